"""The selective scan of Mamba (Gu & Dao 2023, arXiv 2312.00752, §3.2 and Algorithm 2) token by token: the
spec every fast path is checked against.

Per sequence, channel e and state n (zero-order-hold discretisation of A, Euler step for B, as in the paper):
    delta_t = softplus(delta_t + delta_bias)           (when delta_softplus)
    h_t[e,n] = exp(delta_t[e] A[e,n]) h_{t-1}[e,n] + delta_t[e] B_t[n] u_t[e]
    y_t[e]   = sum_n C_t[n] h_t[e,n] + D[e] u_t[e]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
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
) -> tuple[Tensor, Tensor]:
    """u, delta [Bt,T,E]; A [E,N]; B, C [Bt,T,N]; D, delta_bias [E] or None; initial_state [S,E,N] or None
    (zeros), S = Bt or the number of sequences of cu_seqlens [S+1] (then Bt == 1).

    Computed in u's dtype (the tests pass float64). Returns y [Bt,T,E] and the final states [S,E,N].
    """
    Bt, T, E = u.shape
    if cu_seqlens is None:
        rows = [(b, 0, T) for b in range(Bt)]
    else:
        bounds = cu_seqlens.tolist()
        rows = [(0, a, b) for a, b in zip(bounds, bounds[1:])]
    dt = u.dtype
    if delta_bias is not None:
        delta = delta + delta_bias.to(dt)
    if delta_softplus:
        delta = F.softplus(delta)
    A, B, C, delta = A.to(dt), B.to(dt), C.to(dt), delta.to(dt)
    y = torch.empty_like(u)
    finals = []
    for s, (b, lo, hi) in enumerate(rows):
        h = u.new_zeros(E, A.shape[1]) if initial_state is None else initial_state[s].to(dt)
        for t in range(lo, hi):
            h = torch.exp(delta[b, t, :, None] * A) * h + (delta[b, t] * u[b, t])[:, None] * B[b, t]
            y[b, t] = h @ C[b, t]
        finals.append(h)
    if D is not None:
        y = y + u * D.to(dt)
    return y, torch.stack(finals)
