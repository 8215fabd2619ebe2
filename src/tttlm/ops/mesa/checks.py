"""Argument checks and dtype rules shared by `mesa` and `mesa_step`; a failed check is a ValueError naming the
argument."""

from __future__ import annotations

import torch
from torch import Tensor

from tttlm.ops.state import MesaState

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t, shape: tuple, dims: str, device: torch.device) -> None:
    """shape: expected sizes, None where any size will do; dims names them, e.g. "[B,T,H,D]"."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor {dims}, got {type(t).__name__}")
    if t.dim() != len(shape):
        raise ValueError(f"{name} must have rank {len(shape)} {dims}, got shape {tuple(t.shape)}")
    if any(want is not None and got != want for got, want in zip(t.shape, shape, strict=True)):
        expected = ",".join("*" if w is None else str(w) for w in shape)
        raise ValueError(f"{name} must have shape {dims} = [{expected}], got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def check_inputs(q, k, v, g, beta, lamb, *, token_dim: bool) -> None:
    """Sequences (token_dim): q, k [B,T,H,D], v [B,T,H,Dv], g, beta [B,T,H]; one token: the same without T.

    On CUDA only shapes, dtypes and devices are checked: the value checks (g <= 0, lamb > 0) would make the host
    wait for the GPU in every layer of every training step and at every decoded token.
    """
    lead = "B,T,H" if token_dim else "B,H"
    if not isinstance(q, Tensor) or q.dim() != (4 if token_dim else 3):
        got = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"q must have shape [{lead},D], got {got}")
    *batch, D = q.shape
    H = batch[-1]
    _tensor("q", q, (*batch, D), f"[{lead},D]", q.device)
    _tensor("k", k, (*batch, D), f"[{lead},D] like q", q.device)
    _tensor("v", v, (*batch, None), f"[{lead},Dv]", q.device)
    _tensor("g", g, tuple(batch), f"[{lead}]", q.device)
    _tensor("beta", beta, tuple(batch), f"[{lead}]", q.device)
    _tensor("lamb", lamb, (H, D), "[H,D]", q.device)
    if token_dim and q.shape[1] == 0:
        raise ValueError("q must hold at least one token (T >= 1)")
    if q.is_cuda:
        return
    if bool((g > 0).any()):
        raise ValueError("g is the log forget gate and must be <= 0 everywhere")
    if bool((lamb <= 0).any()):
        raise ValueError("lamb must be > 0 everywhere")


def io_dtypes(q: Tensor, k: Tensor, v: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, state and compute dtype).

    The output takes the promoted dtype of q, k, v (under autocast they may differ); states and reductions are
    float64 if that is float64, else float32.
    """
    out = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return out, (torch.float64 if out == torch.float64 else torch.float32)


def check_solver(cg_max_iter, cg_tol) -> None:
    if isinstance(cg_max_iter, bool) or not isinstance(cg_max_iter, int) or cg_max_iter < 1:
        raise ValueError(f"cg_max_iter must be an int >= 1, got {cg_max_iter!r}")
    if cg_tol is not None and not (isinstance(cg_tol, (int, float)) and cg_tol >= 0):
        raise ValueError(f"cg_tol must be None or a number >= 0, got {cg_tol!r}")


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> None:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int64 tensor [N+1] with N >= 1")
    if cu_seqlens.dtype != torch.int64:
        raise ValueError(f"cu_seqlens must be int64, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"a packed batch (cu_seqlens) needs B == 1, got B = {B}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ValueError("cu_seqlens must be strictly increasing")
    if bounds[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {bounds[-1]}")


def check_state(state, N: int, H: int, D: int, Dv: int, device: torch.device) -> None:
    """state: None or a MesaState with h_kk [N,H,D,D], h_kv [N,H,D,Dv]."""
    if state is None:
        return
    if not isinstance(state, MesaState):
        raise ValueError(f"state must be a MesaState or None, got {type(state).__name__}")
    _tensor("state.h_kk", state.h_kk, (N, H, D, D), "[N,H,D,D]", device)
    _tensor("state.h_kv", state.h_kv, (N, H, D, Dv), "[N,H,D,Dv]", device)
