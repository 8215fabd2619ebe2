"""The fused loss on the GPU: per chunk of rows, the logits by one matmul (cuBLAS), then one Triton program per
row that takes the log-sum-exp in float32 and overwrites the row with the gradient of its loss w.r.t. the
logits, softmax - onehot(target); the gradients w.r.t. hidden and weight follow from two more matmuls with the
chunk still at hand. The backward pass only scales them by the incoming gradient. So the float32 logits of
the batch never exist, nor are the logits computed twice (as a recomputing chunked loss does).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttlm.ops.ttt_linear.triton_parts import new

CHUNK_BYTES = 1 << 30  # logits held at a time
MAX_BLOCK = 4096  # logits per step of a row's loop


@triton.jit
def _ce_rows_kernel(X, stride, TGT, LOSS, V, ignore_index, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of X [m, V]: LOSS[r] = lse(x) - x[t] (0 if t == ignore_index); with GRAD, X[r] = softmax(x) -
    onehot(t) (0 if ignored), in X's dtype."""
    r = tl.program_id(0).to(tl.int64)
    row = X + r * stride
    t = tl.load(TGT + r)
    keep = t != ignore_index
    cols = tl.arange(0, BLOCK)
    # per-lane running max and sum of exponentials, combined once at the end
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, V, BLOCK):
        x = tl.load(row + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # lanes past V have seen nothing yet: s stays 0
        s = s * tl.exp(m - ref) + tl.exp(x - ref)
        m = m_new
    mx = tl.max(m, 0)
    lse = mx + tl.log(tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - mx), 0.0), 0))
    xt = tl.load(row + tl.where(keep, t, 0)).to(tl.float32)
    tl.store(LOSS + r, tl.where(keep, lse - xt, 0.0))
    if GRAD:
        for off in range(0, V, BLOCK):
            c = off + cols
            x = tl.load(row + c, mask=c < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)
            tl.store(row + c, tl.where(keep, g, 0.0).to(X.dtype.element_ty), mask=c < V)


def _rows_per_chunk(M: int, V: int, itemsize: int) -> int:
    """Rows of logits per chunk: at most CHUNK_BYTES of them, in chunks of equal size."""
    rows = max(1, min(M, CHUNK_BYTES // (V * itemsize)))
    return math.ceil(M / math.ceil(M / rows)) if M else 1


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def _losses(h: Tensor, w: Tensor, targets: Tensor, ignore_index: int, grad: bool):
    """Losses [M] float32 and, with grad, d(sum of losses)/dh [M, C] (h's dtype) and /dw [V, C] (float32)."""
    M, C = h.shape
    V = w.shape[0]
    loss = new((M,), torch.float32, h.device)
    dh = new((M, C), h.dtype, h.device) if grad else None
    dw = None
    block = min(MAX_BLOCK, triton.next_power_of_2(V))
    rows = _rows_per_chunk(M, V, h.element_size())
    for s in range(0, M, rows):
        e = min(M, s + rows)
        logits = h[s:e] @ w.T  # [m, V]
        _ce_rows_kernel[(e - s,)](
            logits, logits.stride(0), targets[s:e], loss[s:e], V, ignore_index, GRAD=grad, BLOCK=block,
            num_warps=8 if block >= 1024 else 4,
        )
        if grad:
            torch.mm(logits, w, out=dh[s:e])
            part = (logits.T @ h[s:e]).float()
            dw = part if dw is None else dw.add_(part)
    if grad and dw is None:
        dw = torch.zeros(V, C, dtype=torch.float32, device=h.device)
    return loss, dh, dw


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, ignore_index):
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit below
            loss, dh, dw = _losses(hidden.to(dtype), weight.to(dtype), targets, ignore_index, grad)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss.sum()

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        dh = dh.to(ctx.dtypes[0]) * g if ctx.needs_input_grad[0] else None
        dw = (dw * g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def linear_cross_entropy_triton(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, reduction: str = "sum", ignore_index: int = -100
) -> Tensor:
    """See `tttlm.ops.linear_cross_entropy` (inputs checked there)."""
    dtype = _compute_dtype(hidden)
    targets = targets.contiguous()
    if reduction == "sum":
        return _LinearCrossEntropySum.apply(hidden, weight, targets, dtype, ignore_index)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise ValueError("linear_cross_entropy(reduction='none') gives no gradients: use reduction='sum', or "
                         "call it under torch.no_grad()")
    with torch.autocast(hidden.device.type, enabled=False):
        return _losses(hidden.to(dtype), weight.to(dtype), targets, ignore_index, grad=False)[0]
