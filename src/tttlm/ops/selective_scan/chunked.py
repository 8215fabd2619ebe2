"""The selective scan in PyTorch for any device: chunkwise, exact, differentiable by autograd; and one step.

A sequence is cut into chunks of `chunk_size` tokens. All chunks run the recurrence at once from their own
start (chunk_size steps on [B, chunks, E, N] tensors), then one pass over the chunk boundaries carries each
chunk's entering state, whose part in token t of a chunk is exp(A * sum of delta since the chunk start) (never
more than 1: the decay of a real state). That is chunk_size + T / chunk_size sequential steps instead of T,
with nothing that can overflow. Packed documents (cu_seqlens) restart at their first token from their own
initial state; states never cross a document start.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and reductions: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_sizes(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """delta (+ delta_bias), through softplus when asked, in dtype."""
    d = delta.to(dtype)
    if delta_bias is not None:
        d = d + delta_bias.to(dtype)
    return F.softplus(d) if delta_softplus else d


def selective_scan_chunked(
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
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor | None]:
    """Arguments as `tttlm.ops.selective_scan` (checked there). Returns y [Bt,T,E] in u's dtype and the final
    states [S,E,N] (float32, float64 for float64 u) or None."""
    Bt, T, E = u.shape
    N = A.shape[1]
    cdt = compute_dtype(u.dtype)
    dev = u.device
    L = chunk_size
    nc = max(1, math.ceil(T / L))
    pad = nc * L - T
    dt = step_sizes(delta, delta_bias, delta_softplus, cdt)

    # which sequence each token belongs to, and where sequences start and end
    start = torch.zeros(Bt, T, dtype=torch.bool, device=dev)
    if cu_seqlens is None:
        seq = torch.arange(Bt, device=dev)[:, None].expand(Bt, T)
        start[:, 0] = True
        ends = (torch.arange(Bt, device=dev), torch.full((Bt,), T - 1, device=dev))
    else:
        cu = cu_seqlens.to(dev, torch.long)
        seq = torch.searchsorted(cu[1:], torch.arange(T, device=dev), right=True)[None]
        start[0, cu[:-1]] = True
        ends = (torch.zeros_like(cu[1:]), cu[1:] - 1)

    def chunks(t: Tensor) -> Tensor:  # [Bt, T, ...] -> [Bt, nc, L, ...]; padding: delta = 0, nothing starts
        if pad:
            t = torch.cat([t, t.new_zeros(Bt, pad, *t.shape[2:])], dim=1)
        return t.reshape(Bt, nc, L, *t.shape[2:])

    dtc, uc, Bc, Cc = (chunks(t.to(cdt)) for t in (dt, u, B, C))
    st, sq = chunks(start), chunks(seq)
    Af = A.to(cdt)
    h0 = None if initial_state is None else initial_state.to(cdt)

    # every chunk from its own start; a sequence start replaces the carried state by that sequence's own
    local = u.new_zeros(Bt, nc, E, N, dtype=cdt)
    ys, states = [], []
    for lpos in range(L):
        s = st[:, :, lpos, None, None]
        prev = local.masked_fill(s, 0.0) if h0 is None else torch.where(s, h0[sq[:, :, lpos]], local)
        decay = torch.exp(dtc[:, :, lpos, :, None] * Af)
        local = decay * prev + (dtc[:, :, lpos] * uc[:, :, lpos])[..., None] * Bc[:, :, lpos, None, :]
        ys.append(torch.einsum("bcen,bcn->bce", local, Cc[:, :, lpos]))
        if output_final_state:
            states.append(local)
    y = torch.stack(ys, dim=2)  # [Bt, nc, L, E]

    # decay of the entering state through token l of its chunk, zero from the chunk's first sequence start on
    carried = (torch.cumsum(st.to(torch.int32), dim=2) == 0).to(cdt)  # [Bt, nc, L]
    P = torch.exp(torch.cumsum(dtc, dim=2)[..., None] * Af) * carried[..., None, None]  # [Bt, nc, L, E, N]
    entering = [local.new_zeros(Bt, E, N)]  # every row starts a sequence at t = 0
    for c in range(nc - 1):
        entering.append(P[:, c, -1] * entering[-1] + local[:, c])
    h_in = torch.stack(entering, dim=1)  # [Bt, nc, E, N]
    y = y + torch.einsum("bcln,bclen,bcen->bcle", Cc, P, h_in)
    y = y.reshape(Bt, nc * L, E)[:, :T]
    if D is not None:
        y = y + u.to(cdt) * D.to(cdt)
    final = None
    if output_final_state:
        b, t = ends
        c, lpos = t // L, t % L
        final = torch.stack(states, dim=2)[b, c, lpos] + P[b, c, lpos] * h_in[b, c]
    return y.to(u.dtype), final


def selective_scan_step_torch(
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None,
    *,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One token: u_t, delta_t [Bt,E], B_t, C_t [Bt,N], state [Bt,E,N] or None (zeros). Returns y_t [Bt,E] in
    u_t's dtype and the new state (float32, float64 for float64 u_t)."""
    cdt = compute_dtype(u_t.dtype)
    dt = step_sizes(delta_t, delta_bias, delta_softplus, cdt)
    h = (dt * u_t.to(cdt))[..., None] * B_t.to(cdt)[:, None, :]
    if state is not None:
        h = h + torch.exp(dt[..., None] * A.to(cdt)) * state.to(cdt)
    y = (h @ C_t.to(cdt)[..., None])[..., 0]
    if D is not None:
        y = y + u_t.to(cdt) * D.to(cdt)
    return y.to(u_t.dtype), h
