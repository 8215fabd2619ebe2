"""Pieces shared by Mesa's Triton kernels: the chunk grid, tile loads, the gates of a chunk, the matrix-free
product with H_t + diag(lamb) and the conjugate-gradient loop.

Every sequence (a row of the batch, or a packed sequence of cu_seqlens) is cut into chunks of C tokens from
its start; chunk gc of the whole call (the chunks of sequence n are CHUNK_FIRST[n] .. CHUNK_FIRST[n+1]-1)
holds tokens tok of one sequence, the last one padded with masked slots (g = beta = 0, zero rows) that leave
the state unchanged. Head dims are padded on chip to powers of two with zero rows and columns (and lamb = 1,
so that a padded component of every solve is exactly 0).

Inside a chunk with start state H0 and Gamma_t = g_1 + ... + g_t (the chunk's tokens up to t):
    H_t x = e^{Gamma_t} H0 x + sum_{s<=t} e^{Gamma_t - Gamma_s} beta_s k_s (k_s . x),
so for the chunk's query rows P [C, D] all products are  e^Gamma * (P H0) + ((P K^T) * M) K  with
M[t, s] = e^{Gamma_t - Gamma_s} beta_s for s <= t, else 0 (H0 is symmetric, so P H0 holds the rows H0 p_t).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Operand precision of the tensor-core products: float32 operands as tf32 (10 stored mantissa bits), float32 sums.
PRECISION: tl.constexpr = tl.constexpr("tf32")


def chunk_grid(B: int, T: int, lengths: list[int] | None, chunk: int, device) -> tuple[Tensor, Tensor, int]:
    """The chunks of a call: chunk_seq [chunks] (int32, each chunk's sequence), chunk_first [N+1] (int32, each
    sequence's first chunk) and the number of chunks.

    B rows of T tokens (lengths None), built on the device without reading it; or the lengths of the sequences
    of a packed batch (known on the host).
    """
    if lengths is None:
        per_row = -(-T // chunk)
        seq = torch.arange(B * per_row, device=device, dtype=torch.int32) // per_row
        return seq, torch.arange(B + 1, device=device, dtype=torch.int32) * per_row, B * per_row
    counts = [-(-n // chunk) for n in lengths]
    first = [0]
    for c in counts:
        first.append(first[-1] + c)
    seq = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), torch.tensor(counts))
    return seq.to(device), torch.tensor(first, dtype=torch.int32).to(device), first[-1]


# ---------------------------------------------------------------------------------------------- kernel pieces
@triton.jit
def _chunk(CU, CHUNK_SEQ, CHUNK_FIRST, gc, C: tl.constexpr):
    """Chunk gc's token indices tok [C] (int64) and which of them belong to its sequence."""
    n = tl.load(CHUNK_SEQ + gc)
    start = tl.load(CU + n) + (gc - tl.load(CHUNK_FIRST + n)) * C
    tok = start + tl.arange(0, C)
    return tok, tok < tl.load(CU + n + 1)


@triton.jit
def _rows(X, tok, valid, h, H, D: tl.constexpr, BD: tl.constexpr):
    """The [C, BD] float32 tile of tokens tok of head h of X [tokens, H, D] (zeros outside)."""
    cols = tl.arange(0, BD)
    mask = valid[:, None] & (cols < D)[None, :]
    return tl.load(X + (tok * H + h)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(X, x, tok, valid, h, H, D: tl.constexpr, BD: tl.constexpr):
    """Store x [C, BD] as tokens tok of head h of X [tokens, H, D], in X's dtype."""
    cols = tl.arange(0, BD)
    mask = valid[:, None] & (cols < D)[None, :]
    tl.store(X + (tok * H + h)[:, None] * D + cols[None, :], x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _cols(X, tok, valid, h, H, W, col0, width, BC: tl.constexpr):
    """The [C, BC] float32 tile of columns col0 .. col0 + width - 1 (at most BC) of tokens tok of head h of
    X [tokens, H, W] (zeros outside)."""
    cols = tl.arange(0, BC)
    mask = valid[:, None] & (cols < width)[None, :]
    return tl.load(X + (tok * H + h)[:, None] * W + col0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_cols(X, x, tok, valid, h, H, W, col0, width, BC: tl.constexpr):
    """Store x [C, BC] as columns col0 .. col0 + width - 1 (at most BC) of tokens tok of head h of X [tokens, H, W]."""
    cols = tl.arange(0, BC)
    mask = valid[:, None] & (cols < width)[None, :]
    tl.store(X + (tok * H + h)[:, None] * W + col0 + cols[None, :], x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _state_ptrs(S, gc, h, H, SW, col0, width, R: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask of the [BR, BC] tile of columns col0 .. col0 + width - 1 (at most BC) of matrix (gc, h)
    of S [*, H, R, SW] (states [H | G]: R = D rows, SW = D + Dv columns)."""
    rows = tl.arange(0, BR)
    cols = tl.arange(0, BC)
    base = (gc * H + h).to(tl.int64) * R * SW
    return S + base + rows[:, None] * SW + col0 + cols[None, :], (rows < R)[:, None] & (cols < width)[None, :]


@triton.jit
def _tile(A, row0, col0, rows, cols, stride, BR: tl.constexpr, BC: tl.constexpr, TRANSPOSED: tl.constexpr,
          FULL: tl.constexpr):
    """The [BR, BC] tile at (row0, col0) of the matrix at A (row stride `stride`; rows / cols of it exist from
    row0 / col0 on, zero padding beyond), or (TRANSPOSED) its transpose [BC, BR]. FULL: nothing is padded, so
    no mask (a mask tensor of a whole matrix would take registers)."""
    r = tl.arange(0, BR)
    c = tl.arange(0, BC)
    if TRANSPOSED:
        ptrs = A + (row0 + r[None, :]) * stride + col0 + c[:, None]
        mask = (r < rows)[None, :] & (c < cols)[:, None]
    else:
        ptrs = A + (row0 + r[:, None]) * stride + col0 + c[None, :]
        mask = (r < rows)[:, None] & (c < cols)[None, :]
    if FULL:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    return tile


@triton.jit
def _matrix(S, gc, h, H, SW, col0, R: tl.constexpr, W: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr,
            TRANSPOSED: tl.constexpr):
    """The [BR, BW] tile of rows 0 .. R-1 and columns col0 .. col0+W-1 of matrix (gc, h) of S [*, H, R, SW], or
    (TRANSPOSED) its transpose [BW, BR], zero padded."""
    base = S + (gc * H + h).to(tl.int64) * R * SW
    return _tile(base, 0, col0, R, W, SW, BR, BW, TRANSPOSED, R == BR and W == BW)


@triton.jit
def _gates(G, BETA, tok, valid, h, H, C: tl.constexpr):
    """The chunk's cumulative log decays Gamma [C], their total (the log decay over the chunk), beta [C] and the
    causal decays E [C, C] (E[t, s] = e^{Gamma_t - Gamma_s} for s <= t, else 0), all float32."""
    g = tl.load(G + tok * H + h, mask=valid, other=0.0).to(tl.float32)
    beta = tl.load(BETA + tok * H + h, mask=valid, other=0.0).to(tl.float32)
    gam = tl.cumsum(g, 0)
    i = tl.arange(0, C)
    # g <= 0 makes every kept exponent <= 0; above the diagonal the exponent could overflow, so it is clamped
    E = tl.where(i[:, None] >= i[None, :], tl.exp(tl.minimum(gam[:, None] - gam[None, :], 0.0)), 0.0)
    return gam, tl.sum(g, 0), beta, E


@triton.jit
def _apply(p, H0, k, M, decay, lamb):
    """(H_t + diag(lamb)) p_t for the rows p [C, BD] of a chunk: e^Gamma * (P H0) + ((P K^T) * M) K + lamb * P.
    The intra-chunk product takes lamb * P as its accumulator (not P H0), so that each product is the last of
    its chain and its warps split its columns (Triton gives a dot feeding another one all warps along rows).
    `_cg` has the same lines inline (a nested call costs the interpreter more than the product)."""
    a = tl.dot(tl.dot(p, tl.trans(k), input_precision=PRECISION) * M, k, lamb[None, :] * p, input_precision=PRECISION)
    return a + decay[:, None] * tl.dot(p, H0, input_precision=PRECISION)


@triton.jit
def _cg(b, x, H0, sh, k, M, decay, lamb, tol2, max_iter, FP16: tl.constexpr):
    """Conjugate gradient on every row of a chunk: x [C, BD] solving (H_t + diag(lamb)) x_t = b_t from x.

    Each row stops at the first step where ||r||^2 <= tol2 ||r_0||^2 (r as CG's recurrence updates it; tol2 < 0
    never stops early) and stays as it is from there; the loop ends after max_iter steps or when every row has
    stopped, decided on chip. Returns x, ||r_0||^2 [C] and the steps each row took [C] (int32).

    The products take float32 operands as tf32, or with FP16 float16 operands scaled to |.| <= 1: H0 by sh, the
    largest entry of its diagonal (H0 is positive semi-definite: no entry is larger), K by its largest entry, M
    by its largest, each vector p_t by its norm (the directions by ||r_t||, which bounds them in CG). Both keep
    11 significant bits (float16 rounds to nearest, tf32 truncates), no value leaves float16's range, and
    float16 products run at twice the rate. The product is written out where it is needed (`_apply` has the
    tf32 one): a nested call costs the interpreter more than the product.
    """
    if FP16:
        sk = tl.max(tl.max(tl.abs(k), 1), 0)
        sm = tl.max(tl.max(M, 1), 0)
        h16 = (H0 * (1.0 / tl.where(sh > 0, sh, 1.0))).to(tl.float16)
        k16 = (k * (1.0 / tl.where(sk > 0, sk, 1.0))).to(tl.float16)
        m16 = (M * (1.0 / tl.where(sm > 0, sm, 1.0))).to(tl.float16)
        sk = sk * sk * sm
        norm = tl.sqrt(tl.sum(x * x, 1))
        x16 = (x * (1.0 / tl.where(norm > 0, norm, 1.0))[:, None]).to(tl.float16)
        ax = (norm * sk)[:, None] * tl.dot(tl.dot(x16, tl.trans(k16)).to(tl.float16) * m16, k16)
        ax += (norm * sh * decay)[:, None] * tl.dot(x16, h16) + lamb[None, :] * x
    else:
        kt = tl.trans(k)
        ax = tl.dot(tl.dot(x, kt, input_precision=PRECISION) * M, k, lamb[None, :] * x, input_precision=PRECISION)
        ax += decay[:, None] * tl.dot(x, H0, input_precision=PRECISION)
    r = b - ax
    p = r
    rr = tl.sum(r * r, 1)
    rr0 = rr
    active = rr > tol2 * rr0
    steps = active.to(tl.int32) * 0
    it = 0
    while (it < max_iter) & (tl.max(active.to(tl.int32), 0) > 0):
        if FP16:
            norm = tl.sqrt(rr)
            p16 = (p * (1.0 / tl.where(norm > 0, norm, 1.0))[:, None]).to(tl.float16)  # p = 0 where r = 0
            ap = (norm * sk)[:, None] * tl.dot(tl.dot(p16, tl.trans(k16)).to(tl.float16) * m16, k16)
            ap += (norm * sh * decay)[:, None] * tl.dot(p16, h16) + lamb[None, :] * p
        else:
            ap = tl.dot(tl.dot(p, kt, input_precision=PRECISION) * M, k, lamb[None, :] * p,
                        input_precision=PRECISION)
            ap += decay[:, None] * tl.dot(p, H0, input_precision=PRECISION)
        pap = tl.sum(p * ap, 1)
        alpha = tl.where(active & (pap != 0), rr / tl.where(pap != 0, pap, 1.0), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rr_next = tl.sum(r * r, 1)
        on = active.to(tl.float32)  # a stopped row keeps p = 0
        p = on[:, None] * r + (on * rr_next / tl.where(rr != 0, rr, 1.0))[:, None] * p
        rr = rr_next
        steps += active.to(tl.int32)
        active = active & (rr > tol2 * rr0)
        it += 1
    return x, rr0, steps
