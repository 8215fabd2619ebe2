"""The SSD on the GPU: Triton kernels for the chunked scan, forward and backward, and the autograd function.

Per row b, head h and chunk c of L tokens, with a_t = dt_t A, cs the cumulative sum of a inside the chunk and
xs_t = dt_t x_t (state S [P, N]):
    Y_i   = sum_{j <= i} (C_i . B_j) exp(cs_i - cs_j) xs_j  +  exp(cs_i) S_in C_i
    S_out = exp(cs_L) S_in + sum_j exp(cs_L - cs_j) xs_j B_j^T
Forward: `_chunk_state_kernel` (each chunk's own S_out term, chunks in parallel), `_state_passing_kernel` (the
recurrence over chunks, sequential, in float32 tiles of the state) and `_chunk_scan_kernel` (Y, chunks in
parallel). The backward recomputes the chunk states (nothing of size [chunks, P, N] is kept between the passes),
then `_chunk_dstate_kernel` and `_dstate_passing_kernel` give each chunk's gradient w.r.t. the state leaving it
(the recurrence run backwards), `_chunk_dx_kernel` the gradients of x, dt and A per head, and
`_chunk_dbc_kernel` those of B and C per group (its heads summed in the program: no atomics, deterministic).

Packed documents (cu_seqlens) come as each token's document index: terms that cross a document start are
masked, so the state restarts from zero there. Each document's final state is read from the state entering its
last chunk (`chunked.document_end_states`), which the forward then returns too; its gradient joins each chunk's
own before the backward's pass over chunks. Products of 16-bit B and C run on the tensor cores in their dtype;
every other product takes float32 operands (tf32 on the GPU) with float32 sums.
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
STATE_BLOCK = 1024  # state elements per program of the passes over chunks
DBC_COLUMNS = 16  # state columns per program of B's and C's gradients (32 and 64 spill registers on sm_90)


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
def _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG: tl.constexpr, L: tl.constexpr, F: tl.constexpr):
    """dt [L], cs [L] (cumulative log decay from the chunk start), the masks of document continuity: same [L, L]
    (j <= i in one document), carried [L] (token in the document of the state entering the chunk), open [L]
    (token in the document still open at the chunk end), and flag (no document starts after the chunk start)."""
    t, tm = _chunk_tokens(c, T, L)
    dt = tl.load(DT + b * sdb + t * sdt + h * sdh, mask=tm, other=0.0).to(F)
    cs = tl.cumsum(dt * tl.load(A + h).to(F), 0)
    i = tl.arange(0, L)
    same = i[:, None] >= i[None, :]
    if HAS_SEG:
        seg = tl.load(SEG + b * T + t, mask=tm, other=-1)
        seg_last = tl.load(SEG + b * T + tl.minimum(c * L + L - 1, T - 1))
        seg_prev = tl.load(SEG + b * T + tl.maximum(c * L - 1, 0))
        same = same & (seg[:, None] == seg[None, :])
        carried = seg == seg_prev
        open_ = seg == seg_last
        flag = seg_last == seg_prev
    else:
        carried = i >= 0
        open_ = i >= 0
        flag = True
    return dt, cs, same, carried, open_, flag


@triton.jit
def _last(v, L: tl.constexpr):
    """v[L - 1] of a [L] vector."""
    return tl.sum(tl.where(tl.arange(0, L) == L - 1, v, 0.0), 0)


@triton.jit
def _tile(X, b, t, tm, k, sb, st, sk, K, BK: tl.constexpr, F: tl.constexpr):
    """X[b, t, k, :K] as an [L, BK] tile in dtype F (zeros outside)."""
    cols = tl.arange(0, BK)
    ptr = X + b * sb + t[:, None] * st + k * sk + cols[None, :]
    return tl.load(ptr, mask=tm[:, None] & (cols[None, :] < K), other=0.0).to(F)


@triton.jit
def _state_tile(S, row, n0, P, N, BP: tl.constexpr, BN: tl.constexpr):
    """Pointers and mask of columns n0 .. n0 + BN of state `row` [P, N]."""
    p = tl.arange(0, BP)
    n = n0 + tl.arange(0, BN)
    return S + row.to(tl.int64) * P * N + p[:, None] * N + n[None, :], (p[:, None] < P) & (n[None, :] < N)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _chunk_state_kernel(
    X, DT, A, Bm, SEG, STATES, CARRY, T, H, G, P, N, nc,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg,
    HAS_SEG: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    """STATES[b, c, h] = sum_j exp(cs_L - cs_j) xs_j B_j^T over the chunk's open document; CARRY[b, h, c] =
    exp(cs_L) if no document starts inside the chunk, else 0."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    F = STATES.dtype.element_ty
    t, tm = _chunk_tokens(c, T, L)
    dt, cs, same, carried, open_, flag = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L, F)
    cs_last = _last(cs, L)
    tl.store(CARRY + bh * nc + c, tl.where(flag, tl.exp(cs_last), 0.0))
    coef = tl.where(open_, tl.exp(cs_last - cs), 0.0) * dt
    xw = _tile(X, b, t, tm, h, sxb, sxt, sxh, P, BP, F) * coef[:, None]  # [L, BP]
    row = (b * nc + c) * H + h
    for n0 in range(0, N, BN):
        Bn = _tile(Bm + n0, b, t, tm, g, sbb, sbt, sbg, N - n0, BN, F)
        ptr, m = _state_tile(STATES, row, n0, P, N, BP, BN)
        tl.store(ptr, tl.dot(tl.trans(xw), Bn), mask=m)


