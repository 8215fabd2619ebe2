"""Mesa's last backward kernel: the gradients of k, v, beta and g of one chunk, from the solves x and y of its
queries and the gradient of the state after it.

With x_t, y_t and the chunk-start states fixed (implicit differentiation), what the chunk contributes is
    L = sum_t [ e^{Gamma_t} (x_t . G0 do_t - y_t . H0 x_t)
               + sum_{s<=t} M[t, s] (x_t . k_s) (do_t . v_s - y_t . k_s) ]
      + <EH, U^H> + <EG, U^G>,   U^H = sum_s w_s k_s k_s^T,  U^G = sum_s w_s k_s v_s^T,
with M[t, s] = e^{Gamma_t - Gamma_s} beta_s, w_s = e^{gamma - Gamma_s} beta_s (gamma the chunk's total log decay)
and [EH | EG] the gradient of the state after the chunk (from `triton_scan._scan_bwd_kernel`). The first
term's dGamma comes from `triton_solve._solve_bwd_kernel` (DGAM); e^gamma's gradient from the scan (DA).
"""

from __future__ import annotations

import triton
import triton.language as tl

from tttlm.ops.mesa.triton_parts import _chunk, _gates, _matrix, _rows, _store_rows
from tttlm.ops.ttt_linear.triton_parts import _dot


@triton.jit
def _grads_kernel(
    X, Y, DO, K, V, G, BETA, DSTATES, DA, DGAM, CU, CHUNK_SEQ, CHUNK_FIRST, DKEY, DVAL, DG, DBETA, H, SW, NB,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr,
    BNB: tl.constexpr,
):
    """dk [tokens, H, D] (DKEY), dv [tokens, H, DV] (DVAL) in their tensors' dtypes, dg, dbeta [tokens, H] (float32) of
    chunk program_id(0), head program_id(1)."""
    gc = tl.program_id(0)
    h = tl.program_id(1)
    tok, valid = _chunk(CU, CHUNK_SEQ, CHUNK_FIRST, gc, C)
    gam, total, beta, E = _gates(G, BETA, tok, valid, h, H, C)
    M = E * beta[None, :]
    x = _rows(X, tok, valid, h, H, D, BD)
    y = _rows(Y, tok, valid, h, H, D, BD)
    k = _rows(K, tok, valid, h, H, D, BD)
    v = _rows(V, tok, valid, h, H, DV, BDV)
    do = _rows(DO, tok, valid, h, H, DV, BDV)
    # within the chunk: P = X K^T, and the gradient of M[t, s] (x_t . k_s)(do_t . v_s - y_t . k_s)
    P = _dot(x, tl.trans(k))
    Wd = _dot(do, tl.trans(v)) - _dot(y, tl.trans(k))
    MP = M * P
    dk = _dot(tl.trans(M * Wd), x) - _dot(tl.trans(MP), y)
    dv = _dot(tl.trans(MP), do)
    dM = P * Wd
    Z = M * dM
    dbeta = tl.sum(E * dM, 0)
    dgam = tl.sum(Z, 1) - tl.sum(Z, 0) + tl.load(DGAM + tok * H + h, mask=valid, other=0.0)
    # through the state after the chunk: U^H (symmetric, so EH enters as EH + EH^T) and U^G
    EH = _matrix(DSTATES, gc, h, H, SW, 0, D, D, BD, BD, False)
    ke = _dot(k, EH + _matrix(DSTATES, gc, h, H, SW, 0, D, D, BD, BD, True))
    kg = _dot(k, _matrix(DSTATES, gc, h, H, SW, D, D, DV, BD, BDV, False))
    EGt = _matrix(DSTATES, gc, h, H, SW, D, D, DV, BD, BDV, True)
    e = tl.exp(total - gam)
    w = e * beta
    dk += w[:, None] * (ke + _dot(v, EGt))
    dv += w[:, None] * kg
    z = 0.5 * tl.sum(ke * k, 1) + tl.sum(kg * v, 1)  # k^T EH k + k^T EG v
    dbeta += e * z
    dgam -= w * z
    da = tl.sum(tl.load(DA + (gc * H + h) * NB + tl.arange(0, BNB), mask=tl.arange(0, BNB) < NB, other=0.0), 0)
    last = tl.sum(w * z, 0) + tl.exp(total) * da  # the gradient of gamma, the total log decay
    dgam += tl.where(tl.arange(0, C) == C - 1, last, 0.0)
    dg = tl.cumsum(dgam, 0, reverse=True)  # Gamma_t = g_1 + ... + g_t
    _store_rows(DKEY, dk, tok, valid, h, H, D, BD)
    _store_rows(DVAL, dv, tok, valid, h, H, DV, BDV)
    tl.store(DG + tok * H + h, dg, mask=valid)
    tl.store(DBETA + tok * H + h, dbeta, mask=valid)
