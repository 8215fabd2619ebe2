"""Mesa on the GPU: the Triton kernels over whole sequences and their autograd function.

Forward: the state pass (`triton_scan._scan_fwd_kernel`) writes [H | G] at every chunk start in float32; then
one program per (chunk, head) solves all the chunk's queries by conjugate gradient on chip and writes the
output (`triton_solve._solve_fwd_kernel`). Backward (implicit differentiation, no CG step is backpropagated):
  1. `triton_solve._solve_bwd_kernel`: dx_t = G_t do_t, y_t = (H_t + diag(lamb))^-1 dx_t by CG; dq = y,
     d lamb = -sum_t y_t * x_t, and dGamma_t through the chunk-start states;
  2. `triton_scan._scan_bwd_kernel`: the gradients of the states after every chunk, backwards from the final
     state's, and of the initial state;
  3. `triton_grads._grads_kernel`: dk, dv, dbeta, dg of every chunk from x, y and those state gradients.
The forward keeps the chunk-start states (float32, chunks x H x D x (D + Dv)) and the solves x (float32) for
the backward.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from tttlm.ops.backend import kernel_device
from tttlm.ops.mesa.checks import io_dtypes
from tttlm.ops.mesa.triton_grads import _grads_kernel
from tttlm.ops.mesa.triton_parts import chunk_grid
from tttlm.ops.mesa.triton_scan import _scan_bwd_kernel, _scan_fwd_kernel
from tttlm.ops.mesa.triton_solve import _solve_bwd_kernel, _solve_fwd_kernel
from tttlm.ops.state import MesaState
from tttlm.ops.ttt_linear.triton_parts import block_d, new

MAX_D = 128
SUPPORTED_CHUNKS = (16, 32, 64)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LIMITS = (f"head dims up to {MAX_D}, chunk_size in {SUPPORTED_CHUNKS}, float16, bfloat16 or float32, on CUDA (or "
          "the CPU under TRITON_INTERPRET=1)")
SCAN_BLOCK = 32  # columns of [H | G] per program of the state passes
GRADS_BLOCK = 64  # columns of dk, dv made at once by `triton_grads._grads_kernel`
# Warps per program by on-chip head dim, for the per-chunk kernels (solves, gradients) and the state passes.
CHUNK_NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}
SCAN_NUM_WARPS = 4
# Operands of the CG steps' products (`triton_parts._cg`): None takes float16 (scaled) when any of q, k, v is
# 16-bit (under autocast the layer's q, k may leave their norm in float32 while v is bfloat16) and tf32 for
# float32 inputs; True or False forces float16 or tf32 (tests, benchmarks/gpu_mesa.py).
CG_FP16: bool | None = None


def cg_fp16(*tensors: Tensor) -> bool:
    """Whether the CG steps take float16 operands for these inputs (see CG_FP16)."""
    if CG_FP16 is not None:
        return CG_FP16
    return any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


def supports(q: Tensor, k: Tensor, v: Tensor, chunk_size: int | None) -> bool:
    """Whether these kernels handle q, k [..., D] and v [..., Dv] with this chunk size (None: the decode step)."""
    return (
        kernel_device(q)
        and q.shape[-1] <= MAX_D
        and v.shape[-1] <= MAX_D
        and (chunk_size is None or chunk_size in SUPPORTED_CHUNKS)
        and all(t.dtype in SUPPORTED_DTYPES for t in (q, k, v))
    )


def _dims(D: int, Dv: int, C: int) -> dict:
    return dict(D=D, DV=Dv, BD=block_d(D), BDV=block_d(Dv), C=C)


class _Grid:
    """The chunks of a call (`triton_parts.chunk_grid`) with the sequences' bounds cu [N+1] (int64)."""

    def __init__(self, B: int, T: int, cu_seqlens: Tensor | None, chunk: int, device: torch.device):
        if cu_seqlens is None:
            self.cu = torch.arange(0, B * T + 1, T, dtype=torch.long, device=device)
            lengths = None
        else:
            self.cu = cu_seqlens
            bounds = cu_seqlens.tolist()
            lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        self.rows = B if cu_seqlens is None else 1
        self.seq, self.first, self.chunks = chunk_grid(B, T, lengths, chunk, device)
        self.N = self.cu.numel() - 1
        self.chunk = chunk


