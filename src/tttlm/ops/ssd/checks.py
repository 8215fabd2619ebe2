"""Argument checks and helpers shared by the SSD paths."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, step: bool) -> tuple[int, int, int, int]:
    lead = 1 if step else 2
    want = "[B, H, P]" if step else "[B, T, H, P]"
    if x.dim() != lead + 2:
        raise ValueError(f"x must have shape {want}, got {list(x.shape)}")
    H, P = x.shape[-2:]
    if dt.shape != x.shape[:-1]:
        raise ValueError(f"dt must have shape {list(x.shape[:-1])} (x's without P), got {list(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must have shape [H={H}], got {list(A.shape)}")
    if B.dim() != lead + 2 or B.shape[:lead] != x.shape[:lead] or C.shape != B.shape:
        raise ValueError(
            f"B and C must have shape [{', '.join(map(str, x.shape[:lead]))}, G, N], "
            f"got {list(B.shape)} and {list(C.shape)}"
        )
    G, N = B.shape[-2:]
    if H % G:
        raise ValueError(f"the number of groups G = {G} of B and C must divide the number of heads H = {H}")
    return H, P, G, N


def check_state(state: Tensor | None, rows: int, H: int, P: int, N: int, name: str) -> None:
    if state is not None and state.shape != (rows, H, P, N):
        raise ValueError(f"{name} must have shape [{rows}, {H}, {P}, {N}], got {list(state.shape)}")


def heads(t: Tensor, H: int) -> Tensor:
    """[..., G, N] -> [..., H, N], each group shared by H / G consecutive heads."""
    return t.repeat_interleave(H // t.shape[-2], dim=-2)
