"""Mesa's decode step on the GPU: one token of every (sequence, head) per program, the new states and the CG
solve on chip (one launch, no host synchronisation per CG step). In place (INPLACE: the new states' pointers are
the old ones'), a program reads its (sequence, head)'s states, h_kk twice (the symmetric part), before a barrier and
writes them after it; no element is shared between programs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.mesa.checks import io_dtypes
from tttlm.ops.mesa.triton_solve import _lamb
from tttlm.ops.state import MesaState
from tttlm.ops.ttt_linear.triton_parts import block_d, new

# Warps per program by on-chip head dim.
NUM_WARPS = {16: 2, 32: 2, 64: 4, 128: 8}


@triton.jit
def _mesa_step_kernel(
    Q, K, V, G, BETA, LAMB, HKK, HKV, O, HKK1, HKV1, STEPS, RESID, tol2, max_iter, H,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_STATE: tl.constexpr, STATS: tl.constexpr, INPLACE: tl.constexpr,
):
    """Row program_id(0) = b * H + h: H1 = e^g sym(H) + beta k k^T, G1 = e^g G + beta k v^T (HKK1 [B,H,D,D],
    HKV1 [B,H,D,DV], float32), o = G1^T (H1 + diag(lamb))^-1 q (O [B,H,DV]), the solve by CG from the Jacobi
    guess with `_cg`'s stopping rule; with STATS the steps taken (STEPS [B*H]) and the true relative residual
    (RESID [B*H])."""
    row = tl.program_id(0)
    h = row % H
    d = tl.arange(0, BD)
    e = tl.arange(0, BDV)
    dm = d < D
    em = e < DV
    q = tl.load(Q + row * D + d, mask=dm, other=0.0).to(tl.float32)
    k = tl.load(K + row * D + d, mask=dm, other=0.0).to(tl.float32)
    v = tl.load(V + row * DV + e, mask=em, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(G + row).to(tl.float32))
    beta = tl.load(BETA + row).to(tl.float32)
    lamb = _lamb(LAMB, h, D, BD)
    base = row.to(tl.int64) * D
    hm = dm[:, None] & dm[None, :]
    gm = dm[:, None] & em[None, :]
    Hn = beta * k[:, None] * k[None, :]
    Gn = beta * k[:, None] * v[None, :]
    if HAS_STATE:
        Hs = tl.load(HKK + base * D + d[:, None] * D + d[None, :], mask=hm, other=0.0)
        Hs += tl.load(HKK + base * D + d[None, :] * D + d[:, None], mask=hm, other=0.0)
        Hn += (0.5 * decay) * Hs
        Gn += decay * tl.load(HKV + base * DV + d[:, None] * DV + e[None, :], mask=gm, other=0.0)
    if INPLACE:  # every thread's loads (h_kk's element (i, j) by two threads) before any thread's stores
        tl.debug_barrier()
    tl.store(HKK1 + base * D + d[:, None] * D + d[None, :], Hn, mask=hm)
    tl.store(HKV1 + base * DV + d[:, None] * DV + e[None, :], Gn, mask=gm)
    # Hn is symmetric: H p is summed over rows, so that p and H p share the layout of a column of Hn
    diag = tl.sum(tl.where(d[:, None] == d[None, :], Hn, 0.0), 0) + lamb
    x = q / diag
    r = q - tl.sum(Hn * x[:, None], 0) - lamb * x
    p = r
    rr = tl.sum(r * r, 0)
    rr0 = rr
    active = rr > tol2 * rr0
    steps = 0
    while (steps < max_iter) & active:
        ap = tl.sum(Hn * p[:, None], 0) + lamb * p
        pap = tl.sum(p * ap, 0)
        alpha = tl.where(pap != 0, rr / tl.where(pap != 0, pap, 1.0), 0.0)
        x += alpha * p
        r -= alpha * ap
        rr_next = tl.sum(r * r, 0)
        p = r + (rr_next / tl.where(rr != 0, rr, 1.0)) * p
        rr = rr_next
        steps += 1
        active = rr > tol2 * rr0
    if STATS:
        res = q - tl.sum(Hn * x[:, None], 0) - lamb * x
        tl.store(RESID + row, tl.where(rr0 > 0, tl.sqrt(tl.sum(res * res, 0) / tl.where(rr0 > 0, rr0, 1.0)), 0.0))
        tl.store(STEPS + row, steps)
    o = tl.sum(Gn * x[:, None], 0)
    tl.store(O + row * DV + e, o.to(O.dtype.element_ty), mask=em)


def mesa_step_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    state: MesaState | None,
    *,
    cg_max_iter: int,
    cg_tol: float | None,
    cg_stats: dict | None = None,
    inplace: bool = False,
) -> tuple[Tensor, MesaState]:
    """See `tttlm.ops.mesa.mesa_step`; inputs are assumed checked and `triton_chunk.supports(q, k, v, None)` (with
    inplace, the state too: `MesaState.check_in_place`).

    q, k [B,H,D], v [B,H,Dv], g, beta [B,H], lamb [H,D]. Returns o [B,H,Dv] in the promoted dtype of q, k, v
    and the new state (float32), or `state` itself written over with inplace. Not differentiable: with gradients
    wanted, the PyTorch step runs.
    """
    tensors = (q, k, v, g, beta, lamb) + (() if state is None else (state.h_kk, state.h_kv))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        from tttlm.ops.mesa.step import mesa_step_dense

        return mesa_step_dense(q, k, v, g, beta, lamb, state, cg_max_iter=cg_max_iter, cg_tol=cg_tol,
                               cg_stats=cg_stats, inplace=inplace)
    B, H, D = q.shape
    Dv = v.shape[-1]
    dev = q.device
    out_dtype, _ = io_dtypes(q, k, v)
    o = new((B, H, Dv), out_dtype, dev)
    if inplace:
        out = state
    else:
        out = MesaState(new((B, H, D, D), torch.float32, dev), new((B, H, D, Dv), torch.float32, dev))
    stats = cg_stats is not None
    steps = torch.full((B * H,), -1, dtype=torch.int32, device=dev) if stats else o
    resid = new((B * H,), torch.float32, dev) if stats else o
    _mesa_step_kernel[(B * H,)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), lamb.contiguous(),
        *((out.h_kk, out.h_kv) if state is None else (t.float().contiguous() for t in (state.h_kk, state.h_kv))),
        o, out.h_kk, out.h_kv, steps, resid,
        -1.0 if cg_tol is None else float(cg_tol) ** 2, cg_max_iter, H,
        D=D, DV=Dv, BD=block_d(D), BDV=block_d(Dv), HAS_STATE=state is not None, STATS=stats, INPLACE=inplace,
        num_warps=NUM_WARPS[block_d(D)],
    )
    if stats:
        cg_stats["iterations"] = int(steps.max())
        cg_stats["mean_iterations"] = steps.float().mean().item()
        cg_stats["residual"] = resid.view(B, H)
    return o, out
