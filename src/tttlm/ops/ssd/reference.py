"""The spec of the SSD: the recurrence token by token (`ssd_ref`), and one token of it for decoding (`ssd_step`)."""

from __future__ import annotations

import torch
from torch import Tensor

from tttlm.ops.ssd.checks import check, check_state, compute_dtype, heads


def ssd_step(
    x_t: Tensor, dt_t: Tensor, A: Tensor, B_t: Tensor, C_t: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token of `ssd`: x_t [Bt, H, P], dt_t [Bt, H], A [H], B_t, C_t [Bt, G, N], state [Bt, H, P, N]
    or None.

    Returns y_t [Bt, H, P] in x_t's dtype and the new state (float32; float64 for float64 x_t).
    """
    H, P, G, N = check(x_t, dt_t, A, B_t, C_t, step=True)
    check_state(state, x_t.shape[0], H, P, N, "state")
    cdt = compute_dtype(x_t.dtype)
    if state is None:
        state = x_t.new_zeros(x_t.shape[0], H, P, N, dtype=cdt)
    dt = dt_t.to(cdt)
    Bh, Ch = heads(B_t.to(cdt), H), heads(C_t.to(cdt), H)  # [Bt, H, N]
    decay = torch.exp(dt * A.to(cdt))[..., None, None]
    state = decay * state.to(cdt) + (dt[..., None] * x_t.to(cdt))[..., None] * Bh[:, :, None, :]
    y = (state @ Ch[..., None])[..., 0]
    return y.to(x_t.dtype), state


def ssd_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The spec: the recurrence token by token, in the inputs' dtype (tests use float64). Arguments as `ssd`;
    with cu_seqlens the state restarts from zero at each document start. Returns y and the last state."""
    H, P, G, N = check(x, dt, A, B, C, step=False)
    Bt, T = x.shape[:2]
    starts = set() if cu_seqlens is None else set(cu_seqlens.tolist())
    h = x.new_zeros(Bt, H, P, N) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        if t in starts:
            h = torch.zeros_like(h)
        Bh, Ch = heads(B[:, t], H), heads(C[:, t], H)
        a = torch.exp(dt[:, t] * A)[..., None, None]
        h = a * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch))
    return torch.stack(ys, dim=1), h
