"""TTT-Linear's backward dW chain (`triton_chunk_bwd._chain_kernel`) with dW's columns split over programs.

The chain carries dW, db back over a sequence's mini-batches, one program per (sequence, head): at long T with
few sequences it is the backward's cost (~13 us per mini-batch at D=128 on the H100). Here, as in the split
forward (`triton_split`), SPLIT programs per (sequence, head) hold NC columns of dW and db each. Per mini-batch
every column of k dW, dE and of the update q^T dZq + k^T dZt needs only its own column, except through the
backward of the LayerNorm-L2 gradient, whose row sums all follow from seven column sums per token (with
g = eta dE and a = lnw^2):
    R1 = sum g, R2 = sum g xhat, R3 = sum g G, R4 = sum a g, R5 = sum a g xhat, R6 = sum a xhat,
    R7 = sum a xhat^2
(see `_split_dzt`), and through E dSum^T, which the chain stores for dk: its programs exchange their
[BT, BD] parts of E dW^T beside the sums, once per mini-batch, and each stores its columns of the total.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tttlm.ops.ttt_linear.triton_parts import _dot, _dot_acc, _head_ln, _minibatch_tokens, _sequence, block_d
from tttlm.ops.ttt_linear.triton_split import _arrive_and_wait, _gathered, _post

SUMS = tl.constexpr(8)  # the seven column sums, rounded up to a power of two
# Programs per (sequence, head) the chain may take, by on-chip head dim, most first (`triton_split.split_count`).
# Unlike the forward's, the chain's step gains from the split at D=64 and with 2 programs per head; timed on the
# H100, fwd+bwd in ms with one program per head against split: H16xD128 T=8k B=4 16.6 / 14.8 (2), H32xD64
# T=32k B=1 25.1 / 22.5 (2) / 21.3 (4). With more programs than SMs it lost (H16xD128 T=2k B=16, split 2:
# 13.1 against 12.3), and then the exchange could wait on programs that never start.
SPLITS = {128: (8, 4, 2), 64: (4, 2)}
# Warps per program by (on-chip head dim, columns per program), timed on the H100 (fwd+bwd): at 128 x 16
# columns 4 beat 8 and 16 (25.6 / 27.3 / 40.9 ms at H16xD128 T=32k) although they spill 184 stack bytes; at
# 128 x 32, 8 beat 4 and 16 (35.7 / 38.5 / 51.9 at H32xD128 T=32k); at 128 x 64, 8 beat 4 (14.8 / 15.9 at
# T=8k); at 64 x 16, 8 beat 4 (21.3 / 26.7 at H32xD64 T=32k); at 64 x 32 only 8 was timed. 4 where SPLITS
# offers no split (forced in tests).
NUM_WARPS = {(128, 16): 4, (128, 32): 8, (128, 64): 8, (64, 16): 8, (64, 32): 8}


@triton.jit
def _split_dzt(g, xh, G, rstd, mG, mGx, a, sum_a, R1, R2, R3, R4, R5, R6, R7, cm, D: tl.constexpr):
    """`triton_parts._ln_l2_grad_bwd`'s dZ for columns `cm` of the [BT, NC] tiles g = eta dE, xhat, G and a
    = lnw^2 [NC], from the row sums R1..R7 over all D columns (module docstring) and the forward's rstd, mean(G)
    and mean(G xhat) [BT]: every row sum it takes is one of these, or follows from them and sum a:
    sum a dG = rstd (R4 - mg sum a - mgx R6), sum a dG xhat = rstd (R5 - mg R6 - mgx R7), sum G = D mean(G)."""
    mg = R1 / D
    mgx = R2 / D
    dr = R3 - mG * R1 - mGx * R2
    dG = tl.where(cm[None, :], rstd[:, None] * (g - mg[:, None] - xh * mgx[:, None]), 0.0)
    dx = a[None, :] * dG - rstd[:, None] * (g * mGx[:, None] + G * mgx[:, None])
    mdx = (rstd * (R4 - mg * sum_a - mgx * R6) - rstd * (mGx * R1 + mgx * D * mG)) / D
    mdxx = (rstd * (R5 - mg * R6 - mgx * R7) - rstd * (mGx * R2 + mgx * D * mGx)) / D
    dZ = tl.where(cm[None, :], rstd[:, None] * (dx - mdx[:, None] - xh * mdxx[:, None]), 0.0)
    return dZ - (dr * rstd * rstd / D)[:, None] * xh


@triton.jit
def _split_chain_load(m, Q, K, V, ETA, XH, RSTD, MG, DZQ, DEP, h, H, s, start, off, L, D: tl.constexpr,
                      BD: tl.constexpr, NC: tl.constexpr, BT: tl.constexpr):
    """Mini-batch m's tiles for `_split_chain_step` (zeros outside the sequence): q, k [BT,BD]; this program's
    columns [BT,NC] of k, v, xhat, dZq and the local part of dE; eta, rstd, mean(G), mean(G xhat) [BT]."""
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    rows = (tok * H + h) * D
    d = tl.arange(0, BD)
    c = s * NC + tl.arange(0, NC)
    fm = valid[:, None] & (d < D)[None, :]
    cm = valid[:, None] & (c < D)[None, :]
    at = rows[:, None] + c[None, :]
    return (
        tl.load(Q + rows[:, None] + d[None, :], mask=fm, other=0.0),
        tl.load(K + rows[:, None] + d[None, :], mask=fm, other=0.0),
        tl.load(K + at, mask=cm, other=0.0),
        tl.load(V + at, mask=cm, other=0.0),
        tl.load(XH + at, mask=cm, other=0.0),
        tl.load(DZQ + at, mask=cm, other=0.0),
        tl.load(DEP + at, mask=cm, other=0.0),
        tl.load(ETA + tok * H + h, mask=valid, other=0.0),
        tl.load(RSTD + tok * H + h, mask=valid, other=0.0),
        tl.load(MG + (tok * H + h) * 2, mask=valid, other=0.0),
        tl.load(MG + (tok * H + h) * 2 + 1, mask=valid, other=0.0),
    )


@triton.jit
def _split_chain_step(
    m, dW, db, tiles,
    S, DGWF, DGBF, DE, DKW, DEP, DW1, DB1, DGW0, DGB0, Xg, CNT,
    lnw, lnb, a, sum_a, g, s, base, h, H, start, off, L, num_mb,
    D: tl.constexpr, BD: tl.constexpr, NC: tl.constexpr, BT: tl.constexpr, SPLIT: tl.constexpr,
    FIRST: tl.constexpr, OPEN: tl.constexpr,
):
    """`triton_chunk_bwd._chain_step` for columns s*NC .. s*NC+NC-1: dW [BD,NC], db [NC] in and out."""
    q, k, k_c, v_c, xh, dZq, dE, eta, rstd, mG, mGx = tiles
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    c = s * NC + tl.arange(0, NC)
    cm = c < D
    wm = (d < D)[:, None] & cm[None, :]
    w_off = d[:, None] * D + c[None, :]
    tm = valid[:, None] & cm[None, :]
    at = (tok * H + h)[:, None] * D + c[None, :]
    q = q.to(tl.float32)
    k = k.to(tl.float32)
    eta = eta.to(tl.float32)
    full = ((m + 1) * BT <= off + L).to(tl.float32)
    cf = tl.load(S + BT - 1) * full
    G = lnw[None, :] * (lnw[None, :] * xh + lnb[None, :] - v_c.to(tl.float32) + k_c.to(tl.float32))
    E = eta[:, None] * tl.where(cm[None, :], rstd[:, None] * (G - mG[:, None] - xh * mGx[:, None]), 0.0)

    kdW = _dot(k, dW)
    kdS = -cf * kdW
    dSb = -cf * db
    EdS = _dot(E, tl.trans(-cf * dW))  # this program's part of E dSum^T [BT, BD]
    tl.store(DEP + at, kdW + db[None, :], mask=tm)  # for the gradient of s_{b-1}, as in `_chain_step`
    if OPEN:
        is_open = (m == num_mb - 1) & (full == 0.0)
        dGW = tl.load(DGWF + base * D * D + w_off, mask=wm & is_open, other=0.0)
        kdS = _dot_acc(k, dGW, kdS)
        EdS = _dot_acc(E, tl.trans(dGW), EdS)
        dSb += tl.load(DGBF + base * D + c, mask=cm & is_open, other=0.0)
    if FIRST:  # as in `_chain_step`
        tl.store(DW1 + base * D * D + w_off, dW, mask=wm)
        tl.store(DB1 + base * D + c, db, mask=cm)
        dSum = -cf * dW
        if OPEN:
            dSum += dGW
        dC = -tl.load(S + i)[:, None] * dZq
        tl.store(DGW0 + base * D * D + w_off, _dot_acc(tl.trans(q), dC, dSum), mask=wm)
        tl.store(DGB0 + base * D + c, tl.sum(dC, 0) + dSb, mask=cm)
    dE += kdS + dSb[None, :]
    tl.store(DE + at, dE, mask=tm)

    gE = eta[:, None] * dE
    t = num_mb - 1 - m  # the exchange counts steps taken, from the last mini-batch back
    R: tl.constexpr = SUMS * BT + BT * BD  # per program: the sums, then its part of E dSum^T
    _post(Xg, tl.sum(gE, 1), t, s, 0, SPLIT, R, BT)
    _post(Xg, tl.sum(gE * xh, 1), t, s, 1, SPLIT, R, BT)
    _post(Xg, tl.sum(gE * G, 1), t, s, 2, SPLIT, R, BT)
    _post(Xg, tl.sum(a[None, :] * gE, 1), t, s, 3, SPLIT, R, BT)
    _post(Xg, tl.sum(a[None, :] * gE * xh, 1), t, s, 4, SPLIT, R, BT)
    _post(Xg, tl.sum(a[None, :] * xh, 1), t, s, 5, SPLIT, R, BT)
    _post(Xg, tl.sum(a[None, :] * xh * xh, 1), t, s, 6, SPLIT, R, BT)
    parts = Xg + SUMS * BT + i[:, None] * BD
    tl.store(parts + ((t % 2) * SPLIT + s) * R + d[None, :], EdS)
    _arrive_and_wait(CNT + g, t, SPLIT)
    total = tl.zeros((BT, NC), tl.float32)
    for r in tl.static_range(SPLIT):
        total += tl.load(parts + ((t % 2) * SPLIT + r) * R + c[None, :], cache_modifier=".cg")
    tl.store(DKW + at, total, mask=tm)
    dZt = _split_dzt(
        gE, xh, G, rstd, mG, mGx, a, sum_a,
        _gathered(Xg, t, 0, SPLIT, R, BT), _gathered(Xg, t, 1, SPLIT, R, BT), _gathered(Xg, t, 2, SPLIT, R, BT),
        _gathered(Xg, t, 3, SPLIT, R, BT), _gathered(Xg, t, 4, SPLIT, R, BT), _gathered(Xg, t, 5, SPLIT, R, BT),
        _gathered(Xg, t, 6, SPLIT, R, BT), cm, D,
    )
    dW = _dot_acc(tl.trans(q), dZq, dW)
    dW = _dot_acc(tl.trans(k), dZt, dW)
    db += tl.sum(dZq, 0) + tl.sum(dZt, 0)
    return dW, db


@triton.jit
def _split_chain_kernel(
    Q, K, V, ETA, LNW, LNB, S, CU, OFF, XH, RSTD, MG, DZQ, DEP, DWF, DBF, DGWF, DGBF,
    DE, DKW, DW1, DB1, DW0, DB0, DGW0, DGB0, X, CNT,
    H, D: tl.constexpr, BD: tl.constexpr, NC: tl.constexpr, BT: tl.constexpr, SPLIT: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):
    """`triton_chunk_bwd._chain_kernel`, program (sequence n, head h, part s) with columns s*NC .. s*NC+NC-1.
    X [N*H, 2, SPLIT, SUMS*BT + BT*BD] float32 is the exchange and CNT [N*H] int32 (zeros) counts arrivals."""
    pid = tl.program_id(0)
    g = pid // SPLIT
    s = pid % SPLIT
    n = g // H
    h = g % H
    start, L, off, num_mb = _sequence(CU, OFF, n, BT)
    d = tl.arange(0, BD)
    c = s * NC + tl.arange(0, NC)
    cm = c < D
    wm = (d < D)[:, None] & cm[None, :]
    w_off = d[:, None] * D + c[None, :]
    base = g.to(tl.int64)
    Xg = X + base * (2 * SPLIT * (SUMS * BT + BT * BD))
    lnw, lnb = _head_ln(LNW, LNB, h, c, D)
    lnw_all = tl.load(LNW + h * D + d, mask=d < D, other=0.0).to(tl.float32)
    sum_a = tl.sum(lnw_all * lnw_all, 0)
    a = lnw * lnw
    top = num_mb - 1  # as in `_chain_kernel`: the loop takes mini-batches top..1, the first one is peeled
    tiles = _split_chain_load(top, Q, K, V, ETA, XH, RSTD, MG, DZQ, DEP, h, H, s, start, off, L, D, BD, NC, BT)
    if HAS_DFINAL:
        dW = tl.load(DWF + base * D * D + w_off, mask=wm, other=0.0)
        db = tl.load(DBF + base * D + c, mask=cm, other=0.0)
        if ((off + L) % BT != 0) & (num_mb > 1):
            ahead = _split_chain_load(top - 1, Q, K, V, ETA, XH, RSTD, MG, DZQ, DEP, h, H, s, start, off, L,
                                      D, BD, NC, BT)
            dW, db = _split_chain_step(
                top, dW, db, tiles,
                S, DGWF, DGBF, DE, DKW, DEP, DW1, DB1, DGW0, DGB0, Xg, CNT,
                lnw, lnb, a, sum_a, g, s, base, h, H, start, off, L, num_mb, D, BD, NC, BT, SPLIT, False, True,
            )
            tiles = ahead
            top = num_mb - 2
    else:
        dW = tl.zeros([BD, NC], dtype=tl.float32)
        db = tl.zeros([NC], dtype=tl.float32)
    for r in range(num_mb - top, num_mb):
        m = num_mb - r
        ahead = _split_chain_load(m - 1, Q, K, V, ETA, XH, RSTD, MG, DZQ, DEP, h, H, s, start, off, L,
                                  D, BD, NC, BT)
        dW, db = _split_chain_step(
            m, dW, db, tiles,
            S, DGWF, DGBF, DE, DKW, DEP, DW1, DB1, DGW0, DGB0, Xg, CNT,
            lnw, lnb, a, sum_a, g, s, base, h, H, start, off, L, num_mb, D, BD, NC, BT, SPLIT, False, False,
        )
        tiles = ahead
    dW, db = _split_chain_step(
        0, dW, db, tiles,
        S, DGWF, DGBF, DE, DKW, DEP, DW1, DB1, DGW0, DGB0, Xg, CNT,
        lnw, lnb, a, sum_a, g, s, base, h, H, start, off, L, num_mb, D, BD, NC, BT, SPLIT, True, HAS_DFINAL,
    )
    tl.store(DW0 + base * D * D + w_off, dW, mask=wm)
    tl.store(DB0 + base * D + c, db, mask=cm)


def split_chain(q, k, v, eta, ln_weight, ln_bias, s, cu, offset, XH, RSTD, MG, DZQ, DEP, dWF, dBF, dGWF, dGBF,
                DE, DKW, dW1, db1, dW0, db0, dgW0, dgb0, has_dfinal, split):
    """Launch `_split_chain_kernel` over N*H*split programs, arguments as `_chain_kernel`'s."""
    _, H, D = q.shape
    N, BT = dW0.shape[0], s.numel()
    BD = block_d(D)
    X = torch.empty((N * H, 2, split, SUMS.value * BT + BT * BD), dtype=torch.float32, device=q.device)
    cnt = torch.zeros(N * H, dtype=torch.int32, device=q.device)
    _split_chain_kernel[(N * H * split,)](
        q, k, v, eta, ln_weight, ln_bias, s, cu, offset, XH, RSTD, MG, DZQ, DEP, dWF, dBF, dGWF, dGBF,
        DE, DKW, dW1, db1, dW0, db0, dgW0, dgb0, X, cnt,
        H, D=D, BD=BD, NC=BD // split, BT=BT, SPLIT=split, HAS_DFINAL=has_dfinal,
        num_warps=NUM_WARPS.get((BD, BD // split), 4),
    )
