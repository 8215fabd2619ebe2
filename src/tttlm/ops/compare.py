"""How the tests and the GPU checks measure a result against its float64 reference."""

from __future__ import annotations

import torch
from torch import Tensor


def rel_rmse(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 on the CPU (x and ref of one shape, any dtype and device)."""
    x, ref = x.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def differing(got: dict[str, Tensor], want: dict[str, Tensor], exact: bool) -> list[str]:
    """Names of the tensors of `got` that differ from those of `want` (e.g. an in-place decode step's against the
    out-of-place one's): exact, in any element; else (the same arithmetic in two kernels compiled apart) by a
    relative RMSE over 1e-6, or over 4e-3 (about one rounding) in a 16-bit dtype."""
    def close(g: Tensor, w: Tensor) -> bool:
        if exact:
            return torch.equal(g, w)
        return rel_rmse(g, w) <= (4e-3 if g.dtype in (torch.float16, torch.bfloat16) else 1e-6)

    return [name for name, g in got.items() if not close(g, want[name])]
