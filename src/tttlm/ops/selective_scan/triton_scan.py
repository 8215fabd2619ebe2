"""The selective scan as Triton kernels: sequential in T, parallel over channels and state dims.

One program per (sequence, block of BE channels) holds its [BE, N] float32 state and walks its sequence in
tiles of BT tokens. Inside a tile the recurrence h_t = a_t h_{t-1} + b_t is an associative scan over the
tile's [BT, BE, N] pairs (a_t, b_t) (a first-order linear recurrence composes as (a, b) then (a', b') =
(a a', a' b + b')); as Triton lays it out for sm_90, each thread holds the BT tokens of its (channel, state)
elements and scans them in registers, so a tile is one load, one scan and one store instead of BT dependent
round trips. The next tile's inputs are loaded while the current one is scanned.

The forward keeps the state entering every tile (float32, [tiles, E, N]) for the backward, which walks each
sequence's tiles in reverse: it rebuilds the tile's states from the kept one, then scans the adjoint
g_t = dL/dh_t = a_{t+1} g_{t+1} + C_t dy_t backwards inside the tile. With them, a_t h_{t-1} = h_t - b_t gives
every gradient without dividing by a. B's and C's gradients are summed over channels per program and the
channel blocks' parts added afterwards (no atomics: the result does not depend on scheduling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.backend import kernel_device
from tttlm.ops.ttt_linear.triton_parts import new

BT = 16  # tokens per tile
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_N = 64
LIMITS = f"state sizes N up to {MAX_N}, float16, bfloat16 or float32, on CUDA (or the CPU under TRITON_INTERPRET=1)"


def supports(u: Tensor, N: int) -> bool:
    """Whether these kernels take u [B,T,E] with state size N (on CUDA, or on the CPU under TRITON_INTERPRET)."""
    return kernel_device(u) and u.dtype in SUPPORTED_DTYPES and 1 <= N <= MAX_N


def channel_block(sequences: int, E: int, device: torch.device) -> int:
    """Channels per program: 16, or 8 when 16 would leave fewer than two programs per SM (few long sequences)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return 16 if sequences * triton.cdiv(E, 16) >= 2 * sms else 8


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _step_sizes(DELTA, rows, e, mask, bias, E, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta of tokens `rows` [BT] and channels e [BE] (0 outside `mask`), and its value before the softplus."""
    x = tl.load(DELTA + rows[:, None] * E + e[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += bias[None, :]
    d = _softplus(x) if SOFTPLUS else x
    return tl.where(mask, d, 0.0), x


@triton.jit
def _tile_inputs(U, Bm, Cm, rows, e, n, mask, nmask, E, N):
    """u [BT, BE], B and C [BT, BN] of tokens `rows`, float32, zero outside the masks."""
    u = tl.load(U + rows[:, None] * E + e[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bm + rows[:, None] * N + n[None, :], mask=nmask, other=0.0).to(tl.float32)
    c = tl.load(Cm + rows[:, None] * N + n[None, :], mask=nmask, other=0.0).to(tl.float32)
    return u, b, c


@triton.jit
def _fwd_kernel(
    U, DELTA, A, Bm, Cm, Dv, BIAS, H0, Y, HT, CKPT, CU, TILE0, E, N,
    BE: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr, STORE_CKPT: tl.constexpr,
):
    s = tl.program_id(0)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    n = tl.arange(0, BN)
    em, nm = e < E, n < N
    en = em[:, None] & nm[None, :]
    en_off = e[:, None] * N + n[None, :]
    bos = tl.load(CU + s).to(tl.int64)
    eos = tl.load(CU + s + 1).to(tl.int64)
    A_t = tl.load(A + en_off, mask=en, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else None
    Dd = tl.load(Dv + e, mask=em, other=0.0).to(tl.float32) if HAS_D else None
    if HAS_H0:
        h = tl.load(H0 + s * E * N + en_off, mask=en, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BE, BN], dtype=tl.float32)
    last = (tl.arange(0, BT) == BT - 1)[:, None, None]
    slot = tl.load(TILE0 + s).to(tl.int64)

    rows = bos + tl.arange(0, BT)
    mask = (rows < eos)[:, None] & em[None, :]
    nmask = (rows < eos)[:, None] & nm[None, :]
    u, b, c = _tile_inputs(U, Bm, Cm, rows, e, n, mask, nmask, E, N)
    d, _ = _step_sizes(DELTA, rows, e, mask, bias, E, HAS_BIAS, SOFTPLUS)
    for _ in range(bos, eos, BT):
        # the next tile's inputs are on their way while this one is scanned
        nrows = rows + BT
        nmask_e = (nrows < eos)[:, None] & em[None, :]
        nmask_n = (nrows < eos)[:, None] & nm[None, :]
        u_n, b_n, c_n = _tile_inputs(U, Bm, Cm, nrows, e, n, nmask_e, nmask_n, E, N)
        d_n, _ = _step_sizes(DELTA, nrows, e, nmask_e, bias, E, HAS_BIAS, SOFTPLUS)

        if STORE_CKPT:
            tl.store(CKPT + slot * E * N + en_off, h, mask=en)
        a = tl.exp(d[:, :, None] * A_t[None, :, :])  # padding tokens: d = 0, a = 1, b = 0 keep the state
        bx = (d * u)[:, :, None] * b[:, None, :]
        pa, pb = tl.associative_scan((a, bx), 0, _combine)
        hs = pb + pa * h[None, :, :]
        y = tl.sum(hs * c[:, None, :], 2)
        if HAS_D:
            y += Dd[None, :] * u
        tl.store(Y + rows[:, None] * E + e[None, :], y.to(Y.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where(last, hs, 0.0), 0)
        slot += 1

        rows, mask = nrows, nmask_e
        u, b, c, d = u_n, b_n, c_n, d_n
    if STORE_FINAL:
        tl.store(HT + s * E * N + en_off, h, mask=en)


@triton.jit
def _bwd_kernel(
    U, DELTA, A, Bm, Cm, Dv, BIAS, DY, DHT, CKPT, CU, TILE0,
    DU, DDELTA, DA_P, DB_P, DC_P, DD_P, DBIAS_P, DH0, E, N, TOTAL,
    BE: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DHT: tl.constexpr,
):
    s = tl.program_id(0)
    blk = tl.program_id(1)
    e = blk * BE + tl.arange(0, BE)
    n = tl.arange(0, BN)
    em, nm = e < E, n < N
    en = em[:, None] & nm[None, :]
    en_off = e[:, None] * N + n[None, :]
    bos = tl.load(CU + s).to(tl.int64)
    eos = tl.load(CU + s + 1).to(tl.int64)
    A_t = tl.load(A + en_off, mask=en, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else None
    Dd = tl.load(Dv + e, mask=em, other=0.0).to(tl.float32) if HAS_D else None
    if HAS_DHT:
        g = tl.load(DHT + s * E * N + en_off, mask=en, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BE, BN], dtype=tl.float32)
    first = (tl.arange(0, BT) == 0)[:, None, None]
    slot0 = tl.load(TILE0 + s).to(tl.int64)
    tiles = (eos - bos + BT - 1) // BT
    dA_acc = tl.zeros([BE, BN], dtype=tl.float32)
    dD_acc = tl.zeros([BE], dtype=tl.float32)
    dbias_acc = tl.zeros([BE], dtype=tl.float32)

    for i in range(tiles):
        k = tiles - 1 - i
        rows = bos + k * BT + tl.arange(0, BT)
        live = rows < eos
        mask = live[:, None] & em[None, :]
        nmask = live[:, None] & nm[None, :]
        u, b, c = _tile_inputs(U, Bm, Cm, rows, e, n, mask, nmask, E, N)
        d, x = _step_sizes(DELTA, rows, e, mask, bias, E, HAS_BIAS, SOFTPLUS)
        dy = tl.load(DY + rows[:, None] * E + e[None, :], mask=mask, other=0.0).to(tl.float32)
        # the decay of the next token (1 past the end, where the final state's gradient enters unchanged)
        nxt = rows + 1
        d_next, _ = _step_sizes(DELTA, nxt, e, (nxt < eos)[:, None] & em[None, :], bias, E, HAS_BIAS, SOFTPLUS)
        h_in = tl.load(CKPT + (slot0 + k) * E * N + en_off, mask=en, other=0.0)

        a = tl.exp(d[:, :, None] * A_t[None, :, :])
        bx = (d * u)[:, :, None] * b[:, None, :]
        pa, pb = tl.associative_scan((a, bx), 0, _combine)
        hs = pb + pa * h_in[None, :, :]
        a_next = tl.exp(d_next[:, :, None] * A_t[None, :, :])
        ra, rb = tl.associative_scan((a_next, c[:, None, :] * dy[:, :, None]), 0, _combine, reverse=True)
        gs = rb + ra * g[None, :, :]  # dL/dh_t

        gd = gs * d[:, :, None]
        prev = hs - bx  # a_t h_{t-1}
        du = tl.sum(gd * b[:, None, :], 2)
        if HAS_D:
            du += Dd[None, :] * dy
            dD_acc += tl.sum(dy * u, 0)
        dd = tl.sum(gs * (u[:, :, None] * b[:, None, :] + A_t[None, :, :] * prev), 2)
        if SOFTPLUS:
            dd = dd * tl.sigmoid(x)
        dd = tl.where(mask, dd, 0.0)
        tl.store(DU + rows[:, None] * E + e[None, :], du.to(DU.dtype.element_ty), mask=mask)
        tl.store(DDELTA + rows[:, None] * E + e[None, :], dd.to(DDELTA.dtype.element_ty), mask=mask)
        dbias_acc += tl.sum(dd, 0)
        dA_acc += tl.sum(gd * prev, 0)
        part = blk.to(tl.int64) * TOTAL * N + rows[:, None] * N + n[None, :]
        tl.store(DB_P + part, tl.sum(gd * u[:, :, None], 1), mask=nmask)
        tl.store(DC_P + part, tl.sum(hs * dy[:, :, None], 1), mask=nmask)
        g = tl.sum(tl.where(first, gs, 0.0), 0)

    tl.store(DA_P + s * E * N + en_off, dA_acc, mask=en)
    if HAS_D:
        tl.store(DD_P + s * E + e, dD_acc, mask=em)
    if HAS_BIAS:
        tl.store(DBIAS_P + s * E + e, dbias_acc, mask=em)
    # the initial state reaches token bos through its decay a_bos
    first_row = bos + tl.arange(0, 1)
    d0, _ = _step_sizes(DELTA, first_row, e, em[None, :], bias, E, HAS_BIAS, SOFTPLUS)
    a0 = tl.exp(tl.reshape(d0, [BE])[:, None] * A_t)
    tl.store(DH0 + s * E * N + en_off, a0 * g, mask=en)


def _layout(cu: Tensor, S: int, T_row: int | None, total: int) -> tuple[Tensor, int]:
    """TILE0 [S] (each sequence's first checkpoint slot) and a slot count that needs no device sync:
    sum(ceil(len_s / BT)) <= total // BT + S."""
    tiles = (cu[1:] - cu[:-1] + BT - 1) // BT
    tile0 = F.pad(tiles.cumsum(0), (1, 0))[:-1].contiguous()
    slots = S * triton.cdiv(T_row, BT) if T_row is not None else total // BT + S
    return tile0, slots


def _num_warps(BE: int) -> tuple[int, int]:
    """Warps of the forward and the backward kernel: [BT, BE, N] tiles; the backward holds about twice as many."""
    return (4, 8) if BE >= 16 else (2, 4)


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, h0, cu, T_row, softplus, output_final_state):
        total, E = u.shape
        N = A.shape[1]
        S = cu.numel() - 1
        keep = any(ctx.needs_input_grad[:8])
        tile0, slots = _layout(cu, S, T_row, total)
        BE = channel_block(S, E, u.device)
        y = new((total, E), u.dtype, u.device)
        hT = new((S, E, N), torch.float32, u.device) if output_final_state else None
        ckpt = new((slots, E, N), torch.float32, u.device) if keep else None
        dummy = y  # stands for absent optional tensors (never read: their flags are off)
        _fwd_kernel[(S, triton.cdiv(E, BE))](
            u, delta, A, B, C, dummy if D is None else D, dummy if delta_bias is None else delta_bias,
            dummy if h0 is None else h0, y, dummy if hT is None else hT, dummy if ckpt is None else ckpt,
            cu, tile0, E, N,
            BE=BE, BN=max(2, triton.next_power_of_2(N)), BT=BT, HAS_D=D is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_H0=h0 is not None,
            STORE_FINAL=output_final_state, STORE_CKPT=keep, num_warps=_num_warps(BE)[0],
        )
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, ckpt, cu, tile0)
            ctx.flags = (softplus, h0 is not None, BE)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, delta, A, B, C, D, delta_bias, ckpt, cu, tile0 = ctx.saved_tensors
        softplus, has_h0, BE = ctx.flags
        total, E = u.shape
        N = A.shape[1]
        S = cu.numel() - 1
        blocks = triton.cdiv(E, BE)
        dy = dy.contiguous()
        du = new((total, E), u.dtype, u.device)
        ddelta = new((total, E), delta.dtype, u.device)
        dA_p = new((S, E, N), torch.float32, u.device)
        dB_p = new((blocks, total, N), torch.float32, u.device)
        dC_p = new((blocks, total, N), torch.float32, u.device)
        dD_p = new((S, E), torch.float32, u.device) if D is not None else None
        dbias_p = new((S, E), torch.float32, u.device) if delta_bias is not None else None
        dh0 = new((S, E, N), torch.float32, u.device)
        dummy = du
        _bwd_kernel[(S, blocks)](
            u, delta, A, B, C, dummy if D is None else D, dummy if delta_bias is None else delta_bias, dy,
            dummy if dhT is None else dhT.contiguous(), ckpt, cu, tile0,
            du, ddelta, dA_p, dB_p, dC_p, dummy if dD_p is None else dD_p, dummy if dbias_p is None else dbias_p,
            dh0, E, N, total,
            BE=BE, BN=max(2, triton.next_power_of_2(N)), BT=BT, HAS_D=D is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_DHT=dhT is not None,
            num_warps=_num_warps(BE)[1],
        )
        dA = dA_p.sum(0).to(A.dtype)
        dB = dB_p.sum(0).to(B.dtype)
        dC = dC_p.sum(0).to(C.dtype)
        dD = None if D is None else dD_p.sum(0).to(D.dtype)
        dbias = None if delta_bias is None else dbias_p.sum(0).to(delta_bias.dtype)
        return du, ddelta, dA, dB, dC, dD, dbias, dh0 if has_h0 else None, None, None, None, None


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Arguments as `tttlm.ops.selective_scan` (checked there). Returns y [Bt,T,E] in u's dtype and the final
    states [S,E,N] (float32) or None."""
    Bt, T, E = u.shape
    N = A.shape[1]
    if cu_seqlens is None:
        cu = torch.arange(0, Bt * T + 1, T, device=u.device, dtype=torch.int64)
        T_row = T
    else:
        cu = cu_seqlens.to(u.device, torch.int64)
        T_row = None
    h0 = None if initial_state is None else initial_state.float().contiguous()
    y, hT = _SelectiveScanFn.apply(
        u.reshape(Bt * T, E).contiguous(), delta.reshape(Bt * T, E).contiguous(), A.float().contiguous(),
        B.reshape(Bt * T, N).contiguous(), C.reshape(Bt * T, N).contiguous(),
        None if D is None else D.float().contiguous(),
        None if delta_bias is None else delta_bias.float().contiguous(), h0, cu, T_row, delta_softplus,
        output_final_state,
    )
    return y.view(Bt, T, E), hT
