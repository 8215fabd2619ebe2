"""TTT-Linear's backward pass on the GPU: one short sequential kernel between two parallel ones.

The forward recursion (`triton_chunk`) couples mini-batches only through the weights W_m, b_m at their
starts, and the backward couples them only through dW_m, db_m (the gradients w.r.t. those). The forward
stores W_m, b_m at the start of every group of GROUP mini-batches (the checkpoints), then:

1. `_local_kernel`, one program per (group, head), walks its mini-batches from the checkpoint
   (W_{m+1} = W_m - s_{b-1} K^T E) and does the part of each one's backward that does not depend on later
   mini-batches: the output LayerNorm, dq, and the parts of dE and dk that come through the causal products.
2. `_chain_kernel`, one program per (sequence, head), carries only dW and db back: per mini-batch the
   products k dW_{m+1} and E dW_{m+1}^T, the LayerNorm-L2 gradient's Jacobian applied to dE, and
   dW += q^T dZq + k^T dZt. It stores dE, dk's term E dSum^T (dSum = -s_{b-1} dW_{m+1}, the gradient of
   what the mini-batch handed on) and k dW_{m+1} + db_{m+1} (over the local part of dE, which it has read),
   all [BT, D] per mini-batch: no D x D matrix per mini-batch leaves it. With few sequences on the GPU
   `triton_split_chain` splits dW's columns over several programs per (sequence, head) instead.
3. `_finish_kernel`, one program per (group, head), walks the group forward again with W_m^T: dv, deta, the
   inner LayerNorm's gradient, dk += dZt W_m^T, and the chain's share of the gradient of s_{b-1},
   -sum((k dW_{m+1} + db_{m+1}) * E) over every complete mini-batch.

Whether walking a group beats a checkpoint per mini-batch depends on registers: a walk carries a D x D matrix
across mini-batches, which spills at D=128 (see GROUP), while a checkpoint per mini-batch costs the forward a
D x D store per step and memory. Storing dW_{m+1} per mini-batch for the finish kernel instead of forming
E dSum^T in the chain was tried: on the H100 it was faster only with a few long sequences and less precise in
the gradient of s_{b-1} (docs/benchmarks.md). The chain holds one D x D matrix, loads each step's tiles one
step ahead, and leaves to the other kernels all they can do (the local kernel hands it the row means its
LayerNorm Jacobian needs). Memory: the checkpoints (per head 2 D^2 bytes per 16 tokens for 16-bit inputs and
GROUP 1, else 4 D^2 bytes per GROUP x 16 tokens), kept from the forward to the backward, and six float32
[tokens, H, D] buffers and a few small ones while the backward runs.

Groups: sequence n owns group slots gcum[n] .. gcum[n+1]-1, the k-th covering its mini-batches
k GROUP .. k GROUP + GROUP - 1 on the grid of `ttt_common.make_layout`; the parallel kernels get a slot ->
sequence table and skip slots past the last one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tttlm.ops.ttt_linear import triton_split, triton_split_chain
from tttlm.ops.ttt_linear.triton_parts import (
    _advance,
    _dot,
    _dot_acc,
    _group,
    _head_ln,
    _ln_bwd,
    _ln_l2_dz,
    _ln_l2_grad_bwd,
    _load_inputs,
    _mat_ptrs,
    _minibatch_forward,
    _minibatch_tokens,
    _sequence,
    _tile_ptrs,
    block_d,
    new,
)

# Mini-batches per checkpoint (each group of them is walked by one program of the parallel kernels, unrolled):
# fewer means more memory and traffic for the checkpoints, more means longer walks. Compiled for sm_90 at
# D=128 the walks spill (stack bytes of the local and the output kernel: 64 / 0 with 1, 496 / 208 with 2,
# 528 / 224 with 8), so 1: every mini-batch is its own checkpoint and nothing D x D is carried. A larger GROUP
# is the way to trade speed for the checkpoints' memory.
GROUP = 1
# Warps per program by on-chip head dim, for the sequential and the parallel kernels
# (benchmarks/gpu_ttt_linear.py --sweep times the alternatives). The chain's are (with more programs than SMs,
# with an SM per program): at 64, 4 warps fit two programs on an SM, which hide each other's latency, and
# 8 are faster where there is no second one (H100, H32xD64 fwd+bwd at 4 / 8 warps: T=2k B=16 7.9 / 10.0 ms,
# T=8k B=4 10.8 / 9.4); at 128 even 4 warps leave room for one.
CHAIN_NUM_WARPS = {16: (4, 4), 32: (4, 4), 64: (4, 8), 128: (8, 8)}
LOCAL_NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}


# ----------------------------------------------------------------------------------------- 1. per group, local
@triton.jit
def _local_kernel(
    Q, K, V, ETA, DO, LNW, LNB, S, CU, OFF, SEQ, GCUM, GW0, GB0, WC, BC,
    DQ, DZQ, DEP, DKP, XH, RSTD, MG, DLN_P, DS_P,
    eps, N, H, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    n, start, L, off, num_mb, m0, m1 = _group(g, SEQ, GCUM, CU, OFF, N, BT, GROUP)
    if n < N:
        i = tl.arange(0, BT)
        d = tl.arange(0, BD)
        dm = d < D
        dd = dm[:, None] & dm[None, :]
        causal = i[:, None] >= i[None, :]
        row = (g * H + h).to(tl.int64)
        seq = (n * H + h).to(tl.int64)
        s = tl.load(S + i)
        lnw, lnb = _head_ln(LNW, LNB, h, d, D)
        W = tl.load(_mat_ptrs(WC, row, D, BD), mask=dd, other=0.0).to(tl.float32)
        bv = tl.load(BC + row * D + d, mask=dm, other=0.0)
        dln_w = tl.zeros([BD], dtype=tl.float32)
        dln_b = tl.zeros([BD], dtype=tl.float32)
        ds = tl.zeros([BT], dtype=tl.float32)
        for j in tl.static_range(GROUP):  # unrolled: with GROUP 1 nothing is carried
            m = m0 + j
            if m < m1:
                tok, valid = _minibatch_tokens(m, start, off, L, BT)
                vm = valid[:, None] & dm[None, :]
                q, k, v, eta = _load_inputs(m, Q, K, V, ETA, h, H, start, off, L, D, BD, BT)
                q = q.to(tl.float32)
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                eta = eta.to(tl.float32)
                do = tl.load(_tile_ptrs(DO, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)

                # the forward of this mini-batch
                xh, rstd, mG, mGx, E, A, C, Sb, xq, rq = _minibatch_forward(
                    m, W, bv, q, k, v, eta, s, lnw, lnb, GW0, GB0, seq, D, BD, BT, eps
                )

                # its backward up to dE (all but what comes from later mini-batches)
                dZq = _ln_bwd(lnw[None, :] * do, xq, rq, D, BD)
                dC = -s[:, None] * dZq
                dA = tl.where(causal, _dot(dC, tl.trans(E)), 0.0)
                dq = do + _dot(dZq, tl.trans(W))
                dq = _dot_acc(dA, k, dq)
                if m == 0:
                    dq = _dot_acc(dC, tl.load(_mat_ptrs(GW0, seq, D, BD, True), mask=dd, other=0.0), dq)
                tl.store(_tile_ptrs(DQ, tok, h, H, D, BD), dq.to(DQ.dtype.element_ty), mask=vm)
                tl.store(_tile_ptrs(DZQ, tok, h, H, D, BD), dZq, mask=vm)
                tl.store(_tile_ptrs(DEP, tok, h, H, D, BD), _dot(tl.trans(A), dC), mask=vm)
                tl.store(_tile_ptrs(DKP, tok, h, H, D, BD), _dot(tl.trans(dA), q), mask=vm)
                tl.store(_tile_ptrs(XH, tok, h, H, D, BD), xh, mask=vm)
                tl.store(RSTD + tok * H + h, rstd, mask=valid)
                tl.store(MG + (tok * H + h) * 2, mG, mask=valid)
                tl.store(MG + (tok * H + h) * 2 + 1, mGx, mask=valid)
                dln_w += tl.sum(do * xq, 0)
                dln_b += tl.sum(do, 0)
                ds -= tl.sum(dZq * C, 1)

                c = tl.load(S + BT - 1) * ((m + 1) * BT <= off + L).to(tl.float32)
                W, bv = _advance(m, W, bv, k, E, Sb, c, GW0, seq, D, BD)
        tl.store(DLN_P + (row * 2) * D + d, dln_w, mask=dm)
        tl.store(DLN_P + (row * 2 + 1) * D + d, dln_b, mask=dm)
        tl.store(DS_P + row * BT + i, ds)


# ----------------------------------------------------------------------------------------- 2. the dW chain
@triton.jit
def _chain_load(m, Q, K, V, ETA, XH, RSTD, MG, DZQ, DEP, h, H, start, off, L, D: tl.constexpr,
                BD: tl.constexpr, BT: tl.constexpr):
    """Mini-batch m's input tiles for `_chain_step` (zeros outside the sequence): q, k, v, eta, rstd, mean(G),
    mean(G xhat), xhat, dZq and the local part of dE."""
    q, k, v, eta = _load_inputs(m, Q, K, V, ETA, h, H, start, off, L, D, BD, BT)
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    vm = valid[:, None] & (tl.arange(0, BD) < D)[None, :]
    return (
        q,
        k,
        v,
        eta,
        tl.load(RSTD + tok * H + h, mask=valid, other=0.0),
        tl.load(MG + (tok * H + h) * 2, mask=valid, other=0.0),
        tl.load(MG + (tok * H + h) * 2 + 1, mask=valid, other=0.0),
        tl.load(_tile_ptrs(XH, tok, h, H, D, BD), mask=vm, other=0.0),
        tl.load(_tile_ptrs(DZQ, tok, h, H, D, BD), mask=vm, other=0.0),
        tl.load(_tile_ptrs(DEP, tok, h, H, D, BD), mask=vm, other=0.0),
    )


@triton.jit
def _chain_step(
    m, dW, db, tiles,
    S, DGWF, DGBF, DE, DKW, DEP, DW1, DB1, DGW0, DGB0,
    lnw, lnb, base, h, H, start, off, L, num_mb,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, FIRST: tl.constexpr, OPEN: tl.constexpr,
):
    """Mini-batch m in reverse. In: dW, db w.r.t. the weights after it. Out: the same w.r.t. the weights at
    its start. tiles: its tiles from `_chain_load`. OPEN: the mini-batch may be the row's last and unfinished,
    which hands its sums to the final state (whose gradient is DGWF, DGBF) instead of to the weights. Besides
    dE it stores E dSum^T, dk's term through what the mini-batch handed on (dSum = -s_{b-1} dW_{m+1}), so that
    no D x D matrix is stored per mini-batch, and over the local part of dE (in DEP, loaded a step before)
    k dW_{m+1} + db_{m+1}; the rest of the mini-batch's backward waits for `_finish_kernel`."""
    q, k, v, eta, rstd, mG, mGx, xh, dZq, dE = tiles
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    dm = d < D
    dd = dm[:, None] & dm[None, :]
    vm = valid[:, None] & dm[None, :]
    q = q.to(tl.float32)
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    eta = eta.to(tl.float32)
    full = ((m + 1) * BT <= off + L).to(tl.float32)
    c = tl.load(S + BT - 1) * full
    G = lnw[None, :] * (lnw[None, :] * xh + lnb[None, :] - v + k)  # zero in the padding columns, as lnw is
    E = eta[:, None] * _ln_l2_dz(G, xh, rstd, mG, mGx, D, BD)

    kdW = _dot(k, dW)
    kdS = -c * kdW
    dSb = -c * db
    EdS = -c * _dot(E, tl.trans(dW))
    # the chain's share of the gradient of s_{b-1}, -full sum((k dW + db) * E), is left to `_finish_kernel`:
    # as a reduction to a scalar here it cost 30% of the chain's time (H200, H16xD128, T=2k; docs/benchmarks.md)
    tl.store(_tile_ptrs(DEP, tok, h, H, D, BD), kdW + db[None, :], mask=vm)
    if OPEN:
        is_open = (m == num_mb - 1) & (full == 0.0)
        dGW = tl.load(_mat_ptrs(DGWF, base, D, BD), mask=dd & is_open, other=0.0)
        kdS = _dot_acc(k, dGW, kdS)
        EdS = _dot_acc(E, tl.trans(dGW), EdS)
        dSb += tl.load(DGBF + base * D + d, mask=dm & is_open, other=0.0)
    if FIRST:
        # for the host's share of ds: the state's partial sums enter W_1 = W_0 - s_{b-1} (gW + K^T E) (if the
        # mini-batch is complete), and a product with them here would cost the whole kernel registers
        tl.store(_mat_ptrs(DW1, base, D, BD), dW, mask=dd)
        tl.store(DB1 + base * D + d, db, mask=dm)
        dSum = -c * dW
        if OPEN:
            dSum += dGW
        dC = -tl.load(S + i)[:, None] * dZq
        tl.store(_mat_ptrs(DGW0, base, D, BD), _dot_acc(tl.trans(q), dC, dSum), mask=dd)
        tl.store(DGB0 + base * D + d, tl.sum(dC, 0) + dSb, mask=dm)
    dE += kdS + dSb[None, :]
    tl.store(_tile_ptrs(DE, tok, h, H, D, BD), dE, mask=vm)
    tl.store(_tile_ptrs(DKW, tok, h, H, D, BD), EdS, mask=vm)
    dZt, _ = _ln_l2_grad_bwd(dE, xh, rstd, G, mG, mGx, eta, lnw, D, BD)

    dW = _dot_acc(tl.trans(q), dZq, dW)
    dW = _dot_acc(tl.trans(k), dZt, dW)
    db += tl.sum(dZq, 0) + tl.sum(dZt, 0)
    return dW, db


