"""Loss by token position (the TTT paper's long-context figure, Sun et al. 2024 Fig. 2/11; MesaNet's
position-wise loss, von Oswald et al. 2025 §5) and the context-length ladder (perplexity at each evaluation
length).

Position p (1-based) is the loss of predicting token p+1 of a document after reading its first p tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def token_losses(model, ids: Tensor, batch_size: int = 1) -> Tensor:
    """Next-token losses of every document row read from its start.

    ids int64 [N, T] (T >= 2), on any device (moved to the model's). Returns float32 [N, T-1] on the CPU:
    entry [n, p-1] is the loss at position p.
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must have shape [N, T] with T >= 2, got {list(ids.shape)}")
    device = next(model.parameters()).device
    out = []
    for s in range(0, ids.shape[0], batch_size):
        chunk = ids[s : s + batch_size].to(device)
        loss = model(input_ids=chunk, labels=chunk, loss_reduction="none").loss  # [b, T], 0 at the last slot
        out.append(loss[:, :-1].float().cpu())
    return torch.cat(out)


def log_bins(n: int, per_decade: int = 12) -> list[tuple[int, int]]:
    """Half-open position ranges [a, b) covering 1..n, geometrically growing (one position each at first)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    count = max(1, math.ceil(math.log10(n + 1) * per_decade))
    edges = sorted({round(10 ** (i * math.log10(n + 1) / count)) for i in range(count + 1)} | {1, n + 1})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def position_curve(losses: Tensor, per_decade: int = 12) -> dict:
    """Mean loss per position of losses [N, P] (position p in column p-1), averaged in log-spaced bins.

    Returns {"position": geometric bin centres, "loss": mean loss per bin, "bins": [[a, b), ...],
    "mean": mean over all positions, "last_decile": mean over the last tenth of the positions, "num_docs": N}.
    """
    mean = losses.double().mean(0)  # [P]
    P = mean.numel()
    bins = log_bins(P, per_decade)
    return {
        "position": [math.sqrt(a * (b - 1)) for a, b in bins],
        "loss": [float(mean[a - 1 : b - 1].mean()) for a, b in bins],
        "bins": [[a, b] for a, b in bins],
        "mean": float(mean.mean()),
        "last_decile": float(mean[P - max(1, P // 10) :].mean()),
        "num_docs": losses.shape[0],
    }


def ladder(model, ids: Tensor, lengths: list[int], batch_size: int = 1) -> dict:
    """Perplexity of the first L tokens of every row of ids [N, T] for each L in lengths (each L <= T, read as
    a separate call from the document start). Returns {L: {"loss", "perplexity", "tokens"}}."""
    out = {}
    for L in sorted(lengths):
        if not 2 <= L <= ids.shape[1]:
            raise ValueError(f"evaluation length {L} must lie in [2, {ids.shape[1]}] (the documents' length)")
        losses = token_losses(model, ids[:, :L], batch_size)
        loss = float(losses.double().mean())
        out[L] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": losses.numel()}
    return out
