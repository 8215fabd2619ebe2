"""TTT-Linear's sequential forward with W's columns split over several programs per (sequence, head).

With few sequences (B = 1 at long T) one program per (sequence, head) leaves most SMs idle, and each
mini-batch step is a chain of dependent on-chip operations on a D x D W. Here SPLIT programs hold NC = BD/SPLIT
columns of W each. Every column of Z = K W + b, and so of E = eta * dl/dZ and of the update K^T E, needs only
its own column of W, except through the LayerNorm-L2 gradient's row statistics. Those follow from six column
sums per token, which the programs exchange once per mini-batch through global memory:
with a = lnw^2 and c = lnw (lnb - V + K) (so G = a xhat + c),
    sum Z, sum Z^2            -> mean, rstd,
    sum a Z, sum a Z^2        -> with sum a: sum a xhat, sum a xhat^2,
    sum c, sum c Z            -> sum c, sum c xhat,
and mean(G) = (sum a xhat + sum c)/D, mean(G xhat) = (sum a xhat^2 + sum c xhat)/D.

A program waits for the other SPLIT - 1 at every mini-batch, so all of a launch's programs must be resident at
once: `splits` only splits while (sequences x heads x SPLIT) fits on the SMs. Each mini-batch's inputs are
loaded one step ahead. The kernel keeps W, b at the start of every GROUP mini-batches (`triton_chunk`'s
checkpoints), from which `_output_kernel` writes o. On the H100 at B=1, T=32k, H16xD128 the forward takes
8.7 ms against the one-program kernel's 14.4 (docs/benchmarks.md); at D=64, or with 2 programs per head, it
was slower than that kernel, so SPLITS leaves those out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tttlm.ops.ttt_linear.triton_parts import (
    _dot,
    _dot_acc,
    _head_ln,
    _minibatch_tokens,
    _sequence,
    block_d,
)

# Programs per (sequence, head) the forward may take, by on-chip head dim, most first: 16 or 32 columns per
# program at 128. At 64 one program's step (~2.8 us on the H100) beat the exchange's, and with 64 columns (2
# programs) the split lost at every width timed.
SPLITS = {128: (8, 4)}
STATS = tl.constexpr(6)  # column sums exchanged per token and mini-batch
# Warps per program by columns per program (timed on the H100: 2 beat 4 and 8 at 16 columns); 4 for widths
# SPLITS does not offer, which run only when forced (tests).
NUM_WARPS = {16: 2, 32: 4}


def split_count(programs: int, D: int, sms: int, options: dict[int, tuple[int, ...]]) -> int:
    """Programs per (sequence, head) for `programs` = sequences x heads of head dim D on a GPU of `sms` SMs: the
    most of options[block_d(D)] (a kernel's SPLITS) for which every program of the launch has an SM of its own;
    else 1."""
    return next((split for split in options.get(block_d(D), ()) if programs * split <= sms), 1)


def splits(programs: int, D: int, device: torch.device, options: dict[int, tuple[int, ...]]) -> int:
    """`split_count` on `device`'s SMs; 1 off CUDA (the interpreter runs a launch's programs one by one)."""
    if device.type != "cuda":
        return 1
    return split_count(programs, D, torch.cuda.get_device_properties(device).multi_processor_count, options)


def forced(split: int):
    """A stand-in for `splits` that takes `split` programs in each kernel offering it at the head dim, else one
    (to time or compile a split whatever the GPU)."""
    return lambda programs, D, device, options: split if split in options.get(block_d(D), ()) else 1


@triton.jit
def _post(X, part, m, s, j, SPLIT: tl.constexpr, REGION: tl.constexpr, BT: tl.constexpr):
    """Store this program's column sum `part` [BT] as statistic j of mini-batch m in its REGION of the exchange X
    (two slots alternate: a program can be at most one mini-batch ahead of the slowest, which reads the other)."""
    tl.store(X + ((m % 2) * SPLIT + s) * REGION + j * BT + tl.arange(0, BT), part)


@triton.jit
def _arrive_and_wait(CNT, m, SPLIT: tl.constexpr):
    """Count this program in at mini-batch m, then wait for all SPLIT. Every thread's posts come before the
    arrival (the barrier, then a release at GPU scope), and the loads of the others' after it (an acquire, then
    the barrier)."""
    tl.debug_barrier()
    tl.atomic_add(CNT, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    while arrived < SPLIT * (m + 1):
        arrived = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _gathered(X, m, j, SPLIT: tl.constexpr, REGION: tl.constexpr, BT: tl.constexpr):
    """Statistic j of mini-batch m summed over the SPLIT programs, in a fixed order (the same on every
    program: all see one set of row statistics). Loaded from L2 (`.cg`): L1 may hold the slot's old values."""
    i = tl.arange(0, BT)
    total = tl.zeros((BT,), tl.float32)
    for r in tl.static_range(SPLIT):
        total += tl.load(X + ((m % 2) * SPLIT + r) * REGION + j * BT + i, cache_modifier=".cg")
    return total