def _scan_blocks(D: int, Dv: int) -> tuple[int, int]:
    """Column blocks of H and in all, for the state passes."""
    nbh = triton.cdiv(D, SCAN_BLOCK)
    return nbh, nbh + triton.cdiv(Dv, SCAN_BLOCK)


class _MesaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, lamb, init, grid, max_iter, tol2, out_dtype, keep, stats):
        """q, k [tokens,H,D], v [tokens,H,Dv], g, beta [tokens,H], lamb [H,D], init [N,H,D,D+Dv] float32 or None
        -> o [tokens,H,Dv] (out_dtype), final states [N,H,D,D+Dv] float32. With `keep` it keeps what the
        backward needs; `stats` (a dict or None) receives the solver's telemetry (`mesa`'s cg_stats)."""
        total, H, D = q.shape
        Dv = v.shape[-1]
        SW = D + Dv
        dev = q.device
        f32 = torch.float32
        dims = _dims(D, Dv, grid.chunk)
        fp16 = cg_fp16(q, k, v)
        states = new((grid.chunks, H, D, SW), f32, dev)
        final = new((grid.N, H, D, SW), f32, dev)
        nbh, nb = _scan_blocks(D, Dv)
        _scan_fwd_kernel[(grid.N * H, nb)](
            k, v, g, beta, final if init is None else init, states, final, grid.cu, grid.first, H, SW, nbh,
            D=D, DV=Dv, BD=dims["BD"], BV=SCAN_BLOCK, C=grid.chunk, HAS_INIT=init is not None,
            num_warps=SCAN_NUM_WARPS,
        )
        o = new((total, H, Dv), out_dtype, dev)
        x = new((total, H, D), f32, dev) if keep else o  # o: an unwritten placeholder
        steps = torch.full((grid.chunks, H, 2), -1, dtype=torch.int32, device=dev) if stats is not None else grid.first
        resid = new((grid.chunks, H), f32, dev) if stats is not None else states
        _solve_fwd_kernel[(grid.chunks, H)](
            q, k, v, g, beta, lamb, states, grid.cu, grid.seq, grid.first, o, x, steps, resid,
            tol2, max_iter, H, SW, **dims, STORE_X=keep, STATS=stats is not None, FP16=fp16,
            num_warps=CHUNK_NUM_WARPS[dims["BD"]],
        )
        if stats is not None:
            stats["iterations"] = int(steps[..., 0].max())
            stats["mean_iterations"] = steps[..., 1].sum().item() / (total * H)
            stats["residual"] = _per_row(resid, grid)
        if keep:
            ctx.save_for_backward(k, v, g, beta, lamb, states, x)
            ctx.grid, ctx.max_iter, ctx.tol2, ctx.fp16 = grid, max_iter, tol2, fp16
            ctx.q_dtype, ctx.has_init = q.dtype, init is not None
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        k, v, g, beta, lamb, states, x = ctx.saved_tensors
        grid = ctx.grid
        total, H, D = k.shape
        Dv = v.shape[-1]
        SW = D + Dv
        dev = k.device
        f32 = torch.float32
        dims = _dims(D, Dv, grid.chunk)
        warps = CHUNK_NUM_WARPS[dims["BD"]]
        do = torch.zeros((total, H, Dv), dtype=f32, device=dev) if do is None else do.contiguous()
        dq = new((total, H, D), ctx.q_dtype, dev)
        y = new((total, H, D), f32, dev)
        dlamb = new((grid.chunks, H, dims["BD"]), f32, dev)
        dgam = new((total, H), f32, dev)
        _solve_bwd_kernel[(grid.chunks, H)](
            k, v, g, beta, lamb, states, x, do, grid.cu, grid.seq, grid.first, dq, y, dlamb, dgam,
            ctx.tol2, ctx.max_iter, H, SW, **dims, FP16=ctx.fp16, num_warps=warps,
        )
        nbh, nb = _scan_blocks(D, Dv)
        dstates = new((grid.chunks, H, D, SW), f32, dev)
        dinit = new((grid.N, H, D, SW), f32, dev)
        da = new((grid.chunks, H, nb), f32, dev)
        _scan_bwd_kernel[(grid.N * H, nb)](
            x, y, do, g, dinit if dfinal is None else dfinal.contiguous(), states, dstates, dinit, da, grid.cu,
            grid.first, H, SW, nbh, nb, D=D, DV=Dv, BD=dims["BD"], BV=SCAN_BLOCK, C=grid.chunk,
            HAS_DFINAL=dfinal is not None, num_warps=SCAN_NUM_WARPS,
        )
        dk = new(k.shape, k.dtype, dev)
        dv = new(v.shape, v.dtype, dev)
        dg = new((total, H), f32, dev)
        dbeta = new((total, H), f32, dev)
        _grads_kernel[(grid.chunks, H)](
            x, y, do, k, v, g, beta, dstates, da, dgam, grid.cu, grid.seq, grid.first, dk, dv, dg, dbeta,
            H, SW, nb, **dims, BN=min(GRADS_BLOCK, dims["BD"]), BNV=min(GRADS_BLOCK, dims["BDV"]),
            BNB=triton.next_power_of_2(nb), num_warps=warps,
        )
        dlamb = dlamb.sum(0)[:, :D].to(lamb.dtype)
        return (dq, dk, dv, dg.to(g.dtype), dbeta.to(beta.dtype), dlamb, dinit if ctx.has_init else None,
                None, None, None, None, None, None)


