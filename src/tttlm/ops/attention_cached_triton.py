"""One query per row over a static key/value cache, split over the keys (flash-decoding): Triton kernels.

A single query per (row, head) is too little work for one program at long contexts, so the cache's capacity S is
cut into NSPLIT ranges of SPLIT keys; program (row x head, split) reduces its range to a running max m, a sum
of exponentials l and an unnormalised output acc (all float32), and a second kernel merges the splits. Each
program reads its row's valid length from memory and skips what lies past it: the grid depends only on the
capacity (fixed for a CUDA graph), the work on the valid lengths. Scores are row-wise products, not tl.dot:
one query row is memory-bound anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.backend import kernel_device

BLOCK_N = 128  # keys per loop step
MAX_SPLITS = 128  # splits per (row, head) at most: the merge kernel holds them all at once
SPLIT_WARPS = 4  # warps per program of the split kernel

LIMITS = "one query per row (T == 1), on CUDA (or the CPU under TRITON_INTERPRET=1)"


def supports(q: Tensor) -> bool:
    """Whether these kernels take q [B, T, H, D]: one query per row."""
    return q.shape[1] == 1 and kernel_device(q)


def split_size(S: int) -> int:
    """Keys per split for a cache of capacity S: at least two blocks, at most MAX_SPLITS splits."""
    per = max(2 * BLOCK_N, triton.cdiv(S, MAX_SPLITS))
    return triton.cdiv(per, BLOCK_N) * BLOCK_N


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    POS,
    M,
    L,
    ACC,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    H,
    NSPLIT,
    scale,
    SPLIT: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BN: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    length = tl.load(POS + b) + 1
    start = sp * SPLIT
    end = tl.minimum(start + SPLIT, length)
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    dm = d < D
    dvm = dv < DV
    q = tl.load(Q + bh.to(tl.int64) * D + d, mask=dm, other=0.0).to(tl.float32) * scale
    m = -float("inf")
    lsum = 0.0
    acc = tl.zeros([BDV], dtype=tl.float32)
    for n0 in range(start, end, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < end
        k = tl.load(K + b * stride_kb + n[:, None] * stride_ks + h * stride_kh + d[None, :],
                    mask=nm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        s = tl.where(nm, tl.sum(k * q[None, :], 1), -float("inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(V + b * stride_vb + n[:, None] * stride_vs + h * stride_vh + dv[None, :],
                    mask=nm[:, None] & dvm[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        lsum = lsum * alpha + tl.sum(p, 0)
        m = m_new
    part = bh.to(tl.int64) * NSPLIT + sp
    tl.store(M + part, m)
    tl.store(L + part, lsum)
    tl.store(ACC + part * DV + dv, acc, mask=dvm)


@triton.jit
def _merge_kernel(
    M,
    L,
    ACC,
    POS,
    O,
    H,
    NSPLIT,
    SPLIT: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    BS: tl.constexpr,
):
    bh = tl.program_id(0)
    length = tl.load(POS + bh // H) + 1
    used = (length + SPLIT - 1) // SPLIT  # splits holding at least one valid key
    s = tl.arange(0, BS)
    sm = s < used
    dv = tl.arange(0, BDV)
    dvm = dv < DV
    part = bh.to(tl.int64) * NSPLIT + s
    m = tl.load(M + part, mask=sm, other=-float("inf"))
    lsum = tl.load(L + part, mask=sm, other=0.0)
    acc = tl.load(ACC + part[:, None] * DV + dv[None, :], mask=sm[:, None] & dvm[None, :], other=0.0)
    w = tl.where(sm, tl.exp(m - tl.max(m, 0)), 0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * lsum, 0)
    tl.store(O + bh.to(tl.int64) * DV + dv, o.to(O.dtype.element_ty), mask=dvm)


def cached_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    """q [B, H, D], k_cache [B, S, H, D], v_cache [B, S, H, Dv], pos [B] (row b attends to keys 0 .. pos[b]).
    Returns o [B, H, Dv] in q's dtype. Inputs are assumed checked by `attention_cached.cached_attention`."""
    B, H, D = q.shape
    S, Dv = k_cache.shape[1], v_cache.shape[-1]
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last dim")
    split = split_size(S)
    nsplit = triton.cdiv(S, split)
    dev = q.device
    m = torch.empty(B * H, nsplit, dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty(B * H, nsplit, Dv, dtype=torch.float32, device=dev)
    o = torch.empty(B, H, Dv, dtype=q.dtype, device=dev)
    pos = pos.contiguous()
    bd, bdv = triton.next_power_of_2(D), triton.next_power_of_2(Dv)
    _split_kernel[(B * H, nsplit)](
        q.contiguous(), k_cache, v_cache, pos, m, lsum, acc,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H, nsplit, D**-0.5,
        SPLIT=split, D=D, DV=Dv, BD=bd, BDV=bdv, BN=BLOCK_N, num_warps=SPLIT_WARPS,
    )
    _merge_kernel[(B * H,)](
        m, lsum, acc, pos, o, H, nsplit,
        SPLIT=split, DV=Dv, BDV=bdv, BS=triton.next_power_of_2(nsplit), num_warps=4,
    )
    return o
