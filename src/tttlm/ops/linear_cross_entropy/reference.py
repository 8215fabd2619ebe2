"""The spec of `linear_cross_entropy`: the full logits, then torch's cross-entropy, in the inputs' dtype."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def linear_cross_entropy_ref(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, reduction: str = "sum", ignore_index: int = -100
) -> Tensor:
    """Arguments and result as `linear_cross_entropy`, in hidden's dtype (the tests use float64)."""
    losses = F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index, reduction="none")
    return losses if reduction == "none" else losses.sum()
