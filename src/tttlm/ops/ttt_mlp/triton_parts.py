"""Pieces shared by TTT-MLP's Triton kernels: which shapes they take, the hidden width's tiles, GELU (tanh
approximation) and its first two derivatives, and pointers into the inner weights.

The inner weights W1 [D, F], b1 [F], W2 [F, D] (F = 4D) of a head do not fit on chip (64 KB each in float32
at D=64), so every kernel walks F in tiles of FT columns of W1 (rows of W2) and keeps the weights in global
memory, where they stay in L2 between mini-batches. The LayerNorm pieces over the head dim are TTT-Linear's
(`tttlm.ops.ttt_linear.triton_parts`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.backend import kernel_device
from tttlm.ops.ttt_linear.triton_parts import block_d

MAX_D = 128
SUPPORTED_MINI_BATCH = (16,)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Hidden units per tile of the decode step, at most (the whole-sequence kernels': `Tiling.max_f_tile`).
MAX_F_TILE = 64
GELU_C = tl.constexpr(math.sqrt(2.0 / math.pi))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the whole-sequence kernels (`triton_chunk`, `triton_chunk_bwd`) run at one on-chip head width: at most
    `max_f_tile` hidden units per tile (`chunk_f_tile`), and the warps per program of the forward and of the
    backward."""

    max_f_tile: int
    fwd_warps: int
    bwd_warps: int

    def __str__(self) -> str:
        return f"FT{self.max_f_tile} fwd {self.fwd_warps} bwd {self.bwd_warps} warps"


# By on-chip head width (`block_d`). Compiled for sm_90 at D=64 every tiling takes 255 registers per thread and
# spills (`benchmarks/kernel_registers.py --tiling`); 64 hidden units per tile gave the fewest instructions per
# mini-batch step at D=64 and D=128 (8 warps; backward, per thread: 18k against 27k with 32 at D=64; 47k
# against 67k at D=128). Width 64 compiles with 4 warps: with 8 (and tiles of 64) it compiled to a wgmma of
# shape m64n32k8 with its A operand in registers and gave NaN although its PTX is right (run on CPU by
# benchmarks/ptx_emulate.py it matches the PyTorch path; ptxas before 13.3 mishandles register-operand wgmma,
# triton-lang/triton issue 9433); with 4 it compiles to the m64n64k8 of width 128 (tests/test_kernel_registers.py
# checks it) and passed on an H200. `benchmarks/gpu_ttt_mlp.py --tilings` times the alternatives and checks each
# against the PyTorch path.
TILINGS = {16: Tiling(64, 4, 4), 32: Tiling(64, 4, 4), 64: Tiling(64, 4, 4), 128: Tiling(64, 8, 8)}
# The tilings that `benchmarks/gpu_ttt_mlp.py --tilings` checks and times at width 64 unless told others (the
# shipped one first; 64 hidden units with 8 warps is the one that gave NaN). Compiled for sm_90 (backward without
# the final state's gradient): 16 and 32 units at 4 warps spill 2.6 and 4.5 KB per thread (64: 7.7 KB) in 25 and
# 38 KB of shared memory (64: 84 KB), wgmma m64n16k8 and m64n32k8 with A in registers; 32 at 8 warps 3.2 KB in
# 38 KB, m64n16k8 (one program per SM: 255 registers of 256 threads).
CANDIDATE_TILINGS = (Tiling(64, 4, 4), Tiling(32, 4, 4), Tiling(32, 8, 8), Tiling(16, 4, 4))


def tiling(D: int) -> Tiling:
    """The whole-sequence kernels' `Tiling` at head dim D."""
    return TILINGS[block_d(D)]


# On-chip head widths (`block_d`) at which the whole-sequence kernels run by default on CUDA: those whose tests
# (tests/ops/test_ttt_mlp_triton.py) passed on an H200 (Triton 3.6 with its ptxas 12.8), with the tilings of
# TILINGS. Elsewhere CUDA runs the PyTorch path and refuses backend="triton". Widths 16 and 32 (wgmma m64n16k8
# and m64n32k8) have never run on a GPU. The decode step has no matrix products and runs at every width.
CHUNK_WIDTHS_ON_CUDA = (64, 128)
LIMITS = (f"head dims up to {MAX_D} that are multiples of 4, mini_batch_size in {SUPPORTED_MINI_BATCH}, float16, "
          f"bfloat16 or float32, on CUDA (whole sequences at head dims {CHUNK_WIDTHS_ON_CUDA} only) or the CPU "
          "under TRITON_INTERPRET=1")