@triton.jit
def _split_inputs(m, K, V, ETA, h, H, s, start, off, L, D: tl.constexpr, BD: tl.constexpr, NC: tl.constexpr,
                  BT: tl.constexpr):
    """Mini-batch m's k [BT,BD], this program's columns of k and v [BT,NC], and eta [BT], in their input dtypes
    (zeros outside the sequence)."""
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    rows = (tok * H + h) * D
    d = tl.arange(0, BD)
    c = s * NC + tl.arange(0, NC)
    tm = valid[:, None] & (c < D)[None, :]
    return (  # k's columns are loaded again: a tile's columns cannot be sliced on chip
        tl.load(K + rows[:, None] + d[None, :], mask=valid[:, None] & (d < D)[None, :], other=0.0),
        tl.load(K + rows[:, None] + c[None, :], mask=tm, other=0.0),
        tl.load(V + rows[:, None] + c[None, :], mask=tm, other=0.0),
        tl.load(ETA + tok * H + h, mask=valid, other=0.0),
    )


@triton.jit
def _split_step(
    m, W, bv, k, k_c, v_c, eta, S, WC, BC, GW0, GB0, WF, BF, GWF, GBF, Xg, CNT, lnw, lnb, a, sum_a, eps,
    g, s, h, H, base, off, L, num_mb, g0,
    D: tl.constexpr, BD: tl.constexpr, NC: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    SPLIT: tl.constexpr, HAS_SUMS: tl.constexpr,
):
    """Mini-batch m for columns s*NC .. s*NC+NC-1, from its `_split_inputs`: returns these columns of W [BD,NC]
    and b [NC] after it."""
    d = tl.arange(0, BD)
    c = s * NC + tl.arange(0, NC)
    cm = c < D
    wm = (d < D)[:, None] & cm[None, :]
    w_off = d[:, None] * D + c[None, :]
    k = k.to(tl.float32)
    k_c = k_c.to(tl.float32)
    v_c = v_c.to(tl.float32)
    eta = eta.to(tl.float32)
    if m % GROUP == 0:  # the backward's checkpoint of this group of mini-batches
        slot = ((g0 + m // GROUP) * H + h).to(tl.int64)
        tl.store(WC + slot * D * D + w_off, W.to(WC.dtype.element_ty), mask=wm)
        tl.store(BC + slot * D + c, bv, mask=cm)

    Z = _dot(k, W) + bv[None, :]
    cz = lnw[None, :] * (lnb[None, :] - v_c + k_c)
    R: tl.constexpr = STATS * BT
    _post(Xg, tl.sum(Z, 1), m, s, 0, SPLIT, R, BT)
    _post(Xg, tl.sum(Z * Z, 1), m, s, 1, SPLIT, R, BT)
    _post(Xg, tl.sum(a[None, :] * Z, 1), m, s, 2, SPLIT, R, BT)
    _post(Xg, tl.sum(a[None, :] * Z * Z, 1), m, s, 3, SPLIT, R, BT)
    _post(Xg, tl.sum(cz, 1), m, s, 4, SPLIT, R, BT)
    _post(Xg, tl.sum(cz * Z, 1), m, s, 5, SPLIT, R, BT)
    _arrive_and_wait(CNT + g, m, SPLIT)
    mu = _gathered(Xg, m, 0, SPLIT, R, BT) / D
    rstd = 1.0 / tl.sqrt(_gathered(Xg, m, 1, SPLIT, R, BT) / D - mu * mu + eps)
    saz = _gathered(Xg, m, 2, SPLIT, R, BT)
    sc = _gathered(Xg, m, 4, SPLIT, R, BT)
    mG = (rstd * (saz - mu * sum_a) + sc) / D
    mGx = (
        rstd * rstd * (_gathered(Xg, m, 3, SPLIT, R, BT) - 2.0 * mu * saz + mu * mu * sum_a)
        + rstd * (_gathered(Xg, m, 5, SPLIT, R, BT) - mu * sc)
    ) / D
    xh = tl.where(cm[None, :], (Z - mu[:, None]) * rstd[:, None], 0.0)
    G = a[None, :] * xh + cz
    E = eta[:, None] * tl.where(cm[None, :], rstd[:, None] * (G - mG[:, None] - xh * mGx[:, None]), 0.0)

    Sb = tl.sum(E, 0)
    if HAS_SUMS:
        gW = tl.load(GW0 + base * D * D + w_off, mask=wm, other=0.0)
        Sb += tl.load(GB0 + base * D + c, mask=cm, other=0.0)
    full = ((m + 1) * BT <= off + L).to(tl.float32)  # only a row's last mini-batch can be unfinished
    cf = tl.load(S + BT - 1) * full
    W_next = _dot_acc(tl.trans(-cf * k), E, W)
    if HAS_SUMS:
        W_next -= cf * gW
    b_next = bv - cf * Sb
    if m == num_mb - 1:  # `_fwd_minibatch`'s final state, at this program's columns
        tl.store(WF + base * D * D + w_off, W_next, mask=wm)
        tl.store(BF + base * D + c, b_next, mask=cm)
        Sum = _dot(tl.trans(k), E)
        if HAS_SUMS:
            Sum += gW
        tl.store(GWF + base * D * D + w_off, (1.0 - full) * Sum, mask=wm)
        tl.store(GBF + base * D + c, (1.0 - full) * Sb, mask=cm)
    return W_next, b_next


@triton.jit
def _split_fwd_kernel(
    K, V, ETA, LNW, LNB, S, CU, OFF, GCUM, W0, B0, GW0, GB0, WC, BC, WF, BF, GWF, GBF, X, CNT,
    eps, H, D: tl.constexpr, BD: tl.constexpr, NC: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Program (sequence n, head h, part s) walks the sequence's mini-batches with columns s*NC .. s*NC+NC-1 of
    W [BD,NC] and b [NC]. X [N*H, 2, SPLIT, STATS, BT] float32 is the exchange, CNT [N*H] int32 (zeros) counts
    the parts' arrivals."""
    pid = tl.program_id(0)
    g = pid // SPLIT
    s = pid % SPLIT
    n = g // H
    h = g % H
    start, L, off, num_mb = _sequence(CU, OFF, n, BT)
    g0 = tl.load(GCUM + n)
    Xg = X + g.to(tl.int64) * (2 * SPLIT * STATS * BT)
    d = tl.arange(0, BD)
    c = s * NC + tl.arange(0, NC)
    cm = c < D
    base = (n * H + h).to(tl.int64)
    W = tl.load(W0 + base * D * D + d[:, None] * D + c[None, :], mask=(d < D)[:, None] & cm[None, :], other=0.0)
    bv = tl.load(B0 + base * D + c, mask=cm, other=0.0)
    lnw, lnb = _head_ln(LNW, LNB, h, c, D)
    lnw_all = tl.load(LNW + h * D + d, mask=d < D, other=0.0).to(tl.float32)
    sum_a = tl.sum(lnw_all * lnw_all, 0)
    a = lnw * lnw
    # each mini-batch's inputs are loaded a step ahead, off the chain of dependent steps
    inputs = _split_inputs(0, K, V, ETA, h, H, s, start, off, L, D, BD, NC, BT)
    ahead = _split_inputs(1, K, V, ETA, h, H, s, start, off, L, D, BD, NC, BT)
    W, bv = _split_step(
        0, W, bv, *inputs, S, WC, BC, GW0, GB0, WF, BF, GWF, GBF, Xg, CNT, lnw, lnb, a, sum_a, eps,
        g, s, h, H, base, off, L, num_mb, g0, D, BD, NC, BT, GROUP, SPLIT, True,
    )
    for m in range(1, num_mb):
        inputs = ahead
        ahead = _split_inputs(m + 1, K, V, ETA, h, H, s, start, off, L, D, BD, NC, BT)
        W, bv = _split_step(
            m, W, bv, *inputs, S, WC, BC, GW0, GB0, WF, BF, GWF, GBF, Xg, CNT, lnw, lnb, a, sum_a, eps,
            g, s, h, H, base, off, L, num_mb, g0, D, BD, NC, BT, GROUP, SPLIT, False,
        )


def split_forward(q, k, v, eta, ln_weight, ln_bias, s, cu, offset, gcum, W0, b0, gW0, gb0, WC, BC, WF, BF, GWF,
                  GBF, eps, group, split):
    """Launch `_split_fwd_kernel` over N*H*split programs; arguments as `triton_chunk._fwd_kernel`'s (q for
    its shape: o is left to `_output_kernel`)."""
    _, H, D = q.shape
    N, BT = W0.shape[0], s.numel()
    X = torch.empty((N * H, 2, split, STATS.value, BT), dtype=torch.float32, device=q.device)
    cnt = torch.zeros(N * H, dtype=torch.int32, device=q.device)
    BD = block_d(D)
    _split_fwd_kernel[(N * H * split,)](
        k, v, eta, ln_weight, ln_bias, s, cu, offset, gcum, W0, b0, gW0, gb0, WC, BC, WF, BF, GWF, GBF, X, cnt,
        eps, H, D=D, BD=BD, NC=BD // split, BT=BT, GROUP=group, SPLIT=split, num_warps=NUM_WARPS.get(BD // split, 4),
    )