def _per_row(resid: Tensor, grid: _Grid) -> Tensor:
    """The largest of each batch row's chunks: [chunks, H] -> [B, H], or [1, H] for a packed batch."""
    if grid.rows == 1:
        return resid.amax(0, keepdim=True)
    return resid.view(grid.rows, -1, resid.shape[-1]).amax(1)


def mesa_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    state: MesaState | None,
    *,
    chunk_size: int,
    cg_max_iter: int,
    cg_tol: float | None,
    cu_seqlens: Tensor | None,
    output_final_state: bool,
    cg_stats: dict | None,
) -> tuple[Tensor, MesaState | None]:
    """See `tttlm.ops.mesa.mesa`; inputs are assumed checked and `supports(q, k, v, chunk_size)`.

    Differentiable in every tensor input, the state's included. Returns o [B,T,H,Dv] in the promoted dtype of
    q, k, v and the final MesaState (float32) or None.
    """
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    out_dtype, _ = io_dtypes(q, k, v)
    grid = _Grid(B, T, cu_seqlens, chunk_size, q.device)
    init = None
    if state is not None:
        h_kk = state.h_kk.float()
        init = torch.cat([(h_kk + h_kk.mT) / 2, state.h_kv.float()], -1).contiguous()
    tensors = (q, k, v, g, beta, lamb) + (() if state is None else (state.h_kk, state.h_kv))
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    o, final = _MesaFn.apply(
        *(t.reshape(B * T, H, -1).contiguous() for t in (q, k, v)),
        *(t.reshape(B * T, H).contiguous() for t in (g, beta)),
        lamb.contiguous(),
        init,
        grid,
        cg_max_iter,
        -1.0 if cg_tol is None else float(cg_tol) ** 2,
        out_dtype,
        keep,
        cg_stats,
    )
    o = o.view(B, T, H, Dv)
    if not output_final_state:
        return o, None
    return o, MesaState(final[..., :D].contiguous(), final[..., D:].contiguous())