@triton.jit
def _chain_kernel(
    Q, K, V, ETA, LNW, LNB, S, CU, OFF, XH, RSTD, MG, DZQ, DEP, DWF, DBF, DGWF, DGBF,
    DE, DKW, DW1, DB1, DW0, DB0, DGW0, DGB0,
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
    lnw, lnb = _head_ln(LNW, LNB, h, d, D)
    # each step's tiles are loaded one step ahead, so their latency hides behind the step before
    top = num_mb - 1  # the loop takes mini-batches top..1, the first one is peeled
    tiles = _chain_load(top, Q, K, V, ETA, XH, RSTD, MG, DZQ, DEP, h, H, start, off, L, D, BD, BT)
    if HAS_DFINAL:
        dW = tl.load(_mat_ptrs(DWF, base, D, BD), mask=dd, other=0.0)
        db = tl.load(DBF + base * D + d, mask=dm, other=0.0)
        # an unfinished last mini-batch is peeled too, so that the loop never holds the final sums' gradient
        if ((off + L) % BT != 0) & (num_mb > 1):
            tiles_next = _chain_load(top - 1, Q, K, V, ETA, XH, RSTD, MG, DZQ, DEP, h, H, start, off, L, D, BD, BT)
            dW, db = _chain_step(
                top, dW, db, tiles,
                S, DGWF, DGBF, DE, DKW, DEP, DW1, DB1, DGW0, DGB0,
                lnw, lnb, base, h, H, start, off, L, num_mb, D, BD, BT, False, True,
            )
            tiles = tiles_next
            top = num_mb - 2
    else:
        dW = tl.zeros([BD, BD], dtype=tl.float32)
        db = tl.zeros([BD], dtype=tl.float32)
    for r in range(num_mb - top, num_mb):
        m = num_mb - r
        tiles_next = _chain_load(m - 1, Q, K, V, ETA, XH, RSTD, MG, DZQ, DEP, h, H, start, off, L, D, BD, BT)
        dW, db = _chain_step(
            m, dW, db, tiles,
            S, DGWF, DGBF, DE, DKW, DEP, DW1, DB1, DGW0, DGB0,
            lnw, lnb, base, h, H, start, off, L, num_mb, D, BD, BT, False, False,
        )
        tiles = tiles_next
    dW, db = _chain_step(
        0, dW, db, tiles,
        S, DGWF, DGBF, DE, DKW, DEP, DW1, DB1, DGW0, DGB0,
        lnw, lnb, base, h, H, start, off, L, num_mb, D, BD, BT, True, HAS_DFINAL,
    )
    tl.store(_mat_ptrs(DW0, base, D, BD), dW, mask=dd)
    tl.store(DB0 + base * D + d, db, mask=dm)


# -------------------------------------------------------------------------------------- 3. the rest, per group
@triton.jit
def _finish_kernel(
    K, V, ETA, LNW, LNB, S, CU, OFF, SEQ, GCUM, GW0, WC, XH, RSTD, MG, DE, DKP, DKW, KDW,
    DK, DV, DETA, DLN_P, DS_P,
    N, H, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
):
    """dv, deta, dk and the inner LayerNorm's gradient from dE: through the LayerNorm-L2 gradient, and
    dk += dZt W_m^T and the chain's E dSum^T; and the chain's share of the gradient of s_{b-1} from its
    k dW_{m+1} + db_{m+1} (KDW), added to DS_P's last column."""
    g = tl.program_id(0)
    h = tl.program_id(1)
    n, start, L, off, num_mb, m0, m1 = _group(g, SEQ, GCUM, CU, OFF, N, BT, GROUP)
    if n < N:
        d = tl.arange(0, BD)
        dm = d < D
        dd = dm[:, None] & dm[None, :]
        row = (g * H + h).to(tl.int64)
        lnw, lnb = _head_ln(LNW, LNB, h, d, D)
        Wt = tl.zeros([BD, BD], dtype=tl.float32)  # W_m^T, loaded where first used
        dln_w = tl.zeros([BD], dtype=tl.float32)
        dln_b = tl.zeros([BD], dtype=tl.float32)
        ds_last = 0.0
        for j in tl.static_range(GROUP):  # unrolled: with GROUP 1 nothing is carried
            m = m0 + j
            if m < m1:
                tok, valid = _minibatch_tokens(m, start, off, L, BT)
                vm = valid[:, None] & dm[None, :]
                full = ((m + 1) * BT <= off + L).to(tl.float32)
                k = tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
                v = tl.load(_tile_ptrs(V, tok, h, H, D, BD), mask=vm, other=0.0).to(tl.float32)
                eta = tl.load(ETA + tok * H + h, mask=valid, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + tok * H + h, mask=valid, other=0.0)
                mG = tl.load(MG + (tok * H + h) * 2, mask=valid, other=0.0)
                mGx = tl.load(MG + (tok * H + h) * 2 + 1, mask=valid, other=0.0)
                xh = tl.load(_tile_ptrs(XH, tok, h, H, D, BD), mask=vm, other=0.0)
                dE = tl.load(_tile_ptrs(DE, tok, h, H, D, BD), mask=vm, other=0.0)
                y = lnw[None, :] * xh + lnb[None, :]
                G = lnw[None, :] * (y - v + k)
                dZ = _ln_l2_dz(G, xh, rstd, mG, mGx, D, BD)
                dZt, dG = _ln_l2_grad_bwd(dE, xh, rstd, G, mG, mGx, eta, lnw, D, BD)
                dy = lnw[None, :] * dG
                tl.store(DETA + tok * H + h, tl.sum(dE * dZ, 1).to(DETA.dtype.element_ty), mask=valid)
                kdW = tl.load(_tile_ptrs(KDW, tok, h, H, D, BD), mask=vm, other=0.0)
                ds_last -= full * tl.sum(tl.sum(kdW * eta[:, None] * dZ, 1), 0)
                tl.store(_tile_ptrs(DV, tok, h, H, D, BD), (-dy).to(DV.dtype.element_ty), mask=vm)
                dln_w += tl.sum(dG * (y - v + k) + dy * xh, 0)
                dln_b += tl.sum(dy, 0)

                dk = dy + tl.load(_tile_ptrs(DKP, tok, h, H, D, BD), mask=vm, other=0.0)
                dk += tl.load(_tile_ptrs(DKW, tok, h, H, D, BD), mask=vm, other=0.0)
                if j == 0:
                    Wt = tl.load(_mat_ptrs(WC, row, D, BD, True), mask=dd, other=0.0).to(tl.float32)
                dk = _dot_acc(dZt, Wt, dk)
                tl.store(_tile_ptrs(DK, tok, h, H, D, BD), dk.to(DK.dtype.element_ty), mask=vm)
                if j + 1 < GROUP:  # W_{m+1}^T
                    c = tl.load(S + BT - 1) * full
                    Wt = _dot_acc(tl.trans(-c * eta[:, None] * dZ), k, Wt)
                    if m == 0:
                        seq = (n * H + h).to(tl.int64)
                        Wt -= c * tl.load(_mat_ptrs(GW0, seq, D, BD, True), mask=dd, other=0.0)
        dln = DLN_P + (row * 2) * D + d
        tl.store(dln, tl.load(dln, mask=dm) + dln_w, mask=dm)
        tl.store(dln + D, tl.load(dln + D, mask=dm) + dln_b, mask=dm)
        tl.store(DS_P + row * BT + BT - 1, tl.load(DS_P + row * BT + BT - 1) + ds_last)


# ------------------------------------------------------------------------------------------------ host side
def chain_warps(programs: int, BD: int, device: torch.device) -> int:
    """`_chain_kernel`'s warps per program for a launch of `programs` (CHAIN_NUM_WARPS)."""
    alone = device.type == "cuda" and programs <= torch.cuda.get_device_properties(device).multi_processor_count
    return CHAIN_NUM_WARPS[BD][alone]


def chunk_backward(q, k, v, eta, ln_weight, ln_bias, s, gW0, gb0, cu, offset, gcum, seq, WC, BC, group, do,
                   dfinal, eps):
    """Gradients of `triton_chunk._TTTLinearFn`: q, k, v, do [tokens,H,D], eta [tokens,H], s [BT] float32,
    gW0 [N,H,D,D], gb0 [N,H,D], cu [N+1], offset [N], the forward's checkpoints WC [slots,H,D,D]
    (`triton_chunk.checkpoint_dtype`), BC [slots,H,D] float32
    every `group` mini-batches, on the slots of gcum [N+1] and seq [slots] (`checkpoint_layout`); dfinal the
    final state's (dW, db, dgW, dgb) in float32, or None.

    Returns dq, dk, dv, deta, dln_w, dln_b, dtoken_scale, dW0, db0, dgW0, dgb0."""
    total, H, D = q.shape
    N, BT = gW0.shape[0], s.numel()
    slots = WC.shape[0]
    dev = q.device
    BD = block_d(D)
    f32 = torch.float32

    # DEP: the local part of dE, which the chain replaces by k dW_{m+1} + db_{m+1} as it goes back
    DZQ, DEP, DKP, XH, DE, DKW = (new((total, H, D), f32, dev) for _ in range(6))
    RSTD, MG = new((total, H), f32, dev), new((total, H, 2), f32, dev)  # MG: mean(G), mean(G xhat)
    dln_p = torch.zeros(slots, H, 2, D, dtype=f32, device=dev)  # partial sums: unused slots add zeros
    ds_p = torch.zeros(slots, H, BT, dtype=f32, device=dev)
    dq, dk, dv = (new((total, H, D), q.dtype, dev) for _ in range(3))
    deta = new((total, H), eta.dtype, dev)
    dW0, dgW0, dW1 = (new((N, H, D, D), f32, dev) for _ in range(3))
    db0, dgb0, db1 = (new((N, H, D), f32, dev) for _ in range(3))
    local_warps = LOCAL_NUM_WARPS[BD]
    dims = dict(D=D, BD=BD, BT=BT)
    has_dfinal = dfinal is not None
    dWF, dBF, dGWF, dGBF = dfinal if has_dfinal else (gW0, gb0, gW0, gb0)  # unread placeholders without

    _local_kernel[(slots, H)](
        q, k, v, eta, do, ln_weight, ln_bias, s, cu, offset, seq, gcum, gW0, gb0, WC, BC,
        dq, DZQ, DEP, DKP, XH, RSTD, MG, dln_p, ds_p, eps, N, H, **dims, GROUP=group, num_warps=local_warps,
    )
    split = triton_split.splits(N * H, D, dev, triton_split_chain.SPLITS)
    if split > 1:
        triton_split_chain.split_chain(
            q, k, v, eta, ln_weight, ln_bias, s, cu, offset, XH, RSTD, MG, DZQ, DEP, dWF, dBF, dGWF, dGBF,
            DE, DKW, dW1, db1, dW0, db0, dgW0, dgb0, has_dfinal, split,
        )
    else:
        _chain_kernel[(N * H,)](
            q, k, v, eta, ln_weight, ln_bias, s, cu, offset, XH, RSTD, MG, DZQ, DEP, dWF, dBF, dGWF, dGBF,
            DE, DKW, dW1, db1, dW0, db0, dgW0, dgb0, H, **dims, HAS_DFINAL=has_dfinal,
            num_warps=chain_warps(N * H, BD, dev),
        )
    _finish_kernel[(slots, H)](
        k, v, eta, ln_weight, ln_bias, s, cu, offset, seq, gcum, gW0, WC, XH, RSTD, MG, DE, DKP, DKW, DEP,
        dk, dv, deta, dln_p, ds_p, N, H, **dims, GROUP=group, num_warps=local_warps,
    )
    dln = dln_p.sum(0)  # [H, 2, D]
    ds = ds_p.sum((0, 1))
    full0 = (offset + cu[1:] - cu[:-1] >= BT).to(f32)  # whether each sequence's first mini-batch is complete
    ds_sums = (dW1 * gW0).sum((-2, -1)) + (db1 * gb0).sum(-1)  # [N, H]
    ds[BT - 1] -= (full0[:, None] * ds_sums).sum()
    return (dq, dk, dv, deta, dln[:, 0].to(ln_weight.dtype), dln[:, 1].to(ln_bias.dtype),
            ds, dW0, db0, dgW0, dgb0)
