"""TTT-Linear on the GPU: the Triton forward kernel over whole sequences and the autograd function.

The math is `reference.ttt_linear_ref` in the dual form (Sun et al. 2024, arXiv 2407.04620, §2.5): per
mini-batch of b tokens, with W, b the inner weights at its start,
    Z = K W + b,  E = eta * dl/dZ  (the LayerNorm-L2 gradient, row-wise),
    Zq_i = q_i W + b - s_i (sum_{j<=i} (q_i.k_j + 1) e_j + q_i gW + gb),   o_i = q_i + LN(Zq_i),
    W <- W - s_{b-1} (gW + K^T E)  (b likewise) when the mini-batch is complete,
where (gW, gb) are the state's partial sums (nonzero only in the first mini-batch of a call).

One program per (sequence, head) walks its mini-batches in order with W and b held on chip in float32; the
matrix products run on the tensor cores (tf32 for float32 operands). With gradients wanted it keeps W and b at
the start of every GROUP mini-batches, the checkpoints from which the backward (`triton_chunk_bwd`) walks each
group again. Unless its programs already fill the GPU (many sequences), it then leaves the output to
`_output_kernel`, one program per (group, head) after it: the sequential kernel does per mini-batch only what
the next one needs (Z, E and the update). With few sequences on the GPU (B = 1 at long T, head dim 128) the
sequential forward runs instead with W's columns split over several programs (`triton_split`), which also
leaves the output to `_output_kernel`.

Head dims up to 128: one that is not a power of two (the 760m presets' 96) is padded on chip to `block_d(D)`
with zeros, and every LayerNorm statistic and LayerNorm gradient is taken over, and kept to, the D real
columns, so the padding stays zero through all updates.

Sequences are aligned to the mini-batch grid as in `ttt_common.make_layout`: sequence n's token t sits at grid
position offset[n] + t; slots outside the sequence load as zeros with eta = 0 and write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.backend import kernel_device
from tttlm.ops.state import TTTLinearState
from tttlm.ops.ttt_common import default_token_scale
from tttlm.ops.ttt_linear import triton_chunk_bwd, triton_split
from tttlm.ops.ttt_linear.triton_parts import (
    _advance,
    _dot,
    _dot_acc,
    _group,
    _head_ln,
    _layernorm,
    _ln_l2_grad,
    _load_inputs,
    _mat_ptrs,
    _minibatch_forward,
    _minibatch_tokens,
    _sequence,
    _tile_ptrs,
    block_d,
    checkpoint_layout,
    new,
)

MAX_D = 128
SUPPORTED_MINI_BATCH = (16,)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LIMITS = (f"head dims up to {MAX_D}, mini_batch_size in {SUPPORTED_MINI_BATCH}, float16, bfloat16 or float32, "
          "on CUDA (or the CPU under TRITON_INTERPRET=1)")


def supports(q: Tensor, mini_batch_size: int) -> bool:
    """Whether these kernels handle q [B,T,H,D] (or [B,H,D] for a step) with this mini-batch size."""
    return (
        kernel_device(q)
        and 1 <= q.shape[-1] <= MAX_D
        and mini_batch_size in SUPPORTED_MINI_BATCH
        and q.dtype in SUPPORTED_DTYPES
    )


# Warps per program by on-chip head dim (block_d), for the forward and the decode step kernels
# (benchmarks/gpu_ttt_linear.py --sweep times the alternatives).
NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}


def _num_warps(D: int) -> int:
    return NUM_WARPS[block_d(D)]


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_minibatch(
    m, W, bv, q_in, k_in, v, eta,
    S, O, WC, BC, GW0, GB0, WF, BF, GWF, GBF, lnw, lnb, eps, n, h, H, start, off, L, num_mb, g0,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    HAS_SUMS: tl.constexpr, CHECKPOINT: tl.constexpr, OUTPUT: tl.constexpr,
):
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    dd = (d[:, None] < D) & (d[None, :] < D)
    vm = valid[:, None] & (d < D)[None, :]
    q = q_in.to(tl.float32)
    k = k_in.to(tl.float32)
    v = v.to(tl.float32)
    eta = eta.to(tl.float32)
    s = tl.load(S + i)
    s_last = tl.load(S + BT - 1)
    if CHECKPOINT:
        if m % GROUP == 0:  # the backward's checkpoint of this group of mini-batches
            row = ((g0 + m // GROUP) * H + h).to(tl.int64)
            tl.store(_mat_ptrs(WC, row, D, BD), W.to(WC.dtype.element_ty), mask=dd)
            tl.store(BC + row * D + d, bv, mask=d < D)

    Z = _dot(k, W) + bv[None, :]
    _, _, _, _, _, dZ = _ln_l2_grad(Z, v, k, lnw, lnb, D, BD, eps)
    E = eta[:, None] * dZ

    Sb = tl.sum(E, 0)
    if HAS_SUMS:
        base = (n * H + h).to(tl.int64)
        gW = tl.load(_mat_ptrs(GW0, base, D, BD), mask=dd, other=0.0)
        gb = tl.load(GB0 + base * D + d, mask=d < D, other=0.0)
        Sb += gb
    if OUTPUT:  # or `_output_kernel` writes o afterwards, in parallel, from the checkpoints
        P = tl.dot(q_in, tl.trans(k_in))  # exact products of the 16-bit inputs, float32 sums
        A = tl.where(i[:, None] >= i[None, :], P + 1.0, 0.0)
        C = _dot(A, E)
        if HAS_SUMS:
            C = _dot_acc(q, gW, C) + gb[None, :]
        Zq = _dot(q, W) + bv[None, :] - s[:, None] * C
        xq, _ = _layernorm(Zq, D, BD, eps)
        o = q + lnw[None, :] * xq + lnb[None, :]
        tl.store(_tile_ptrs(O, tok, h, H, D, BD), o.to(O.dtype.element_ty), mask=vm)

    # the update accumulates into W, so no second D x D matrix (the sum K^T E) is live in every step
    full = ((m + 1) * BT <= off + L).to(tl.float32)  # only a row's last mini-batch can be unfinished
    c = s_last * full
    W_next = _dot_acc(tl.trans(-c * k), E, W)
    if HAS_SUMS:
        W_next -= c * gW
    b_next = bv - c * Sb
    if m == num_mb - 1:  # W_next is stored before K^T E is formed: the two D x D matrices are never both live
        base = (n * H + h).to(tl.int64)
        tl.store(_mat_ptrs(WF, base, D, BD), W_next, mask=dd)
        tl.store(BF + base * D + d, b_next, mask=d < D)
        Sum = _dot(tl.trans(k), E)
        if HAS_SUMS:
            Sum += gW
        tl.store(_mat_ptrs(GWF, base, D, BD), (1.0 - full) * Sum, mask=dd)
        tl.store(GBF + base * D + d, (1.0 - full) * Sb, mask=d < D)
    return W_next, b_next


@triton.jit
def _fwd_kernel(
    Q, K, V, ETA, LNW, LNB, S, CU, OFF, GCUM, W0, B0, GW0, GB0, O, WC, BC, WF, BF, GWF, GBF,
    eps, H, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr, CHECKPOINT: tl.constexpr,
    OUTPUT: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    start, L, off, num_mb = _sequence(CU, OFF, n, BT)
    g0 = 0  # the sequence's first checkpoint slot
    if CHECKPOINT:
        g0 = tl.load(GCUM + n)
    d = tl.arange(0, BD)
    dd = (d[:, None] < D) & (d[None, :] < D)
    base = (n * H + h).to(tl.int64)
    W = tl.load(_mat_ptrs(W0, base, D, BD), mask=dd, other=0.0)
    bv = tl.load(B0 + base * D + d, mask=d < D, other=0.0)
    lnw, lnb = _head_ln(LNW, LNB, h, d, D)
    q, k, v, eta = _load_inputs(0, Q, K, V, ETA, h, H, start, off, L, D, BD, BT)
    W, bv = _fwd_minibatch(
        0, W, bv, q, k, v, eta,
        S, O, WC, BC, GW0, GB0, WF, BF, GWF, GBF, lnw, lnb, eps, n, h, H, start, off, L, num_mb, g0,
        D, BD, BT, GROUP, True, CHECKPOINT, OUTPUT,
    )
    for m in range(1, num_mb):
        q, k, v, eta = _load_inputs(m, Q, K, V, ETA, h, H, start, off, L, D, BD, BT)
        W, bv = _fwd_minibatch(
            m, W, bv, q, k, v, eta,
            S, O, WC, BC, GW0, GB0, WF, BF, GWF, GBF, lnw, lnb, eps, n, h, H, start, off, L, num_mb, g0,
            D, BD, BT, GROUP, False, CHECKPOINT, OUTPUT,
        )


@triton.jit
def _output_kernel(
    Q, K, V, ETA, LNW, LNB, S, CU, OFF, SEQ, GCUM, GW0, GB0, WC, BC, O,
    eps, N, H, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
):
    """o for one (group of mini-batches, head) from the checkpoint the forward kept: the output half of a
    forward step, off the sequential kernel's path."""
    g = tl.program_id(0)
    h = tl.program_id(1)
    n, start, L, off, num_mb, m0, m1 = _group(g, SEQ, GCUM, CU, OFF, N, BT, GROUP)
    if n < N:
        d = tl.arange(0, BD)
        dm = d < D
        row = (g * H + h).to(tl.int64)
        seq = (n * H + h).to(tl.int64)
        s = tl.load(S + tl.arange(0, BT))
        lnw, lnb = _head_ln(LNW, LNB, h, d, D)
        W = tl.load(_mat_ptrs(WC, row, D, BD), mask=dm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        bv = tl.load(BC + row * D + d, mask=dm, other=0.0)
        for j in tl.static_range(GROUP):  # unrolled: with GROUP 1 nothing is carried
            m = m0 + j
            if m < m1:
                tok, valid = _minibatch_tokens(m, start, off, L, BT)
                q, k, v, eta = _load_inputs(m, Q, K, V, ETA, h, H, start, off, L, D, BD, BT)
                q = q.to(tl.float32)
                k = k.to(tl.float32)
                _, _, _, _, E, _, _, Sb, xq, _ = _minibatch_forward(
                    m, W, bv, q, k, v.to(tl.float32), eta.to(tl.float32), s, lnw, lnb, GW0, GB0, seq, D, BD, BT, eps
                )
                o = q + lnw[None, :] * xq + lnb[None, :]
                tl.store(_tile_ptrs(O, tok, h, H, D, BD), o.to(O.dtype.element_ty), mask=valid[:, None] & dm[None, :])
                if GROUP > 1:
                    c = tl.load(S + BT - 1) * ((m + 1) * BT <= off + L).to(tl.float32)
                    W, bv = _advance(m, W, bv, k, E, Sb, c, GW0, seq, D, BD)


# ------------------------------------------------------------------------------------------------ autograd
def checkpoint_dtype(dtype: torch.dtype, group: int) -> torch.dtype:
    """The dtype of the W checkpoints for inputs of `dtype`, one every `group` mini-batches. For 16-bit inputs
    and a checkpoint per mini-batch float16: the backward then reads them only as operands of tf32 products,
    which keep 10 mantissa bits of float32 as float16 does (and its range, full precision from 6e-5 to 65504,
    holds inner weights), so half the bytes are stored and loaded for the same products. Float32 otherwise
    (walks from one checkpoint to the next add to W)."""
    return torch.float16 if group == 1 and dtype in (torch.float16, torch.bfloat16) else torch.float32


def output_in_forward(programs: int, device: torch.device) -> bool:
    """With checkpoints, whether the sequential forward writes o itself (rather than `_output_kernel` after it):
    when its programs, one per (sequence, head), already occupy every SM, the output costs less there."""
    return device.type == "cuda" and programs >= torch.cuda.get_device_properties(device).multi_processor_count


class _TTTLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, ln_weight, ln_bias, s, W0, b0, gW0, gb0, cu, offset, eps, checkpoint):
        """q, k, v [tokens,H,D], eta [tokens,H], s [BT] float32, W0/gW0 [N,H,D,D], b0/gb0 [N,H,D] float32,
        cu [N+1], offset [N] int64 -> o [tokens,H,D], final W, b, grad_W, grad_b (float32). With `checkpoint`
        it keeps W, b at the start of every GROUP mini-batches for the backward."""
        total, H, D = q.shape
        N, BT = W0.shape[0], s.numel()
        dev = q.device
        f32 = torch.float32
        o = new((total, H, D), q.dtype, dev)
        WF, GWF = new((N, H, D, D), f32, dev), new((N, H, D, D), f32, dev)
        BF, GBF = new((N, H, D), f32, dev), new((N, H, D), f32, dev)
        group = triton_chunk_bwd.GROUP
        split = triton_split.splits(N * H, D, dev, triton_split.SPLITS)
        if checkpoint or split > 1:  # the split forward always leaves o to `_output_kernel`, from checkpoints
            gcum, seq, slots = checkpoint_layout(cu, offset, total, BT, group)
            WC, BC = new((slots, H, D, D), checkpoint_dtype(q.dtype, group), dev), new((slots, H, D), f32, dev)
        else:
            gcum, seq, WC, BC = cu, None, WF, BF  # unread placeholders
        dims = dict(D=D, BD=block_d(D), BT=BT, GROUP=group)
        if split > 1:
            output = False
            triton_split.split_forward(
                q, k, v, eta, ln_weight, ln_bias, s, cu, offset, gcum, W0, b0, gW0, gb0, WC, BC, WF, BF, GWF, GBF,
                eps, group, split,
            )
        else:
            output = not checkpoint or output_in_forward(N * H, dev)
            _fwd_kernel[(N * H,)](
                q, k, v, eta, ln_weight, ln_bias, s, cu, offset, gcum, W0, b0, gW0, gb0, o, WC, BC, WF, BF, GWF,
                GBF, eps, H, **dims, CHECKPOINT=checkpoint, OUTPUT=output, num_warps=_num_warps(D),
            )
        if not output:
            _output_kernel[(slots, H)](
                q, k, v, eta, ln_weight, ln_bias, s, cu, offset, seq, gcum, gW0, gb0, WC, BC, o,
                eps, N, H, **dims, num_warps=triton_chunk_bwd.LOCAL_NUM_WARPS[block_d(D)],
            )
        ctx.save_for_backward(q, k, v, eta, ln_weight, ln_bias, s, gW0, gb0, cu, offset, gcum, seq, WC, BC)
        ctx.eps = eps
        ctx.checkpoint = checkpoint
        ctx.group = group
        ctx.set_materialize_grads(False)
        return o, WF, BF, GWF, GBF

    @staticmethod
    def backward(ctx, do, dWF, dBF, dGWF, dGBF):
        if not ctx.checkpoint:
            raise RuntimeError(
                "ttt_linear_triton ran without keeping what its backward needs (no input needed a gradient when it ran)"
            )
        q, k, v, eta, ln_weight, ln_bias, s, gW0, gb0, cu, offset, gcum, seq, WC, BC = ctx.saved_tensors
        do = torch.zeros_like(q) if do is None else do.contiguous()
        dfinal = None
        if any(t is not None for t in (dWF, dBF, dGWF, dGBF)):
            dfinal = tuple(
                torch.zeros_like(like) if t is None else t.float().contiguous()
                for t, like in zip((dWF, dBF, dGWF, dGBF), (gW0, gb0, gW0, gb0), strict=True)
            )
        grads = triton_chunk_bwd.chunk_backward(
            q, k, v, eta, ln_weight, ln_bias, s, gW0, gb0, cu, offset, gcum, seq, WC, BC, ctx.group, do, dfinal, ctx.eps
        )
        return *grads, None, None, None, None