def supports(q: Tensor, mini_batch_size: int) -> bool:
    """Whether these kernels handle q [B,T,H,D] (or [B,H,D] for a step) with this mini-batch size: head dims up
    to 128 that are multiples of 4 (so that the hidden width 4D splits into tiles of at least 16), and on CUDA
    the whole-sequence kernels only at the widths of CHUNK_WIDTHS_ON_CUDA."""
    D = q.shape[-1]
    return (
        kernel_device(q)
        and 4 <= D <= MAX_D
        and D % 4 == 0
        and mini_batch_size in SUPPORTED_MINI_BATCH
        and q.dtype in SUPPORTED_DTYPES
        and not (q.is_cuda and q.dim() == 4 and block_d(D) not in CHUNK_WIDTHS_ON_CUDA)
    )


# Programs per (sequence, head) the kernels may take, most first: each owns an equal share of the hidden tiles.
SPLITS = (8, 4, 2)


def split_count(programs: int, D: int, sms: int) -> int:
    """Programs per (sequence, head) for `programs` = sequences x heads of head dim D on a GPU of `sms` SMs: the
    most of SPLITS that divides the number of hidden tiles and gives every program of the launch an SM of its
    own (the programs of a (sequence, head) wait for each other at every mini-batch, so all must be resident);
    else 1."""
    tiles = 4 * D // chunk_f_tile(D)
    return next((s for s in SPLITS if tiles % s == 0 and programs * s <= sms), 1)


def splits(programs: int, D: int, device: torch.device) -> int:
    """`split_count` on `device`'s SMs; 1 off CUDA (the interpreter runs a launch's programs one by one)."""
    if device.type != "cuda":
        return 1
    return split_count(programs, D, torch.cuda.get_device_properties(device).multi_processor_count)


def exchange(groups: int, split: int, BD: int, BT: int, device) -> tuple[Tensor, Tensor]:
    """The exchange and arrival counters of `groups` (sequence, head) pairs split over `split` programs (as
    `triton_chunk._fwd_kernel` and `triton_chunk_bwd._bwd_kernel` take them): float32
    [groups, 2, split, BT * (2 BT + 3 BD)] and int32 zeros [groups]; one-element placeholders without a split."""
    if split == 1:
        return torch.empty(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    region = BT * (2 * BT + 3 * BD)  # the backward's larger exchange
    return (torch.empty(groups * 2 * split * region, device=device),
            torch.zeros(groups, dtype=torch.int32, device=device))


def f_tile(D: int, most: int = MAX_F_TILE) -> int:
    """Columns of W1 (rows of W2) per tile for head dim D: the largest power of two that divides F = 4D, at most
    `most` (so with 64: 64 at D=64, 96 and 128; 32 at D=24, 16 at D=12)."""
    F = 4 * D
    return min(F & -F, most)


def chunk_f_tile(D: int) -> int:
    """`f_tile` of the whole-sequence kernels at head dim D, at most its `tiling`'s max_f_tile."""
    return f_tile(D, tiling(D).max_f_tile)


# ---------------------------------------------------------------------------------------------- kernel pieces
@triton.jit
def _tanh(u):
    # 1 - 2 / (1 + e^{2u}) saturates to -1 and 1 without overflow (e^{2u} = inf gives 1)
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))


