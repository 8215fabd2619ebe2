"""Pieces shared by TTT-Linear's Triton kernels: on-chip widths, output allocation, and the jitted math
(LayerNorm, its gradient, the LayerNorm-L2 inner loss's gradient, tile pointers, the decode steps' offset)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# Tests set this to fill every kernel output with NaN before the kernels run, so an unwritten element shows.
POISON_OUTPUTS = False


def block_d(D: int) -> int:
    """The on-chip width of a head dim: the next power of two (Triton's tiles), at least 16 (tensor cores)."""
    return max(16, triton.next_power_of_2(D))


def new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def checkpoint_layout(cu: Tensor, offset: Tensor, total: int, BT: int, group: int) -> tuple[Tensor, Tensor, int]:
    """Where the forward keeps W, b at the start of every `group` mini-batches (one slot per group of a
    sequence): gcum [N+1] (sequence n's slots are gcum[n] .. gcum[n+1]-1), seq [slots] (each slot's sequence,
    N for a slot past the last), and a number of slots that needs no device sync:
    sum(ceil(mb_n / group)) <= sum(mb_n) // group + N, and sum(mb_n) <= total // BT + 2N."""
    N = offset.numel()
    mini_batches = (offset + cu[1:] - cu[:-1] + BT - 1) // BT
    gcum = F.pad(((mini_batches + group - 1) // group).cumsum(0), (1, 0))
    slots = (total // BT + 2 * N) // group + N
    seq = torch.searchsorted(gcum[1:].contiguous(), torch.arange(slots, device=cu.device), right=True)
    return gcum, seq, slots


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
def _head_ln(LNW, LNB, h, cols, D: tl.constexpr):
    """Head h's inner LayerNorm weight and bias [H, D] at columns `cols`, float32 (zeros from column D on)."""
    cm = cols < D
    return (
        tl.load(LNW + h * D + cols, mask=cm, other=0.0).to(tl.float32),
        tl.load(LNB + h * D + cols, mask=cm, other=0.0).to(tl.float32),
    )


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
def _mat_ptrs(X, row, D: tl.constexpr, BD: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Pointers of the [BD, BD] tile of D x D matrix `row` (int64) of X, or of its transpose."""
    d = tl.arange(0, BD)
    if TRANSPOSED:
        return X + row * D * D + d[None, :] * D + d[:, None]
    return X + row * D * D + d[:, None] * D + d[None, :]


@triton.jit
def _sequence(CU, OFF, n, BT: tl.constexpr):
    """Sequence n's first token, length, offset in its first mini-batch, and number of mini-batch slots."""
    start = tl.load(CU + n)
    L = tl.load(CU + n + 1) - start
    off = tl.load(OFF + n)
    return start, L, off, (off + L + BT - 1) // BT


@triton.jit
def _load_inputs(m, Q, K, V, ETA, h, H, start, off, L, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """Mini-batch m's q, k, v tiles and eta (zeros outside the sequence), in their input dtypes."""
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    vm = valid[:, None] & (tl.arange(0, BD) < D)[None, :]
    return (
        tl.load(_tile_ptrs(Q, tok, h, H, D, BD), mask=vm, other=0.0),
        tl.load(_tile_ptrs(K, tok, h, H, D, BD), mask=vm, other=0.0),
        tl.load(_tile_ptrs(V, tok, h, H, D, BD), mask=vm, other=0.0),
        tl.load(ETA + tok * H + h, mask=valid, other=0.0),
    )


@triton.jit
def _ln_l2_grad(Z, V, K, lnw, lnb, D: tl.constexpr, BD: tl.constexpr, eps):
    """For a [BT, BD] tile: xhat, rstd, G = lnw*(y - (V - K)), G's row means mG = mean(G), mGx = mean(G xhat),
    and dZ = d(1/2||LN(Z) - (V - K)||^2)/dZ."""
    xh, rstd = _layernorm(Z, D, BD, eps)
    G = lnw[None, :] * (lnw[None, :] * xh + lnb[None, :] - V + K)
    mG = tl.sum(G, 1) / D
    mGx = tl.sum(G * xh, 1) / D
    return xh, rstd, G, mG, mGx, _ln_l2_dz(G, xh, rstd, mG, mGx, D, BD)


@triton.jit
def _ln_l2_dz(G, xh, rstd, mG, mGx, D: tl.constexpr, BD: tl.constexpr):
    """`_ln_l2_grad`'s dZ from its G, xhat, rstd and G's row means (the backward's kernels keep those)."""
    return _cols(rstd[:, None] * (G - mG[:, None] - xh * mGx[:, None]), D, BD)


@triton.jit
def _ln_l2_grad_bwd(dE, xh, rstd, G, mG, mGx, eta, lnw, D: tl.constexpr, BD: tl.constexpr):
    """Back through E = eta * dZ, dZ the LayerNorm-L2 gradient of `_ln_l2_grad` (G, mG, mGx as it gives them):
    given dL/dE [BT,BD], returns dL/dZ and dL/dG (padding columns kept zero)."""
    g = eta[:, None] * dE
    mgx = tl.sum(g * xh, 1) / D
    dr = tl.sum(g * (G - mG[:, None] - xh * mGx[:, None]), 1)
    dG = _ln_bwd(g, xh, rstd, D, BD)
    dx = lnw[None, :] * lnw[None, :] * dG - rstd[:, None] * (g * mGx[:, None] + G * mgx[:, None])
    return _ln_bwd(dx, xh, rstd, D, BD) - (dr * rstd * rstd / D)[:, None] * xh, dG


@triton.jit
def _group(g, SEQ, GCUM, CU, OFF, N, BT: tl.constexpr, GROUP: tl.constexpr):
    """Group slot g's sequence n (N for an unused slot, whose other values are then meaningless), that
    sequence's start, length, offset, number of mini-batches, and the group's first and end mini-batch."""
    n = tl.load(SEQ + g)
    n_in = tl.minimum(n, N - 1)
    start, L, off, num_mb = _sequence(CU, OFF, n_in, BT)
    m0 = (g - tl.load(GCUM + n_in)) * GROUP
    return n, start, L, off, num_mb, m0, tl.minimum(m0 + GROUP, num_mb)


@triton.jit
def _minibatch_forward(m, W, bv, q, k, v, eta, s, lnw, lnb, GW0, GB0, seq, D: tl.constexpr, BD: tl.constexpr,
                       BT: tl.constexpr, eps):
    """Mini-batch m's forward from the inner weights W [BD,BD], bv [BD] at its start; q, k, v [BT,BD], eta [BT]
    float32 tiles, s [BT] the token scale, row `seq` of GW0 [N,H,D,D], GB0 [N,H,D] the state's partial sums
    (added in mini-batch 0). Returns Z's xhat and rstd, G's row means (`_ln_l2_grad`), E [BT,BD], the causal
    A = tril(q k^T + 1) [BT,BT], C = A E (+ q gW + gb) [BT,BD], sum(E) (+ gb) [BD], and Zq's xhat and rstd."""
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    dm = d < D
    Z = _dot(k, W) + bv[None, :]
    xh, rstd, _, mG, mGx, dZ = _ln_l2_grad(Z, v, k, lnw, lnb, D, BD, eps)
    E = eta[:, None] * dZ
    A = tl.where(i[:, None] >= i[None, :], _dot(q, tl.trans(k)) + 1.0, 0.0)
    C = _dot(A, E)
    Sb = tl.sum(E, 0)
    if m == 0:
        gb = tl.load(GB0 + seq * D + d, mask=dm, other=0.0)
        C = _dot_acc(q, tl.load(_mat_ptrs(GW0, seq, D, BD), mask=dm[:, None] & dm[None, :], other=0.0), C)
        C += gb[None, :]
        Sb += gb
    Zq = _dot(q, W) + bv[None, :] - s[:, None] * C
    xq, rq = _layernorm(Zq, D, BD, eps)
    return xh, rstd, mG, mGx, E, A, C, Sb, xq, rq


@triton.jit
def _advance(m, W, bv, k, E, Sb, c, GW0, seq, D: tl.constexpr, BD: tl.constexpr):
    """The weights after mini-batch m: W - c (K^T E + gW in mini-batch 0), bv - c Sb, where c = s_{b-1} for a
    finished mini-batch and 0 for an unfinished one."""
    W = _dot_acc(tl.trans(-c * k), E, W)
    if m == 0:
        dm = tl.arange(0, BD) < D
        W -= c * tl.load(_mat_ptrs(GW0, seq, D, BD), mask=dm[:, None] & dm[None, :], other=0.0)
    return W, bv - c * Sb


@triton.jit
def _read_offset(OFF, n, BT: tl.constexpr, INPLACE: tl.constexpr):
    """A decode step's mini-batch offset of row n (TTT-Linear's and TTT-MLP's), and how many programs of the row
    read it before this one. INPLACE (the new offset goes over OFF[n], which every head's program reads): each
    adds BT as it reads, so OFF[n] % BT stays the offset until the row's last program writes the new one."""
    if INPLACE:
        arrived = tl.atomic_add(OFF + n, BT)
        pos = arrived % BT
        before = arrived // BT
    else:
        pos = tl.load(OFF + n)
        before = 0
    return pos, before


@triton.jit
def _write_offset(OFF, OFF1, n, h, H, pos, before, BT: tl.constexpr, INPLACE: tl.constexpr):
    """The new offset of row n: in place by the row's last program to read OFF[n] (`_read_offset`: the atomic
    orders its store after every other program's read), else by its head 0 into OFF1."""
    if INPLACE:
        if before == H - 1:
            tl.store(OFF + n, (pos + 1) % BT)
    elif h == 0:
        tl.store(OFF1 + n, (pos + 1) % BT)
