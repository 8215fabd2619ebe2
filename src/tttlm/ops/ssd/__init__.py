"""Mamba-2's selective state space model (Dao & Gu 2024, arXiv 2405.21060), per batch row and head:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        (state [P, N]: head dim x state dim)
    y_t = h_t C_t                                      ([P])

`ssd` computes it chunkwise with the state-space-duality algorithm (§6 of the paper): Triton kernels on CUDA
(`triton_ssd`), else PyTorch (`chunked`). `reference.ssd_ref` is the token-by-token spec and
`reference.ssd_step` one token of it (decoding); the tests hold every path to the spec.
B and C have G groups shared by H / G heads each. States are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from torch import Tensor

from tttlm.ops.backend import use_triton
from tttlm.ops.ssd.checks import check, check_state
from tttlm.ops.ssd.chunked import ssd_chunked
from tttlm.ops.ssd.reference import ssd_ref, ssd_step

KERNELS = "tttlm.ops.ssd.triton_ssd"


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The SSM over whole sequences, chunkwise.

    Args:
        x: [Bt, T, H, P] inputs; dt: [Bt, T, H] step sizes (>= 0, after the softplus); A: [H] (< 0).
        B, C: [Bt, T, G, N] input and output projections of the state, G groups (G divides H).
        chunk_size: tokens per chunk.
        initial_state: [Bt, H, P, N] or None (zeros).
        cu_seqlens: int64 [N+1], documents packed in one row (Bt == 1): the state is reset to zero at every
            document start. Packed calls take no initial state. Its values are checked off the GPU only
            (reading them there would make the host wait).
        output_final_state: also return the state after the last token, [Bt, H, P, N] (packed: after each
            document's last token, [N, H, P, N], as a prefill of prompts of different lengths hands to decoding).
        backend: None picks the Triton kernels for CUDA tensors (while `tttlm.fast` allows them) at chunk sizes
            they support, else PyTorch; "triton" or "torch" forces one.

    Returns:
        y [Bt, T, H, P] in x's dtype, and the final state (float32; float64 for float64 x) or None.
    """
    H, P, G, N = check(x, dt, A, B, C, step=False)
    Bt, T = x.shape[:2]
    if cu_seqlens is not None:
        if Bt != 1 or cu_seqlens.dim() != 1:
            raise ValueError(f"with cu_seqlens [N+1], x must be one packed row (B == 1), got B = {Bt}")
        if not cu_seqlens.is_cuda and (int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T):
            raise ValueError(f"cu_seqlens must run from 0 to T={T}")
        if initial_state is not None:
            raise ValueError("packed calls (cu_seqlens) take no initial_state")
    check_state(initial_state, Bt, H, P, N, "initial_state")
    kwargs = dict(chunk_size=chunk_size, initial_state=initial_state, cu_seqlens=cu_seqlens,
                  output_final_state=output_final_state)
    if use_triton(backend, KERNELS, x=x, chunk_size=chunk_size):
        from tttlm.ops.ssd.triton_ssd import ssd_triton

        return ssd_triton(x, dt, A, B, C, **kwargs)
    return ssd_chunked(x, dt, A, B, C, **kwargs)


__all__ = ["ssd", "ssd_chunked", "ssd_ref", "ssd_step"]
