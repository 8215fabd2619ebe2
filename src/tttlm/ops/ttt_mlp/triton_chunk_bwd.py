"""TTT-MLP's backward pass on the GPU: one sequential kernel that walks each sequence's mini-batches in reverse.

The forward (`triton_chunk`) couples mini-batches only through the inner weights P_m = (W1, b1, W2, b2) at their
starts, so the backward carries only dP_m, the gradient w.r.t. them (float32, in global memory like the
forward's weights), from the last mini-batch to the first. It needs each mini-batch's P_m, and recovers them in
the same reverse walk from the final weights, by undoing the updates:
    W2_m = W2_{m+1} + c (X2^T E2 + gW2),  E1 = (E2 W2_m^T) * gelu'(Z1),  W1_m = W1_{m+1} + c (K^T E1 + gW1),
    b1_m likewise, with c = s_{b-1} for a complete mini-batch (0 for an unfinished one) and the state's sums
    (gW1, gb1, gW2, gb2) in mini-batch 0 only,
from what the forward kept per token: Z1 (so X2 = gelu(Z1)) and Z2's LayerNorm (so E2). No weights are stored
per mini-batch and none are recomputed by a second forward walk; float32 rounding adds ~1e-7 of |W| per step.

The backward of one mini-batch (notation of `triton_chunk`; C1, C2 the corrections that s multiplies, A1 =
tril(Q K^T + 1), A2 = tril(Xq2 X2^T + 1); dW' = dP_{m+1}, and dSum = -c dW' (+ the final sums' gradient in
an unfinished last mini-batch) the gradient of what the mini-batch hands on, K^T E1 + gW1 and so on):
    dZq2 = LN'(lnw * do),  dC2 = -s dZq2,  dA2 = tril(dC2 E2^T)
  pass 1, per tile of the hidden width (the weights of the tile recovered first):
    dXq2 = dZq2 W2^T + dA2 X2 (- s dZq2 gW2^T),  dZq1 = dXq2 * gelu'(Zq1),  dC1 = -s dZq1
    dA1 += dC1 E1^T,  dq += dZq1 W1^T (+ dC1 gW1^T)
    dE1 = A1^T dC1 + K dSum_W1 + dSum_b1,  dP1 = dE1 * gelu'(Z1)           (P1 = E2 W2^T, E1 = P1 gelu'(Z1))
    dE2 += dP1 W2 + X2 dSum_W2
    U = (dA2^T Xq2 + E2 dSum_W2^T) * gelu'(Z1) + dE1 * P1 * gelu''(Z1)       (dZ1 but for its part from dZ2)
    dk += U W1^T + E1 dSum_W1^T
    dW1 += Q^T dZq1 + K^T U,  db1 += sum(dZq1) + sum(U),  dW2 += Xq2^T dZq2 + dP1^T E2
  then
    dE2 += A2^T dC2 + dSum_b2;  dZ2, and dv, dk, deta, the inner LayerNorm's gradient, through E2 = eta * dl/dZ2
    dq += do + tril(dA1) K,  dk += tril(dA1)^T Q,  db2 += sum(dZq2) + sum(dZ2)
  pass 2, per tile (the part of dZ1 through Z2 = X2 W2 + b2):
    V = (dZ2 W2^T) * gelu'(Z1),  dW1 += K^T V,  db1 += sum(V),  dW2 += X2^T dZ2,  dk += V W1^T
and, in mini-batch 0, the state's sums' gradients dgW1 = Q^T dC1 + dSum_W1, dgb1 = sum(dC1) + dSum_b1,
dgW2 = Xq2^T dC2 + dSum_W2, dgb2 = sum(dC2) + dSum_b2. The token scale: ds_i -= sum(dZq1 * C1 + dZq2 * C2) per
position i, and ds_{b-1} -= dW' . (K^T E1 + gW1, ...) summed over complete mini-batches.

Memory: the forward keeps per token and head Z1 [4D], both LayerNorms' normalised values [D] and four
statistics, float32 (1.6 KB at D=64); the backward adds its outputs and a copy of the final weights and of
their gradient per (sequence, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tttlm.ops.ttt_linear.triton_parts import (
    _dot,
    _dot_acc,
    _head_ln,
    _ln_bwd,
    _ln_l2_dz,
    _ln_l2_grad_bwd,
    _minibatch_tokens,
    _sequence,
    _tile_ptrs,
    block_d,
    new,
)
from tttlm.ops.ttt_mlp import triton_parts
from tttlm.ops.ttt_mlp.triton_parts import (
    _arrive,
    _f_ptrs,
    _gathered,
    _gelu_parts,
    _hidden_ptrs,
    _post,
    _tile_offsets,
    _w1_tile,
    _w2_tile,
    chunk_f_tile,
    exchange,
    tiling,
)


@triton.jit
def _inner_loss(Q, K, V, ETA, XH2S, STS, tok, valid, h, H, lnw, lnb, D: tl.constexpr, BD: tl.constexpr):
    """A mini-batch's q, k [BT,BD] (float32, and in their input dtype), v, eta, and from what the forward kept
    of Z2's LayerNorm: xhat, rstd, G = lnw (y - v + k) with y = lnw xhat + lnb, mean(G), mean(G xhat), y and
    dl/dZ2 (E2 = eta dl/dZ2)."""
    d = tl.arange(0, BD)
    vm = valid[:, None] & (d < D)[None, :]
    q_in = tl.load(_tile_ptrs(Q, tok, h, H, D, BD), mask=vm, other=0.0)
    k_in = tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0)
    k = k_in.to(tl.float32)
    v = tl.load(_tile_ptrs(V, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
    eta = tl.load(ETA + tok * H + h, mask=valid, other=0.0).to(tl.float32)
    st = STS + (tok * H + h) * 4
    rstd = tl.load(st, mask=valid, other=0.0)
    mG = tl.load(st + 1, mask=valid, other=0.0)
    mGx = tl.load(st + 2, mask=valid, other=0.0)
    xh = tl.load(_tile_ptrs(XH2S, tok, h, H, D, BD), mask=vm, other=0.0)
    y = lnw[None, :] * xh + lnb[None, :]
    G = lnw[None, :] * (y - v + k)  # zero in the padding columns, as lnw is
    return q_in, k_in, k, v, eta, xh, rstd, G, mG, mGx, y, _ln_l2_dz(G, xh, rstd, mG, mGx, D, BD)


@triton.jit
def _bwd_minibatch(
    m, db2, dln_w, dln_b, ds, ds_last,
    Q, K, V, ETA, DO, S, W1, B1, W2, GW1, GB1, GW2, GB2, DW1, DB1, DW2, DGW1F, DGB1F, DGW2F, DGB2F,
    Z1S, XH2S, XQS, STS, DQ, DK, DV, DETA, DGW1, DGB1, DGW2, DGB2, SCR, X, CNT,
    lnw, lnb, base, part, split, h, H, start, off, L, num_mb,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FT: tl.constexpr,
    FIRST: tl.constexpr, HAS_DFINAL: tl.constexpr,
):
    """Mini-batch m in reverse. W1, B1, W2 hold its successor's starting weights and are left holding its own;
    DW1, DB1, DW2 and db2 likewise for their gradients. dln_w, dln_b [BD], ds [BT] and ds_last [BT] (rows of
    the sum that ds_{b-1} loses) accumulate over mini-batches. FIRST: mini-batch 0, which adds the state's
    sums (and writes their gradients). SCR: this program's scratch [3, BT, BD] + [2, BT, BT] float32.

    Only accumulators stay on chip from one phase to the next: what a phase needs besides is loaded again
    (from the inputs, or from the scratch), as a [BT, BD] tile kept across a loop over the hidden width
    costs registers for the whole loop, which spilled. With split > 1 this program (`part`) walks its share of
    the hidden tiles only, sums A2, dA1, dE2, X2 dW2' and dq with the others after pass 1 and dk after pass 2
    (exchange X, counter CNT), and counts what every part computes alike (the LayerNorms' gradients and their
    shares of ds) only in part 0, which writes it."""
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    dm = d < D
    vm = valid[:, None] & dm[None, :]
    causal = i[:, None] >= i[None, :]
    s = tl.load(S + i)
    full = ((m + 1) * BT <= off + L).to(tl.float32)
    c = tl.load(S + BT - 1) * full
    is_open = (m == num_mb - 1) & (full == 0.0)  # an unfinished last mini-batch hands its sums to the final state
    nt = F // FT // split  # tiles per program
    REGION: tl.constexpr = BT * (2 * BT + 3 * BD)
    lead = (part == 0).to(tl.float32)
    e = 2 * (num_mb - 1 - m)  # this mini-batch's first exchange: they count up as the walk goes back
    o1, o2, m1, m2 = _tile_offsets(D, BD, F, FT)
    rows = i[:, None] * BD + d[None, :]
    scr_e2 = SCR + rows
    scr_dzq2 = SCR + BT * BD + rows
    scr_dz2 = SCR + 2 * BT * BD + rows
    sq = i[:, None] * BT + i[None, :]
    scr_a1 = SCR + 3 * BT * BD + sq
    scr_da2 = SCR + 3 * BT * BD + BT * BT + sq

    # E2, dZq2, A1 = tril(Q K^T + 1), dA2 = tril(dC2 E2^T) to the scratch
    q_in, k_in, k, v, eta, xh, rstd, G, mG, mGx, y, dZ = _inner_loss(Q, K, V, ETA, XH2S, STS, tok, valid, h, H,
                                                                      lnw, lnb, D, BD)
    E2 = eta[:, None] * dZ
    do = tl.load(_tile_ptrs(DO, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
    xq = tl.load(_tile_ptrs(XQS, tok, h, H, D, BD), mask=vm, other=0.0)
    dZq2 = _ln_bwd(lnw[None, :] * do, xq, tl.load(STS + (tok * H + h) * 4 + 3, mask=valid, other=0.0), D, BD)
    dln_w += lead * tl.sum(do * xq, 0)
    dln_b += lead * tl.sum(do, 0)
    tl.store(scr_e2, E2)
    tl.store(scr_dzq2, dZq2)
    tl.store(scr_a1, tl.where(causal, tl.dot(q_in, tl.trans(k_in)) + 1.0, 0.0))  # exact products of 16-bit inputs
    tl.store(scr_da2, tl.where(causal, _dot(-s[:, None] * dZq2, tl.trans(E2)), 0.0))
    tl.debug_barrier()

    # pass 1: recover the tile's weights, then its share of the mini-batch's backward
    A2 = tl.zeros([BT, BT], dtype=tl.float32)
    dA1 = tl.zeros([BT, BT], dtype=tl.float32)
    dE2 = tl.zeros([BT, BD], dtype=tl.float32)
    XdW2 = tl.zeros([BT, BD], dtype=tl.float32)  # X2 dW2', over all tiles
    dq = tl.zeros([BT, BD], dtype=tl.float32)
    dk = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(part * nt, part * nt + nt):
        w1 = _w1_tile(base, j, D, F, FT)
        w2 = _w2_tile(base, j, D, F, FT)
        w1p = W1 + w1 + o1
        w2p = W2 + w2 + o2
        b1p = _f_ptrs(B1, base, j, F, FT)
        dw1p = DW1 + w1 + o1
        dw2p = DW2 + w2 + o2
        db1_ptr = _f_ptrs(DB1, base, j, F, FT)
        q = tl.load(_tile_ptrs(Q, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
        k = tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
        E2 = tl.load(scr_e2)
        dZq2 = tl.load(scr_dzq2)
        dC2 = -s[:, None] * dZq2
        A1 = tl.load(scr_a1)
        dA2 = tl.load(scr_da2)
        X2, g1, g2 = _gelu_parts(tl.load(_hidden_ptrs(Z1S, tok, h, H, j, F, FT), mask=valid[:, None], other=0.0))
        SW2 = _dot(tl.trans(X2), E2)
        if FIRST:
            gW2 = tl.load(GW2 + w2 + o2, mask=m2, other=0.0)
            SW2 += gW2
        W2j = tl.load(w2p, mask=m2, other=0.0) + c * SW2
        P1 = _dot(E2, tl.trans(W2j))
        E1 = P1 * g1
        SW1 = _dot(tl.trans(k), E1)
        Sb1 = tl.sum(E1, 0)
        if FIRST:
            gW1 = tl.load(GW1 + w1 + o1, mask=m1, other=0.0)
            gb1 = tl.load(_f_ptrs(GB1, base, j, F, FT))
            SW1 += gW1
            Sb1 += gb1
        W1j = tl.load(w1p, mask=m1, other=0.0) + c * SW1
        b1j = tl.load(b1p) + c * Sb1

        C1 = _dot(A1, E1)
        if FIRST:
            C1 = _dot_acc(q, gW1, C1) + gb1[None, :]
        Xq2, gq1, _gq2 = _gelu_parts(_dot(q, W1j) + b1j[None, :] - s[:, None] * C1)
        A2 = _dot_acc(Xq2, tl.trans(X2), A2)
        dXq2 = _dot_acc(dA2, X2, _dot(dZq2, tl.trans(W2j)))
        if FIRST:
            T2 = _dot(dZq2, tl.trans(gW2))
            dXq2 -= s[:, None] * T2
            ds -= tl.sum(Xq2 * T2, 1)
        dZq1 = dXq2 * gq1
        ds -= tl.sum(dZq1 * C1, 1)
        dC1 = -s[:, None] * dZq1
        dA1 = _dot_acc(dC1, tl.trans(E1), dA1)
        dq = _dot_acc(dZq1, tl.trans(W1j), dq)
        if FIRST:
            dq = _dot_acc(dC1, tl.trans(gW1), dq)

        dW1p = tl.load(dw1p, mask=m1, other=0.0)
        db1p = tl.load(db1_ptr)
        dW2p = tl.load(dw2p, mask=m2, other=0.0)
        kdW1 = _dot(k, dW1p) + db1p[None, :]
        ds_last += full * tl.sum(kdW1 * E1, 1)
        XdW2 = _dot_acc(X2, dW2p, XdW2)
        dE1 = _dot(tl.trans(A1), dC1) - c * kdW1
        dS1 = -c * dW1p
        dSb1 = -c * db1p
        dS2 = -c * dW2p
        if HAS_DFINAL:
            gf1 = tl.load(DGW1F + w1 + o1, mask=m1 & is_open, other=0.0)
            gfb1 = tl.load(_f_ptrs(DGB1F, base, j, F, FT), mask=is_open, other=0.0)
            gf2 = tl.load(DGW2F + w2 + o2, mask=m2 & is_open, other=0.0)
            dE1 = _dot_acc(k, gf1, dE1) + gfb1[None, :]
            dS1 += gf1
            dSb1 += gfb1
            dS2 += gf2
            dE2 = _dot_acc(X2, gf2, dE2)
        dP1 = dE1 * g1
        dE2 = _dot_acc(dP1, W2j, dE2)
        U = _dot_acc(E2, tl.trans(dS2), _dot(tl.trans(dA2), Xq2)) * g1 + dE1 * P1 * g2
        dk = _dot_acc(U, tl.trans(W1j), dk)
        dk = _dot_acc(E1, tl.trans(dS1), dk)
        if FIRST:
            tl.store(DGW1 + w1 + o1, _dot_acc(tl.trans(q), dC1, dS1), mask=m1)
            tl.store(_f_ptrs(DGB1, base, j, F, FT), tl.sum(dC1, 0) + dSb1)
            tl.store(DGW2 + w2 + o2, _dot_acc(tl.trans(Xq2), dC2, dS2), mask=m2)
            # ds_{b-1}'s share through the sums, spread over the rows it is kept in
            share = tl.sum(tl.sum(dW1p * gW1, 1), 0) + tl.sum(db1p * gb1, 0) + tl.sum(tl.sum(dW2p * gW2, 1), 0)
            ds_last += tl.where(i == 0, full * share, 0.0)
        dW1n = _dot_acc(tl.trans(k), U, _dot_acc(tl.trans(q), dZq1, dW1p))
        db1n = db1p + tl.sum(dZq1, 0) + tl.sum(U, 0)
        dW2n = _dot_acc(tl.trans(dP1), E2, _dot_acc(tl.trans(Xq2), dZq2, dW2p))
        tl.debug_barrier()  # every thread's loads of this tile come before any thread's store to it
        tl.store(w1p, W1j, mask=m1)
        tl.store(b1p, b1j)
        tl.store(w2p, W2j, mask=m2)
        tl.store(dw1p, dW1n, mask=m1)
        tl.store(db1_ptr, db1n)
        tl.store(dw2p, dW2n, mask=m2)
    tl.debug_barrier()  # pass 2 reads the tiles that pass 1 wrote
    if split > 1:
        _post(X, e, part, split, 0, A2, BT, BT, REGION)
        _post(X, e, part, split, BT * BT, dA1, BT, BT, REGION)
        _post(X, e, part, split, 2 * BT * BT, dE2, BT, BD, REGION)
        _post(X, e, part, split, 2 * BT * BT + BT * BD, XdW2, BT, BD, REGION)
        _post(X, e, part, split, 2 * BT * BT + 2 * BT * BD, dq, BT, BD, REGION)
        _arrive(CNT, e, split)
        A2 = _gathered(X, e, split, 0, BT, BT, REGION)
        dA1 = _gathered(X, e, split, BT * BT, BT, BT, REGION)
        dE2 = _gathered(X, e, split, 2 * BT * BT, BT, BD, REGION)
        XdW2 = _gathered(X, e, split, 2 * BT * BT + BT * BD, BT, BD, REGION)
        dq = _gathered(X, e, split, 2 * BT * BT + 2 * BT * BD, BT, BD, REGION)

    # the rest of the mini-batch but for pass 2: dv, deta, dq, the inner LayerNorm, and dZ2 to the scratch
    q_in, k_in, k, v, eta, xh, rstd, G, mG, mGx, y, dZ = _inner_loss(Q, K, V, ETA, XH2S, STS, tok, valid, h, H,
                                                                      lnw, lnb, D, BD)
    q = q_in.to(tl.float32)
    E2 = eta[:, None] * dZ
    dZq2 = tl.load(scr_dzq2)
    dC2 = -s[:, None] * dZq2
    A2 = tl.where(causal, A2 + 1.0, 0.0)
    C2 = _dot(A2, E2)
    dSb2 = -c * db2
    ds_last += lead * full * tl.sum((XdW2 + db2[None, :]) * E2, 1)
    if HAS_DFINAL:
        dSb2 += tl.load(DGB2F + base * D + d, mask=dm & is_open, other=0.0)
    if FIRST:
        gb2 = tl.load(GB2 + base * D + d, mask=dm, other=0.0)
        C2 += gb2[None, :]
        ds_last += tl.where(i == 0, lead * full * tl.sum(db2 * gb2, 0), 0.0)
        if part == 0:
            tl.store(DGB2 + base * D + d, tl.sum(dC2, 0) + dSb2, mask=dm)
    ds -= lead * tl.sum(dZq2 * C2, 1)
    dE2 += _dot(tl.trans(A2), dC2) - c * XdW2 + dSb2[None, :]
    dZ2, dG = _ln_l2_grad_bwd(dE2, xh, rstd, G, mG, mGx, eta, lnw, D, BD)
    dy = lnw[None, :] * dG
    dln_w += lead * tl.sum(dG * (y - v + k) + dy * xh, 0)
    dln_b += lead * tl.sum(dy, 0)
    dA1 = tl.where(causal, dA1, 0.0)
    if part == 0:
        tl.store(DETA + tok * H + h, tl.sum(dE2 * dZ, 1).to(DETA.dtype.element_ty), mask=valid)
        tl.store(_tile_ptrs(DV, tok, h, H, D, BD), (-dy).to(DV.dtype.element_ty), mask=vm)
        dq = _dot_acc(dA1, k, dq) + tl.load(_tile_ptrs(DO, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
        tl.store(_tile_ptrs(DQ, tok, h, H, D, BD), dq.to(DQ.dtype.element_ty), mask=vm)
    dk += lead * (_dot(tl.trans(dA1), q) + dy)
    db2 += tl.sum(dZq2, 0) + tl.sum(dZ2, 0)
    tl.store(scr_dz2, dZ2)
    tl.debug_barrier()

    # pass 2: the part of dZ1 that comes through Z2
    for j in range(part * nt, part * nt + nt):
        w1 = _w1_tile(base, j, D, F, FT)
        w2 = _w2_tile(base, j, D, F, FT)
        dw1p = DW1 + w1 + o1
        dw2p = DW2 + w2 + o2
        db1_ptr = _f_ptrs(DB1, base, j, F, FT)
        k = tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
        dZ2 = tl.load(scr_dz2)
        X2, g1, _g2 = _gelu_parts(tl.load(_hidden_ptrs(Z1S, tok, h, H, j, F, FT), mask=valid[:, None], other=0.0))
        Vz = _dot(dZ2, tl.trans(tl.load(W2 + w2 + o2, mask=m2, other=0.0))) * g1
        dk = _dot_acc(Vz, tl.trans(tl.load(W1 + w1 + o1, mask=m1, other=0.0)), dk)
        dW1n = _dot_acc(tl.trans(k), Vz, tl.load(dw1p, mask=m1, other=0.0))
        db1n = tl.load(db1_ptr) + tl.sum(Vz, 0)
        dW2n = _dot_acc(tl.trans(X2), dZ2, tl.load(dw2p, mask=m2, other=0.0))
        tl.debug_barrier()
        tl.store(dw1p, dW1n, mask=m1)
        tl.store(db1_ptr, db1n)
        tl.store(dw2p, dW2n, mask=m2)
    if split > 1:
        _post(X, e + 1, part, split, 0, dk, BT, BD, REGION)
        _arrive(CNT, e + 1, split)
        dk = _gathered(X, e + 1, split, 0, BT, BD, REGION)
    if part == 0:
        tl.store(_tile_ptrs(DK, tok, h, H, D, BD), dk.to(DK.dtype.element_ty), mask=vm)
    tl.debug_barrier()  # this mini-batch's stores come before the next one's loads
    return db2, dln_w, dln_b, ds, ds_last


@triton.jit(do_not_specialize=["H", "split"])  # one compiled kernel for any number of heads and split
def _bwd_kernel(
    Q, K, V, ETA, DO, LNW, LNB, S, CU, OFF, W1, B1, W2, GW1, GB1, GW2, GB2, DW1, DB1, DW2, DB2,
    DGW1F, DGB1F, DGW2F, DGB2F, Z1S, XH2S, XQS, STS, DQ, DK, DV, DETA, DGW1, DGB1, DGW2, DGB2, DLN_P, DS_P, SCR,
    X, CNT, H, split, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FT: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):
    """Program (sequence n, head h, part of `split`). W1, B1, W2 hold the final weights and are left holding the
    initial ones; DW1, DB1, DW2, DB2 the final weights' gradients (zeros without), left holding the initial
    ones'. DLN_P [N*H*split, 2, D] and DS_P [N*H*split, BT] take this program's share of the inner LayerNorm's
    and the token scale's gradients. SCR: a scratch of SCRATCH float32 per program; X, CNT: the exchange and
    arrival counters of `triton_chunk.exchange`."""
    pid = tl.program_id(0)
    g = pid // split
    part = pid % split
    n = g // H
    h = g % H
    start, L, off, num_mb = _sequence(CU, OFF, n, BT)
    base = g.to(tl.int64)
    SCRATCH: tl.constexpr = 3 * BT * BD + 2 * BT * BT
    scr = SCR + pid.to(tl.int64) * SCRATCH
    Xg = X + base * (2 * split * BT * (2 * BT + 3 * BD))
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    dm = d < D
    lnw, lnb = _head_ln(LNW, LNB, h, d, D)
    db2 = tl.load(DB2 + base * D + d, mask=dm, other=0.0)
    dln_w = tl.zeros([BD], dtype=tl.float32)
    dln_b = tl.zeros([BD], dtype=tl.float32)
    ds = tl.zeros([BT], dtype=tl.float32)
    ds_last = tl.zeros([BT], dtype=tl.float32)
    for r in range(1, num_mb):  # mini-batches num_mb - 1 .. 1; the first is peeled
        db2, dln_w, dln_b, ds, ds_last = _bwd_minibatch(
            num_mb - r, db2, dln_w, dln_b, ds, ds_last,
            Q, K, V, ETA, DO, S, W1, B1, W2, GW1, GB1, GW2, GB2, DW1, DB1, DW2, DGW1F, DGB1F, DGW2F, DGB2F,
            Z1S, XH2S, XQS, STS, DQ, DK, DV, DETA, DGW1, DGB1, DGW2, DGB2, scr, Xg, CNT + g,
            lnw, lnb, base, part, split, h, H, start, off, L, num_mb, D, BD, BT, F, FT, False, HAS_DFINAL,
        )
    db2, dln_w, dln_b, ds, ds_last = _bwd_minibatch(
        0, db2, dln_w, dln_b, ds, ds_last,
        Q, K, V, ETA, DO, S, W1, B1, W2, GW1, GB1, GW2, GB2, DW1, DB1, DW2, DGW1F, DGB1F, DGW2F, DGB2F,
        Z1S, XH2S, XQS, STS, DQ, DK, DV, DETA, DGW1, DGB1, DGW2, DGB2, scr, Xg, CNT + g,
        lnw, lnb, base, part, split, h, H, start, off, L, num_mb, D, BD, BT, F, FT, True, HAS_DFINAL,
    )
    if part == 0:
        tl.store(DB2 + base * D + d, db2, mask=dm)
    row = pid.to(tl.int64)
    tl.store(DLN_P + (row * 2) * D + d, dln_w, mask=dm)
    tl.store(DLN_P + (row * 2 + 1) * D + d, dln_b, mask=dm)
    tl.store(DS_P + row * BT + i, ds - tl.where(i == BT - 1, tl.sum(ds_last, 0), 0.0))


def chunk_backward(q, k, v, eta, ln_weight, ln_bias, s, sums, cu, offset, final, saved, do, dfinal, eps):
    """Gradients of `triton_chunk._TTTMLPFn`: q, k, v, do [tokens,H,D], eta [tokens,H], s [BT] float32, sums the
    state's (gW1, gb1, gW2, gb2), cu [N+1], offset [N], final the forward's final (W1, b1, W2), saved its
    per-token (Z1, Z2's xhat, Zq2's xhat, statistics); dfinal the final state's 8 gradients in float32, or None.

    Returns dq, dk, dv, deta, dln_w, dln_b, dtoken_scale, dW1, db1, dW2, db2, dgW1, dgb1, dgW2, dgb2."""
    total, H, D = q.shape
    BT = s.numel()
    N = sums[0].shape[0]
    BD = block_d(D)
    dev = q.device
    f32 = torch.float32
    W1, b1, W2 = (t.clone() for t in final)  # walked back to the initial weights in place
    has_dfinal = dfinal is not None
    if has_dfinal:
        dW = [t.clone() for t in dfinal[:4]]
        dgf = dfinal[4:]
    else:
        dW = [torch.zeros_like(t) for t in sums]
        dgf = sums  # unread placeholders
    dq, dk, dv = (new((total, H, D), q.dtype, dev) for _ in range(3))
    deta = new((total, H), eta.dtype, dev)
    dsums = [new(t.shape, f32, dev) for t in sums]
    split = triton_parts.splits(N * H, D, dev)
    programs = N * H * split
    dln_p = new((programs, 2, D), f32, dev)
    ds_p = new((programs, BT), f32, dev)
    scratch = torch.empty(programs * (3 * BD + 2 * BT) * BT, dtype=f32, device=dev)
    X, cnt = exchange(N * H, split, BD, BT, dev)
    _bwd_kernel[(programs,)](
        q, k, v, eta, do, ln_weight, ln_bias, s, cu, offset, W1, b1, W2, *sums, *dW, *dgf, *saved,
        dq, dk, dv, deta, *dsums, dln_p, ds_p, scratch, X, cnt,
        H, split, D=D, BD=BD, BT=BT, F=4 * D, FT=chunk_f_tile(D), HAS_DFINAL=has_dfinal,
        num_warps=tiling(D).bwd_warps,
    )
    dln = dln_p.view(N, H, split, 2, D).sum((0, 2))
    return (dq, dk, dv, deta, dln[:, 0].to(ln_weight.dtype), dln[:, 1].to(ln_bias.dtype), ds_p.sum(0),
            *dW, *dsums)
