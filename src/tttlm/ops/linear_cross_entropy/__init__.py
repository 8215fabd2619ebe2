"""The language-model loss fused with its output projection: cross-entropy of hidden @ weight^T, computed
without the float32 logits of the whole batch.

`linear_cross_entropy` runs Triton kernels on CUDA (`triton_ce`); `reference.linear_cross_entropy_ref` is the
spec. The model's loss on the CPU keeps its own chunked PyTorch path (`modeling.chunked_cross_entropy`).
"""

from __future__ import annotations

from torch import Tensor

from tttlm.ops.backend import kernel_device
from tttlm.ops.linear_cross_entropy.reference import linear_cross_entropy_ref

REDUCTIONS = ("sum", "none")


def supports(hidden: Tensor) -> bool:
    """Whether the kernels run for tensors on hidden's device (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    return kernel_device(hidden)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, reduction: str = "sum", ignore_index: int = -100
) -> Tensor:
    """Cross-entropy of the logits hidden @ weight^T against targets.

    Args:
        hidden: [M, C] float; weight: [V, C] float (the output projection / tied embedding).
        targets: [M] int64, each in [0, V) or ignore_index (no loss, no gradient). Values are not checked on the
            GPU (that would make the host wait for it): a target outside [0, V) gives an undefined loss.
        reduction: "sum": the float32 scalar sum of the losses, differentiable w.r.t. hidden and weight (their
            gradients are computed in this forward pass, with the logits at hand, and scaled in the backward);
            "none": the float32 losses [M] (0 where ignored), without gradients.

    Under autocast the logits are computed in its dtype (as nn.Linear would), else in hidden's; at most about
    1 GiB of them exists at a time, and the log-sum-exp and the softmax are taken in float32.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [M, C], got {list(hidden.shape)}")
    M, C = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != C:
        raise ValueError(f"weight must have shape [V, C={C}], got {list(weight.shape)}")
    if targets.shape != (M,) or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be an int64 tensor of shape [M={M}], got {targets.dtype} {list(targets.shape)}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, "
                         f"{targets.device}")
    if not supports(hidden):
        raise ValueError(f"linear_cross_entropy runs on CUDA (or under TRITON_INTERPRET=1), got {hidden.device}; "
                         "linear_cross_entropy_ref is the PyTorch spec")
    from tttlm.ops.linear_cross_entropy.triton_ce import linear_cross_entropy_triton

    return linear_cross_entropy_triton(hidden, weight, targets, reduction=reduction, ignore_index=ignore_index)


__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref", "supports"]
