"""TTT-Linear on the GPU: Triton kernels for the forward and backward passes over whole sequences.

The math is `reference.ttt_linear_ref` in the dual form (Sun et al. 2024, arXiv 2407.04620, §2.5): per
mini-batch of b tokens, with W, b the inner weights at its start,
    Z = K W + b,  E = eta * dl/dZ  (the LayerNorm-L2 gradient, row-wise),
    Zq_i = q_i W + b - s_i (sum_{j<=i} (q_i.k_j + 1) e_j + q_i gW + gb),   o_i = q_i + LN(Zq_i),
    W <- W - s_{b-1} (gW + K^T E)  (b likewise) when the mini-batch is complete,
where (gW, gb) are the state's partial sums (nonzero only in the first mini-batch of a call).

One program per (sequence, head) walks its mini-batches in order with W and b held on chip in float32; the
matrix products run on the tensor cores (tf32 for float32 operands). The backward pass walks them in reverse,
rebuilding each mini-batch's W from the next one and the stored E (W_m = W_{m+1} + s_{b-1} K^T E, exact up to
float32 rounding), so nothing of size D x D per mini-batch is stored.

Head dims up to 128: one that is not a power of two (the 760m presets' 96) is padded on chip to `block_d(D)`
with zeros, and every LayerNorm statistic and LayerNorm gradient is taken over, and kept to, the D real
columns, so the padding stays zero through all updates.

Sequences are aligned to the mini-batch grid as in `ttt_common.make_layout`: sequence n's token t sits at grid
position offset[n] + t; slots outside the sequence load as zeros with eta = 0 and write nothing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.state import TTTLinearState
from tttlm.ops.ttt_common import default_token_scale

MAX_D = 128
SUPPORTED_MINI_BATCH = (16,)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tests set this to fill every kernel output with NaN before the kernels run, so an unwritten element shows.
POISON_OUTPUTS = False


def supports(q: Tensor, mini_batch_size: int) -> bool:
    """Whether these kernels handle q [B,T,H,D] (or [B,H,D] for a step) with this mini-batch size."""
    on_device = q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return (
        on_device
        and 1 <= q.shape[-1] <= MAX_D
        and mini_batch_size in SUPPORTED_MINI_BATCH
        and q.dtype in SUPPORTED_DTYPES
    )


def block_d(D: int) -> int:
    """The on-chip width of a head dim: the next power of two (Triton's tiles), at least 16 (tensor cores)."""
    return max(16, triton.next_power_of_2(D))


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Warps per program by on-chip head dim (block_d), for the forward/step and the backward kernels
# (benchmarks/gpu_ttt_linear.py --sweep times the alternatives).
NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}
BWD_NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}


def _num_warps(D: int) -> int:
    return NUM_WARPS[block_d(D)]


# ---------------------------------------------------------------------------------------------- kernel pieces
@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _dot_acc(a, b, acc):
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _cols(x, D: tl.constexpr, BD: tl.constexpr):
    """x [R, BD] with its padding columns (D and up) set to zero."""
    if BD != D:
        x = tl.where((tl.arange(0, BD) < D)[None, :], x, 0.0)
    return x


@triton.jit
def _layernorm(z, D: tl.constexpr, BD: tl.constexpr, eps):
    """Row-wise xhat [BT,BD] and rstd [BT] of z [BT,BD] over its first D columns (the rest must be zero)."""
    mu = tl.sum(z, 1) / D
    zc = _cols(z - mu[:, None], D, BD)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 1) / D + eps)
    return zc * rstd[:, None], rstd


@triton.jit
def _ln_bwd(g, xh, rstd, D: tl.constexpr, BD: tl.constexpr):
    """d/dz of a LayerNorm's xhat = (z - mean) * rstd, given g = dL/dxhat [BT,BD] (padding columns kept zero)."""
    mg = tl.sum(g, 1) / D
    mgx = tl.sum(g * xh, 1) / D
    return _cols(rstd[:, None] * (g - mg[:, None] - xh * mgx[:, None]), D, BD)