@triton.jit
def _gelu_parts(x):
    """GELU (tanh approximation) of x and its first and second derivatives, element-wise:
    g = x (1 + t) / 2 with t = tanh(u), u = c (x + a x^3); g' = (1 + t) / 2 + x (1 - t^2) u' / 2;
    g'' = (1 - t^2) (u' + x (u'' - 2 t u'^2) / 2), u' = c (1 + 3 a x^2), u'' = 6 a c x."""
    a = 0.044715
    c = GELU_C
    t = _tanh(c * (x + a * x * x * x))
    sech2 = (1.0 - t) * (1.0 + t)
    du = c * (1.0 + 3.0 * a * x * x)
    g1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du
    g2 = sech2 * (du + 0.5 * x * (6.0 * a * c * x - 2.0 * t * du * du))
    return 0.5 * x * (1.0 + t), g1, g2  # the compiler drops what a caller leaves unused


@triton.jit
def _post(X, e, part, split, at, val, R: tl.constexpr, C: tl.constexpr, REGION: tl.constexpr):
    """Store this program's share `val` [R, C] of exchange e at float `at` of its REGION in the exchange X of its
    (sequence, head), [2, split, REGION]: two slots alternate, as a program can be at most one exchange ahead of
    the slowest, which reads the other (`_arrive`)."""
    idx = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(X + ((e % 2) * split + part) * REGION + at + idx, val)


@triton.jit
def _arrive(CNT, e, split):
    """Count this program in at exchange e, then wait for all `split` (TTT-Linear's `triton_split` barrier with a
    run-time count). Every thread's posts come before the arrival (the barrier, then a release at GPU scope),
    and the loads of the others' after it (an acquire, then the barrier)."""
    tl.debug_barrier()
    tl.atomic_add(CNT, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    while arrived < split * (e + 1):
        arrived = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _gathered(X, e, split, at, R: tl.constexpr, C: tl.constexpr, REGION: tl.constexpr):
    """The shares [R, C] posted at `at` for exchange e summed over the `split` programs, in a fixed order (the
    same sum on every program). Loaded from L2 (`.cg`): L1 may hold the slot's old values."""
    idx = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    total = tl.zeros([R, C], dtype=tl.float32)
    for t in range(split):
        total += tl.load(X + ((e % 2) * split + t) * REGION + at + idx, cache_modifier=".cg")
    return total


@triton.jit
def _tile_offsets(D: tl.constexpr, BD: tl.constexpr, F: tl.constexpr, FT: tl.constexpr):
    """Element offsets (int32) of a W1 tile [BD, FT] from its first element in a D x F matrix, and of a W2 tile
    [FT, BD] in an F x D matrix, with the masks of their real head-dim rows and columns. A weight-shaped tensor's
    tile is its pointer plus a scalar offset (`_w1_tile`, `_w2_tile`) plus these: a tensor of 64-bit pointers
    per weight-shaped argument, which the compiler keeps across the tile loop, takes 16 registers per thread
    each (compiled for sm_90 at D=64: the backward spilled 2 KB per thread that way)."""
    d = tl.arange(0, BD)
    f = tl.arange(0, FT)
    return d[:, None] * F + f[None, :], f[:, None] * D + d[None, :], (d < D)[:, None], (d < D)[None, :]


@triton.jit
def _w1_tile(row, j, D: tl.constexpr, F: tl.constexpr, FT: tl.constexpr):
    """Offset (int64) of tile j's first element in the D x F matrix `row` of a [N*H, D, F] tensor: W1 and its
    kin, all of which share it."""
    return row * D * F + j * FT


@triton.jit
def _w2_tile(row, j, D: tl.constexpr, F: tl.constexpr, FT: tl.constexpr):
    """Offset (int64) of tile j's first element in the F x D matrix `row` of a [N*H, F, D] tensor: W2's kin."""
    return row * F * D + j * FT * D


@triton.jit
def _f_ptrs(X, row, j, F: tl.constexpr, FT: tl.constexpr):
    """Pointers of tile j [FT] of the F-vector `row` (int64) of X: b1 and its kin."""
    return X + row * F + j * FT + tl.arange(0, FT)


@triton.jit
def _hidden_ptrs(X, tok, h, H, j, F: tl.constexpr, FT: tl.constexpr):
    """Pointers of tile j [BT, FT] of tokens `tok` [BT] (int64) of head h in a [tokens, H, F] tensor."""
    return X + j * FT + (tok * H + h)[:, None] * F + tl.arange(0, FT)[None, :]
