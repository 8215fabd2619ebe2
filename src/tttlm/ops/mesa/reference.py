"""The Mesa recurrence token by token with an exact solve: the spec every fast path is checked against.

von Oswald et al. 2025 (arXiv 2506.05233), the Mesa layer: per batch element and head,
    H_t = e^{g_t} H_{t-1} + beta_t k_t k_t^T,   G_t = e^{g_t} G_{t-1} + beta_t k_t v_t^T,
    o_t = G_t^T (H_t + diag(lamb))^{-1} q_t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tttlm.ops.state import MesaState


def mesa_ref(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, state: MesaState | None = None
) -> tuple[Tensor, MesaState]:
    """q, k [B,T,H,D], v [B,T,H,Dv], g, beta [B,T,H], lamb [H,D]; state (h_kk [B,H,D,D], h_kv [B,H,D,Dv]) or
    None for zeros.

    Returns o [B,T,H,Dv] and the final state, both float64 for float64 q, float32 otherwise.
    The initial h_kk enters through its symmetric part, as in every path of this op.
    """
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, D = q.shape
    q, k, v, g, beta, lamb = (t.to(dt) for t in (q, k, v, g, beta, lamb))
    if state is None:
        h_kk = q.new_zeros(B, H, D, D)
        h_kv = q.new_zeros(B, H, D, v.shape[-1])
    else:
        h_kk = (state.h_kk.to(dt) + state.h_kk.to(dt).mT) / 2
        h_kv = state.h_kv.to(dt)
    outputs = []
    for t in range(T):
        decay = g[:, t].exp()[..., None, None]
        scaled_k = (beta[:, t, :, None] * k[:, t]).unsqueeze(-1)
        h_kk = decay * h_kk + scaled_k * k[:, t].unsqueeze(-2)
        h_kv = decay * h_kv + scaled_k * v[:, t].unsqueeze(-2)
        x = torch.linalg.solve(h_kk + torch.diag_embed(lamb), q[:, t])
        outputs.append((h_kv.mT @ x.unsqueeze(-1)).squeeze(-1))
    return torch.stack(outputs, dim=1), MesaState(h_kk, h_kv)
