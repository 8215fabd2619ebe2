"""Recurrent states of the ops: everything needed to continue a sequence exactly where a call stopped.

All tensors of one state share a float dtype: float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs.
`N` is the batch size, or the number of sequences of a packed (`cu_seqlens`) batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


class _TensorState:
    def map(self, fn: Callable[[Tensor], Tensor]):
        """A copy with `fn` applied to every tensor (e.g. `lambda t: t[idx]` to reorder a batch)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def detach(self):
        return self.map(Tensor.detach)

    def copy_(self, other):
        """Writes `other`'s tensors into this state's own (without autograd history); returns self. The PyTorch
        steps' `inplace=True`."""
        with torch.no_grad():
            for f in fields(self):
                getattr(self, f.name).copy_(getattr(other, f.name))
        return self

    def check_in_place(self, dtype: torch.dtype) -> None:
        """Raises ValueError unless a step may write this state in place (`inplace=True`): every float tensor
        `dtype`, every tensor contiguous (an expanded one would write one element for many) and not requiring
        grad."""
        for f in fields(self):
            t = getattr(self, f.name)
            want = torch.long if f.name == "offset" else dtype
            if t.dtype != want or not t.is_contiguous() or t.requires_grad:
                raise ValueError(
                    f"inplace=True writes state.{f.name} in place: it must be a contiguous {want} tensor that does "
                    f"not require grad, got a {'' if t.is_contiguous() else 'non-contiguous '}{t.dtype} tensor"
                    f"{' requiring grad' if t.requires_grad else ''}"
                )


@dataclass
class TTTLinearState(_TensorState):
    """TTT-Linear's inner model at a point inside its mini-batch schedule.

    W [N,H,D,D], b [N,H,D]: inner weights at the start of the unfinished mini-batch.
    grad_W [N,H,D,D], grad_b [N,H,D]: sum of eta_j * grad l_j(W, b) over the tokens of that mini-batch seen so far.
    offset [N] int64: how many tokens of that mini-batch were seen, 0 <= offset < mini_batch_size.
    """

    W: Tensor
    b: Tensor
    grad_W: Tensor
    grad_b: Tensor
    offset: Tensor

    @classmethod
    def start(cls, W: Tensor, b: Tensor) -> TTTLinearState:
        """The state at a mini-batch boundary with inner weights W [N,H,D,D], b [N,H,D]."""
        offset = torch.zeros(W.shape[0], dtype=torch.long, device=W.device)
        return cls(W, b, torch.zeros_like(W), torch.zeros_like(b), offset)

    @property
    def params(self) -> tuple[Tensor, ...]:
        return (self.W, self.b)

    @property
    def grads(self) -> tuple[Tensor, ...]:
        return (self.grad_W, self.grad_b)


@dataclass
class TTTMLPState(_TensorState):
    """TTT-MLP's inner model at a point inside its mini-batch schedule.

    W1 [N,H,D,4D], b1 [N,H,4D], W2 [N,H,4D,D], b2 [N,H,D]: inner weights at the start of the unfinished mini-batch.
    grad_* (same shapes): sum of eta_j * grad l_j over the tokens of that mini-batch seen so far.
    offset [N] int64: how many tokens of that mini-batch were seen, 0 <= offset < mini_batch_size.
    """

    W1: Tensor
    b1: Tensor
    W2: Tensor
    b2: Tensor
    grad_W1: Tensor
    grad_b1: Tensor
    grad_W2: Tensor
    grad_b2: Tensor
    offset: Tensor

    @classmethod
    def start(cls, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor) -> TTTMLPState:
        """The state at a mini-batch boundary with inner weights W1 [N,H,D,4D], b1 [N,H,4D], W2 [N,H,4D,D],
        b2 [N,H,D]."""
        offset = torch.zeros(W1.shape[0], dtype=torch.long, device=W1.device)
        zeros = [torch.zeros_like(t) for t in (W1, b1, W2, b2)]
        return cls(W1, b1, W2, b2, *zeros, offset)

    @property
    def params(self) -> tuple[Tensor, ...]:
        return (self.W1, self.b1, self.W2, self.b2)

    @property
    def grads(self) -> tuple[Tensor, ...]:
        return (self.grad_W1, self.grad_b1, self.grad_W2, self.grad_b2)


@dataclass
class MesaState(_TensorState):
    """Mesa's running statistics: h_kk [N,H,D,D], the decayed sum of beta k k^T, and h_kv [N,H,D,Dv], the decayed
    sum of beta k v^T."""

    h_kk: Tensor
    h_kv: Tensor

    @classmethod
    def start(cls, h_kk: Tensor, h_kv: Tensor) -> MesaState:
        return cls(h_kk, h_kv)
