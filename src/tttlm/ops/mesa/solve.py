"""Batched conjugate gradient for Mesa's linear systems, differentiated implicitly.

Every system is (H + diag(lamb)) x = b, H symmetric positive semi-definite and lamb > 0, H given only through
a matrix-free product `apply(x, *params) = H x`. Vectors lie in the last dimension; all leading dimensions are
independent systems solved in parallel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Apply = Callable[..., Tensor]


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (a residual of exactly zero has converged: nothing is left to do)."""
    return torch.where(den != 0, num / den, 0.0)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor, max_iter: int, tol: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve A x = b for a symmetric positive definite A, every system of the batch at once.

    b, x0 [..., D]. Each system stops at the first step where ||r|| <= tol * ||r_0|| (r as CG's recurrence
    updates it) and stays as it is from there; a system whose start is exact (r_0 = 0) takes no step. The loop
    runs `max_iter` steps, or fewer once every system has stopped. Returns x [..., D], the steps each system
    took [...] (int64) and ||r_0||^2 [...].
    """
    x = x0
    r = b - matvec(x)
    p = r
    rr = torch.linalg.vecdot(r, r)
    rr0 = rr
    tol2 = -1.0 if tol is None else tol * tol
    active = rr > tol2 * rr0
    steps = torch.zeros(rr.shape, dtype=torch.long, device=rr.device)
    for _ in range(max_iter):
        # One host sync per step, only when an early stop was asked for.
        if tol is not None and not bool(active.any()):
            break
        ap = matvec(p)
        alpha = torch.where(active, _safe_div(rr, torch.linalg.vecdot(p, ap)), 0.0).unsqueeze(-1)
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, ap, value=-1)
        rr_next = torch.linalg.vecdot(r, r)
        p = torch.where(active.unsqueeze(-1), torch.addcmul(r, _safe_div(rr_next, rr).unsqueeze(-1), p), 0.0)
        rr = rr_next
        steps += active
        active = active & (rr > tol2 * rr0)
    return x, steps, rr0


class _ImplicitSolve(torch.autograd.Function):
    """x = (H(params) + diag(lamb))^-1 b by CG; the backward solves once more with the same matrix.

    With A = H + diag(lamb) symmetric and y = A^-1 dx: db = y, dlamb = -sum y * x, and the gradient of the
    params is that of -y^T H(params) x with x, y held fixed (implicit function theorem), so no CG step is
    ever backpropagated through.
    """

    @staticmethod
    def forward(ctx, apply, max_iter, tol, stats, b, diag, lamb, *params):
        def matvec(x):
            return torch.addcmul(apply(x, *params), lamb, x)

        x, steps, rr0 = conjugate_gradient(matvec, b, b / diag, max_iter, tol)
        if stats is not None:
            # The true residual: in low precision CG's recurrence for r drifts far below it.
            r = b - matvec(x)
            stats["iterations"] = int(steps.max()) if steps.numel() else 0
            stats["steps"] = steps
            stats["residual"] = _safe_div(torch.linalg.vecdot(r, r), rr0).sqrt()
        ctx.apply_h, ctx.max_iter, ctx.tol = apply, max_iter, tol
        ctx.save_for_backward(x, diag, lamb, *params)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, dx):
        x, diag, lamb, *params = ctx.saved_tensors
        x = x.detach()

        def matvec(z):
            return torch.addcmul(ctx.apply_h(z, *params), lamb, z)

        need = ctx.needs_input_grad[7:]
        grads: list[Tensor | None] = [None] * len(params)
        with torch.autocast(x.device.type, enabled=False):
            y, _, _ = conjugate_gradient(matvec, dx, dx / diag, ctx.max_iter, ctx.tol)
        if any(need):
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need, strict=True)]
                surrogate = -(y * ctx.apply_h(x, *leaves)).sum()
                wanted = [leaf for leaf, n in zip(leaves, need, strict=True) if n]
                found = iter(torch.autograd.grad(surrogate, wanted, allow_unused=True))
            grads = [next(found) if n else None for n in need]
        dlamb = (-(y * x)).sum_to_size(lamb.shape) if ctx.needs_input_grad[6] else None
        return (None, None, None, None, y, None, dlamb, *grads)


def implicit_solve(
    apply: Apply,
    b: Tensor,
    diag: Tensor,
    lamb: Tensor,
    params: tuple[Tensor, ...],
    max_iter: int,
    tol: float | None,
    stats: dict | None = None,
) -> Tensor:
    """x [..., D] solving (H + diag(lamb)) x = b by CG from the Jacobi guess b / diag.

    apply(x, *params) = H x, linear in x, H symmetric. b [..., D]; diag [..., D] = diag(H) + lamb (only the
    starting guess uses it; no gradient flows through it); lamb broadcastable to b. Differentiable in b, lamb
    and params. `stats`, if given, receives the forward solve's "iterations" (int, the most steps a system
    took), "steps" ([...], each system's steps) and "residual" ([...], ||b - A x|| / ||b - A x0||, 0 where the
    start was exact).
    """
    return _ImplicitSolve.apply(apply, max_iter, tol, stats, b, diag.detach(), lamb, *params)
