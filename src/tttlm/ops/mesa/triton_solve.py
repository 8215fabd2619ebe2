"""Mesa's per-chunk kernels: the forward solve with the output, and the backward's solve with what it yields.

One program per (chunk, head), its start states H0 (and G0) read from the state pass (`triton_scan`), every
query of the chunk solved at once by conjugate gradient on chip (`triton_parts._cg`). See `triton_parts` for
the chunk's algebra; the backward's is in `triton_chunk`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tttlm.ops.mesa.triton_parts import _apply, _cg, _chunk, _gates, _matrix, _rows, _store_rows
from tttlm.ops.ttt_linear.triton_parts import _dot, _dot_acc


@triton.jit
def _chunk_start(STATES, gc, h, H, SW, D: tl.constexpr, BD: tl.constexpr):
    """H0 [BD, BD] of chunk gc (zero padding)."""
    return _matrix(STATES, gc, h, H, SW, 0, D, D, BD, BD, False)


@triton.jit
def _diag(STATES, gc, h, H, SW, M, k, decay, lamb, D: tl.constexpr, BD: tl.constexpr):
    """The diagonals of H_t + diag(lamb) [C, BD], the Jacobi preconditioner: e^Gamma_t diag(H0) +
    sum_{s<=t} M[t, s] k_s^2 + lamb; and the largest entry of diag(H0)."""
    d = tl.arange(0, BD)
    diag0 = tl.load(STATES + (gc * H + h).to(tl.int64) * D * SW + d * (SW + 1), mask=d < D, other=0.0)
    return decay[:, None] * diag0[None, :] + _dot(M, k * k) + lamb[None, :], tl.max(tl.abs(diag0), 0)


@triton.jit
def _operands(K, G, BETA, tok, valid, h, H, D: tl.constexpr, BD: tl.constexpr, C: tl.constexpr):
    """The chunk's keys [C, BD], M [C, C] and decays e^Gamma [C]."""
    gam, _, beta, E = _gates(G, BETA, tok, valid, h, H, C)
    return _rows(K, tok, valid, h, H, D, BD), E * beta[None, :], tl.exp(gam)


@triton.jit
def _lamb(LAMB, h, D: tl.constexpr, BD: tl.constexpr):
    """Head h's lamb [BD], float32, 1 in the padding (where every solve is exactly 0)."""
    d = tl.arange(0, BD)
    return tl.load(LAMB + h * D + d, mask=d < D, other=1.0).to(tl.float32)


@triton.jit
def _solve_fwd_kernel(
    Q, K, V, G, BETA, LAMB, STATES, CU, CHUNK_SEQ, CHUNK_FIRST, O, X, STEPS, RESID,
    tol2, max_iter, H, SW,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr,
    STORE_X: tl.constexpr, STATS: tl.constexpr, FP16: tl.constexpr,
):
    """o = G_t^T (H_t + diag(lamb))^-1 q_t for the queries of chunk gc = program_id(0), head program_id(1).

    Writes o [tokens, H, DV]; with STORE_X the solves x [tokens, H, D] (float32, for the backward); with STATS
    per program the steps taken by its rows, their largest and their sum (STEPS [chunks, H, 2], int32), and the
    largest true relative residual ||q - A x|| / ||q - A x0|| of its rows (RESID [chunks, H]).
    """
    gc = tl.program_id(0)
    h = tl.program_id(1)
    tok, valid = _chunk(CU, CHUNK_SEQ, CHUNK_FIRST, gc, C)
    k, M, decay = _operands(K, G, BETA, tok, valid, h, H, D, BD, C)
    lamb = _lamb(LAMB, h, D, BD)
    q = _rows(Q, tok, valid, h, H, D, BD)
    diag, sh = _diag(STATES, gc, h, H, SW, M, k, decay, lamb, D, BD)
    H0 = _chunk_start(STATES, gc, h, H, SW, D, BD)
    x, rr0, steps = _cg(q, q / diag, H0, sh, k, M, decay, lamb, tol2, max_iter, FP16)
    # what follows loads its operands again rather than keep them in registers through the loop
    tok, valid = _chunk(CU, CHUNK_SEQ, CHUNK_FIRST, gc, C)
    k, M, decay = _operands(K, G, BETA, tok, valid, h, H, D, BD, C)
    if STORE_X:
        _store_rows(X, x, tok, valid, h, H, D, BD)
    if STATS:
        r = _rows(Q, tok, valid, h, H, D, BD) - _apply(x, _chunk_start(STATES, gc, h, H, SW, D, BD), k, M, decay, lamb)
        rel = tl.where(rr0 > 0, tl.sqrt(tl.sum(r * r, 1) / tl.where(rr0 > 0, rr0, 1.0)), 0.0)
        row = gc * H + h
        tl.store(RESID + row, tl.max(tl.where(valid, rel, 0.0), 0))
        tl.store(STEPS + 2 * row, tl.max(steps, 0))
        tl.store(STEPS + 2 * row + 1, tl.sum(steps, 0))
    G0 = _matrix(STATES, gc, h, H, SW, D, D, DV, BD, BDV, False)
    v = _rows(V, tok, valid, h, H, DV, BDV)
    o = _dot_acc(_dot(x, tl.trans(k)) * M, v, decay[:, None] * _dot(x, G0))
    _store_rows(O, o, tok, valid, h, H, DV, BDV)


