"""The SSD on the GPU: Triton kernels for the chunked scan, forward and backward, and the autograd function.

Per row b, head h and chunk c of L tokens, with a_t = dt_t A, cs the cumulative sum of a inside the chunk and
xs_t = dt_t x_t (state S [P, N]):
    Y_i   = sum_{j <= i} (C_i . B_j) exp(cs_i - cs_j) xs_j  +  exp(cs_i) S_in C_i
    S_out = exp(cs_L) S_in + sum_j exp(cs_L - cs_j) xs_j B_j^T
The state passes from chunk to chunk on chip: `_scan_kernel` runs one program per (row, head, slice of the head
dim's rows of S) through the chunks in order, keeping the state entering every chunk; `_chunk_y_kernel` then
gives every chunk's Y at once (one program per few chunks of one head). The backward reruns the pass, then
`_scan_bwd_kernel` runs through the chunks in reverse carrying the gradient w.r.t. the state and keeps it as it
leaves every chunk; `_chunk_dx_kernel` gives dx per chunk, `_dbc_kernel` the gradients of B and C per group (its
heads summed in the program, the chunk's L x L products summed over heads first: no atomics, deterministic) and
`_ddt_kernel` those of dt and A from the parts the other two leave per token. With Y_IN_SCAN (DX_IN_SCAN) the
passes compute Y (dx) themselves, so that the forward writes nothing of size [chunks, P, N], at the price of
sequential programs doing the chunk's L x L and L x N products (benchmarks/gpu_ssd.py --sweep times both).

Packed documents (cu_seqlens) come as each token's document index: terms that cross a document start are
masked, so the state restarts from zero there. Each document's final state is read from the state entering its
last chunk (`chunked.document_end_states`), which the forward then returns too; its gradient joins the carried
gradient as the backward pass reaches that chunk's start. The state and its gradient are float32 (float64 for
float64 inputs) wherever they are carried, kept or multiplied (float32 operands run as tf32 on the GPU), and so
is every sum: dt's and A's gradients sum terms that cancel, and bf16 states or state products made dA's error 2-5%
in an emulation of bf16 rounding (1e-6 with float32 ones). The products of the chunk's L x L matrices with x, dy,
B and C take 16-bit operands for 16-bit inputs (`LOW_PRODUCTS`); C B^T and dy x^T multiply the inputs as given.

Traffic at the 125m preset (P = 64, N = 128, L = 64): the float32 states and their gradients [chunks, P, N] are
each twice the size of x in bf16, written once and read twice (once with Y_IN_SCAN and DX_IN_SCAN), so they and
x, dy, B and C (read two to four times) make most of it; the per-token parts of dt's gradient are small.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.backend import kernel_device
from tttlm.ops.ssd.chunked import document_end_states
from tttlm.ops.ttt_linear.triton_parts import new

CHUNK_SIZES = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 128
LIMITS = (f"head dims up to {MAX_HEAD_DIM}, chunk_size in {CHUNK_SIZES}, float16, bfloat16, float32 or float64, "
          "on CUDA (or the CPU under TRITON_INTERPRET=1)")
# Tiles and warps (benchmarks/gpu_ssd.py --sweep times others): head-dim rows of the state per program of the
# passes over chunks (each holds [SCAN_ROWS, N] of the state in registers), state columns per program of B's
# and C's gradients; chunks per program of the per-chunk kernels (unrolled) and their warps. At the 125m preset
# on sm_90 (benchmarks/kernel_registers.py --ops ssd) these compile without spills: the passes in 134-156
# registers (3 programs per SM), the per-chunk kernels in 202-255 and B's and C's gradients in 255 (1 program per
# SM). Computing Y or dx in the passes takes 32 rows and 8 warps (255 registers). On an H200 (2026-12-03, the
# sweep at B16xT2048, every setting within 2.9e-3 of float64) 4 warps for the per-chunk kernels ran
# forward+backward in 3.25 ms against 3.72 with 8; no other setting moved it by more than 1%, and Y and dx in the
# passes took 5.5 ms.
SCAN_ROWS, SCAN_WARPS, SCAN_STAGES = 16, 4, 2
DBC_COLUMNS, DBC_WARPS, DBC_STAGES = 64, 8, 2
CHUNK_STEP, CHUNK_WARPS = 1, 4
# Products of the chunk's L x L matrices with x, dy, B or C take operands in the 16-bit inputs' dtype (the tensor
# cores' fast path; else float32, as tf32 on the GPU).
LOW_PRODUCTS = True
# Y and dx in the passes over chunks (see above), or by one program per chunk and head.
Y_IN_SCAN, DX_IN_SCAN = False, False
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def supports(x: Tensor, chunk_size: int) -> bool:
    """Whether these kernels take x [Bt, T, H, P] with this chunk size."""
    return (kernel_device(x) and chunk_size in CHUNK_SIZES and x.dtype in SUPPORTED_DTYPES
            and x.shape[-1] <= MAX_HEAD_DIM)


# ------------------------------------------------------------------------------------------------ pieces
@triton.jit
def _chunk_tokens(c, T, L: tl.constexpr):
    """Token indices of chunk c (in the row) and which of them exist."""
    t = c * L + tl.arange(0, L)
    return t, t < T


@triton.jit
def _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG: tl.constexpr, L: tl.constexpr):
    """The chunk's dt [L] and its decays: inside [L, L] (exp(cs_i - cs_j) where token j feeds token i: j <= i in
    one document), gamma [L] (the entering state's share of token i), w [L] (token j's share of the leaving
    state) and carry (the entering state's share of the leaving state), from cs [L], the cumulative log decay
    from the chunk start."""
    t, tm = _chunk_tokens(c, T, L)
    dt = tl.load(DT + b * sdb + t * sdt + h * sdh, mask=tm, other=0.0).to(A.dtype.element_ty)
    cs = tl.cumsum(dt * tl.load(A + h), 0)
    cs_last = tl.sum(tl.where(tl.arange(0, L) == L - 1, cs, 0.0), 0)
    i = tl.arange(0, L)
    same = i[:, None] >= i[None, :]
    gamma = tl.exp(cs)
    w = tl.exp(cs_last - cs)
    carry = tl.exp(cs_last)
    if HAS_SEG:
        seg = tl.load(SEG + b * T + t, mask=tm, other=-1)
        seg_last = tl.load(SEG + b * T + tl.minimum(c * L + L - 1, T - 1))
        seg_prev = tl.load(SEG + b * T + tl.maximum(c * L - 1, 0))
        same = same & (seg[:, None] == seg[None, :])
        gamma = tl.where(seg == seg_prev, gamma, 0.0)
        w = tl.where(seg == seg_last, w, 0.0)
        carry = tl.where(seg_last == seg_prev, carry, 0.0)
    inside = tl.exp(tl.where(same, cs[:, None] - cs[None, :], float("-inf")))
    return dt, inside, gamma, w, carry


@triton.jit
def _tile(X, b, t, tm, k, sb, st, sk, K, BK: tl.constexpr):
    """X[b, t, k, :K] as an [L, BK] tile in X's dtype (zeros outside)."""
    cols = tl.arange(0, BK)
    ptr = X + b * sb + t[:, None] * st + k * sk + cols[None, :]
    return tl.load(ptr, mask=tm[:, None] & (cols[None, :] < K), other=0.0)


@triton.jit
def _token_rows(Y, b, t, tm, h, T, H, P, p0, BP: tl.constexpr):
    """Pointers and mask of Y[b, t, h, p0 : p0 + BP] in a contiguous [Bt, T, H, P] tensor."""
    cols = p0 + tl.arange(0, BP)
    ptr = Y + ((b * T + t[:, None]) * H + h).to(tl.int64) * P + cols[None, :]
    return ptr, tm[:, None] & (cols[None, :] < P)


@triton.jit
def _state_tile(S, row, p0, P, N, BP: tl.constexpr, BN: tl.constexpr, n0=0):
    """Pointers and mask of rows p0 .. p0 + BP, columns n0 .. n0 + BN of state `row` [P, N]."""
    p = p0 + tl.arange(0, BP)
    n = n0 + tl.arange(0, BN)
    return S + row.to(tl.int64) * P * N + p[:, None] * N + n[None, :], (p[:, None] < P) & (n[None, :] < N)


@triton.jit
def _part(PARTS, part, rows, bh, c, nc, L: tl.constexpr):
    """Pointers to PARTS[part, bh, c, :] of a [parts, rows (= Bt H), nc, L] buffer."""
    return PARTS + ((part * rows + bh) * nc + c).to(tl.int64) * L + tl.arange(0, L)


@triton.jit
def _chunk_y(x, Bc, Cc, S, dt, inside, gamma, D: tl.constexpr):
    """Y [L, BP] of one chunk from x [L, BP], B and C [L, N], S [BP, N] (the entering state's rows), dt, inside
    and gamma of `_decays`; D the dtype of the L x L matrix's product's operands."""
    F = dt.dtype
    M = tl.dot(Cc, tl.trans(Bc)).to(F) * inside * dt[None, :]
    return tl.dot(M.to(D), x.to(D)) + gamma[:, None] * tl.dot(Cc.to(F), tl.trans(S.to(F)))


@triton.jit
def _chunk_dx(x, dy, Bc, Cc, dS, dt, inside, w, D: tl.constexpr, L: tl.constexpr):
    """One chunk's dx [L, BP], and the parts from these rows of the head dim of the gradient w.r.t. cs [L] (all
    but the entering state's terms) and of sum_p dx_p x_p / dt [L], from x and dy [L, BP], B and C [L, N], dS
    [BP, N] (the gradient w.r.t. the leaving state's rows), dt, inside and w of `_decays`; D as in `_chunk_y`."""
    F = dt.dtype
    M = tl.dot(Cc, tl.trans(Bc)).to(F) * inside
    BG = tl.dot(Bc.to(F), tl.trans(dS.to(F)))  # B dS^T [L, BP]
    dxs = tl.dot(tl.trans(M).to(D), dy.to(D)) + w[:, None] * BG
    R = M * tl.dot(dy, tl.trans(x)) * dt[None, :]
    xf = x.to(F)
    out_w = w * tl.sum(xf * dt[:, None] * BG, 1)  # d/dw_j, times w_j
    dcs = tl.sum(R, 1) - tl.sum(R, 0) - out_w + tl.where(tl.arange(0, L) == L - 1, tl.sum(out_w, 0), 0.0)
    return dxs * dt[:, None], dcs, tl.sum(dxs * xf, 1)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _scan_kernel(
    X, DT, A, Bm, Cm, SEG, INIT, Y, STATES, FINAL, T, H, G, P, N, nc,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg, scb, sct, scg,
    HAS_SEG: tl.constexpr, HAS_INIT: tl.constexpr, WRITE_Y: tl.constexpr, WRITE_STATES: tl.constexpr,
    HAS_FINAL: tl.constexpr, D: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    """Through the chunks of row b, head h in order, holding rows p0 .. p0 + BP of the state [P, N]: Y of every
    chunk (WRITE_Y), the state entering every chunk (STATES[b, c, h], WRITE_STATES) and the state after the last
    (FINAL), from INIT (or zeros)."""
    bh = tl.program_id(0)
    p0 = tl.program_id(1) * BP
    b, h = bh // H, bh % H
    g = h // (H // G)
    F = A.dtype.element_ty
    if HAS_INIT:
        ip, im = _state_tile(INIT, bh, p0, P, N, BP, BN)
        S = tl.load(ip, mask=im, other=0.0).to(F)
    else:
        S = tl.zeros((BP, BN), F)
    for c in range(nc):
        t, tm = _chunk_tokens(c, T, L)
        dt, inside, gamma, w, carry = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L)
        if WRITE_STATES:
            ptr, sm = _state_tile(STATES, (b * nc + c) * H + h, p0, P, N, BP, BN)
            tl.store(ptr, S, mask=sm)
        x = _tile(X + p0, b, t, tm, h, sxb, sxt, sxh, P - p0, BP)
        Bc = _tile(Bm, b, t, tm, g, sbb, sbt, sbg, N, BN)
        if WRITE_Y:
            Cc = _tile(Cm, b, t, tm, g, scb, sct, scg, N, BN)
            y = _chunk_y(x, Bc, Cc, S, dt, inside, gamma, D)
            yp, ym = _token_rows(Y, b, t, tm, h, T, H, P, p0, BP)
            tl.store(yp, y.to(Y.dtype.element_ty), mask=ym)
        S = carry * S + tl.dot(tl.trans(x.to(F) * (w * dt)[:, None]), Bc.to(F))
    if HAS_FINAL:
        ptr, sm = _state_tile(FINAL, bh, p0, P, N, BP, BN)
        tl.store(ptr, S, mask=sm)


@triton.jit
def _chunk_y_kernel(
    X, DT, A, Bm, Cm, SEG, STATES, Y, T, H, G, P, N, nc,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg, scb, sct, scg,
    HAS_SEG: tl.constexpr, D: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    STEP: tl.constexpr,
):
    """Y of chunks c0 .. c0 + STEP of row b, head h from the state entering each (STATES[b, c, h]); the chunks are
    independent (unrolled, so that one chunk's loads may run ahead of another's products)."""
    c0 = tl.program_id(0) * STEP
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    for k in tl.static_range(STEP):
        c = c0 + k
        if c < nc:
            t, tm = _chunk_tokens(c, T, L)
            dt, inside, gamma, w, carry = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L)
            ptr, sm = _state_tile(STATES, (b * nc + c) * H + h, 0, P, N, BP, BN)
            x = _tile(X, b, t, tm, h, sxb, sxt, sxh, P, BP)
            Bc = _tile(Bm, b, t, tm, g, sbb, sbt, sbg, N, BN)
            Cc = _tile(Cm, b, t, tm, g, scb, sct, scg, N, BN)
            y = _chunk_y(x, Bc, Cc, tl.load(ptr, mask=sm, other=0.0), dt, inside, gamma, D)
            yp, ym = _token_rows(Y, b, t, tm, h, T, H, P, 0, BP)
            tl.store(yp, y.to(Y.dtype.element_ty), mask=ym)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _scan_bwd_kernel(
    X, DT, A, Bm, Cm, SEG, DY, DFINAL, DENTER, DSTATES, DX, DCS, DDTX, DINIT, T, H, G, P, N, nc,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg, scb, sct, scg, syb, syt, syh,
    HAS_SEG: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_DENTER: tl.constexpr, HAS_DINIT: tl.constexpr,
    WRITE_DX: tl.constexpr, D: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    """Through the chunks of row b, head h in reverse, holding rows p0 .. p0 + BP of dS, the gradient w.r.t. the
    state (from DFINAL, or zeros): keeps dS leaving every chunk (DSTATES[b, c, h]) and (WRITE_DX) writes DX and
    this program's parts of the gradient w.r.t. cs (DCS[part]) and of sum_p dx_p x_p / dt (DDTX[part]) per token;
    DENTER (the entering states' gradient from outside) joins dS at each chunk's start, and DINIT gets dS at the
    row's start."""
    bh = tl.program_id(0)
    part = tl.program_id(1)
    p0 = part * BP
    b, h = bh // H, bh % H
    g = h // (H // G)
    F = A.dtype.element_ty
    rows = tl.num_programs(0)
    if HAS_DFINAL:
        ip, im = _state_tile(DFINAL, bh, p0, P, N, BP, BN)
        dS = tl.load(ip, mask=im, other=0.0).to(F)
    else:
        dS = tl.zeros((BP, BN), F)
    for k in range(nc):
        c = nc - 1 - k
        t, tm = _chunk_tokens(c, T, L)
        dt, inside, gamma, w, carry = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L)
        row = (b * nc + c) * H + h
        ptr, sm = _state_tile(DSTATES, row, p0, P, N, BP, BN)
        tl.store(ptr, dS, mask=sm)
        dy = _tile(DY + p0, b, t, tm, h, syb, syt, syh, P - p0, BP)
        Cc = _tile(Cm, b, t, tm, g, scb, sct, scg, N, BN)
        if WRITE_DX:
            x = _tile(X + p0, b, t, tm, h, sxb, sxt, sxh, P - p0, BP)
            Bc = _tile(Bm, b, t, tm, g, sbb, sbt, sbg, N, BN)
            dx, dcs, ddtx = _chunk_dx(x, dy, Bc, Cc, dS, dt, inside, w, D, L)
            tl.store(_part(DCS, part, rows, bh, c, nc, L), dcs)
            tl.store(_part(DDTX, part, rows, bh, c, nc, L), ddtx)
            xp, xm = _token_rows(DX, b, t, tm, h, T, H, P, p0, BP)
            tl.store(xp, dx.to(DX.dtype.element_ty), mask=xm)
        dS = carry * dS + tl.dot(tl.trans(dy.to(F) * gamma[:, None]), Cc.to(F))
        if HAS_DENTER:
            ptr, sm = _state_tile(DENTER, row, p0, P, N, BP, BN)
            dS += tl.load(ptr, mask=sm, other=0.0)
    if HAS_DINIT:
        ptr, sm = _state_tile(DINIT, bh, p0, P, N, BP, BN)
        tl.store(ptr, dS, mask=sm)


