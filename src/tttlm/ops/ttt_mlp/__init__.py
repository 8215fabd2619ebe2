"""TTT-MLP (Sun et al. 2024, arXiv 2407.04620): the public op and its one-token step.

Backends: Triton kernels on CUDA (`triton_chunk`, `triton_chunk_bwd`, `triton_step`) where they support the
shapes, else the dual-form PyTorch path (`chunked`, any device). Both are tested against
`reference.ttt_mlp_ref`.
"""

from __future__ import annotations

from torch import Tensor

from tttlm.ops.backend import use_triton
from tttlm.ops.state import TTTMLPState
from tttlm.ops.ttt_common import check_ttt_inputs, compute_dtype
from tttlm.ops.ttt_mlp.chunked import MLP, ttt_mlp_chunked, ttt_mlp_step_recurrent

KERNELS = "tttlm.ops.ttt_mlp.triton_parts"


def ttt_mlp(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor, ln_bias: Tensor, state: TTTMLPState, *,
    mini_batch_size: int = 16, token_scale: Tensor | None = None, eps: float = 1e-6,
    cu_seqlens: Tensor | None = None, output_final_state: bool = False, backend: str | None = None,
) -> tuple[Tensor, TTTMLPState | None]:
    """TTT-MLP over whole sequences: `tttlm.ops.ttt_linear` with the inner model
    f(x) = x + LN(gelu_tanh(x W1 + b1) W2 + b2), W1 [D, 4D], W2 [4D, D].

    q, k, v [B, T, H, D]; eta [B, T, H] >= 0; ln_weight, ln_bias [H, D]; state: TTTMLPState with N rows
    (`TTTMLPState.start(W1, b1, W2, b2)`: [N,H,D,4D], [N,H,4D], [N,H,4D,D], [N,H,D]); token_scale
    [mini_batch_size] or None (1/(i+1)); cu_seqlens int64 [N+1] with B == 1; backend None picks the Triton
    kernels on CUDA (while `tttlm.fast` allows them) where they support the shapes (head dim a multiple of 4
    from 36 to 128, the widths verified on a GPU: `triton_parts.CHUNK_WIDTHS_ON_CUDA`; mini-batch 16; 16- or
    32-bit floats), else PyTorch; "triton" or "torch" forces one. Returns o [B, T, H, D] in q's dtype and the
    final TTTMLPState (float32, or float64 for float64 inputs) if output_final_state, else None.
    """
    check_ttt_inputs(q, k, v, eta, ln_weight, ln_bias, state, TTTMLPState, MLP.param_shapes, mini_batch_size,
                     token_scale, cu_seqlens)
    kwargs = dict(mini_batch_size=mini_batch_size, token_scale=token_scale, eps=eps, cu_seqlens=cu_seqlens,
                  output_final_state=output_final_state)
    if use_triton(backend, KERNELS, q=q, mini_batch_size=mini_batch_size):
        from tttlm.ops.ttt_mlp.triton_chunk import ttt_mlp_triton

        return ttt_mlp_triton(q, k, v, eta, ln_weight, ln_bias, state, **kwargs)
    return ttt_mlp_chunked(q, k, v, eta, ln_weight, ln_bias, state, **kwargs)


def ttt_mlp_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, eta_t: Tensor, ln_weight: Tensor, ln_bias: Tensor, state: TTTMLPState,
    *, mini_batch_size: int = 16, token_scale: Tensor | None = None, eps: float = 1e-6, backend: str | None = None,
    inplace: bool = False,
) -> tuple[Tensor, TTTMLPState]:
    """One token of TTT-MLP: equal to `ttt_mlp` read token by token. q_t, k_t, v_t [B, H, D], eta_t [B, H], the
    rest as in `ttt_mlp` (but its Triton kernel runs on CUDA at every head dim up to 128). Returns o_t [B, H, D] and
    the new state. inplace: as in `tttlm.ops.ttt_linear_step`, the new state written into `state` (contiguous,
    float32 or float64 for float64 inputs, no grad), which is returned."""
    check_ttt_inputs(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, TTTMLPState, MLP.param_shapes,
                     mini_batch_size, token_scale, None, step=True)
    if inplace:
        state.check_in_place(compute_dtype(q_t.dtype))
    kwargs = dict(mini_batch_size=mini_batch_size, token_scale=token_scale, eps=eps, inplace=inplace)
    if use_triton(backend, KERNELS, q=q_t, mini_batch_size=mini_batch_size):
        from tttlm.ops.ttt_mlp.triton_step import ttt_mlp_step_triton

        return ttt_mlp_step_triton(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, **kwargs)
    return ttt_mlp_step_recurrent(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, **kwargs)