@triton.jit
def _solve_bwd_kernel(
    K, V, G, BETA, LAMB, STATES, X, DO, CU, CHUNK_SEQ, CHUNK_FIRST, DQ, Y, DLAMB, DGAM,
    tol2, max_iter, H, SW,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr, FP16: tl.constexpr,
):
    """The backward's solve of chunk gc = program_id(0), head program_id(1), and the gradients it gives at once.

    dx_t = G_t do_t (the gradient of o_t = G_t^T x_t in x_t), y_t = (H_t + diag(lamb))^-1 dx_t by CG as in the
    forward; writes dq = y (DQ, q's dtype), y (Y [tokens, H, D] float32), the chunk's share of d lamb =
    -sum_t y_t * x_t (DLAMB [chunks, H, BD]) and of dGamma_t through the chunk-start states,
    e^{Gamma_t} (x_t . G0 do_t - y_t . H0 x_t) (DGAM [tokens, H], float32).
    """
    gc = tl.program_id(0)
    h = tl.program_id(1)
    tok, valid = _chunk(CU, CHUNK_SEQ, CHUNK_FIRST, gc, C)
    k, M, decay = _operands(K, G, BETA, tok, valid, h, H, D, BD, C)
    lamb = _lamb(LAMB, h, D, BD)
    v = _rows(V, tok, valid, h, H, DV, BDV)
    do = _rows(DO, tok, valid, h, H, DV, BDV)
    G0t = _matrix(STATES, gc, h, H, SW, D, D, DV, BD, BDV, True)  # [BDV, BD]
    dog = _dot(do, G0t)  # rows G0 do_t
    xdog = tl.sum(_rows(X, tok, valid, h, H, D, BD) * dog, 1)  # x_t . G0 do_t
    dx = _dot_acc(_dot(do, tl.trans(v)) * M, k, decay[:, None] * dog)
    diag, sh = _diag(STATES, gc, h, H, SW, M, k, decay, lamb, D, BD)
    H0 = _chunk_start(STATES, gc, h, H, SW, D, BD)
    y, _, _ = _cg(dx, dx / diag, H0, sh, k, M, decay, lamb, tol2, max_iter, FP16)
    tok, valid = _chunk(CU, CHUNK_SEQ, CHUNK_FIRST, gc, C)
    _store_rows(DQ, y, tok, valid, h, H, D, BD)
    _store_rows(Y, y, tok, valid, h, H, D, BD)
    x = _rows(X, tok, valid, h, H, D, BD)
    tl.store(DLAMB + (gc * H + h) * BD + tl.arange(0, BD), -tl.sum(y * x, 0))
    xh = _dot(x, _chunk_start(STATES, gc, h, H, SW, D, BD))
    dgam = tl.exp(_gates(G, BETA, tok, valid, h, H, C)[0]) * (xdog - tl.sum(y * xh, 1))
    tl.store(DGAM + tok * H + h, dgam, mask=valid)
