"""Mesa's state passes: the states [H | G] at every chunk start (forward) and their gradients (backward).

Over a chunk with total log decay gamma = g_1 + ... + g_C and w_s = e^{gamma - Gamma_s} beta_s,
    S_{c+1} = e^gamma S_c + U_c,   U_c = sum_s w_s k_s [k_s | v_s]^T,
a scan along the chunks of each sequence: one program per (sequence, head, block of BV columns of [H | G]),
the block held on chip in float32. Column blocks of H come first (NBH of them), then those of G.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tttlm.ops.mesa.triton_parts import _cols, _rows, _state_ptrs
from tttlm.ops.ttt_linear.triton_parts import _dot


@triton.jit
def _block(j, NBH, D, DV, BV: tl.constexpr):
    """Column block j of [H | G]: whether it is in H, its first column within its part and within [H | G],
    and how many columns it has (at most BV)."""
    in_h = j < NBH
    col = tl.where(in_h, j, j - NBH) * BV
    width = tl.where(in_h, D, DV) - col
    return in_h, col, tl.where(in_h, col, D + col), width


@triton.jit
def _scan_fwd_kernel(
    K, V, G, BETA, INIT, STATES, FINAL, CU, CHUNK_FIRST, H, SW, NBH,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """States at the start of every chunk of sequence program_id(0) // H, head program_id(0) % H, columns
    block program_id(1): STATES [chunks, H, D, SW] and the state after the sequence, FINAL [N, H, D, SW];
    the sequence starts from INIT [N, H, D, SW] (zeros without HAS_INIT)."""
    n = tl.program_id(0) // H
    h = tl.program_id(0) % H
    in_h, col, scol, width = _block(tl.program_id(1), NBH, D, DV, BV)
    ptrs, mask = _state_ptrs(INIT, n, h, H, SW, scol, width, D, BD, BV)
    if HAS_INIT:
        S = tl.load(ptrs, mask=mask, other=0.0)
    else:
        S = tl.zeros([BD, BV], dtype=tl.float32)
    c0 = tl.load(CHUNK_FIRST + n)
    start = tl.load(CU + n)
    end = tl.load(CU + n + 1)
    for i in range(tl.load(CHUNK_FIRST + n + 1) - c0):
        sp, sm = _state_ptrs(STATES, c0 + i, h, H, SW, scol, width, D, BD, BV)
        tl.store(sp, S, mask=sm)
        tok = start + i * C + tl.arange(0, C)
        valid = tok < end
        g = tl.load(G + tok * H + h, mask=valid, other=0.0).to(tl.float32)
        beta = tl.load(BETA + tok * H + h, mask=valid, other=0.0).to(tl.float32)
        gam = tl.cumsum(g, 0)
        total = tl.sum(g, 0)
        k = _rows(K, tok, valid, h, H, D, BD)
        if in_h:
            kv = _cols(K, tok, valid, h, H, D, col, width, BV)
        else:
            kv = _cols(V, tok, valid, h, H, DV, col, width, BV)
        w = tl.exp(total - gam) * beta
        S = tl.exp(total) * S + _dot(tl.trans(k * w[:, None]), kv)
    fp, fm = _state_ptrs(FINAL, n, h, H, SW, scol, width, D, BD, BV)
    tl.store(fp, S, mask=fm)


@triton.jit
def _scan_bwd_kernel(
    X, Y, DO, G, DFINAL, STATES, DSTATES, DINIT, DA, CU, CHUNK_FIRST, H, SW, NBH, NB,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):
    """The forward scan run backwards for sequence program_id(0) // H, head program_id(0) % H, column block
    program_id(1), from the gradient of the final state DFINAL [N, H, D, SW] (zeros without HAS_DFINAL).

    The gradient of the chunk-start state S_c is dS_c = L_c + e^gamma_c dS_{c+1}, where L_c is what the chunk's
    queries take from S_c: dH0 = -sum_t e^{Gamma_t} y_t x_t^T, dG0 = sum_t e^{Gamma_t} x_t do_t^T. Writes
    DSTATES[c] = dS_{c+1} (the gradient of U_c), DA [chunks, H, NB] the block's share of <dS_{c+1}, S_c> (the
    gradient of e^gamma_c, times nothing yet), and DINIT [N, H, D, SW] = dS_0.
    """
    n = tl.program_id(0) // H
    h = tl.program_id(0) % H
    j = tl.program_id(1)
    in_h, col, scol, width = _block(j, NBH, D, DV, BV)
    ptrs, mask = _state_ptrs(DFINAL, n, h, H, SW, scol, width, D, BD, BV)
    if HAS_DFINAL:
        dS = tl.load(ptrs, mask=mask, other=0.0)
    else:
        dS = tl.zeros([BD, BV], dtype=tl.float32)
    c0 = tl.load(CHUNK_FIRST + n)
    count = tl.load(CHUNK_FIRST + n + 1) - c0
    start = tl.load(CU + n)
    end = tl.load(CU + n + 1)
    for r in range(count):
        i = count - 1 - r
        sp, sm = _state_ptrs(DSTATES, c0 + i, h, H, SW, scol, width, D, BD, BV)
        tl.store(sp, dS, mask=sm)
        sp, sm = _state_ptrs(STATES, c0 + i, h, H, SW, scol, width, D, BD, BV)
        tl.store(DA + ((c0 + i) * H + h) * NB + j, tl.sum(tl.sum(dS * tl.load(sp, mask=sm, other=0.0), 1), 0))
        tok = start + i * C + tl.arange(0, C)
        valid = tok < end
        g = tl.load(G + tok * H + h, mask=valid, other=0.0).to(tl.float32)
        decay = tl.exp(tl.cumsum(g, 0))
        if in_h:
            local = -_dot(tl.trans(_rows(Y, tok, valid, h, H, D, BD) * decay[:, None]),
                          _cols(X, tok, valid, h, H, D, col, width, BV))
        else:
            local = _dot(tl.trans(_rows(X, tok, valid, h, H, D, BD) * decay[:, None]),
                         _cols(DO, tok, valid, h, H, DV, col, width, BV))
        dS = local + tl.exp(tl.sum(g, 0)) * dS
    dp, dm = _state_ptrs(DINIT, n, h, H, SW, scol, width, D, BD, BV)
    tl.store(dp, dS, mask=dm)