@triton.jit
def _state_passing_kernel(STATES, CARRY, INIT, FINAL, H, PN, nc,
                          HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """In place over the chunks of (b, h): STATES[c] (the chunk's own term) becomes the state entering chunk c,
    S_in[c+1] = CARRY[c] S_in[c] + own[c], from INIT (or zeros); FINAL gets the state after the last chunk."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_INIT:
        s = tl.load(INIT + bh.to(tl.int64) * PN + offs, mask=m, other=0.0).to(STATES.dtype.element_ty)
    else:
        s = tl.zeros((BLOCK,), STATES.dtype.element_ty)
    for c in range(nc):
        ptr = STATES + ((b * nc + c) * H + h).to(tl.int64) * PN + offs
        own = tl.load(ptr, mask=m, other=0.0)
        tl.store(ptr, s, mask=m)
        s = tl.load(CARRY + bh * nc + c) * s + own
    if HAS_FINAL:
        tl.store(FINAL + bh.to(tl.int64) * PN + offs, s, mask=m)


@triton.jit
def _chunk_scan_kernel(
    X, DT, A, Bm, Cm, SEG, STATES, Y, T, H, G, P, N, nc,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg, scb, sct, scg,
    HAS_SEG: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    """Y of chunk c, head h: the masked decay "attention" inside the chunk plus the entering state's readout."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    F = STATES.dtype.element_ty
    t, tm = _chunk_tokens(c, T, L)
    dt, cs, same, carried, open_, flag = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L, F)
    row = (b * nc + c) * H + h
    CB = tl.zeros((L, L), F)
    CS = tl.zeros((L, BP), F)
    for n0 in range(0, N, BN):
        Cn = _tile(Cm + n0, b, t, tm, g, scb, sct, scg, N - n0, BN, Cm.dtype.element_ty)
        Bn = _tile(Bm + n0, b, t, tm, g, sbb, sbt, sbg, N - n0, BN, Bm.dtype.element_ty)
        CB += tl.dot(Cn, tl.trans(Bn)).to(F)
        ptr, m = _state_tile(STATES, row, n0, P, N, BP, BN)
        CS += tl.dot(Cn.to(F), tl.trans(tl.load(ptr, mask=m, other=0.0)))
    decay = tl.exp(tl.where(same, cs[:, None] - cs[None, :], float("-inf")))
    x = _tile(X, b, t, tm, h, sxb, sxt, sxh, P, BP, F)
    y = tl.dot(CB * decay * dt[None, :], x) + tl.where(carried, tl.exp(cs), 0.0)[:, None] * CS
    cols = tl.arange(0, BP)
    ptr = Y + ((b * T + t[:, None]) * H + h).to(tl.int64) * P + cols[None, :]
    tl.store(ptr, y.to(Y.dtype.element_ty), mask=tm[:, None] & (cols[None, :] < P))


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _chunk_dstate_kernel(
    DY, DT, A, Cm, SEG, DSTATES, T, H, G, P, N, nc,
    syb, syt, syh, sdb, sdt, sdh, scb, sct, scg,
    HAS_SEG: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    """DSTATES[b, c, h] = dL/dS_in[c] through chunk c's own outputs: sum_i exp(cs_i) dY_i C_i^T (carried i)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    F = DSTATES.dtype.element_ty
    t, tm = _chunk_tokens(c, T, L)
    dt, cs, same, carried, open_, flag = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L, F)
    dy = _tile(DY, b, t, tm, h, syb, syt, syh, P, BP, F) * tl.where(carried, tl.exp(cs), 0.0)[:, None]
    row = (b * nc + c) * H + h
    for n0 in range(0, N, BN):
        Cn = _tile(Cm + n0, b, t, tm, g, scb, sct, scg, N - n0, BN, F)
        ptr, m = _state_tile(DSTATES, row, n0, P, N, BP, BN)
        tl.store(ptr, tl.dot(tl.trans(dy), Cn), mask=m)


@triton.jit
def _dstate_passing_kernel(DSTATES, CARRY, DFINAL, DINIT, H, PN, nc,
                           HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, BLOCK: tl.constexpr):
    """The recurrence backwards, in place: DSTATES[c] (chunk c's own term) becomes the gradient w.r.t. the
    state leaving chunk c, from DFINAL (or zeros) at the end; DINIT gets the one w.r.t. the initial state."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_DFINAL:
        gr = tl.load(DFINAL + bh.to(tl.int64) * PN + offs, mask=m, other=0.0).to(DSTATES.dtype.element_ty)
    else:
        gr = tl.zeros((BLOCK,), DSTATES.dtype.element_ty)
    for k in range(nc):
        c = nc - 1 - k
        ptr = DSTATES + ((b * nc + c) * H + h).to(tl.int64) * PN + offs
        own = tl.load(ptr, mask=m, other=0.0)
        tl.store(ptr, gr, mask=m)
        gr = tl.load(CARRY + bh * nc + c) * gr + own
    if HAS_DINIT:
        tl.store(DINIT + bh.to(tl.int64) * PN + offs, gr, mask=m)


@triton.jit
def _chunk_dx_kernel(
    X, DT, A, Bm, Cm, SEG, STATES, DSTATES, CARRY, DY, DX, DDT, DA, T, H, G, P, N, nc,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg, scb, sct, scg, syb, syt, syh,
    HAS_SEG: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    """Gradients of chunk c, head h w.r.t. x (DX), dt (DDT) and this chunk's share of A's (DA[b, h, c]), from
    dY, the entering state S_in (STATES) and the gradient w.r.t. the leaving state (DSTATES)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    F = STATES.dtype.element_ty
    t, tm = _chunk_tokens(c, T, L)
    dt, cs, same, carried, open_, flag = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L, F)
    cs_last = _last(cs, L)
    row = (b * nc + c) * H + h
    CB = tl.zeros((L, L), F)
    BG = tl.zeros((L, BP), F)  # B dS_out^T
    CS = tl.zeros((L, BP), F)  # C S_in^T
    kappa = tl.sum(tl.zeros((BP,), F), 0)  # <S_in, dS_out>
    for n0 in range(0, N, BN):
        Cn = _tile(Cm + n0, b, t, tm, g, scb, sct, scg, N - n0, BN, Cm.dtype.element_ty)
        Bn = _tile(Bm + n0, b, t, tm, g, sbb, sbt, sbg, N - n0, BN, Bm.dtype.element_ty)
        CB += tl.dot(Cn, tl.trans(Bn)).to(F)
        ptr, m = _state_tile(STATES, row, n0, P, N, BP, BN)
        S = tl.load(ptr, mask=m, other=0.0)
        ptr, m = _state_tile(DSTATES, row, n0, P, N, BP, BN)
        dS = tl.load(ptr, mask=m, other=0.0)
        BG += tl.dot(Bn.to(F), tl.trans(dS))
        CS += tl.dot(Cn.to(F), tl.trans(S))
        kappa += tl.sum(tl.sum(S * dS, 1), 0)
    x = _tile(X, b, t, tm, h, sxb, sxt, sxh, P, BP, F)
    dy = _tile(DY, b, t, tm, h, syb, syt, syh, P, BP, F)
    xs = x * dt[:, None]
    M = CB * tl.exp(tl.where(same, cs[:, None] - cs[None, :], float("-inf")))
    w = tl.where(open_, tl.exp(cs_last - cs), 0.0)
    gamma = tl.where(carried, tl.exp(cs), 0.0)
    dxs = tl.dot(tl.trans(M), dy) + w[:, None] * BG
    R = M * tl.dot(dy, tl.trans(xs))
    out_w = w * tl.sum(xs * BG, 1)  # d/dw_j, times w_j
    dcs = tl.sum(R, 1) - tl.sum(R, 0) + gamma * tl.sum(dy * CS, 1) - out_w
    last = tl.sum(out_w, 0) + tl.where(flag, tl.exp(cs_last), 0.0) * kappa
    dcs += tl.where(tl.arange(0, L) == L - 1, last, 0.0)
    da = tl.sum(dcs, 0) - tl.cumsum(dcs, 0) + dcs  # d/da_t = sum of dcs_i over i >= t
    ddt = da * tl.load(A + h).to(F) + tl.sum(dxs * x, 1)
    tl.store(DDT + ((b * T + t) * H + h).to(tl.int64), ddt, mask=tm)
    tl.store(DA + bh * nc + c, tl.sum(da * dt, 0))
    cols = tl.arange(0, BP)
    ptr = DX + ((b * T + t[:, None]) * H + h).to(tl.int64) * P + cols[None, :]
    tl.store(ptr, (dxs * dt[:, None]).to(DX.dtype.element_ty), mask=tm[:, None] & (cols[None, :] < P))


@triton.jit
def _chunk_dbc_kernel(
    X, DT, A, Bm, Cm, SEG, STATES, DSTATES, DY, DB, DC, T, H, G, P, N, nc,
    sxb, sxt, sxh, sdb, sdt, sdh, sbb, sbt, sbg, scb, sct, scg, syb, syt, syh,
    HAS_SEG: tl.constexpr, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    """Gradients w.r.t. B and C of chunk c, group g, state columns n0 .. n0 + BN, summed over the group's heads."""
    c = tl.program_id(0)
    bg = tl.program_id(1)
    n0 = tl.program_id(2) * BN
    b, g = bg // G, bg % G
    F = STATES.dtype.element_ty
    t, tm = _chunk_tokens(c, T, L)
    Cn = _tile(Cm + n0, b, t, tm, g, scb, sct, scg, N - n0, BN, F)
    Bn = _tile(Bm + n0, b, t, tm, g, sbb, sbt, sbg, N - n0, BN, F)
    dC = tl.zeros((L, BN), F)
    dB = tl.zeros((L, BN), F)
    per_group = H // G
    for k in range(per_group):
        h = g * per_group + k
        dt, cs, same, carried, open_, flag = _decays(DT, A, SEG, b, h, c, T, sdb, sdt, sdh, HAS_SEG, L, F)
        cs_last = _last(cs, L)
        row = (b * nc + c) * H + h
        ptr, m = _state_tile(STATES, row, n0, P, N, BP, BN)
        S = tl.load(ptr, mask=m, other=0.0)
        ptr, m = _state_tile(DSTATES, row, n0, P, N, BP, BN)
        dS = tl.load(ptr, mask=m, other=0.0)
        xs = _tile(X, b, t, tm, h, sxb, sxt, sxh, P, BP, F) * dt[:, None]
        dy = _tile(DY, b, t, tm, h, syb, syt, syh, P, BP, F)
        Q = tl.exp(tl.where(same, cs[:, None] - cs[None, :], float("-inf"))) * tl.dot(dy, tl.trans(xs))
        gamma = tl.where(carried, tl.exp(cs), 0.0)
        w = tl.where(open_, tl.exp(cs_last - cs), 0.0)
        dC += tl.dot(Q, Bn) + gamma[:, None] * tl.dot(dy, S)
        dB += tl.dot(tl.trans(Q), Cn) + w[:, None] * tl.dot(xs, dS)
    cols = n0 + tl.arange(0, BN)
    off = ((b * T + t[:, None]) * G + g).to(tl.int64) * N + cols[None, :]
    m = tm[:, None] & (cols[None, :] < N)
    tl.store(DC + off, dC, mask=m)
    tl.store(DB + off, dB, mask=m)


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
        self.BN = max(16, min(64, triton.next_power_of_2(self.N)))
        self.F = torch.float64 if x.dtype == torch.float64 else torch.float32

    def shape(self) -> dict:
        return dict(T=self.T, H=self.H, G=self.G, P=self.P, N=self.N, nc=self.nc)

    def tiles(self, num_warps: int = 8, num_stages: int = 2) -> dict:
        return dict(L=self.L, BP=self.BP, BN=self.BN, num_warps=num_warps, num_stages=num_stages)


def _states(x, dt, A, B, seg, init, d: _Dims, final: bool):
    """The state entering every chunk [Bt, nc, H, P, N], the chunks' carries [Bt, H, nc], the final state."""
    states = new((d.Bt, d.nc, d.H, d.P, d.N), d.F, x.device)
    carry = new((d.Bt, d.H, d.nc), d.F, x.device)
    grid = (d.nc, d.Bt * d.H)
    _chunk_state_kernel[grid](
        x, dt, A, B, seg, states, carry, **d.shape(), **_strides(x=x, d=dt, b=B), HAS_SEG=seg is not None,
        **d.tiles(),
    )
    fin = new((d.Bt, d.H, d.P, d.N), d.F, x.device) if final else None
    PN = d.P * d.N
    _state_passing_kernel[(d.Bt * d.H, triton.cdiv(PN, STATE_BLOCK))](
        states, carry, init, fin, d.H, PN, d.nc, HAS_INIT=init is not None, HAS_FINAL=final, BLOCK=STATE_BLOCK,
    )
    return states, carry, fin


class _SSDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, init, seg, chunk_size, final, entering):
        """y, the final state (with `final`) and the state entering every chunk [Bt, nc, H, P, N] (with
        `entering`: what each packed document's final state is read from)."""
        d = _Dims(x, B, chunk_size)
        states, _, fin = _states(x, dt, A, B, seg, init, d, final)
        y = new((d.Bt, d.T, d.H, d.P), x.dtype, x.device)
        _chunk_scan_kernel[(d.nc, d.Bt * d.H)](
            x, dt, A, B, C, seg, states, y, **d.shape(), **_strides(x=x, d=dt, b=B, c=C),
            HAS_SEG=seg is not None, **d.tiles(),
        )
        ctx.save_for_backward(x, dt, A, B, C, init, seg)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, fin, (states if entering else None)

    @staticmethod
    def backward(ctx, dy, dfinal, dentering):
        x, dt, A, B, C, init, seg = ctx.saved_tensors
        d = _Dims(x, B, ctx.chunk_size)
        dy = torch.zeros_like(x) if dy is None else _rows(dy)
        states, carry, _ = _states(x, dt, A, B, seg, init, d, False)
        dstates = new((d.Bt, d.nc, d.H, d.P, d.N), d.F, x.device)
        grid = (d.nc, d.Bt * d.H)
        _chunk_dstate_kernel[grid](
            dy, dt, A, C, seg, dstates, **d.shape(), **_strides(y=dy, d=dt, c=C), HAS_SEG=seg is not None, **d.tiles(),
        )
        if dentering is not None:  # the entering states' gradient from outside joins each chunk's own before the pass
            dstates += dentering
        PN = d.P * d.N
        dinit = new((d.Bt, d.H, d.P, d.N), d.F, x.device) if init is not None else None
        _dstate_passing_kernel[(d.Bt * d.H, triton.cdiv(PN, STATE_BLOCK))](
            dstates, carry, None if dfinal is None else dfinal.contiguous(), dinit, d.H, PN, d.nc,
            HAS_DFINAL=dfinal is not None, HAS_DINIT=init is not None, BLOCK=STATE_BLOCK,
        )
        dx = new(x.shape, x.dtype, x.device)
        ddt = new(dt.shape, d.F, x.device)
        da = new((d.Bt, d.H, d.nc), d.F, x.device)
        _chunk_dx_kernel[grid](
            x, dt, A, B, C, seg, states, dstates, carry, dy, dx, ddt, da, **d.shape(),
            **_strides(x=x, d=dt, b=B, c=C, y=dy), HAS_SEG=seg is not None, **d.tiles(),
        )
        dB = new(B.shape, d.F, x.device)
        dC = new(C.shape, d.F, x.device)
        tiles = {**d.tiles(), "BN": min(d.BN, DBC_COLUMNS)}
        _chunk_dbc_kernel[(d.nc, d.Bt * d.G, triton.cdiv(d.N, tiles["BN"]))](
            x, dt, A, B, C, seg, states, dstates, dy, dB, dC, **d.shape(),
            **_strides(x=x, d=dt, b=B, c=C, y=dy), HAS_SEG=seg is not None, **tiles,
        )
        dA = da.sum((0, 2)).to(A.dtype)
        return dx, ddt.to(dt.dtype), dA, dB.to(B.dtype), dC.to(C.dtype), dinit, None, None, None, None


def ssd_triton(x, dt, A, B, C, *, chunk_size=64, initial_state=None, cu_seqlens=None, output_final_state=False):
    """See `tttlm.ops.ssd` (inputs checked there; `supports(x, chunk_size)`). Differentiable w.r.t. x, dt, A, B,
    C and initial_state."""
    seg = None
    if cu_seqlens is not None:  # each token's document, found on the device (no wait for the GPU)
        T = x.shape[1]
        seg = torch.searchsorted(cu_seqlens[1:].contiguous(), torch.arange(T, device=x.device), right=True)
        seg = seg.to(torch.int32)[None].contiguous()
    init = None if initial_state is None else initial_state.to(_Dims(x, B, chunk_size).F).contiguous()
    packed_final = output_final_state and seg is not None
    x, B = _rows(x), _rows(B)
    y, final, entering = _SSDFn.apply(x, dt, A.contiguous(), B, _rows(C), init, seg, chunk_size,
                                      output_final_state and not packed_final, packed_final)
    if packed_final:
        final = document_end_states(x, dt, A, B, cu_seqlens, entering[0], chunk_size)
    return y, final
