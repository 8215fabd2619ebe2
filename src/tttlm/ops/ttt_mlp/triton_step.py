"""TTT-MLP decode: one token per call, a Triton kernel with one program per (row, head).

Per token (Sun et al. 2024, arXiv 2407.04620, §2), with the weights W1, b1, W2, b2 at the mini-batch's start:
z1 = k W1 + b1, x2 = gelu(z1), e2 = eta * dl/dz2 at z2 = x2 W2 + b2, e1 = (e2 W2^T) * gelu'(z1); the running
sums grow by (k^T e1, e1, x2^T e2, e2); the token reads out with the weights W - s_pos (sums), and at a
mini-batch's end those become the weights. The program reads the weights and sums in tiles of the hidden
width (twice: z2 needs all of it before e1), writes the new ones once; all arithmetic in float32.

In place (INPLACE: the new state's pointers are the old state's), tile j of the second pass is written after a
barrier that follows every read of it (the tiles are disjoint, and the first pass reads before any write); the row's
offset is read and written as TTT-Linear's step does (`_read_offset`, `_write_offset`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.state import TTTMLPState
from tttlm.ops.ttt_linear.triton_parts import (
    _head_ln,
    _layernorm,
    _ln_l2_grad,
    _read_offset,
    _write_offset,
    block_d,
    new,
)
from tttlm.ops.ttt_mlp.triton_parts import _f_ptrs, _gelu_parts, _tile_offsets, _w1_tile, _w2_tile, f_tile

# Warps per program by on-chip head dim (passed on an H200 at 64 and 128).
NUM_WARPS = {16: 4, 32: 4, 64: 8, 128: 8}


@triton.jit(do_not_specialize=["H", "default_s"])  # one compiled kernel for any number of heads
def _step_kernel(
    Q, K, V, ETA, LNW, LNB, S, OFF, W1, B1, W2, B2, GW1, GB1, GW2, GB2,
    O, W1N, B1N, W2N, B2N, GW1N, GB1N, GW2N, GB2N, OFF1,
    eps, H, default_s, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FT: tl.constexpr,
    INPLACE: tl.constexpr,
):
    """Program (row n, head h). default_s: the token scale 1/(pos+1) (S unread), else S [BT]; a run-time flag,
    so that one compiled kernel serves both."""
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    base = pid.to(tl.int64)
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(Q + base * D + d, mask=dm, other=0.0).to(tl.float32)
    k = tl.load(K + base * D + d, mask=dm, other=0.0).to(tl.float32)
    v = tl.load(V + base * D + d, mask=dm, other=0.0).to(tl.float32)
    eta = tl.load(ETA + base).to(tl.float32)
    lnw, lnb = _head_ln(LNW, LNB, h, d, D)
    pos, before = _read_offset(OFF, n, BT, INPLACE)
    s = tl.load(S + pos, mask=default_s == 0, other=1.0) / tl.where(default_s == 0, 1, pos + 1).to(tl.float32)
    done = (pos + 1 == BT).to(tl.float32)
    if INPLACE:  # the weights change only at a mini-batch end: in place, the other tokens leave them unwritten
        new_w = pos + 1 == BT
    else:
        new_w = pos >= 0
    NT: tl.constexpr = F // FT
    o1, o2, m1, m2 = _tile_offsets(D, BD, F, FT)

    b2 = tl.load(B2 + base * D + d, mask=dm, other=0.0)
    z2 = b2
    for j in range(NT):
        W1j = tl.load(W1 + _w1_tile(base, j, D, F, FT) + o1, mask=m1, other=0.0)
        z1 = tl.sum(k[:, None] * W1j, 0) + tl.load(_f_ptrs(B1, base, j, F, FT))
        W2j = tl.load(W2 + _w2_tile(base, j, D, F, FT) + o2, mask=m2, other=0.0)
        z2 += tl.sum(_gelu_parts(z1)[0][:, None] * W2j, 0)
    dz = _ln_l2_grad(z2[None, :], v[None, :], k[None, :], lnw, lnb, D, BD, eps)[5]
    e2 = eta * tl.sum(dz, 0)  # the [1, BD] row as a vector
    gb2 = tl.load(GB2 + base * D + d, mask=dm, other=0.0) + e2
    b2_bar = b2 - s * gb2
    zq2 = b2_bar
    for j in range(NT):
        w1 = _w1_tile(base, j, D, F, FT)
        w2 = _w2_tile(base, j, D, F, FT)
        W1j = tl.load(W1 + w1 + o1, mask=m1, other=0.0)
        W2j = tl.load(W2 + w2 + o2, mask=m2, other=0.0)
        b1j = tl.load(_f_ptrs(B1, base, j, F, FT))
        x2, g1, _g2 = _gelu_parts(tl.sum(k[:, None] * W1j, 0) + b1j)
        e1 = tl.sum(e2[None, :] * W2j, 1) * g1
        gW1 = tl.load(GW1 + w1 + o1, mask=m1, other=0.0) + k[:, None] * e1[None, :]
        gb1 = tl.load(_f_ptrs(GB1, base, j, F, FT)) + e1
        gW2 = tl.load(GW2 + w2 + o2, mask=m2, other=0.0) + x2[:, None] * e2[None, :]
        W1_bar = W1j - s * gW1
        b1_bar = b1j - s * gb1
        W2_bar = W2j - s * gW2
        xq2 = _gelu_parts(tl.sum(q[:, None] * W1_bar, 0) + b1_bar)[0]
        zq2 += tl.sum(xq2[:, None] * W2_bar, 0)
        if INPLACE:  # every thread's loads of tile j (and of the first pass) before any thread's stores over it
            tl.debug_barrier()
        tl.store(W1N + w1 + o1, W1j + done * (W1_bar - W1j), mask=m1 & new_w)
        tl.store(_f_ptrs(B1N, base, j, F, FT), b1j + done * (b1_bar - b1j), mask=new_w)
        tl.store(W2N + w2 + o2, W2j + done * (W2_bar - W2j), mask=m2 & new_w)
        tl.store(GW1N + w1 + o1, (1.0 - done) * gW1, mask=m1)
        tl.store(_f_ptrs(GB1N, base, j, F, FT), (1.0 - done) * gb1)
        tl.store(GW2N + w2 + o2, (1.0 - done) * gW2, mask=m2)
    xq, _ = _layernorm(zq2[None, :], D, BD, eps)
    o = q + lnw * tl.sum(xq, 0) + lnb
    tl.store(O + base * D + d, o.to(O.dtype.element_ty), mask=dm)
    tl.store(B2N + base * D + d, b2 + done * (b2_bar - b2), mask=dm & new_w)
    tl.store(GB2N + base * D + d, (1.0 - done) * gb2, mask=dm)
    _write_offset(OFF, OFF1, n, h, H, pos, before, BT, INPLACE)


def ttt_mlp_step_triton(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, eta_t: Tensor, ln_weight: Tensor, ln_bias: Tensor, state: TTTMLPState,
    *, mini_batch_size: int = 16, token_scale: Tensor | None = None, eps: float = 1e-6, inplace: bool = False,
) -> tuple[Tensor, TTTMLPState]:
    """See `tttlm.ops.ttt_mlp_step`; inputs are assumed checked and `triton_parts.supports` (with inplace, the
    state too: `TTTMLPState.check_in_place`).

    q_t, k_t, v_t [B,H,D], eta_t [B,H], ln_weight/ln_bias [H,D], state with B rows. Returns o_t [B,H,D] in
    q_t's dtype and a new state (float32), or `state` itself written over with inplace. Not differentiable: with
    gradients wanted, the PyTorch step runs.
    """
    tensors = (q_t, k_t, v_t, eta_t, ln_weight, ln_bias, token_scale, *state.params, *state.grads)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        from tttlm.ops.ttt_mlp.chunked import ttt_mlp_step_recurrent

        return ttt_mlp_step_recurrent(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state,
                                      mini_batch_size=mini_batch_size, token_scale=token_scale, eps=eps,
                                      inplace=inplace)
    B, H, D = q_t.shape
    dev = q_t.device
    o = new((B, H, D), q_t.dtype, dev)
    old = [t.float().contiguous() for t in (*state.params, *state.grads)]
    if inplace:
        out = state
    else:
        out = TTTMLPState(*(new(t.shape, torch.float32, dev) for t in old), torch.empty_like(state.offset))
    s = q_t if token_scale is None else token_scale.float().contiguous()  # q_t: an unread placeholder
    _step_kernel[(B * H,)](
        q_t.contiguous(), k_t.contiguous(), v_t.contiguous(), eta_t.contiguous(), ln_weight.contiguous(),
        ln_bias.contiguous(), s, state.offset.contiguous(), *old, o, *out.params, *out.grads, out.offset,
        float(eps), H, int(token_scale is None), D=D, BD=block_d(D), BT=mini_batch_size, F=4 * D, FT=f_tile(D),
        INPLACE=inplace, num_warps=NUM_WARPS[block_d(D)],
    )
    return o, out
