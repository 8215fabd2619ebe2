"""Mesa for one token (decoding): update the explicit states H, G, then solve by CG like the chunked path."""

from __future__ import annotations

from torch import Tensor

from tttlm.ops.mesa.checks import io_dtypes
from tttlm.ops.mesa.solve import implicit_solve
from tttlm.ops.state import MesaState


def _apply_dense(x: Tensor, h: Tensor) -> Tensor:
    """H x for x [B,H,D], H [B,H,D,D] symmetric (written x^T H, as the chunked path does)."""
    return (x.unsqueeze(-2) @ h).squeeze(-2)


def mesa_step_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    state: MesaState | None,
    *,
    cg_max_iter: int,
    cg_tol: float | None,
    cg_stats: dict | None = None,
    inplace: bool = False,
) -> tuple[Tensor, MesaState]:
    """One token on validated inputs; see `tttlm.ops.mesa.mesa_step` for the contract."""
    out_dtype, dt = io_dtypes(q, k, v)
    B, H, D = q.shape
    q, k, v, g, beta, lamb = (t.to(dt) for t in (q, k, v, g, beta, lamb))
    if state is None:
        h_kk = q.new_zeros(B, H, D, D)
        h_kv = q.new_zeros(B, H, D, v.shape[-1])
    else:
        h_kk = state.h_kk.to(dt)
        h_kk = (h_kk + h_kk.mT) / 2
        h_kv = state.h_kv.to(dt)
    decay = g.exp()[..., None, None]
    scaled_k = (beta.unsqueeze(-1) * k).unsqueeze(-1)
    h_kk = decay * h_kk + scaled_k * k.unsqueeze(-2)
    h_kv = decay * h_kv + scaled_k * v.unsqueeze(-2)
    diag = h_kk.diagonal(dim1=-2, dim2=-1) + lamb
    x = implicit_solve(_apply_dense, q, diag, lamb, (h_kk,), cg_max_iter, cg_tol, cg_stats)
    if cg_stats is not None:
        cg_stats["mean_iterations"] = cg_stats.pop("steps").float().mean().item()
    o = (x.unsqueeze(-2) @ h_kv).squeeze(-2)
    new = MesaState(h_kk, h_kv)
    return o.to(out_dtype), state.copy_(new) if inplace else new
