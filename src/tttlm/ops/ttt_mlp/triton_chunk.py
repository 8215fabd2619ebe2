"""TTT-MLP on the GPU: the Triton forward kernel over whole sequences and the autograd function.

The math is `reference.ttt_mlp_ref` in the dual form (Sun et al. 2024, arXiv 2407.04620, §2.5 and appendix;
`chunked.mlp_minibatch`): per mini-batch of b tokens, with W1, b1, W2, b2 the inner weights at its start,
    Z1 = K W1 + b1,  X2 = gelu(Z1),  Z2 = X2 W2 + b2,  E2 = eta * dl/dZ2  (the LayerNorm-L2 gradient),
    E1 = (E2 W2^T) * gelu'(Z1),
    Zq1 = Q W1 + b1 - s * (tril(Q K^T + 1) E1 + Q gW1 + gb1),  Xq2 = gelu(Zq1),
    Zq2 = Xq2 W2 + b2 - s * (tril(Xq2 X2^T + 1) E2 + Xq2 gW2 + gb2),  o = Q + LN(Zq2),
    W1 <- W1 - s_{b-1} (gW1 + K^T E1), b1, W2 (gW2 + X2^T E2), b2 likewise, when the mini-batch is complete,
where (gW1, gb1, gW2, gb2) are the state's partial sums (nonzero only in the first mini-batch of a call).

One program per (sequence, head) walks its mini-batches in order. W1 [D, 4D], b1 and W2 [4D, D] stay in
global memory in float32 (the final state's tensors serve as the workspace, updated in place; 2 x 64 KB per
head at D=64, which L2 holds between mini-batches) and are read in tiles of FT hidden units
(`triton_parts.chunk_f_tile`), twice per mini-batch: a first pass forms Z2 (the LayerNorm-L2 gradient needs all of
it), a second forms E1, the output and the update of each tile. b2 stays on chip. The matrix products run on
the tensor cores (tf32 for float32 operands). With few sequences (B = 1 at long T) the hidden tiles of a
(sequence, head) are split over 2, 4 or 8 programs (`triton_parts.splits`), which sum their shares of Z2,
then of A2 and Zq2, through global memory at every mini-batch (the backward does the same), as TTT-Linear's
split kernels exchange LayerNorm statistics; all of a launch's programs must then be resident at once.

With gradients wanted the forward also keeps, per token, Z1 [4D] and the two LayerNorms' normalised values and
statistics: the backward (`triton_chunk_bwd`) needs nothing else, as it walks the mini-batches in reverse and
recovers each one's starting weights from the next one's (W_m = W_{m+1} + s_{b-1} (K^T E1 + ...)).

Head dims up to 128, multiples of 4; one that is not a power of two is padded on chip to `block_d(D)` with
zeros, and every LayerNorm statistic is taken over the D real columns. Sequences are aligned to the mini-batch
grid as in `ttt_common.make_layout`: sequence n's token t sits at grid position offset[n] + t; slots outside
the sequence load as zeros with eta = 0 and write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.state import TTTMLPState
from tttlm.ops.ttt_common import default_token_scale
from tttlm.ops.ttt_linear.triton_parts import (
    _dot,
    _dot_acc,
    _head_ln,
    _layernorm,
    _ln_l2_grad,
    _load_inputs,
    _minibatch_tokens,
    _sequence,
    _tile_ptrs,
    block_d,
    new,
)
from tttlm.ops.ttt_mlp import triton_chunk_bwd, triton_parts
from tttlm.ops.ttt_mlp.triton_parts import (
    _arrive,
    _f_ptrs,
    _gathered,
    _gelu_parts,
    _hidden_ptrs,
    _post,
    _tile_offsets,
    _w1_tile,
    _w2_tile,
    chunk_f_tile,
    exchange,
    tiling,
)

STATS = 4  # per token and head, kept for the backward: rstd, mean(G), mean(G xhat) of Z2's LayerNorm, Zq2's rstd


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_minibatch(
    m, b2, Q, K, V, ETA, S, W1, B1, W2, GW1, GB1, GW2, GB2, GW1F, GB1F, GW2F, GB2F, O, Z1S, XH2S, XQS, STS, X, CNT,
    lnw, lnb, eps, base, part, split, h, H, start, off, L, num_mb,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FT: tl.constexpr,
    HAS_SUMS: tl.constexpr, SAVE: tl.constexpr,
):
    """Mini-batch m: writes its output (and, with SAVE, what the backward keeps), updates W1, b1, W2 in place
    and returns b2 after it; at the row's last mini-batch also writes the final partial sums. With split > 1
    this program (`part`) walks its share of the hidden tiles only and sums Z2, then A2 and Zq2, with the others
    through the exchange X; part 0 writes what follows from the sums."""
    tok, valid = _minibatch_tokens(m, start, off, L, BT)
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    vm = valid[:, None] & (d < D)[None, :]
    causal = i[:, None] >= i[None, :]
    q_in, k_in, v, eta = _load_inputs(m, Q, K, V, ETA, h, H, start, off, L, D, BD, BT)
    q = q_in.to(tl.float32)
    k = k_in.to(tl.float32)
    v = v.to(tl.float32)
    eta = eta.to(tl.float32)
    s = tl.load(S + i)
    full = ((m + 1) * BT <= off + L).to(tl.float32)  # only a row's last mini-batch can be unfinished
    c = tl.load(S + BT - 1) * full
    last = m == num_mb - 1
    nt = F // FT // split  # tiles per program
    REGION: tl.constexpr = BT * (2 * BT + 3 * BD)  # as `exchange` allocates it (the backward's needs)
    o1, o2, m1, m2 = _tile_offsets(D, BD, F, FT)

    # pass 1: Z2 = gelu(K W1 + b1) W2 + b2, tile by tile, then E2
    Z2 = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(part * nt, part * nt + nt):
        W1j = tl.load(W1 + _w1_tile(base, j, D, F, FT) + o1, mask=m1, other=0.0)
        Z1 = _dot(k, W1j) + tl.load(_f_ptrs(B1, base, j, F, FT))[None, :]
        if SAVE:
            tl.store(_hidden_ptrs(Z1S, tok, h, H, j, F, FT), Z1, mask=valid[:, None])
        Z2 = _dot_acc(_gelu_parts(Z1)[0], tl.load(W2 + _w2_tile(base, j, D, F, FT) + o2, mask=m2, other=0.0), Z2)
    if split > 1:
        _post(X, 2 * m, part, split, 0, Z2, BT, BD, REGION)
        _arrive(CNT, 2 * m, split)
        Z2 = _gathered(X, 2 * m, split, 0, BT, BD, REGION)
    xh, rstd, _G, mG, mGx, dZ = _ln_l2_grad(Z2 + b2[None, :], v, k, lnw, lnb, D, BD, eps)
    E2 = eta[:, None] * dZ

    # pass 2: per tile E1, its share of the output, and the update
    A1 = tl.where(causal, tl.dot(q_in, tl.trans(k_in)) + 1.0, 0.0)  # exact products of 16-bit inputs
    A2 = tl.zeros([BT, BT], dtype=tl.float32)
    Zq2 = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(part * nt, part * nt + nt):
        w1 = _w1_tile(base, j, D, F, FT)
        w2 = _w2_tile(base, j, D, F, FT)
        w1p = W1 + w1 + o1
        w2p = W2 + w2 + o2
        b1p = _f_ptrs(B1, base, j, F, FT)
        W1j = tl.load(w1p, mask=m1, other=0.0)
        W2j = tl.load(w2p, mask=m2, other=0.0)
        b1j = tl.load(b1p)
        Z1 = _dot(k, W1j) + b1j[None, :]
        X2, g1, _g2 = _gelu_parts(Z1)
        E1 = _dot(E2, tl.trans(W2j)) * g1
        C1 = _dot(A1, E1)
        SW1 = _dot(tl.trans(k), E1)
        Sb1 = tl.sum(E1, 0)
        SW2 = _dot(tl.trans(X2), E2)
        if HAS_SUMS:
            gW1 = tl.load(GW1 + w1 + o1, mask=m1, other=0.0)
            gb1 = tl.load(_f_ptrs(GB1, base, j, F, FT))
            gW2 = tl.load(GW2 + w2 + o2, mask=m2, other=0.0)
            C1 = _dot_acc(q, gW1, C1) + gb1[None, :]
            SW1 += gW1
            Sb1 += gb1
            SW2 += gW2
        Xq2 = _gelu_parts(_dot(q, W1j) + b1j[None, :] - s[:, None] * C1)[0]
        A2 = _dot_acc(Xq2, tl.trans(X2), A2)
        Zq2 = _dot_acc(Xq2, W2j, Zq2)
        if HAS_SUMS:
            Zq2 -= s[:, None] * _dot(Xq2, gW2)
        if last:  # the final state's partial sums: zero unless the mini-batch is unfinished
            tl.store(GW1F + w1 + o1, (1.0 - full) * SW1, mask=m1)
            tl.store(_f_ptrs(GB1F, base, j, F, FT), (1.0 - full) * Sb1)
            tl.store(GW2F + w2 + o2, (1.0 - full) * SW2, mask=m2)
        tl.debug_barrier()  # every thread's loads of this tile come before any thread's store to it
        tl.store(w1p, W1j - c * SW1, mask=m1)
        tl.store(b1p, b1j - c * Sb1)
        tl.store(w2p, W2j - c * SW2, mask=m2)
    if split > 1:
        _post(X, 2 * m + 1, part, split, 0, A2, BT, BT, REGION)
        _post(X, 2 * m + 1, part, split, BT * BT, Zq2, BT, BD, REGION)
        _arrive(CNT, 2 * m + 1, split)
        A2 = _gathered(X, 2 * m + 1, split, 0, BT, BT, REGION)
        Zq2 = _gathered(X, 2 * m + 1, split, BT * BT, BT, BD, REGION)

    C2 = _dot(tl.where(causal, A2 + 1.0, 0.0), E2)
    Sb2 = tl.sum(E2, 0)
    if HAS_SUMS:
        gb2 = tl.load(GB2 + base * D + d, mask=d < D, other=0.0)
        C2 += gb2[None, :]
        Sb2 += gb2
    xq, rq = _layernorm(Zq2 + b2[None, :] - s[:, None] * C2, D, BD, eps)
    if part == 0:
        o = q + lnw[None, :] * xq + lnb[None, :]
        tl.store(_tile_ptrs(O, tok, h, H, D, BD), o.to(O.dtype.element_ty), mask=vm)
        if SAVE:
            tl.store(_tile_ptrs(XH2S, tok, h, H, D, BD), xh, mask=vm)
            tl.store(_tile_ptrs(XQS, tok, h, H, D, BD), xq, mask=vm)
            st = STS + (tok * H + h) * 4
            tl.store(st, rstd, mask=valid)
            tl.store(st + 1, mG, mask=valid)
            tl.store(st + 2, mGx, mask=valid)
            tl.store(st + 3, rq, mask=valid)
        if last:
            tl.store(GB2F + base * D + d, (1.0 - full) * Sb2, mask=d < D)
    tl.debug_barrier()  # this mini-batch's stores of W1, b1, W2 come before the next one's loads
    return b2 - c * Sb2


@triton.jit(do_not_specialize=["H", "split"])  # one compiled kernel for any number of heads and split
def _fwd_kernel(
    Q, K, V, ETA, LNW, LNB, S, CU, OFF, W1, B1, W2, B2, GW1, GB1, GW2, GB2, GW1F, GB1F, GW2F, GB2F,
    O, Z1S, XH2S, XQS, STS, X, CNT,
    eps, H, split, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FT: tl.constexpr,
    SAVE: tl.constexpr,
):
    """Program (sequence n, head h, part of `split`). W1, B1, W2, B2 hold the initial weights and are left
    holding the final ones. X [N*H, 2, split, BT*(2BT+3BD)] float32 is the exchange of the `split` programs of a
    (sequence, head), CNT [N*H] int32 (zeros) counts their arrivals."""
    pid = tl.program_id(0)
    g = pid // split
    part = pid % split
    n = g // H
    h = g % H
    start, L, off, num_mb = _sequence(CU, OFF, n, BT)
    base = g.to(tl.int64)
    Xg = X + base * (2 * split * BT * (2 * BT + 3 * BD))
    d = tl.arange(0, BD)
    lnw, lnb = _head_ln(LNW, LNB, h, d, D)
    b2 = tl.load(B2 + base * D + d, mask=d < D, other=0.0)
    b2 = _fwd_minibatch(
        0, b2, Q, K, V, ETA, S, W1, B1, W2, GW1, GB1, GW2, GB2, GW1F, GB1F, GW2F, GB2F, O, Z1S, XH2S, XQS, STS,
        Xg, CNT + g, lnw, lnb, eps, base, part, split, h, H, start, off, L, num_mb, D, BD, BT, F, FT, True, SAVE,
    )
    for m in range(1, num_mb):
        b2 = _fwd_minibatch(
            m, b2, Q, K, V, ETA, S, W1, B1, W2, GW1, GB1, GW2, GB2, GW1F, GB1F, GW2F, GB2F, O, Z1S, XH2S, XQS,
            STS, Xg, CNT + g, lnw, lnb, eps, base, part, split, h, H, start, off, L, num_mb, D, BD, BT, F, FT, False,
            SAVE,
        )
    if part == 0:
        tl.store(B2 + base * D + d, b2, mask=d < D)


# ------------------------------------------------------------------------------------------------ autograd
class _TTTMLPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, ln_weight, ln_bias, s, W1, b1, W2, b2, gW1, gb1, gW2, gb2, cu, offset, eps, save):
        """q, k, v [tokens,H,D], eta [tokens,H], s [BT] float32, the state's W1/gW1 [N,H,D,F], b1/gb1 [N,H,F],
        W2/gW2 [N,H,F,D], b2/gb2 [N,H,D] float32, cu [N+1], offset [N] int64 -> o [tokens,H,D] and the final
        W1, b1, W2, b2, grad_W1, grad_b1, grad_W2, grad_b2 (float32). With `save` it keeps per token what the
        backward needs."""
        total, H, D = q.shape
        BT = s.numel()
        F = 4 * D
        dev = q.device
        f32 = torch.float32
        o = new((total, H, D), q.dtype, dev)
        final = [t.clone() for t in (W1, b1, W2, b2)]  # the kernel's workspace: it ends as the final weights
        final_sums = [new(t.shape, f32, dev) for t in (gW1, gb1, gW2, gb2)]
        if save:
            Z1S = new((total, H, F), f32, dev)
            XH2S, XQS = new((total, H, D), f32, dev), new((total, H, D), f32, dev)
            STS = new((total, H, STATS), f32, dev)
        else:
            Z1S = XH2S = XQS = STS = o  # unread placeholders
        N = W1.shape[0]
        BD = block_d(D)
        split = triton_parts.splits(N * H, D, dev)
        X, cnt = exchange(N * H, split, BD, BT, dev)
        _fwd_kernel[(N * H * split,)](
            q, k, v, eta, ln_weight, ln_bias, s, cu, offset, *final, gW1, gb1, gW2, gb2, *final_sums,
            o, Z1S, XH2S, XQS, STS, X, cnt, eps, H, split, D=D, BD=BD, BT=BT, F=F, FT=chunk_f_tile(D), SAVE=save,
            num_warps=tiling(D).fwd_warps,
        )
        if save:
            ctx.save_for_backward(q, k, v, eta, ln_weight, ln_bias, s, gW1, gb1, gW2, gb2, cu, offset, *final[:3],
                                  Z1S, XH2S, XQS, STS)
        ctx.eps = eps
        ctx.save = save
        ctx.set_materialize_grads(False)
        return o, *final, *final_sums

    @staticmethod
    def backward(ctx, do, *dfinal):
        if not ctx.save:
            raise RuntimeError(
                "ttt_mlp_triton ran without keeping what its backward needs (no input needed a gradient when it ran)"
            )
        q, k, v, eta, ln_weight, ln_bias, s, gW1, gb1, gW2, gb2, cu, offset, W1F, b1F, W2F, *saved = ctx.saved_tensors
        do = torch.zeros_like(q) if do is None else do.contiguous()
        sums = (gW1, gb1, gW2, gb2)
        if all(t is None for t in dfinal):
            dfinal = None
        else:
            dfinal = tuple(
                torch.zeros_like(like) if t is None else t.float().contiguous()
                for t, like in zip(dfinal, sums + sums, strict=True)
            )
        grads = triton_chunk_bwd.chunk_backward(
            q, k, v, eta, ln_weight, ln_bias, s, sums, cu, offset, (W1F, b1F, W2F), saved, do, dfinal, ctx.eps
        )
        return *grads, None, None, None, None


def ttt_mlp_triton(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor, ln_bias: Tensor, state: TTTMLPState, *,
    mini_batch_size: int = 16, token_scale: Tensor | None = None, eps: float = 1e-6,
    cu_seqlens: Tensor | None = None, output_final_state: bool = False,
) -> tuple[Tensor, TTTMLPState | None]:
    """See `tttlm.ops.ttt_mlp`; inputs are assumed checked and `triton_parts.supports(q, mini_batch_size)`.

    q, k, v [B,T,H,D], eta [B,T,H], ln_weight/ln_bias [H,D], state TTTMLPState with N rows. Returns o [B,T,H,D]
    in q's dtype and the final state (float32) or None. Differentiable w.r.t. every tensor input, the state's
    weights and partial sums included.
    """
    B, T, H, D = q.shape
    dev = q.device
    if cu_seqlens is None:
        cu = torch.arange(0, B * T + 1, T, dtype=torch.long, device=dev)
    else:
        cu = cu_seqlens.to(torch.long)
    s = default_token_scale(mini_batch_size, torch.float32, dev) if token_scale is None else token_scale.float()
    tensors = (q, k, v, eta, ln_weight, ln_bias, s, *state.params, *state.grads)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    flat = [t.reshape(B * T, H, D).contiguous() for t in (q, k, v)]
    o, *final = _TTTMLPFn.apply(
        *flat,
        eta.reshape(B * T, H).contiguous(),
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        s.contiguous(),
        *(t.float().contiguous() for t in (*state.params, *state.grads)),
        cu,
        state.offset.contiguous(),
        float(eps),
        save,
    )
    o = o.reshape(B, T, H, D)
    if not output_final_state:
        return o, None
    lengths = cu[1:] - cu[:-1]
    return o, TTTMLPState(*final, (state.offset + lengths) % mini_batch_size)
