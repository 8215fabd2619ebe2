"""Argument checks shared by `selective_scan` and `selective_scan_step`; a failed check is a ValueError naming
the argument and the shape or value it needs."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t, shape: tuple, dims: str, device: torch.device) -> None:
    """shape: expected sizes, None where any size will do; dims names them, e.g. "[B,T,E]"."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor {dims}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(w is not None and g != w for g, w in zip(t.shape, shape, strict=False)):
        expected = ",".join("*" if w is None else str(w) for w in shape)
        raise ValueError(f"{name} must have shape {dims} = [{expected}], got {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like u, got {t.device}")


def check_inputs(u, delta, A, B, C, D, delta_bias, *, token_dim: bool) -> tuple[int, int]:
    """Sequences (token_dim): u, delta [B,T,E], B, C [B,T,N]; one token: the same without T. A [E,N], D and
    delta_bias [E] or None. Returns (E, N)."""
    lead = "B,T" if token_dim else "B"
    if not isinstance(u, Tensor) or u.dim() != (3 if token_dim else 2):
        got = list(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"u must have shape [{lead},E], got {got}")
    batch, E = tuple(u.shape[:-1]), u.shape[-1]
    _tensor("u", u, (*batch, E), f"[{lead},E]", u.device)
    _tensor("delta", delta, (*batch, E), f"[{lead},E] like u", u.device)
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"A must have shape [E,N] = [{E},N], got {list(A.shape) if isinstance(A, Tensor) else A}")
    N = A.shape[1]
    _tensor("A", A, (E, N), "[E,N]", u.device)
    _tensor("B", B, (*batch, N), f"[{lead},N]", u.device)
    _tensor("C", C, (*batch, N), f"[{lead},N]", u.device)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _tensor(name, t, (E,), "[E]", u.device)
    if token_dim and u.shape[1] == 0:
        raise ValueError("u must hold at least one token (T >= 1)")
    return E, N


def check_cu_seqlens(cu_seqlens: Tensor | None, B: int, T: int) -> int:
    """The number of sequences: B, or N for cu_seqlens [N+1] packing N sequences into one row (B == 1)."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be an int64 tensor [N+1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int64, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"with cu_seqlens, u must be one packed row (B == 1), got B = {B}")
    if not cu_seqlens.is_cuda:  # on the GPU, reading them would make the host wait in every layer of every step
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at T = {T}, got {bounds}")
    return cu_seqlens.numel() - 1


def check_state(name: str, state: Tensor | None, rows: int, E: int, N: int, device: torch.device) -> None:
    if state is not None:
        _tensor(name, state, (rows, E, N), f"[{rows},E,N] (one row per sequence)", device)
