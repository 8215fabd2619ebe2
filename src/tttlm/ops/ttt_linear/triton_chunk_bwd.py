"""TTT-Linear's backward pass on the GPU: two short sequential kernels and two parallel ones.

The forward recursion (`triton_chunk`) couples mini-batches only through the weights W_m, b_m at their
starts, and the backward couples them only through dW_m, db_m (the gradients w.r.t. those). So:

1. `_weights_kernel`, one program per (sequence, head), walks back from the final weights and rebuilds every
   W_m = W_{m+1} + s_{b-1} K_m^T E_m (E as the forward stored it), storing each one.
2. `_local_kernel`, one program per (mini-batch, head), recomputes the mini-batch from its W_m and does the
   part of its backward that does not depend on later mini-batches: the output LayerNorm, dq, and the parts
   of dE and dk that come through the causal products.
3. `_chain_kernel`, one program per (sequence, head), carries only dW and db back: per mini-batch one product
   k dW_{m+1}, the LayerNorm-L2 gradient's Jacobian applied to dE, and dW += q^T dZq + k^T dZt. It stores
   dE and the dW_{m+1} it was handed.
4. `_finish_kernel`, one program per (mini-batch, head): dv, deta, the inner LayerNorm's gradient, and
   dk += E dSum^T + dZt W_m^T (dSum = -s_{b-1} dW_{m+1}, the gradient of what the mini-batch handed on).

The sequential kernels hold one D x D matrix each and load each step's tiles one step ahead; the rest runs
with the GPU full whatever the batch. The price is memory, freed when the backward returns: W_m and dW_{m+1}
for every mini-batch (2 x 4 D^2 bytes per 16 tokens and head) and five float32 [tokens, H, D] buffers.

Mini-batch slots: sequence n owns slots mb_cum[n] .. mb_cum[n+1]-1 (its mini-batches on the grid of
`ttt_common.make_layout`); the parallel kernels get a slot -> sequence table and skip slots past the last one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tttlm.ops.ttt_linear.triton_parts import (
    _dot,
    _dot_acc,
    _layernorm,
    _ln_bwd,
    _ln_l2_grad,
    _ln_l2_grad_bwd,
    _load_inputs,
    _mat_ptrs,
    _minibatch_tokens,
    _sequence,
    _tile_ptrs,
    block_d,
    new,
)

# Warps per program by on-chip head dim, for the sequential and the parallel kernels
# (benchmarks/gpu_ttt_linear.py --sweep times the alternatives).
CHAIN_NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}
LOCAL_NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}


# --------------------------------------------------------------------------------------- 1. weights per slot
@triton.jit
def _weights_load(m, K, E_ST, h, H, start, off, L, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    vm = valid[:, None] & (tl.arange(0, BD) < D)[None, :]
    k = tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0)
    return k, tl.load(_tile_ptrs(E_ST, tok, h, H, D, BD), mask=vm, other=0.0)


@triton.jit
def _weights_step(
    m, W, bv, k, E, GW0, GB0, WM, BM, base, h, H, off, L, slot0, s_last,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, FIRST: tl.constexpr,
):
    """W, b at the start of mini-batch m from those after it (and, for the first, the state's open sums)."""
    d = tl.arange(0, BD)
    dm = d < D
    dd = dm[:, None] & dm[None, :]
    c = s_last * ((m + 1) * BT <= off + L).to(tl.float32)
    Sb = tl.sum(E, 0)
    if FIRST:
        W += c * tl.load(_mat_ptrs(GW0, base, D, BD), mask=dd, other=0.0)
        Sb += tl.load(GB0 + base * D + d, mask=dm, other=0.0)
    W = _dot_acc(tl.trans(k.to(tl.float32)) * c, E, W)
    bv += c * Sb
    row = ((slot0 + m) * H + h).to(tl.int64)
    tl.store(_mat_ptrs(WM, row, D, BD), W, mask=dd)
    tl.store(BM + row * D + d, bv, mask=dm)
    return W, bv


@triton.jit
def _weights_kernel(
    K, E_ST, S, CU, OFF, MBCUM, GW0, GB0, WF, BF, WM, BM,
    H, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    start, L, off, num_mb = _sequence(CU, OFF, n, BT)
    d = tl.arange(0, BD)
    base = pid.to(tl.int64)
    W = tl.load(_mat_ptrs(WF, base, D, BD), mask=(d[:, None] < D) & (d[None, :] < D), other=0.0)
    bv = tl.load(BF + base * D + d, mask=d < D, other=0.0)
    s_last = tl.load(S + BT - 1)
    slot0 = tl.load(MBCUM + n)
    # each step's tiles are loaded one step ahead, so their latency hides behind the step before
    k, E = _weights_load(num_mb - 1, K, E_ST, h, H, start, off, L, D, BD, BT)
    for r in range(1, num_mb):
        m = num_mb - r
        k_next, E_next = _weights_load(m - 1, K, E_ST, h, H, start, off, L, D, BD, BT)
        W, bv = _weights_step(m, W, bv, k, E, GW0, GB0, WM, BM, base, h, H, off, L, slot0, s_last, D, BD, BT, False)
        k, E = k_next, E_next
    _weights_step(0, W, bv, k, E, GW0, GB0, WM, BM, base, h, H, off, L, slot0, s_last, D, BD, BT, True)


# ------------------------------------------------------------------------------------ 2. per mini-batch, local
@triton.jit
def _slot(g, n, MBCUM, CU, OFF, BT: tl.constexpr):
    """Slot g of the parallel kernels' grid, in sequence n: its mini-batch m, the sequence's start, length,
    offset and number of mini-batches (`_sequence`), and m's tokens and their validity."""
    m = g - tl.load(MBCUM + n)
    start, L, off, num_mb = _sequence(CU, OFF, n, BT)
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    return m, start, L, off, num_mb, tok, valid


@triton.jit
def _local_kernel(
    Q, K, V, ETA, DO, LNW, LNB, S, CU, OFF, SEQ, MBCUM, GW0, GB0, WM, BM,
    DQ, DZQ, DEP, DKP, XH, RSTD, DLN_P, DS_P,
    eps, N, H, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(SEQ + g)
    if n < N:
        m, start, L, off, _, tok, valid = _slot(g, n, MBCUM, CU, OFF, BT)
        i = tl.arange(0, BT)
        d = tl.arange(0, BD)
        dm = d < D
        dd = dm[:, None] & dm[None, :]
        vm = valid[:, None] & dm[None, :]
        row = (g * H + h).to(tl.int64)
        seq = (n * H + h).to(tl.int64)
        q_in, k_in, v, eta = _load_inputs(m, Q, K, V, ETA, h, H, start, off, L, D, BD, BT)
        q = q_in.to(tl.float32)
        k = k_in.to(tl.float32)
        v = v.to(tl.float32)
        eta = eta.to(tl.float32)
        do = tl.load(_tile_ptrs(DO, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
        s = tl.load(S + i)
        lnw = tl.load(LNW + h * D + d, mask=dm, other=0.0).to(tl.float32)
        lnb = tl.load(LNB + h * D + d, mask=dm, other=0.0).to(tl.float32)
        W = tl.load(_mat_ptrs(WM, row, D, BD), mask=dd, other=0.0)
        Wt = tl.load(_mat_ptrs(WM, row, D, BD, True), mask=dd, other=0.0)  # a second read, not a transpose
        bv = tl.load(BM + row * D + d, mask=dm, other=0.0)

        # the forward of this mini-batch
        Z = _dot(k, W) + bv[None, :]
        xh, rstd, _, dZ = _ln_l2_grad(Z, v, k, lnw, lnb, D, BD, eps)
        E = eta[:, None] * dZ
        causal = i[:, None] >= i[None, :]
        A = tl.where(causal, tl.dot(q_in, tl.trans(k_in)) + 1.0, 0.0)
        C = _dot(A, E)
        if m == 0:
            C = _dot_acc(q, tl.load(_mat_ptrs(GW0, seq, D, BD), mask=dd, other=0.0), C)
            C += tl.load(GB0 + seq * D + d, mask=dm, other=0.0)[None, :]
        Zq = _dot(q, W) + bv[None, :] - s[:, None] * C
        xq, rq = _layernorm(Zq, D, BD, eps)

        # its backward up to dE (all but what comes from later mini-batches)
        dZq = _ln_bwd(lnw[None, :] * do, xq, rq, D, BD)
        dC = -s[:, None] * dZq
        dA = tl.where(causal, _dot(dC, tl.trans(E)), 0.0)
        dq = do + _dot(dZq, Wt)
        dq = _dot_acc(dA, k, dq)
        if m == 0:
            dq = _dot_acc(dC, tl.load(_mat_ptrs(GW0, seq, D, BD, True), mask=dd, other=0.0), dq)
        tl.store(_tile_ptrs(DQ, tok, h, H, D, BD), dq.to(DQ.dtype.element_ty), mask=vm)
        tl.store(_tile_ptrs(DZQ, tok, h, H, D, BD), dZq, mask=vm)
        tl.store(_tile_ptrs(DEP, tok, h, H, D, BD), _dot(tl.trans(A), dC), mask=vm)
        tl.store(_tile_ptrs(DKP, tok, h, H, D, BD), _dot(tl.trans(dA), q), mask=vm)
        tl.store(_tile_ptrs(XH, tok, h, H, D, BD), xh, mask=vm)
        tl.store(RSTD + tok * H + h, rstd, mask=valid)
        tl.store(DLN_P + (row * 2) * D + d, tl.sum(do * xq, 0), mask=dm)
        tl.store(DLN_P + (row * 2 + 1) * D + d, tl.sum(do, 0), mask=dm)
        tl.store(DS_P + row * BT + i, -tl.sum(dZq * C, 1))


# ----------------------------------------------------------------------------------------- 3. the dW chain
@triton.jit
def _chain_load(m, Q, K, V, ETA, XH, RSTD, DZQ, DEP, h, H, start, off, L, D: tl.constexpr, BD: tl.constexpr,
                BT: tl.constexpr):
    """Mini-batch m's input tiles for `_chain_step` (zeros outside the sequence): q, k, v, eta, rstd, xhat,
    dZq and the local part of dE."""
    q, k, v, eta = _load_inputs(m, Q, K, V, ETA, h, H, start, off, L, D, BD, BT)
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    vm = valid[:, None] & (tl.arange(0, BD) < D)[None, :]
    return (
        q,
        k,
        v,
        eta,
        tl.load(RSTD + tok * H + h, mask=valid, other=0.0),
        tl.load(_tile_ptrs(XH, tok, h, H, D, BD), mask=vm, other=0.0),
        tl.load(_tile_ptrs(DZQ, tok, h, H, D, BD), mask=vm, other=0.0),
        tl.load(_tile_ptrs(DEP, tok, h, H, D, BD), mask=vm, other=0.0),
    )


@triton.jit
def _chain_step(
    m, dW, db, ds, tiles,
    S, GW0, GB0, DGWF, DGBF, DWN, DE, DGW0, DGB0,
    lnw, lnb, base, h, H, start, off, L, num_mb, slot0,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, FIRST: tl.constexpr, OPEN: tl.constexpr,
):
    """Mini-batch m in reverse. In: dW, db w.r.t. the weights after it. Out: w.r.t. the weights at its start,
    and the running sum ds [BT] (token_scale). tiles: its tiles from `_chain_load`. OPEN: the mini-batch may
    be the row's last and unfinished, which hands its sums to the final state (whose gradient is DGWF, DGBF)
    instead of to the weights."""
    q, k, v, eta, rstd, xh, dZq, dE = tiles
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    dm = d < D
    dd = dm[:, None] & dm[None, :]
    vm = valid[:, None] & dm[None, :]
    row = ((slot0 + m) * H + h).to(tl.int64)
    tl.store(_mat_ptrs(DWN, row, D, BD), dW, mask=dd)
    q = q.to(tl.float32)
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    eta = eta.to(tl.float32)
    full = ((m + 1) * BT <= off + L).to(tl.float32)
    c = tl.load(S + BT - 1) * full
    G = lnw[None, :] * (lnw[None, :] * xh + lnb[None, :] - v + k)  # zero in the padding columns, as lnw is
    E = eta[:, None] * _ln_bwd(G, xh, rstd, D, BD)
    Sb = tl.sum(E, 0)

    kdW = _dot(k, dW)
    kdS = -c * kdW
    dSb = -c * db
    if OPEN:
        is_open = (m == num_mb - 1) & (full == 0.0)
        dGW = tl.load(_mat_ptrs(DGWF, base, D, BD), mask=dd & is_open, other=0.0)
        kdS = _dot_acc(k, dGW, kdS)
        dSb += tl.load(DGBF + base * D + d, mask=dm & is_open, other=0.0)
    ds_last = -full * (tl.sum(tl.sum(kdW * E, 1), 0) + tl.sum(db * Sb, 0))
    if FIRST:
        gW = tl.load(_mat_ptrs(GW0, base, D, BD), mask=dd, other=0.0)
        gb = tl.load(GB0 + base * D + d, mask=dm, other=0.0)
        ds_last -= full * (tl.sum(tl.sum(dW * gW, 1), 0) + tl.sum(db * gb, 0))
        dSum = -c * dW
        if OPEN:
            dSum += dGW
        dC = -tl.load(S + i)[:, None] * dZq
        tl.store(_mat_ptrs(DGW0, base, D, BD), _dot_acc(tl.trans(q), dC, dSum), mask=dd)
        tl.store(DGB0 + base * D + d, tl.sum(dC, 0) + dSb, mask=dm)
    dE += kdS + dSb[None, :]
    tl.store(_tile_ptrs(DE, tok, h, H, D, BD), dE, mask=vm)
    dZt, _ = _ln_l2_grad_bwd(dE, xh, rstd, G, eta, lnw, D, BD)

    dW = _dot_acc(tl.trans(q), dZq, dW)
    dW = _dot_acc(tl.trans(k), dZt, dW)
    db += tl.sum(dZq, 0) + tl.sum(dZt, 0)
    ds += tl.where(i == BT - 1, ds_last, 0.0)
    return dW, db, ds


@triton.jit
def _chain_kernel(
    Q, K, V, ETA, LNW, LNB, S, CU, OFF, MBCUM, GW0, GB0, XH, RSTD, DZQ, DEP, DWF, DBF, DGWF, DGBF,
    DWN, DE, DW0, DB0, DGW0, DGB0, DS,
    H, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, HAS_DFINAL: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    start, L, off, num_mb = _sequence(CU, OFF, n, BT)
    d = tl.arange(0, BD)
    dm = d < D
    dd = dm[:, None] & dm[None, :]
    base = pid.to(tl.int64)
    slot0 = tl.load(MBCUM + n)
    lnw = tl.load(LNW + h * D + d, mask=dm, other=0.0).to(tl.float32)
    lnb = tl.load(LNB + h * D + d, mask=dm, other=0.0).to(tl.float32)
    ds = tl.zeros([BT], dtype=tl.float32)
    # each step's tiles are loaded one step ahead, so their latency hides behind the step before
    top = num_mb - 1  # the loop takes mini-batches top..1, the first one is peeled
    tiles = _chain_load(top, Q, K, V, ETA, XH, RSTD, DZQ, DEP, h, H, start, off, L, D, BD, BT)
    if HAS_DFINAL:
        dW = tl.load(_mat_ptrs(DWF, base, D, BD), mask=dd, other=0.0)
        db = tl.load(DBF + base * D + d, mask=dm, other=0.0)
        # an unfinished last mini-batch is peeled too, so that the loop never holds the final sums' gradient
        if ((off + L) % BT != 0) & (num_mb > 1):
            tiles_next = _chain_load(top - 1, Q, K, V, ETA, XH, RSTD, DZQ, DEP, h, H, start, off, L, D, BD, BT)
            dW, db, ds = _chain_step(
                top, dW, db, ds, tiles,
                S, GW0, GB0, DGWF, DGBF, DWN, DE, DGW0, DGB0,
                lnw, lnb, base, h, H, start, off, L, num_mb, slot0, D, BD, BT, False, True,
            )
            tiles = tiles_next
            top = num_mb - 2
    else:
        dW = tl.zeros([BD, BD], dtype=tl.float32)
        db = tl.zeros([BD], dtype=tl.float32)
    for r in range(num_mb - top, num_mb):
        m = num_mb - r
        tiles_next = _chain_load(m - 1, Q, K, V, ETA, XH, RSTD, DZQ, DEP, h, H, start, off, L, D, BD, BT)
        dW, db, ds = _chain_step(
            m, dW, db, ds, tiles,
            S, GW0, GB0, DGWF, DGBF, DWN, DE, DGW0, DGB0,
            lnw, lnb, base, h, H, start, off, L, num_mb, slot0, D, BD, BT, False, False,
        )
        tiles = tiles_next
    dW, db, ds = _chain_step(
        0, dW, db, ds, tiles,
        S, GW0, GB0, DGWF, DGBF, DWN, DE, DGW0, DGB0,
        lnw, lnb, base, h, H, start, off, L, num_mb, slot0, D, BD, BT, True, HAS_DFINAL,
    )
    tl.store(_mat_ptrs(DW0, base, D, BD), dW, mask=dd)
    tl.store(DB0 + base * D + d, db, mask=dm)
    tl.store(DS + base * BT + tl.arange(0, BT), ds)


# --------------------------------------------------------------------------------- 4. the rest, per mini-batch
@triton.jit
def _finish_kernel(
    K, V, ETA, LNW, LNB, S, CU, OFF, SEQ, MBCUM, WM, DWN, DGWF, XH, RSTD, DE, DKP,
    DK, DV, DETA, DLN_P,
    N, H, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, HAS_DFINAL: tl.constexpr,
):
    """dv, deta, dk and the inner LayerNorm's gradient from dE: through the LayerNorm-L2 gradient, and
    dk += E dSum^T + dZ W_m^T, with dSum the gradient of what the mini-batch handed on."""
    g = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(SEQ + g)
    if n < N:
        m, start, L, off, num_mb, tok, valid = _slot(g, n, MBCUM, CU, OFF, BT)
        d = tl.arange(0, BD)
        dm = d < D
        dd = dm[:, None] & dm[None, :]
        vm = valid[:, None] & dm[None, :]
        row = (g * H + h).to(tl.int64)
        k = tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
        v = tl.load(_tile_ptrs(V, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
        eta = tl.load(ETA + tok * H + h, mask=valid, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tok * H + h, mask=valid, other=0.0)
        xh = tl.load(_tile_ptrs(XH, tok, h, H, D, BD), mask=vm, other=0.0)
        dE = tl.load(_tile_ptrs(DE, tok, h, H, D, BD), mask=vm, other=0.0)
        lnw = tl.load(LNW + h * D + d, mask=dm, other=0.0).to(tl.float32)
        lnb = tl.load(LNB + h * D + d, mask=dm, other=0.0).to(tl.float32)
        y = lnw[None, :] * xh + lnb[None, :]
        G = lnw[None, :] * (y - v + k)
        dZ = _ln_bwd(G, xh, rstd, D, BD)
        dZt, dG = _ln_l2_grad_bwd(dE, xh, rstd, G, eta, lnw, D, BD)
        dy = lnw[None, :] * dG
        tl.store(DETA + tok * H + h, tl.sum(dE * dZ, 1).to(DETA.dtype.element_ty), mask=valid)
        tl.store(_tile_ptrs(DV, tok, h, H, D, BD), (-dy).to(DV.dtype.element_ty), mask=vm)
        dln_w = DLN_P + (row * 2) * D + d
        dln_b = DLN_P + (row * 2 + 1) * D + d
        tl.store(dln_w, tl.load(dln_w, mask=dm) + tl.sum(dG * (y - v + k) + dy * xh, 0), mask=dm)
        tl.store(dln_b, tl.load(dln_b, mask=dm) + tl.sum(dy, 0), mask=dm)

        full = ((m + 1) * BT <= off + L).to(tl.float32)
        dSum_t = -(tl.load(S + BT - 1) * full) * tl.load(_mat_ptrs(DWN, row, D, BD, True), mask=dd, other=0.0)
        if HAS_DFINAL:
            if (m == num_mb - 1) & (full == 0.0):
                dSum_t += tl.load(_mat_ptrs(DGWF, (n * H + h).to(tl.int64), D, BD, True), mask=dd, other=0.0)
        dk = tl.load(_tile_ptrs(DKP, tok, h, H, D, BD), mask=vm, other=0.0) + dy
        dk = _dot_acc(eta[:, None] * dZ, dSum_t, dk)
        dk = _dot_acc(dZt, tl.load(_mat_ptrs(WM, row, D, BD, True), mask=dd, other=0.0), dk)
        tl.store(_tile_ptrs(DK, tok, h, H, D, BD), dk.to(DK.dtype.element_ty), mask=vm)


# ------------------------------------------------------------------------------------------------ host side
def chunk_backward(q, k, v, eta, ln_weight, ln_bias, s, gW0, gb0, cu, offset, WF, BF, E, do, dfinal, eps):
    """Gradients of `triton_chunk._TTTLinearFn`: q, k, v, do [tokens,H,D], eta [tokens,H], s [BT] float32,
    gW0 [N,H,D,D], gb0 [N,H,D], cu [N+1], offset [N], the forward's final WF, BF and stored E [tokens,H,D]
    (float32); dfinal the final state's (dW, db, dgW, dgb) in float32, or None.

    Returns dq, dk, dv, deta, dln_w, dln_b, dtoken_scale, dW0, db0, dgW0, dgb0."""
    total, H, D = q.shape
    N, BT = WF.shape[0], s.numel()
    dev = q.device
    BD = block_d(D)
    f32 = torch.float32
    lengths = cu[1:] - cu[:-1]
    mb_cum = F.pad(((offset + lengths + BT - 1) // BT).cumsum(0), (1, 0))
    slots = total // BT + 2 * N + 1  # at least sum(mb_cum): each sequence adds at most 2 partial mini-batches
    seq = torch.searchsorted(mb_cum[1:].contiguous(), torch.arange(slots, device=dev), right=True)

    WM, DWN = new((slots, H, D, D), f32, dev), new((slots, H, D, D), f32, dev)
    BM = new((slots, H, D), f32, dev)
    DZQ, DEP, DKP, XH, DE = (new((total, H, D), f32, dev) for _ in range(5))
    RSTD = new((total, H), f32, dev)
    dln_p = torch.zeros(slots, H, 2, D, dtype=f32, device=dev)  # partial sums: unused slots add zeros
    ds_p = torch.zeros(slots, H, BT, dtype=f32, device=dev)
    dq, dk, dv = (new((total, H, D), q.dtype, dev) for _ in range(3))
    deta = new((total, H), eta.dtype, dev)
    dW0, dgW0 = new((N, H, D, D), f32, dev), new((N, H, D, D), f32, dev)
    db0, dgb0 = new((N, H, D), f32, dev), new((N, H, D), f32, dev)
    ds = new((N, H, BT), f32, dev)
    chain_warps, local_warps = CHAIN_NUM_WARPS[BD], LOCAL_NUM_WARPS[BD]
    dims = dict(D=D, BD=BD, BT=BT)
    has_dfinal = dfinal is not None
    dWF, dBF, dGWF, dGBF = dfinal if has_dfinal else (WF, BF, WF, BF)  # unread placeholders without

    _weights_kernel[(N * H,)](k, E, s, cu, offset, mb_cum, gW0, gb0, WF, BF, WM, BM, H, **dims,
                              num_warps=chain_warps)
    _local_kernel[(slots, H)](
        q, k, v, eta, do, ln_weight, ln_bias, s, cu, offset, seq, mb_cum, gW0, gb0, WM, BM,
        dq, DZQ, DEP, DKP, XH, RSTD, dln_p, ds_p, eps, N, H, **dims, num_warps=local_warps,
    )
    _chain_kernel[(N * H,)](
        q, k, v, eta, ln_weight, ln_bias, s, cu, offset, mb_cum, gW0, gb0, XH, RSTD, DZQ, DEP,
        dWF, dBF, dGWF, dGBF, DWN, DE, dW0, db0, dgW0, dgb0, ds, H, **dims,
        HAS_DFINAL=has_dfinal, num_warps=chain_warps,
    )
    _finish_kernel[(slots, H)](
        k, v, eta, ln_weight, ln_bias, s, cu, offset, seq, mb_cum, WM, DWN, dGWF, XH, RSTD, DE, DKP,
        dk, dv, deta, dln_p, N, H, **dims, HAS_DFINAL=has_dfinal, num_warps=local_warps,
    )
    dln = dln_p.sum(0)  # [H, 2, D]
    return (dq, dk, dv, deta, dln[:, 0].to(ln_weight.dtype), dln[:, 1].to(ln_bias.dtype),
            ds.sum((0, 1)) + ds_p.sum((0, 1)), dW0, db0, dgW0, dgb0)
