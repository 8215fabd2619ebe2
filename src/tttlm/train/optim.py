"""AdamW with the usual exclusions from weight decay, and the learning-rate schedules: linear warm-up, then a
cosine decay or warmup-stable-decay (WSD; Hu et al. 2024, MiniCPM, arXiv 2404.06395)."""

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
    """Multiplier of cfg.lr at optimizer step `step` (0-based): a linear warm-up to 1 at step warmup_steps - 1,
    then (schedule "cosine") a cosine from 1 at step warmup_steps to min_lr_ratio at step `steps` (one past the
    last step, which runs just above the floor) and min_lr_ratio from there on, or ("wsd") `_wsd`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        return _wsd(step, cfg)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(step: int, cfg: TrainConfig) -> float:
    """After the warm-up: 1 until the last round(decay_fraction x steps) steps (never into the warm-up), then a
    straight line to min_lr_ratio at step `steps`."""
    decay = min(cfg.steps - cfg.warmup_steps, round(cfg.decay_fraction * cfg.steps))
    start = cfg.steps - decay
    if step < start or decay <= 0:
        return 1.0
    return 1 - (1 - cfg.min_lr_ratio) * min(1.0, (step - start) / decay)


def warmup_progress(step: int, cfg: TrainConfig) -> float:
    """How far the outer warm-up is, in [0, 1] (drives TTT-MLP's inner learning-rate warm-up)."""
    return 1.0 if cfg.warmup_steps == 0 else min(1.0, (step + 1) / cfg.warmup_steps)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """Fused AdamW (betas cfg.beta1/beta2) over param_groups, and its LambdaLR schedule. Fused on every device:
    it is the form of AdamW that can skip a step on a flag held on the device (`SkipNonFinite`)."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_all)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, sched


class SkipNonFinite:
    """Skips the optimizer step of any step whose loss or gradient norm is not finite, without a host
    synchronisation: the flag is computed on the device and given to fused AdamW as `found_inf` (as torch.amp's
    GradScaler does), which then leaves the parameters and its own state (moments, step count) as they were.
    The schedule still advances: a skipped step counts as a step whose batch taught nothing.

    The counts stay on the device, int64 [3]: skipped steps in all, the run of skipped steps ending at the last
    step, and the longest such run since the last `read` (so that a check every few steps misses none).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, skipped: int = 0, streak: int = 0):
        self.optimizer = optimizer
        self.counts = torch.tensor([skipped, streak, streak], dtype=torch.int64, device=device)

    def before_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Call between clipping and optimizer.step(); loss and grad_norm: scalar tensors, the same on every
        process."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = bad.float()
        skipped, streak, longest = self.counts.unbind()
        streak = (streak + 1) * bad
        self.counts = torch.stack([skipped + bad, streak, torch.maximum(longest, streak)])

    def read(self) -> tuple[int, int, int]:
        """(skipped in all, the current run, the longest run since the last read): a host synchronisation."""
        skipped, streak, longest = self.counts.tolist()
        self.counts[2] = self.counts[1]
        return skipped, streak, longest