def ttt_linear_triton(
    q,
    k,
    v,
    eta,
    ln_weight,
    ln_bias,
    state,
    *,
    mini_batch_size=16,
    token_scale=None,
    eps=1e-6,
    cu_seqlens=None,
    output_final_state=False,
):
    """See `tttlm.ops.ttt_linear`; inputs are assumed checked and `supports(q, mini_batch_size)`.

    q, k, v [B,T,H,D], eta [B,T,H], ln_weight/ln_bias [H,D], state TTTLinearState with N rows. Returns
    o [B,T,H,D] in q's dtype and the final state (float32) or None. Differentiable w.r.t. every tensor input,
    the state's W, b, grad_W and grad_b included.
    """
    B, T, H, D = q.shape
    dev = q.device
    if cu_seqlens is None:
        cu = torch.arange(0, B * T + 1, T, dtype=torch.long, device=dev)
    else:
        cu = cu_seqlens.to(torch.long)
    s = default_token_scale(mini_batch_size, torch.float32, dev) if token_scale is None else token_scale.float()
    tensors = (q, k, v, eta, ln_weight, ln_bias, s, state.W, state.b, state.grad_W, state.grad_b)
    checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    flat = [t.reshape(B * T, H, D).contiguous() for t in (q, k, v)]
    o, WF, BF, GWF, GBF = _TTTLinearFn.apply(
        *flat,
        eta.reshape(B * T, H).contiguous(),
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        s.contiguous(),
        *(t.float().contiguous() for t in (state.W, state.b, state.grad_W, state.grad_b)),
        cu,
        state.offset.contiguous(),
        float(eps),
        checkpoint,
    )
    o = o.reshape(B, T, H, D)
    if not output_final_state:
        return o, None
    lengths = cu[1:] - cu[:-1]
    return o, TTTLinearState(WF, BF, GWF, GBF, (state.offset + lengths) % mini_batch_size)
