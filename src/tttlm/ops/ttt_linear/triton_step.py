"""TTT-Linear decode: one token per call, a Triton kernel with one program per (row, head).

Per token (Sun et al. 2024, arXiv 2407.04620, §2): e = eta * dl/dz at z = k W + b, the running sums grow by
(k^T e, e), the token reads out with W - s_pos (grad_W + k^T e); at a mini-batch end that becomes W.
The program reads W, b and the sums once, writes the new ones once; all arithmetic in float32.

In place (INPLACE: the new state's pointers are the old state's), a program reads every element of its (row, head)
before a barrier and writes it after; the offset it shares with the other heads of its row is the one element read
across programs, so they count themselves in on it (`_read_offset`) and the last to arrive writes the new one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.state import TTTLinearState
from tttlm.ops.ttt_linear.triton_chunk import _num_warps
from tttlm.ops.ttt_linear.triton_parts import (
    _head_ln,
    _layernorm,
    _ln_l2_grad,
    _read_offset,
    _write_offset,
    block_d,
    new,
)


@triton.jit
def _step_kernel(
    Q,
    K,
    V,
    ETA,
    LNW,
    LNB,
    S,
    OFF,
    W0,
    B0,
    GW0,
    GB0,
    O,
    W1,
    B1,
    GW1,
    GB1,
    OFF1,
    eps,
    H,
    D: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    DEFAULT_S: tl.constexpr,
    INPLACE: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    base = pid.to(tl.int64)
    d = tl.arange(0, BD)
    dm = d < D
    dd = dm[:, None] & dm[None, :]
    mat = base * D * D + d[:, None] * D + d[None, :]
    q = tl.load(Q + base * D + d, mask=dm, other=0.0).to(tl.float32)
    k = tl.load(K + base * D + d, mask=dm, other=0.0).to(tl.float32)
    v = tl.load(V + base * D + d, mask=dm, other=0.0).to(tl.float32)
    eta = tl.load(ETA + base).to(tl.float32)
    lnw, lnb = _head_ln(LNW, LNB, h, d, D)
    pos, before = _read_offset(OFF, n, BT, INPLACE)
    if DEFAULT_S:
        s = 1.0 / (pos + 1).to(tl.float32)
    else:
        s = tl.load(S + pos)
    W = tl.load(W0 + mat, mask=dd, other=0.0)
    bv = tl.load(B0 + base * D + d, mask=dm, other=0.0)
    gW = tl.load(GW0 + mat, mask=dd, other=0.0)
    gb = tl.load(GB0 + base * D + d, mask=dm, other=0.0)

    z = tl.sum(k[:, None] * W, 0) + bv
    _, _, _, _, _, dz = _ln_l2_grad(z[None, :], v[None, :], k[None, :], lnw, lnb, D, BD, eps)
    e = eta * tl.sum(dz, 0)  # the [1, D] row as a vector
    gW = gW + k[:, None] * e[None, :]
    gb = gb + e
    W_bar = W - s * gW
    b_bar = bv - s * gb
    zq = tl.sum(q[:, None] * W_bar, 0) + b_bar
    xq, _ = _layernorm(zq[None, :], D, BD, eps)
    o = q + lnw * tl.sum(xq, 0) + lnb
    tl.store(O + base * D + d, o.to(O.dtype.element_ty), mask=dm)

    done = (pos + 1 == BT).to(tl.float32)
    if INPLACE:  # every thread's loads of the old state before any thread's stores over it
        tl.debug_barrier()
        new_w = pos + 1 == BT  # the weights change only at a mini-batch end: the other tokens leave them unwritten
    else:
        new_w = pos >= 0
    tl.store(W1 + mat, W + done * (W_bar - W), mask=dd & new_w)
    tl.store(B1 + base * D + d, bv + done * (b_bar - bv), mask=dm & new_w)
    tl.store(GW1 + mat, (1.0 - done) * gW, mask=dd)
    tl.store(GB1 + base * D + d, (1.0 - done) * gb, mask=dm)
    _write_offset(OFF, OFF1, n, h, H, pos, before, BT, INPLACE)


def ttt_linear_step_triton(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    eta_t: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    state: TTTLinearState,
    *,
    mini_batch_size: int = 16,
    token_scale: Tensor | None = None,
    eps: float = 1e-6,
    inplace: bool = False,
) -> tuple[Tensor, TTTLinearState]:
    """See `tttlm.ops.ttt_linear_step`; inputs are assumed checked and `triton_chunk.supports` (with inplace, the
    state too: `TTTLinearState.check_in_place`).

    q_t, k_t, v_t [B,H,D], eta_t [B,H], ln_weight/ln_bias [H,D], state with B rows. Returns o_t [B,H,D] in
    q_t's dtype and a new state (float32), or `state` itself written over with inplace. Not differentiable: with
    gradients wanted, the PyTorch step runs.
    """
    tensors = (
        q_t,
        k_t,
        v_t,
        eta_t,
        ln_weight,
        ln_bias,
        token_scale,
        state.W,
        state.b,
        state.grad_W,
        state.grad_b,
    )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        from tttlm.ops.ttt_linear.chunked import ttt_linear_step_recurrent

        return ttt_linear_step_recurrent(
            q_t,
            k_t,
            v_t,
            eta_t,
            ln_weight,
            ln_bias,
            state,
            mini_batch_size=mini_batch_size,
            token_scale=token_scale,
            eps=eps,
            inplace=inplace,
        )
    B, H, D = q_t.shape
    dev = q_t.device
    o = new((B, H, D), q_t.dtype, dev)
    old = [t.float().contiguous() for t in (state.W, state.b, state.grad_W, state.grad_b)]
    if inplace:
        out = state
    else:
        W1, GW1 = new((B, H, D, D), torch.float32, dev), new((B, H, D, D), torch.float32, dev)
        B1, GB1 = new((B, H, D), torch.float32, dev), new((B, H, D), torch.float32, dev)
        out = TTTLinearState(W1, B1, GW1, GB1, torch.empty_like(state.offset))
    s = q_t if token_scale is None else token_scale.float().contiguous()  # q_t: an unread placeholder
    _step_kernel[(B * H,)](
        q_t.contiguous(),
        k_t.contiguous(),
        v_t.contiguous(),
        eta_t.contiguous(),
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        s,
        state.offset.contiguous(),
        *old,
        o,
        out.W,
        out.b,
        out.grad_W,
        out.grad_b,
        out.offset,
        float(eps),
        H,
        D=D,
        BD=block_d(D),
        BT=mini_batch_size,
        DEFAULT_S=token_scale is None,
        INPLACE=inplace,
        num_warps=_num_warps(D),
    )
    return o, out
