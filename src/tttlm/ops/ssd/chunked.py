"""The SSD in PyTorch, chunkwise (state space duality, §6 of the paper): inside a chunk, a masked "attention"
with the decay matrix; across chunks, a recurrence on the chunk-end states. Any device, any float dtype."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tttlm.ops.ssd.checks import compute_dtype, heads


def ssd_chunked(
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
    """`tttlm.ops.ssd` in PyTorch (arguments checked there)."""
    H, P = x.shape[-2:]
    N = B.shape[-1]
    Bt, T = x.shape[:2]
    cdt = compute_dtype(x.dtype)
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
    Bh, Ch = heads(chunks(B), H), heads(chunks(C), H)  # [Bt, nc, L, H, N]
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
        state = document_end_states(x, dt, A, B, cu_seqlens, S_in[0], L)
    return y, (state if output_final_state else None)


def document_end_states(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, cu_seqlens: Tensor, S_in: Tensor, chunk_size: int
) -> Tensor:
    """The state after each document's last token of a packed row (both paths of `ssd` end with it).

    x [1, T, H, P], dt [1, T, H], A [H], B [1, T, G, N] as `ssd` takes them; cu_seqlens [D+1]; S_in
    [chunks, H, P, N] the state entering each chunk of `chunk_size` tokens (float32, or float64). Document d ends
    at e = cu_seqlens[d+1] - 1, in chunk c = e // L at l = e % L; with cs the log decay summed from the chunk start,
        h_e = [d is open at the chunk start] exp(cs_l) S_in[c] + sum_{j <= l in d} exp(cs_l - cs_j) dt_j x_j B_j^T.
    Returns [D, H, P, N] in S_in's dtype (differentiable w.r.t. every input, S_in included).
    """
    H = x.shape[2]
    T, L = x.shape[1], chunk_size
    cdt = S_in.dtype
    cu = cu_seqlens.to(x.device)
    ends = cu[1:] - 1
    c, at = ends // L, ends % L
    t = c[:, None] * L + torch.arange(L, device=x.device)  # [D, L]: the tokens of each document's last chunk
    mine = (t >= cu[:-1, None]) & (t <= ends[:, None])
    t = t.clamp_max(T - 1)  # tokens past T are no document's
    dtc = dt[0, t].to(cdt) * mine[..., None]  # [D, L, H]
    cs = torch.cumsum(dtc * A.to(cdt), dim=1)
    doc = torch.arange(ends.numel(), device=x.device)
    cs_end = cs[doc, at]  # [D, H]
    # masked before exp: past the document's end cs_l - cs_j may be positive and overflow
    w = torch.exp(torch.where(mine[..., None], cs_end[:, None] - cs, torch.full_like(cs, -math.inf)))
    xs = x[0, t].to(cdt) * dtc[..., None]  # [D, L, H, P]
    local = torch.einsum("dlh,dlhp,dlhn->dhpn", w, xs, heads(B[0, t].to(cdt), H))
    carried = cu[:-1] <= (c * L - 1).clamp_min(0)  # the document began before its last chunk (or is the first)
    return (torch.exp(cs_end) * carried[:, None])[..., None, None] * S_in[c] + local