@triton.jit
def _chunk_dx_kernel(
    X, DT, A, Bm, Cm, SEG, DY, DSTATES, DX, DCS, DDTX, T, H, G, P, N, nc,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg, scb, sct, scg, syb, syt, syh,
    HAS_SEG: tl.constexpr, D: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    STEP: tl.constexpr,
):
    """DX of chunks c0 .. c0 + STEP of row b, head h and the parts DCS[0], DDTX[0] as `_scan_bwd_kernel` writes
    them, from the gradient w.r.t. the state leaving each chunk (DSTATES[b, c, h]); chunks as in
    `_chunk_y_kernel`."""
    c0 = tl.program_id(0) * STEP
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    rows = tl.num_programs(1)
    for k in tl.static_range(STEP):
        c = c0 + k
        if c < nc:
            t, tm = _chunk_tokens(c, T, L)
            dt, inside, gamma, w, carry = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L)
            ptr, sm = _state_tile(DSTATES, (b * nc + c) * H + h, 0, P, N, BP, BN)
            x = _tile(X, b, t, tm, h, sxb, sxt, sxh, P, BP)
            dy = _tile(DY, b, t, tm, h, syb, syt, syh, P, BP)
            Bc = _tile(Bm, b, t, tm, g, sbb, sbt, sbg, N, BN)
            Cc = _tile(Cm, b, t, tm, g, scb, sct, scg, N, BN)
            dx, dcs, ddtx = _chunk_dx(x, dy, Bc, Cc, tl.load(ptr, mask=sm, other=0.0), dt, inside, w, D, L)
            tl.store(_part(DCS, 0, rows, bh, c, nc, L), dcs)
            tl.store(_part(DDTX, 0, rows, bh, c, nc, L), ddtx)
            xp, xm = _token_rows(DX, b, t, tm, h, T, H, P, 0, BP)
            tl.store(xp, dx.to(DX.dtype.element_ty), mask=xm)