@triton.jit
def _tile_ptrs(X, tok, h, H, D: tl.constexpr, BD: tl.constexpr):
    """Pointers of a [BT, BD] tile of tokens `tok` [BT] (int64) of head h in a [tokens, H, D] tensor."""
    return X + (tok * H + h)[:, None] * D + tl.arange(0, BD)[None, :]


@triton.jit
def _minibatch_tokens(m, start, off, L, BT: tl.constexpr):
    """Token index [BT] (int64) and validity of mini-batch m's slots for a sequence starting at `start`."""
    t = m * BT + tl.arange(0, BT) - off
    valid = (t >= 0) & (t < L)
    return start + t, valid


@triton.jit
def _ln_l2_grad(Z, V, K, lnw, lnb, D: tl.constexpr, BD: tl.constexpr, eps):
    """xhat, rstd, G = lnw*(y - (V - K)) and dZ = d(1/2||LN(Z) - (V - K)||^2)/dZ for a [BT, BD] tile."""
    xh, rstd = _layernorm(Z, D, BD, eps)
    G = lnw[None, :] * (lnw[None, :] * xh + lnb[None, :] - V + K)
    return xh, rstd, G, _ln_bwd(G, xh, rstd, D, BD)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_minibatch(
    m,
    W,
    bv,
    Q,
    K,
    V,
    ETA,
    S,
    O,
    E_OUT,
    GW0,
    GB0,
    WF,
    BF,
    GWF,
    GBF,
    lnw,
    lnb,
    eps,
    n,
    h,
    H,
    start,
    off,
    L,
    num_mb,
    D: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    HAS_SUMS: tl.constexpr,
    STORE_E: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    dd = (d[:, None] < D) & (d[None, :] < D)
    vm = valid[:, None] & (d < D)[None, :]
    q_in = tl.load(_tile_ptrs(Q, tok, h, H, D, BD), mask=vm, other=0.0)
    k_in = tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0)
    q = q_in.to(tl.float32)
    k = k_in.to(tl.float32)
    v = tl.load(_tile_ptrs(V, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
    eta = tl.load(ETA + tok * H + h, mask=valid, other=0.0).to(tl.float32)
    s = tl.load(S + i)
    s_last = tl.load(S + BT - 1)

    Z = _dot(k, W) + bv[None, :]
    _, _, _, dZ = _ln_l2_grad(Z, v, k, lnw, lnb, D, BD, eps)
    E = eta[:, None] * dZ
    if STORE_E:
        tl.store(_tile_ptrs(E_OUT, tok, h, H, D, BD), E, mask=vm)

    P = tl.dot(q_in, tl.trans(k_in))  # exact products of the 16-bit inputs, float32 sums
    A = tl.where(i[:, None] >= i[None, :], P + 1.0, 0.0)
    C = _dot(A, E)
    Sum = _dot(tl.trans(k), E)
    Sb = tl.sum(E, 0)
    if HAS_SUMS:
        base = (n * H + h).to(tl.int64)
        gW = tl.load(GW0 + base * D * D + d[:, None] * D + d[None, :], mask=dd, other=0.0)
        gb = tl.load(GB0 + base * D + d, mask=d < D, other=0.0)
        C = _dot_acc(q, gW, C) + gb[None, :]
        Sum += gW
        Sb += gb
    Zq = _dot(q, W) + bv[None, :] - s[:, None] * C
    xq, _ = _layernorm(Zq, D, BD, eps)
    o = q + lnw[None, :] * xq + lnb[None, :]
    tl.store(_tile_ptrs(O, tok, h, H, D, BD), o.to(O.dtype.element_ty), mask=vm)

    full = ((m + 1) * BT <= off + L).to(tl.float32)  # only a row's last mini-batch can be unfinished
    W_next = W - (s_last * full) * Sum
    b_next = bv - (s_last * full) * Sb
    if STORE_FINAL:
        if m == num_mb - 1:
            base = (n * H + h).to(tl.int64)
            tl.store(WF + base * D * D + d[:, None] * D + d[None, :], W_next, mask=dd)
            tl.store(BF + base * D + d, b_next, mask=d < D)
            tl.store(GWF + base * D * D + d[:, None] * D + d[None, :], (1.0 - full) * Sum, mask=dd)
            tl.store(GBF + base * D + d, (1.0 - full) * Sb, mask=d < D)
    return W_next, b_next


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    ETA,
    LNW,
    LNB,
    S,
    CU,
    OFF,
    W0,
    B0,
    GW0,
    GB0,
    O,
    E_OUT,
    WF,
    BF,
    GWF,
    GBF,
    eps,
    H,
    D: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    STORE_E: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    start = tl.load(CU + n)
    L = tl.load(CU + n + 1) - start
    off = tl.load(OFF + n)
    num_mb = (off + L + BT - 1) // BT
    d = tl.arange(0, BD)
    dd = (d[:, None] < D) & (d[None, :] < D)
    base = (n * H + h).to(tl.int64)
    W = tl.load(W0 + base * D * D + d[:, None] * D + d[None, :], mask=dd, other=0.0)
    bv = tl.load(B0 + base * D + d, mask=d < D, other=0.0)
    lnw = tl.load(LNW + h * D + d, mask=d < D, other=0.0).to(tl.float32)
    lnb = tl.load(LNB + h * D + d, mask=d < D, other=0.0).to(tl.float32)
    W, bv = _fwd_minibatch(
        0,
        W,
        bv,
        Q,
        K,
        V,
        ETA,
        S,
        O,
        E_OUT,
        GW0,
        GB0,
        WF,
        BF,
        GWF,
        GBF,
        lnw,
        lnb,
        eps,
        n,
        h,
        H,
        start,
        off,
        L,
        num_mb,
        D,
        BD,
        BT,
        True,
        STORE_E,
        STORE_FINAL,
    )
    for m in range(1, num_mb):
        W, bv = _fwd_minibatch(
            m,
            W,
            bv,
            Q,
            K,
            V,
            ETA,
            S,
            O,
            E_OUT,
            GW0,
            GB0,
            WF,
            BF,
            GWF,
            GBF,
            lnw,
            lnb,
            eps,
            n,
            h,
            H,
            start,
            off,
            L,
            num_mb,
            D,
            BD,
            BT,
            False,
            STORE_E,
            STORE_FINAL,
        )


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _bwd_minibatch(
    m,
    W,
    bv,
    dW,
    db,
    ds,
    dlnw,
    dlnb,
    Q,
    K,
    V,
    ETA,
    S,
    E_ST,
    DO,
    GW0,
    GB0,
    DGWF,
    DGBF,
    DQ,
    DK,
    DV,
    DETA,
    DGW0,
    DGB0,
    lnw,
    lnb,
    eps,
    n,
    h,
    H,
    start,
    off,
    L,
    num_mb,
    D: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    HAS_SUMS: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):
    """One mini-batch in reverse. In: W, bv after it; dW, db the gradients w.r.t. them. Out: the same for its
    start, plus the running sums ds [BT] (token_scale), dlnw, dlnb [D]."""
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    dd = (d[:, None] < D) & (d[None, :] < D)
    vm = valid[:, None] & (d < D)[None, :]
    base = (n * H + h).to(tl.int64)
    q_in = tl.load(_tile_ptrs(Q, tok, h, H, D, BD), mask=vm, other=0.0)
    k_in = tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0)
    q = q_in.to(tl.float32)
    k = k_in.to(tl.float32)
    v = tl.load(_tile_ptrs(V, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
    eta = tl.load(ETA + tok * H + h, mask=valid, other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DO, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
    s = tl.load(S + i)
    s_last = tl.load(S + BT - 1)
    full = ((m + 1) * BT <= off + L).to(tl.float32)

    # rebuild the mini-batch's starting weights from the stored E
    E_st = tl.load(_tile_ptrs(E_ST, tok, h, H, D, BD), mask=vm, other=0.0)
    Sb = tl.sum(E_st, 0)
    if HAS_SUMS:
        gW = tl.load(GW0 + base * D * D + d[:, None] * D + d[None, :], mask=dd, other=0.0)
        gb = tl.load(GB0 + base * D + d, mask=d < D, other=0.0)
        Sb += gb
        W = _dot_acc(tl.trans(k) * (s_last * full), E_st, W + (s_last * full) * gW)
    else:
        W = _dot_acc(tl.trans(k) * (s_last * full), E_st, W)
    bv = bv + (s_last * full) * Sb

    # recompute the forward
    Z = _dot(k, W) + bv[None, :]
    xh, rstd, G, dZ = _ln_l2_grad(Z, v, k, lnw, lnb, D, BD, eps)
    E = eta[:, None] * dZ
    P = tl.dot(q_in, tl.trans(k_in))
    causal = i[:, None] >= i[None, :]
    A = tl.where(causal, P + 1.0, 0.0)
    C = _dot(A, E)
    if HAS_SUMS:
        C = _dot_acc(q, gW, C) + gb[None, :]
    Zq = _dot(q, W) + bv[None, :] - s[:, None] * C
    xq, rq = _layernorm(Zq, D, BD, eps)

    # gradients of the sums (gW + K^T E) that the mini-batch hands on: the next weights', or the final state's
    kdW = _dot(k, dW)
    c = s_last * full
    dSum = -c * dW
    kdS = -c * kdW
    dSb = -c * db
    if HAS_DFINAL:  # the final state's open sums, when the row's last mini-batch is unfinished
        last_open = (m == num_mb - 1) & (full == 0.0)
        dGW = tl.load(DGWF + base * D * D + d[:, None] * D + d[None, :], mask=dd & last_open, other=0.0)
        dSum += dGW
        kdS = _dot_acc(k, dGW, kdS)
        dSb += tl.load(DGBF + base * D + d, mask=(d < D) & last_open, other=0.0)
    ds_last = -full * (tl.sum(tl.sum(kdW * E, 1), 0) + tl.sum(db * Sb, 0))

    # output LayerNorm
    dlnw += tl.sum(do * xq, 0)
    dlnb += tl.sum(do, 0)
    dxq = lnw[None, :] * do
    dZq = _ln_bwd(dxq, xq, rq, D, BD)
    dq = do + _dot(dZq, tl.trans(W))
    dC = -s[:, None] * dZq
    ds_i = -tl.sum(dZq * C, 1)

    dA = tl.where(causal, _dot(dC, tl.trans(E)), 0.0)
    dE = _dot(tl.trans(A), dC) + kdS + dSb[None, :]
    dq = _dot_acc(dA, k, dq)
    dk = _dot(tl.trans(dA), q) + _dot(E, tl.trans(dSum))
    if HAS_SUMS:
        dq = _dot_acc(dC, tl.trans(gW), dq)
        tl.store(DGW0 + base * D * D + d[:, None] * D + d[None, :], _dot(tl.trans(q), dC) + dSum, mask=dd)
        tl.store(DGB0 + base * D + d, tl.sum(dC, 0) + dSb, mask=d < D)
        ds_last -= full * (tl.sum(tl.sum(dW * gW, 1), 0))

    # through E = eta * dZ and the LayerNorm-L2 gradient dZ(Z)
    deta = tl.sum(dE * dZ, 1)
    g = eta[:, None] * dE
    mG = tl.sum(G, 1) / D
    mGx = tl.sum(G * xh, 1) / D
    mgx = tl.sum(g * xh, 1) / D
    dr = tl.sum(g * (G - mG[:, None] - xh * mGx[:, None]), 1)
    dG = _ln_bwd(g, xh, rstd, D, BD)
    dx = -rstd[:, None] * (g * mGx[:, None] + G * mgx[:, None])
    y = lnw[None, :] * xh + lnb[None, :]
    dy = lnw[None, :] * dG
    dlnw += tl.sum(dG * (y - v + k) + dy * xh, 0)
    dlnb += tl.sum(dy, 0)
    dv = -dy
    dk += dy
    dx += lnw[None, :] * dy
    dZt = _ln_bwd(dx, xh, rstd, D, BD)
    dZt -= (dr * rstd * rstd / D)[:, None] * xh

    dk = _dot_acc(dZt, tl.trans(W), dk)
    tl.store(_tile_ptrs(DQ, tok, h, H, D, BD), dq.to(DQ.dtype.element_ty), mask=vm)
    tl.store(_tile_ptrs(DK, tok, h, H, D, BD), dk.to(DK.dtype.element_ty), mask=vm)
    tl.store(_tile_ptrs(DV, tok, h, H, D, BD), dv.to(DV.dtype.element_ty), mask=vm)
    tl.store(DETA + tok * H + h, deta.to(DETA.dtype.element_ty), mask=valid)

    dW = _dot_acc(tl.trans(q), dZq, dW)
    dW = _dot_acc(tl.trans(k), dZt, dW)
    db = db + tl.sum(dZq, 0) + tl.sum(dZt, 0)
    ds += ds_i + tl.where(i == BT - 1, ds_last, 0.0)
    return W, bv, dW, db, ds, dlnw, dlnb


@triton.jit
def _bwd_kernel(
    Q,
    K,
    V,
    ETA,
    LNW,
    LNB,
    S,
    CU,
    OFF,
    GW0,
    GB0,
    WF,
    BF,
    E_ST,
    DO,
    DWF,
    DBF,
    DGWF,
    DGBF,
    DQ,
    DK,
    DV,
    DETA,
    DW0,
    DB0,
    DGW0,
    DGB0,
    DLNW,
    DLNB,
    DS,
    eps,
    H,
    D: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    start = tl.load(CU + n)
    L = tl.load(CU + n + 1) - start
    off = tl.load(OFF + n)
    num_mb = (off + L + BT - 1) // BT
    d = tl.arange(0, BD)
    dd = (d[:, None] < D) & (d[None, :] < D)
    base = (n * H + h).to(tl.int64)
    mat = base * D * D + d[:, None] * D + d[None, :]
    W = tl.load(WF + mat, mask=dd, other=0.0)
    bv = tl.load(BF + base * D + d, mask=d < D, other=0.0)
    if HAS_DFINAL:
        dW = tl.load(DWF + mat, mask=dd, other=0.0)
        db = tl.load(DBF + base * D + d, mask=d < D, other=0.0)
    else:
        dW = tl.zeros([BD, BD], dtype=tl.float32)
        db = tl.zeros([BD], dtype=tl.float32)
    lnw = tl.load(LNW + h * D + d, mask=d < D, other=0.0).to(tl.float32)
    lnb = tl.load(LNB + h * D + d, mask=d < D, other=0.0).to(tl.float32)
    ds = tl.zeros([BT], dtype=tl.float32)
    dlnw = tl.zeros([BD], dtype=tl.float32)
    dlnb = tl.zeros([BD], dtype=tl.float32)
    for r in range(1, num_mb):
        W, bv, dW, db, ds, dlnw, dlnb = _bwd_minibatch(
            num_mb - r,
            W,
            bv,
            dW,
            db,
            ds,
            dlnw,
            dlnb,
            Q,
            K,
            V,
            ETA,
            S,
            E_ST,
            DO,
            GW0,
            GB0,
            DGWF,
            DGBF,
            DQ,
            DK,
            DV,
            DETA,
            DGW0,
            DGB0,
            lnw,
            lnb,
            eps,
            n,
            h,
            H,
            start,
            off,
            L,
            num_mb,
            D,
            BD,
            BT,
            False,
            HAS_DFINAL,
        )
    W, bv, dW, db, ds, dlnw, dlnb = _bwd_minibatch(
        0,
        W,
        bv,
        dW,
        db,
        ds,
        dlnw,
        dlnb,
        Q,
        K,
        V,
        ETA,
        S,
        E_ST,
        DO,
        GW0,
        GB0,
        DGWF,
        DGBF,
        DQ,
        DK,
        DV,
        DETA,
        DGW0,
        DGB0,
        lnw,
        lnb,
        eps,
        n,
        h,
        H,
        start,
        off,
        L,
        num_mb,
        D,
        BD,
        BT,
        True,
        HAS_DFINAL,
    )
    tl.store(DW0 + mat, dW, mask=dd)
    tl.store(DB0 + base * D + d, db, mask=d < D)
    tl.store(DLNW + base * D + d, dlnw, mask=d < D)
    tl.store(DLNB + base * D + d, dlnb, mask=d < D)
    tl.store(DS + base * BT + tl.arange(0, BT), ds)


# ------------------------------------------------------------------------------------------------ autograd
class _TTTLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, ln_weight, ln_bias, s, W0, b0, gW0, gb0, cu, offset, eps, store_e):
        """q, k, v [tokens,H,D], eta [tokens,H], s [BT] float32, W0/gW0 [N,H,D,D], b0/gb0 [N,H,D] float32,
        cu [N+1], offset [N] int64 -> o [tokens,H,D], final W, b, grad_W, grad_b (float32)."""
        total, H, D = q.shape
        N, BT = W0.shape[0], s.numel()
        dev = q.device
        o = _new((total, H, D), q.dtype, dev)
        E = _new((total, H, D), torch.float32, dev) if store_e else o
        WF, GWF = _new((N, H, D, D), torch.float32, dev), _new((N, H, D, D), torch.float32, dev)
        BF, GBF = _new((N, H, D), torch.float32, dev), _new((N, H, D), torch.float32, dev)
        _fwd_kernel[(N * H,)](
            q,
            k,
            v,
            eta,
            ln_weight,
            ln_bias,
            s,
            cu,
            offset,
            W0,
            b0,
            gW0,
            gb0,
            o,
            E,
            WF,
            BF,
            GWF,
            GBF,
            eps,
            H,
            D=D,
            BD=block_d(D),
            BT=BT,
            STORE_E=store_e,
            STORE_FINAL=True,
            num_warps=_num_warps(D),
        )
        ctx.save_for_backward(q, k, v, eta, ln_weight, ln_bias, s, gW0, gb0, cu, offset, WF, BF, E)
        ctx.eps = eps
        ctx.store_e = store_e
        ctx.set_materialize_grads(False)
        return o, WF, BF, GWF, GBF

    @staticmethod
    def backward(ctx, do, dWF, dBF, dGWF, dGBF):
        if not ctx.store_e:
            raise RuntimeError(
                "ttt_linear_triton ran without storing what its backward needs (no input needed a gradient when it ran)"
            )
        q, k, v, eta, ln_weight, ln_bias, s, gW0, gb0, cu, offset, WF, BF, E = ctx.saved_tensors
        total, H, D = q.shape
        N, BT = WF.shape[0], s.numel()
        dev = q.device
        if do is None:
            do = torch.zeros_like(q)
        has_dfinal = any(t is not None for t in (dWF, dBF, dGWF, dGBF))
        if has_dfinal:
            dWF, dGWF = (torch.zeros_like(WF) if t is None else t.float().contiguous() for t in (dWF, dGWF))
            dBF, dGBF = (torch.zeros_like(BF) if t is None else t.float().contiguous() for t in (dBF, dGBF))
        else:
            dWF, dBF, dGWF, dGBF = WF, BF, WF, BF  # unread placeholders
        dq, dk, dv = (_new((total, H, D), q.dtype, dev) for _ in range(3))
        deta = _new((total, H), eta.dtype, dev)
        dW0, dgW0 = _new((N, H, D, D), torch.float32, dev), _new((N, H, D, D), torch.float32, dev)
        db0, dgb0 = _new((N, H, D), torch.float32, dev), _new((N, H, D), torch.float32, dev)
        dlnw, dlnb = _new((N, H, D), torch.float32, dev), _new((N, H, D), torch.float32, dev)
        ds = _new((N, H, BT), torch.float32, dev)
        _bwd_kernel[(N * H,)](
            q,
            k,
            v,
            eta,
            ln_weight,
            ln_bias,
            s,
            cu,
            offset,
            gW0,
            gb0,
            WF,
            BF,
            E,
            do.contiguous(),
            dWF,
            dBF,
            dGWF,
            dGBF,
            dq,
            dk,
            dv,
            deta,
            dW0,
            db0,
            dgW0,
            dgb0,
            dlnw,
            dlnb,
            ds,
            ctx.eps,
            H,
            D=D,
            BD=block_d(D),
            BT=BT,
            HAS_DFINAL=has_dfinal,
            num_warps=BWD_NUM_WARPS[block_d(D)],
            # the final sums' gradient is a D x D load inside the loop: pipelining it overflows shared memory
            num_stages=1 if has_dfinal else 3,
        )
        dlnw = dlnw.sum(0).to(ln_weight.dtype)
        dlnb = dlnb.sum(0).to(ln_bias.dtype)
        return dq, dk, dv, deta, dlnw, dlnb, ds.sum((0, 1)), dW0, db0, dgW0, dgb0, None, None, None, None


def ttt_linear_triton(
    q,
    k,
    v,
    eta,
    ln_weight,
    ln_bias,
    state,
    *,
    mini_batch_size=16,
    token_scale=None,
    eps=1e-6,
    cu_seqlens=None,
    output_final_state=False,
):
    """See `tttlm.ops.ttt_linear`; inputs are assumed checked and `supports(q, mini_batch_size)`.

    q, k, v [B,T,H,D], eta [B,T,H], ln_weight/ln_bias [H,D], state TTTLinearState with N rows. Returns
    o [B,T,H,D] in q's dtype and the final state (float32) or None. Differentiable w.r.t. every tensor input,
    the state's W, b, grad_W and grad_b included.
    """
    B, T, H, D = q.shape
    dev = q.device
    if cu_seqlens is None:
        cu = torch.arange(0, B * T + 1, T, dtype=torch.long, device=dev)
    else:
        cu = cu_seqlens.to(torch.long)
    s = default_token_scale(mini_batch_size, torch.float32, dev) if token_scale is None else token_scale.float()
    tensors = (q, k, v, eta, ln_weight, ln_bias, s, state.W, state.b, state.grad_W, state.grad_b)
    store_e = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    flat = [t.reshape(B * T, H, D).contiguous() for t in (q, k, v)]
    o, WF, BF, GWF, GBF = _TTTLinearFn.apply(
        *flat,
        eta.reshape(B * T, H).contiguous(),
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        s.contiguous(),
        *(t.float().contiguous() for t in (state.W, state.b, state.grad_W, state.grad_b)),
        cu,
        state.offset.contiguous(),
        float(eps),
        store_e,
    )
    o = o.reshape(B, T, H, D)
    if not output_final_state:
        return o, None
    lengths = cu[1:] - cu[:-1]
    return o, TTTLinearState(WF, BF, GWF, GBF, (state.offset + lengths) % mini_batch_size)
