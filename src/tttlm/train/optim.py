"""AdamW with the usual exclusions from weight decay, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from tttlm.train.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything the model names in `no_weight_decay_names()` (norms,
    biases, the TTT inner loop's initial weights, Mesa's lambda; every vector when the model has no such
    method). decay_all: every parameter in the decayed group (the TTT authors' set), the other one empty."""
    named = dict(model.named_parameters())
    if decay_all:
        skip = set()
    elif hasattr(model, "no_weight_decay_names"):
        skip = set(model.no_weight_decay_names())
    else:
        skip = {n for n, p in named.items() if p.dim() < 2}
    decay = [p for n, p in named.items() if p.requires_grad and n not in skip]
    no_decay = [p for n, p in named.items() if p.requires_grad and n in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up over warmup_steps, then a cosine
    from 1 to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_progress(step: int, cfg: TrainConfig) -> float:
    """How far the outer warm-up is, in [0, 1] (drives TTT-MLP's inner learning-rate warm-up)."""
    return 1.0 if cfg.warmup_steps == 0 else min(1.0, (step + 1) / cfg.warmup_steps)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False):
    """AdamW (betas cfg.beta1/beta2) over param_groups and its LambdaLR schedule."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_all)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, sched
