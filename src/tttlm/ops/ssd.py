"""Mamba-2's selective state space model (Dao & Gu 2024, arXiv 2405.21060), per batch row and head:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        (state [P, N]: head dim x state dim)
    y_t = h_t C_t                                      ([P])

`ssd` computes it with the chunked state-space-duality algorithm (§6 of the paper): inside a chunk, a masked
"attention" with the decay matrix; across chunks, a recurrence on the chunk-end states. `ssd_step` is one
token of the recurrence (decoding) and `ssd_ref` the token-by-token spec, both tested against each other.
B and C have G groups shared by H / G heads each. States are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, step: bool) -> tuple[int, int, int, int]:
    lead = 1 if step else 2
    want = "[B, H, P]" if step else "[B, T, H, P]"
    if x.dim() != lead + 2:
        raise ValueError(f"x must have shape {want}, got {list(x.shape)}")
    H, P = x.shape[-2:]
    if dt.shape != x.shape[:-1]:
        raise ValueError(f"dt must have shape {list(x.shape[:-1])} (x's without P), got {list(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must have shape [H={H}], got {list(A.shape)}")
    if B.dim() != lead + 2 or B.shape[:lead] != x.shape[:lead] or C.shape != B.shape:
        raise ValueError(
            f"B and C must have shape [{', '.join(map(str, x.shape[:lead]))}, G, N], "
            f"got {list(B.shape)} and {list(C.shape)}"
        )
    G, N = B.shape[-2:]
    if H % G:
        raise ValueError(f"the number of groups G = {G} of B and C must divide the number of heads H = {H}")
    return H, P, G, N


def _check_state(state: Tensor | None, rows: int, H: int, P: int, N: int, name: str) -> None:
    if state is not None and state.shape != (rows, H, P, N):
        raise ValueError(f"{name} must have shape [{rows}, {H}, {P}, {N}], got {list(state.shape)}")


def _heads(t: Tensor, H: int) -> Tensor:
    """[..., G, N] -> [..., H, N], each group shared by H / G consecutive heads."""
    return t.repeat_interleave(H // t.shape[-2], dim=-2)


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
) -> tuple[Tensor, Tensor | None]:
    """The SSM over whole sequences, chunkwise.

    Args:
        x: [Bt, T, H, P] inputs; dt: [Bt, T, H] step sizes (>= 0, after the softplus); A: [H] (< 0).
        B, C: [Bt, T, G, N] input and output projections of the state, G groups (G divides H).
        chunk_size: tokens per chunk.
        initial_state: [Bt, H, P, N] or None (zeros).
        cu_seqlens: int64 [N+1], documents packed in one row (Bt == 1): the state is reset to zero at every
            document start. Packed calls take no initial state.
        output_final_state: also return the state after the last token, [Bt, H, P, N] (packed: after each
            document's last token, [N, H, P, N]).

    Returns:
        y [Bt, T, H, P] in x's dtype, and the final state (float32; float64 for float64 x) or None.
    """
    H, P, G, N = _check(x, dt, A, B, C, step=False)
    Bt, T = x.shape[:2]
    if cu_seqlens is not None:
        if Bt != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"with cu_seqlens, x must be one packed row (B == 1) and cu_seqlens run from 0 to T={T}")
        if initial_state is not None:
            raise ValueError("packed calls (cu_seqlens) take no initial_state")
    _check_state(initial_state, Bt, H, P, N, "initial_state")
    cdt = _compute_dtype(x.dtype)
    L = chunk_size
    nc = max(1, math.ceil(T / L))
    pad = nc * L - T

    # padding tokens have dt = 0: no decay and no input, so the state after them is the state after token T
    def chunks(t: Tensor) -> Tensor:
        t = t.to(cdt)
        if pad:
            t = torch.cat([t, t.new_zeros(Bt, pad, *t.shape[2:])], dim=1)
        return t.reshape(Bt, nc, L, *t.shape[2:])

    if cu_seqlens is None:
        seg = torch.zeros(Bt, T, dtype=torch.long, device=x.device)
    else:
        seg = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=x.device), right=True)[None]
    if pad:
        seg = torch.cat([seg, seg[:, -1:].expand(Bt, pad)], dim=1)
    seg = seg.reshape(Bt, nc, L)

    dtc = chunks(dt)  # [Bt, nc, L, H]
    xs = chunks(x) * dtc[..., None]  # dt_t x_t
    Bh, Ch = _heads(chunks(B), H), _heads(chunks(C), H)  # [Bt, nc, L, H, N]
    cs = torch.cumsum(dtc * A.to(cdt), dim=2)  # log decay from the chunk start through token l, [Bt, nc, L, H]

    # inside a chunk: y_i += sum_{j<=i, same document} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j
    same = (seg[..., :, None] == seg[..., None, :]) & torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    diff = cs[:, :, :, None, :] - cs[:, :, None, :, :]  # [Bt, nc, L(i), L(j), H]
    decay = torch.exp(torch.where(same[..., None], diff, torch.full_like(diff, -math.inf)))
    scores = torch.einsum("bclhn,bcshn->bclsh", Ch, Bh) * decay
    y = torch.einsum("bclsh,bcshp->bclhp", scores, xs)

    # each chunk's own contribution to its end state (tokens of the document still open at the chunk end)
    open_end = (seg == seg[..., -1:])[..., None]  # [Bt, nc, L, 1]
    w_end = torch.exp(cs[:, :, -1:, :] - cs) * open_end
    local = torch.einsum("bclh,bclhp,bclhn->bchpn", w_end, xs, Bh)  # [Bt, nc, H, P, N]

    # across chunks: the state entering chunk c reaches token i only while i is in the same document
    prev_seg = torch.cat([seg[:, :1, 0], seg[:, :-1, -1]], dim=1)  # [Bt, nc]: document of the state entering c
    carried = (seg == prev_seg[..., None])[..., None]  # [Bt, nc, L, 1]
    carry_end = torch.exp(cs[:, :, -1, :]) * carried[:, :, -1]  # [Bt, nc, H]
    state = x.new_zeros(Bt, H, P, N, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = carry_end[:, c, :, None, None] * state + local[:, c]
    S_in = torch.stack(entering, dim=1)  # [Bt, nc, H, P, N]
    y_off = torch.einsum("bclhn,bchpn->bclhp", Ch, S_in) * (torch.exp(cs) * carried)[..., None]
    y = (y + y_off).reshape(Bt, nc * L, H, P)[:, :T].to(x.dtype)
    if output_final_state and cu_seqlens is not None:
        state = _document_end_states(cu_seqlens, L, seg[0], cs[0], xs[0], Bh[0], carried[0, ..., 0], S_in[0])
    return y, (state if output_final_state else None)


def _document_end_states(
    cu_seqlens: Tensor, L: int, seg: Tensor, cs: Tensor, xs: Tensor, Bh: Tensor, carried: Tensor, S_in: Tensor
) -> Tensor:
    """The state after each document's last token e of a packed row, in chunk c = e // L at l = e % L:
    h_e = [state entering c belongs to the document] exp(cs_l) S_in[c] + sum_{j <= l, same document}
    exp(cs_l - cs_j) dt_j x_j B_j^T. Arguments are ssd's per-chunk tensors of the one row ([nc, L, ...]).
    Returns [N, H, P, N]."""
    ends = cu_seqlens[1:] - 1
    c, at = ends // L, ends % L
    doc = torch.arange(ends.numel(), device=ends.device)
    cs_c = cs[c]  # [N, L, H]
    cs_end = cs_c[doc, at]  # [N, H]
    # the chunk's tokens of the document (those after its end belong to the next one, or are padding with dt = 0);
    # masked before exp: past the document's end cs_l - cs_j >= 0 could overflow
    mine = (seg[c] == doc[:, None])[..., None]  # [N, L, 1]
    w = torch.exp(torch.where(mine, cs_end[:, None] - cs_c, torch.full_like(cs_c, -math.inf)))
    local = torch.einsum("nlh,nlhp,nlhs->nhps", w, xs[c], Bh[c])
    carry = torch.exp(cs_end) * carried[c, at][:, None]  # [N, H]
    return carry[..., None, None] * S_in[c] + local


def ssd_step(
    x_t: Tensor, dt_t: Tensor, A: Tensor, B_t: Tensor, C_t: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token of `ssd`: x_t [Bt, H, P], dt_t [Bt, H], A [H], B_t, C_t [Bt, G, N], state [Bt, H, P, N]
    or None.

    Returns y_t [Bt, H, P] in x_t's dtype and the new state (float32; float64 for float64 x_t).
    """
    H, P, G, N = _check(x_t, dt_t, A, B_t, C_t, step=True)
    _check_state(state, x_t.shape[0], H, P, N, "state")
    cdt = _compute_dtype(x_t.dtype)
    if state is None:
        state = x_t.new_zeros(x_t.shape[0], H, P, N, dtype=cdt)
    dt = dt_t.to(cdt)
    Bh, Ch = _heads(B_t.to(cdt), H), _heads(C_t.to(cdt), H)  # [Bt, H, N]
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
    H, P, G, N = _check(x, dt, A, B, C, step=False)
    Bt, T = x.shape[:2]
    starts = set() if cu_seqlens is None else set(cu_seqlens.tolist())
    h = x.new_zeros(Bt, H, P, N) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        if t in starts:
            h = torch.zeros_like(h)
        Bh, Ch = _heads(B[:, t], H), _heads(C[:, t], H)
        a = torch.exp(dt[:, t] * A)[..., None, None]
        h = a * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch))
    return torch.stack(ys, dim=1), h
