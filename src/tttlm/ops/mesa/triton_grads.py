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

from tttlm.ops.mesa.triton_parts import _chunk, _cols, _gates, _rows, _store_cols, _tile
from tttlm.ops.ttt_linear.triton_parts import _dot


@triton.jit
def _grads_kernel(
    X, Y, DO, K, V, G, BETA, DSTATES, DA, DGAM, CU, CHUNK_SEQ, CHUNK_FIRST, DKEY, DVAL, DG, DBETA, H, SW, NB,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr,
    BN: tl.constexpr, BNV: tl.constexpr, BNB: tl.constexpr,
):
    """dk [tokens, H, D] (DKEY), dv [tokens, H, DV] (DVAL) in their tensors' dtypes, dg, dbeta [tokens, H]
    (float32) of chunk program_id(0), head program_id(1). dk and dv are made BN (BNV) columns at a time, so
    that only a [D, BN] block of the state gradient is on chip at once."""
    gc = tl.program_id(0)
    h = tl.program_id(1)
    tok, valid = _chunk(CU, CHUNK_SEQ, CHUNK_FIRST, gc, C)
    gam, total, beta, E = _gates(G, BETA, tok, valid, h, H, C)
    M = E * beta[None, :]
    k = _rows(K, tok, valid, h, H, D, BD)
    v = _rows(V, tok, valid, h, H, DV, BDV)
    # within the chunk: P = X K^T, and the gradient of M[t, s] (x_t . k_s)(do_t . v_s - y_t . k_s)
    P = _dot(_rows(X, tok, valid, h, H, D, BD), tl.trans(k))
    Wd = _dot(_rows(DO, tok, valid, h, H, DV, BDV), tl.trans(v)) - _dot(_rows(Y, tok, valid, h, H, D, BD), tl.trans(k))
    MP = M * P
    MW = M * Wd
    dM = P * Wd
    Z = M * dM
    dbeta = tl.sum(E * dM, 0)
    dgam = tl.sum(Z, 1) - tl.sum(Z, 0) + tl.load(DGAM + tok * H + h, mask=valid, other=0.0)
    # through the state after the chunk: U^H (symmetric, so EH enters as EH + EH^T) and U^G
    e = tl.exp(total - gam)
    w = e * beta
    z = tl.zeros([C], dtype=tl.float32)  # k^T EH k + k^T EG v
    base = DSTATES + (gc * H + h).to(tl.int64) * D * SW
    for j in tl.static_range(0, BD, BN):
        EH = _tile(base, 0, j, D, D - j, SW, BD, BN, False, D == BD)
        EH += _tile(base, j, 0, D - j, D, SW, BN, BD, True, D == BD)  # columns j.. of EH^T
        ke = _dot(k, EH)
        dk = _dot(tl.trans(MW), _cols(X, tok, valid, h, H, D, j, D - j, BN))
        dk -= _dot(tl.trans(MP), _cols(Y, tok, valid, h, H, D, j, D - j, BN))
        EGt = _tile(base, j, D, D - j, DV, SW, BN, BDV, True, (D == BD) and (DV == BDV))  # columns j.. of EG^T
        dk += w[:, None] * (ke + _dot(v, EGt))
        z += 0.5 * tl.sum(ke * _cols(K, tok, valid, h, H, D, j, D - j, BN), 1)
        _store_cols(DKEY, dk, tok, valid, h, H, D, j, D - j, BN)
    for j in tl.static_range(0, BDV, BNV):
        kg = _dot(k, _tile(base, 0, D + j, D, DV - j, SW, BD, BNV, False, (D == BD) and (DV == BDV)))
        dv = _dot(tl.trans(MP), _cols(DO, tok, valid, h, H, DV, j, DV - j, BNV)) + w[:, None] * kg
        z += tl.sum(kg * _cols(V, tok, valid, h, H, DV, j, DV - j, BNV), 1)
        _store_cols(DVAL, dv, tok, valid, h, H, DV, j, DV - j, BNV)
    dbeta += e * z
    dgam -= w * z
    da = tl.sum(tl.load(DA + (gc * H + h) * NB + tl.arange(0, BNB), mask=tl.arange(0, BNB) < NB, other=0.0), 0)
    last = tl.sum(w * z, 0) + tl.exp(total) * da  # the gradient of gamma, the total log decay
    dgam += tl.where(tl.arange(0, C) == C - 1, last, 0.0)
    dg = tl.cumsum(dgam, 0, reverse=True)  # Gamma_t = g_1 + ... + g_t
    tl.store(DG + tok * H + h, dg, mask=valid)
    tl.store(DBETA + tok * H + h, dbeta, mask=valid)
