"""How the tests and the GPU checks measure a result against its float64 reference."""

from __future__ import annotations

import torch
from torch import Tensor


def rel_rmse(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 on the CPU (x and ref of one shape, any dtype and device)."""
    x, ref = x.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()
