"""Mamba's selective scan (Gu & Dao 2023, arXiv 2312.00752, §3.2): a diagonal linear recurrence whose step
size delta and projections B, C depend on the input.

Per sequence, channel e and state n:
    h_t[e,n] = exp(delta_t[e] A[e,n]) h_{t-1}[e,n] + delta_t[e] B_t[n] u_t[e]
    y_t[e]   = sum_n C_t[n] h_t[e,n] + D[e] u_t[e]
with delta optionally shifted by delta_bias and passed through softplus first (as the Mamba layer does).
Backends: Triton kernels (`triton_scan`) on CUDA, else the chunked PyTorch path (`chunked`); both are tested
against the token-by-token `reference.selective_scan_ref`. States are float32 whatever the input dtype
(float64 for float64 inputs on the PyTorch path).
"""

from __future__ import annotations

from torch import Tensor

from tttlm.ops.backend import use_triton
from tttlm.ops.selective_scan.checks import check_cu_seqlens, check_inputs, check_state
from tttlm.ops.selective_scan.chunked import selective_scan_chunked, selective_scan_step_torch

__all__ = ["selective_scan", "selective_scan_step"]

KERNELS = "tttlm.ops.selective_scan.triton_scan"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The selective scan over whole sequences.

    Args:
        u: [B,T,E] inputs, one scan per channel e.
        delta: [B,T,E] step sizes (>= 0 after delta_bias and softplus).
        A: [E,N] state matrix (diagonal per channel; < 0 for a decaying state).
        B, C: [B,T,N] input and output projections of the state, shared by all channels.
        D: [E] skip connection, or None.
        delta_bias: [E] added to delta first, or None; delta_softplus: pass delta through softplus.
        initial_state: [S,E,N] or None (zeros); S = B, or the number of sequences with cu_seqlens.
        cu_seqlens: int64 [S+1] boundaries of S sequences packed in one row (B == 1), from 0 to T; each starts
            from its own initial state and ends in its own final state.
        output_final_state: also return the state after the last token of each sequence.
        backend: None picks Triton on CUDA (while `tttlm.fast` allows it), else PyTorch; "triton" or "torch"
            forces one.

    Returns:
        y [B,T,E] in u's dtype, and the final states [S,E,N] (float32; float64 for float64 inputs) or None.
    """
    E, N = check_inputs(u, delta, A, B, C, D, delta_bias, token_dim=True)
    S = check_cu_seqlens(cu_seqlens, u.shape[0], u.shape[1])
    check_state("initial_state", initial_state, S, E, N, u.device)
    kwargs = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, initial_state=initial_state,
                  cu_seqlens=cu_seqlens, output_final_state=output_final_state)
    if use_triton(backend, KERNELS, u=u, N=N):
        from tttlm.ops.selective_scan.triton_scan import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, **kwargs)
    return selective_scan_chunked(u, delta, A, B, C, D, **kwargs)


def selective_scan_step(
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None = None,
    *,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of `selective_scan` (decoding): u_t, delta_t [B,E], B_t, C_t [B,N], state [B,E,N] or None
    (zeros); the rest as `selective_scan`. Returns y_t [B,E] in u_t's dtype and the new state [B,E,N]."""
    E, N = check_inputs(u_t, delta_t, A, B_t, C_t, D, delta_bias, token_dim=False)
    check_state("state", state, u_t.shape[0], E, N, u_t.device)
    return selective_scan_step_torch(u_t, delta_t, A, B_t, C_t, D, delta_bias=delta_bias,
                                     delta_softplus=delta_softplus, state=state)