@triton.jit
def _dbc_kernel(
    X, DT, A, Bm, Cm, SEG, DY, STATES, DSTATES, DB, DC, DCS, T, H, G, P, N, nc, first_part,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg, scb, sct, scg, syb, syt, syh,
    HAS_SEG: tl.constexpr, D: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    """Gradients w.r.t. B and C of chunk c, group g, state columns n0 .. n0 + BN, summed over the group's heads,
    and each head's part of the gradient w.r.t. cs through the entering state's readout and carry
    (DCS[first_part + column block])."""
    n0 = tl.program_id(0) * BN
    c = tl.program_id(1)
    bg = tl.program_id(2)
    b, g = bg // G, bg % G
    F = A.dtype.element_ty
    rows = tl.num_programs(2) * (H // G)
    part = first_part + tl.program_id(0)
    i = tl.arange(0, L)
    t, tm = _chunk_tokens(c, T, L)
    Cn = _tile(Cm + n0, b, t, tm, g, scb, sct, scg, N - n0, BN)
    Bn = _tile(Bm + n0, b, t, tm, g, sbb, sbt, sbg, N - n0, BN)
    Q = tl.zeros((L, L), F)  # sum over heads of d/d(C_i . B_j)
    dC = tl.zeros((L, BN), F)
    dB = tl.zeros((L, BN), F)
    per_group = H // G
    for k in range(per_group):
        h = g * per_group + k
        dt, inside, gamma, w, carry = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L)
        row = (b * nc + c) * H + h
        ptr, sm = _state_tile(STATES, row, 0, P, N, BP, BN, n0)
        S = tl.load(ptr, mask=sm, other=0.0).to(F)
        ptr, sm = _state_tile(DSTATES, row, 0, P, N, BP, BN, n0)
        dS = tl.load(ptr, mask=sm, other=0.0).to(F)
        x = _tile(X, b, t, tm, h, sxb, sxt, sxh, P, BP)
        dy = _tile(DY, b, t, tm, h, syb, syt, syh, P, BP)
        Q += inside * tl.dot(dy, tl.trans(x)) * dt[None, :]
        dyS = tl.dot(dy.to(F), S)  # [L, BN]
        dC += gamma[:, None] * dyS
        dB += tl.dot(x.to(F) * (w * dt)[:, None], dS)
        kappa = tl.sum(tl.sum(S * dS, 1), 0)  # <S_in, dS_out> over these columns
        dcs = gamma * tl.sum(Cn.to(F) * dyS, 1) + tl.where(i == L - 1, carry * kappa, 0.0)
        tl.store(_part(DCS, part, rows, b * H + h, c, nc, L), dcs)
    dC += tl.dot(Q.to(D), Bn.to(D))
    dB += tl.dot(tl.trans(Q).to(D), Cn.to(D))
    cols = n0 + tl.arange(0, BN)
    off = ((b * T + t[:, None]) * G + g).to(tl.int64) * N + cols[None, :]
    m = tm[:, None] & (cols[None, :] < N)
    tl.store(DC + off, dC, mask=m)
    tl.store(DB + off, dB, mask=m)


@triton.jit
def _ddt_kernel(DT, A, DCS, DDTX, DDT, DA, T, H, nc, parts, x_parts, sdb, sdt, sdh, L: tl.constexpr):
    """Gradients of chunk c, head h w.r.t. dt (DDT) and this chunk's share of A's (DA[b, h, c]) from the parts of
    the gradient w.r.t. cs and of sum_p dx_p x_p / dt the other kernels left."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.num_programs(1)
    F = A.dtype.element_ty
    t, tm = _chunk_tokens(c, T, L)
    dt = tl.load(DT + b * sdb + t * sdt + h * sdh, mask=tm, other=0.0).to(F)
    dcs = tl.zeros((L,), F)
    for part in range(parts):
        dcs += tl.load(_part(DCS, part, rows, bh, c, nc, L))
    ddtx = tl.zeros((L,), F)
    for part in range(x_parts):
        ddtx += tl.load(_part(DDTX, part, rows, bh, c, nc, L))
    da = tl.sum(dcs, 0) - tl.cumsum(dcs, 0) + dcs  # d/da_t = sum of dcs_i over i >= t
    tl.store(DDT + ((b * T + t) * H + h).to(tl.int64), da * tl.load(A + h) + ddtx, mask=tm)
    tl.store(DA + bh * nc + c, tl.sum(da * dt, 0))


# ------------------------------------------------------------------------------------------------ driver
def _rows(t: Tensor) -> Tensor:
    """t with unit stride in its last dim (the kernels take any other strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(**tensors: Tensor) -> dict:
    """The kernels' stride arguments of [Bt, T, heads or groups, ...] tensors: x=t gives sxb, sxt, sxh."""
    out = {}
    for name, t in tensors.items():
        last = "g" if name in ("b", "c") else "h"
        out.update({f"s{name}b": t.stride(0), f"s{name}t": t.stride(1), f"s{name}{last}": t.stride(2)})
    return out


class _Dims:
    def __init__(self, x: Tensor, B: Tensor, chunk_size: int):
        self.Bt, self.T, self.H, self.P = x.shape
        self.G, self.N = B.shape[2:]
        self.L = chunk_size
        self.nc = max(1, math.ceil(self.T / chunk_size))
        self.BP = max(16, triton.next_power_of_2(self.P))
        self.BN = max(16, triton.next_power_of_2(self.N))
        self.F = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.scan_rows = min(self.BP, SCAN_ROWS)  # a power of two >= 16, like BP
        self.scan_parts = triton.cdiv(self.P, self.scan_rows)
        self.dx_parts = self.scan_parts if DX_IN_SCAN else 1  # programs writing parts of dcs and ddtx per head
        self.dbc_columns = min(self.BN, DBC_COLUMNS)
        low = LOW_PRODUCTS and x.dtype in (torch.float16, torch.bfloat16)
        self.operands = dict(D=_TL[x.dtype] if low else _TL[self.F])  # of the L x L matrices' products

    def shape(self) -> dict:
        return dict(T=self.T, H=self.H, G=self.G, P=self.P, N=self.N, nc=self.nc)

    def scan(self) -> dict:
        """Grid and tiles of the passes over chunks."""
        return dict(grid=(self.Bt * self.H, self.scan_parts), tiles=dict(
            L=self.L, BP=self.scan_rows, BN=self.BN, num_warps=SCAN_WARPS, num_stages=SCAN_STAGES))

    def chunks(self) -> dict:
        """Grid and tiles of the kernels with one program per (CHUNK_STEP chunks, row, head)."""
        return dict(grid=(triton.cdiv(self.nc, CHUNK_STEP), self.Bt * self.H), tiles=dict(
            L=self.L, BP=self.BP, BN=self.BN, STEP=CHUNK_STEP, num_warps=CHUNK_WARPS, num_stages=1))


def _scan(x, dt, A, B, C, seg, init, d: _Dims, y: bool, keep: bool, final: bool):
    """The forward: y [Bt, T, H, P], the state entering every chunk [Bt, nc, H, P, N] and the final state
    [Bt, H, P, N], each only if asked for (else None; the states are kept anyway for Y outside the pass)."""
    in_scan = y and Y_IN_SCAN
    keep = keep or (y and not in_scan)
    out = [new((d.Bt, d.T, d.H, d.P), x.dtype, x.device) if y else None,
           new((d.Bt, d.nc, d.H, d.P, d.N), d.F, x.device) if keep else None,
           new((d.Bt, d.H, d.P, d.N), d.F, x.device) if final else None]
    launch = d.scan()
    _scan_kernel[launch["grid"]](
        x, dt, A, B, C, seg, init, *out, **d.shape(), **_strides(x=x, d=dt, b=B, c=C), HAS_SEG=seg is not None,
        HAS_INIT=init is not None, WRITE_Y=in_scan, WRITE_STATES=out[1] is not None, HAS_FINAL=final,
        **d.operands, **launch["tiles"],
    )
    if y and not in_scan:
        launch = d.chunks()
        _chunk_y_kernel[launch["grid"]](
            x, dt, A, B, C, seg, out[1], out[0], **d.shape(), **_strides(x=x, d=dt, b=B, c=C),
            HAS_SEG=seg is not None, **d.operands, **launch["tiles"],
        )
    return out


class _SSDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, init, seg, chunk_size, final, entering):
        """y, the final state (with `final`) and the state entering every chunk [Bt, nc, H, P, N] (with
        `entering`: what each packed document's final state is read from). A is in the states' dtype."""
        d = _Dims(x, B, chunk_size)
        y, states, fin = _scan(x, dt, A, B, C, seg, init, d, y=True, keep=entering, final=final)
        ctx.save_for_backward(x, dt, A, B, C, init, seg)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, fin, (states if entering else None)

    @staticmethod
    def backward(ctx, dy, dfinal, dentering):
        x, dt, A, B, C, init, seg = ctx.saved_tensors
        d = _Dims(x, B, ctx.chunk_size)
        dy = torch.zeros_like(x) if dy is None else _rows(dy)
        _, states, _ = _scan(x, dt, A, B, C, seg, init, d, y=False, keep=True, final=False)
        dbc_parts = triton.cdiv(d.N, d.dbc_columns)
        parts = d.dx_parts + dbc_parts
        dstates = new((d.Bt, d.nc, d.H, d.P, d.N), d.F, x.device)
        dx = new(x.shape, x.dtype, x.device)
        dcs = new((parts, d.Bt * d.H, d.nc, d.L), d.F, x.device)
        ddtx = new((d.dx_parts, d.Bt * d.H, d.nc, d.L), d.F, x.device)
        dinit = new((d.Bt, d.H, d.P, d.N), d.F, x.device) if init is not None else None
        launch = d.scan()
        _scan_bwd_kernel[launch["grid"]](
            x, dt, A, B, C, seg, dy, None if dfinal is None else dfinal.contiguous(),
            None if dentering is None else dentering.contiguous(), dstates, dx, dcs, ddtx, dinit, **d.shape(),
            **_strides(x=x, d=dt, b=B, c=C, y=dy), HAS_SEG=seg is not None, HAS_DFINAL=dfinal is not None,
            HAS_DENTER=dentering is not None, HAS_DINIT=init is not None, WRITE_DX=DX_IN_SCAN, **d.operands,
            **launch["tiles"],
        )
        if not DX_IN_SCAN:
            launch = d.chunks()
            _chunk_dx_kernel[launch["grid"]](
                x, dt, A, B, C, seg, dy, dstates, dx, dcs, ddtx, **d.shape(), **_strides(x=x, d=dt, b=B, c=C, y=dy),
                HAS_SEG=seg is not None, **d.operands, **launch["tiles"],
            )
        dB = new(B.shape, d.F, x.device)
        dC = new(C.shape, d.F, x.device)
        # the column blocks of one chunk run side by side, reading its x and dy from memory about once
        _dbc_kernel[(dbc_parts, d.nc, d.Bt * d.G)](
            x, dt, A, B, C, seg, dy, states, dstates, dB, dC, dcs, **d.shape(), first_part=d.dx_parts,
            **_strides(x=x, d=dt, b=B, c=C, y=dy), HAS_SEG=seg is not None, **d.operands, L=d.L, BP=d.BP,
            BN=d.dbc_columns,
            num_warps=DBC_WARPS, num_stages=DBC_STAGES,
        )
        ddt = new(dt.shape, d.F, x.device)
        da = new((d.Bt, d.H, d.nc), d.F, x.device)
        _ddt_kernel[(d.nc, d.Bt * d.H)](
            dt, A, dcs, ddtx, ddt, da, d.T, d.H, d.nc, parts, d.dx_parts, *_strides(d=dt).values(), L=d.L,
        )
        return dx, ddt.to(dt.dtype), da.sum((0, 2)), dB.to(B.dtype), dC.to(C.dtype), dinit, None, None, None, None


def ssd_triton(x, dt, A, B, C, *, chunk_size=64, initial_state=None, cu_seqlens=None, output_final_state=False):
    """See `tttlm.ops.ssd` (inputs checked there; `supports(x, chunk_size)`). Differentiable w.r.t. x, dt, A, B,
    C and initial_state."""
    seg = None
    if cu_seqlens is not None:  # each token's document, found on the device (no wait for the GPU)
        T = x.shape[1]
        seg = torch.searchsorted(cu_seqlens[1:].contiguous(), torch.arange(T, device=x.device), right=True)
        seg = seg.to(torch.int32)[None].contiguous()
    F = _Dims(x, B, chunk_size).F
    init = None if initial_state is None else initial_state.to(F).contiguous()
    packed_final = output_final_state and seg is not None
    x, B = _rows(x), _rows(B)
    y, final, entering = _SSDFn.apply(x, dt, A.to(F).contiguous(), B, _rows(C), init, seg, chunk_size,
                                      output_final_state and not packed_final, packed_final)
    if packed_final:
        final = document_end_states(x, dt, A, B, cu_seqlens, entering[0], chunk_size)
    return y, final
