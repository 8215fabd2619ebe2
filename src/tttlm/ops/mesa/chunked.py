"""Mesa, chunkwise: states H, G exist only at chunk boundaries; the queries of all chunks are solved at once.

Inside a chunk with start states (H0, G0) and Gamma_t = sum of g over the chunk's tokens up to t,
    H_t x = e^{Gamma_t} H0 x + sum_{s<=t} e^{Gamma_t - Gamma_s} beta_s k_s (k_s^T x),
so for the chunk's queries X [C,D] (one per row) all products are  e^{Gamma} * (X H0) + ((X K^T) * M) K  with
M[t,s] = e^{Gamma_t - Gamma_s} beta_s for s <= t, else 0. Conjugate gradient runs on all chunks' queries in
parallel (they only need the boundary states), and o_t = G_t^T x_t follows the same pattern with G0 and V.
Inputs are laid out as [S, H, NC, C, ...] (rows, heads, chunks, positions); a packed batch (cu_seqlens) is one
row whose sequences each start on a fresh chunk, padded with tokens that leave the state unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from tttlm.ops.mesa.checks import io_dtypes
from tttlm.ops.mesa.solve import implicit_solve
from tttlm.ops.state import MesaState


@dataclass
class _Layout:
    """Where tokens go in the chunked layout, and where each sequence's state starts and ends.

    index [T] (packed batches only): position of each token in the row of NC * C slots.
    The initial and final states are split into pieces of `piece_rows` rows, one piece per sequence (or all B
    rows at once): starts maps a chunk to the piece that begins there, ends a chunk to the piece it ends.
    """

    rows: int
    chunks: int
    size: int
    index: Tensor | None
    piece_rows: int
    starts: dict[int, int]
    ends: dict[int, int]


def _layout(B: int, T: int, chunk_size: int, cu_seqlens: Tensor | None, device: torch.device) -> _Layout:
    if cu_seqlens is None:
        size = min(chunk_size, T)
        chunks = -(-T // size)
        return _Layout(B, chunks, size, None, B, {0: 0}, {chunks - 1: 0})
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    size = min(chunk_size, max(lengths))
    first = 0
    starts, ends, pieces = {}, {}, []
    for i, n in enumerate(lengths):
        starts[first] = i
        pieces.append(torch.arange(first * size, first * size + n))
        first += -(-n // size)
        ends[first - 1] = i
    return _Layout(1, first, size, torch.cat(pieces).to(device), 1, starts, ends)


def _to_chunks(x: Tensor, lay: _Layout) -> Tensor:
    """[B,T,H,F] -> [S,H,NC,C,F], padded with zeros."""
    B, T, H, Fdim = x.shape
    if lay.index is None:
        x = F.pad(x, (0, 0, 0, 0, 0, lay.chunks * lay.size - T))
    else:
        x = x.new_zeros(1, lay.chunks * lay.size, H, Fdim).index_copy(1, lay.index, x)
    return x.view(lay.rows, lay.chunks, lay.size, H, Fdim).permute(0, 3, 1, 2, 4).contiguous()


def _from_chunks(y: Tensor, lay: _Layout, T: int) -> Tensor:
    """[S,H,NC,C,F] -> [B,T,H,F]."""
    y = y.permute(0, 2, 3, 1, 4).reshape(lay.rows, lay.chunks * lay.size, y.shape[1], y.shape[-1])
    return y[:, :T] if lay.index is None else y.index_select(1, lay.index)


class _ChunkScan(torch.autograd.Function):
    """States at every chunk start: start_c = a_{c-1} start_{c-1} + U_{c-1}, or a piece of `init` where a
    sequence begins; the backward is the same recurrence run in reverse.

    chunk_decay [S,H,NC,1,1] (a_c), updates [S,H,NC,D,F] (U_c), init [N,H,D,F] ->
    starts [S,H,NC,D,F], finals [N,H,D,F] (the state after each sequence's last chunk).
    Only the starts are kept for the backward: one D x F matrix per chunk.
    """

    @staticmethod
    def forward(ctx, chunk_decay, updates, init, lay):
        starts = torch.full_like(updates, float("nan"))  # every slot is written below
        pieces = init.split(lay.piece_rows)
        finals = [None] * len(pieces)
        for c in range(lay.chunks):
            if c in lay.starts:
                starts[:, :, c] = pieces[lay.starts[c]]
            if c in lay.ends:
                finals[lay.ends[c]] = torch.addcmul(updates[:, :, c], chunk_decay[:, :, c], starts[:, :, c])
            else:
                torch.addcmul(updates[:, :, c], chunk_decay[:, :, c], starts[:, :, c], out=starts[:, :, c + 1])
        ctx.lay = lay
        ctx.save_for_backward(chunk_decay, starts)
        return starts, torch.cat(finals, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dstarts, dfinals):
        chunk_decay, starts = ctx.saved_tensors
        lay = ctx.lay
        dfinal_pieces = dfinals.split(lay.piece_rows)
        dinit = [None] * len(dfinal_pieces)
        # dupdates[:, :, c] is also the gradient of the state after chunk c, which the loop carries backwards.
        dupdates = torch.full_like(starts, float("nan"))
        for c in reversed(range(lay.chunks)):
            if c in lay.ends:
                dupdates[:, :, c] = dfinal_pieces[lay.ends[c]]
            if c in lay.starts:
                dinit[lay.starts[c]] = torch.addcmul(dstarts[:, :, c], chunk_decay[:, :, c], dupdates[:, :, c])
            else:
                torch.addcmul(dstarts[:, :, c], chunk_decay[:, :, c], dupdates[:, :, c], out=dupdates[:, :, c - 1])
        ddecay = dupdates.flatten(-2).unsqueeze(-2) @ starts.flatten(-2).unsqueeze(-1)  # [S,H,NC,1,1]
        return ddecay, dupdates, torch.cat(dinit, 0), None


def _apply_h(x: Tensor, h0: Tensor, decay: Tensor, k: Tensor, mix: Tensor) -> Tensor:
    """H_t x_t for every query of every chunk.

    x, k [S,H,NC,C,D]; h0 [S,H,NC,D,D]; decay [S,H,NC,C]; mix [S,H,NC,C,C].
    """
    return torch.addcmul(((x @ k.mT) * mix) @ k, decay.unsqueeze(-1), x @ h0)


def mesa_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    state: MesaState | None = None,
    *,
    chunk_size: int = 64,
    cg_max_iter: int = 30,
    cg_tol: float | None = None,
    cu_seqlens: Tensor | None = None,
    output_final_state: bool = False,
    cg_stats: dict | None = None,
) -> tuple[Tensor, MesaState | None]:
    """The chunkwise Mesa op on validated inputs; see `tttlm.ops.mesa.mesa` for the contract."""
    out_dtype, dt = io_dtypes(q, k, v)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    lay = _layout(B, T, chunk_size, cu_seqlens, q.device)
    n_states = B if cu_seqlens is None else cu_seqlens.numel() - 1

    qc, kc, vc = (_to_chunks(t.to(dt), lay) for t in (q, k, v))
    gc, bc = (_to_chunks(t.to(dt).unsqueeze(-1), lay).squeeze(-1) for t in (g, beta))
    lamb_b = lamb.to(dt).view(1, H, 1, 1, D)

    gamma = gc.cumsum(-1)  # [S,H,NC,C]
    decay = gamma.exp()
    causal = torch.ones(lay.size, lay.size, dtype=torch.bool, device=q.device).tril()
    # Mask before exp: above the diagonal Gamma_t - Gamma_s > 0 could overflow.
    gaps = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    mix = gaps.exp() * bc.unsqueeze(-2)  # [S,H,NC,C,C]
    to_end = (gamma[..., -1:] - gamma).exp() * bc  # [S,H,NC,C]
    chunk_decay = decay[..., -1, None, None]  # [S,H,NC,1,1]
    # H and G share the decay, so one scan carries [H | G] of shape [D, D + Dv].
    updates = (kc * to_end.unsqueeze(-1)).mT @ torch.cat([kc, vc], -1)  # [S,H,NC,D,D+Dv]

    if state is None:
        init = q.new_zeros(n_states, H, D, D + Dv, dtype=dt)
    else:
        h_kk = state.h_kk.to(dt)
        init = torch.cat([(h_kk + h_kk.mT) / 2, state.h_kv.to(dt)], -1)
    start, end = _ChunkScan.apply(chunk_decay, updates, init, lay)  # [S,H,NC,D,D+Dv], [N,H,D,D+Dv]
    h0, g0 = start[..., :D], start[..., D:]

    diag = decay.unsqueeze(-1) * h0.diagonal(dim1=-2, dim2=-1).unsqueeze(-2) + mix @ (kc * kc) + lamb_b
    x = implicit_solve(_apply_h, qc, diag, lamb_b, (h0, decay, kc, mix), cg_max_iter, cg_tol, cg_stats)
    o = decay.unsqueeze(-1) * (x @ g0) + ((x @ kc.mT) * mix) @ vc
    if cg_stats is not None:
        cg_stats["residual"] = cg_stats["residual"].amax(dim=(-2, -1))
        cg_stats["mean_iterations"] = cg_stats.pop("steps").sum().item() / (B * T * H)  # padding takes none
    o = _from_chunks(o, lay, T).to(out_dtype)

    final = MesaState(end[..., :D].contiguous(), end[..., D:].contiguous()) if output_final_state else None
    return o, final
