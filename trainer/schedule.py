"""The LR schedule: linear warmup, then constant, cosine or linear decay to min_lr_ratio of the base LR.
(emopulse: the LR is set from the loss by trainer/optim's EmoPulse, not here.)"""

import math

from .config import TrainConfig

__all__ = ["apply_lr_schedule", "lr_factor"]


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler in ("constant", "emopulse"):
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_scheduler == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def apply_lr_schedule(cfg: TrainConfig, optimizer, base_lrs, step: int) -> None:
    """Set every param group's LR for optimizer step `step`."""
    if cfg.lr_scheduler == "emopulse" or (cfg.lr_scheduler == "constant" and not cfg.warmup_steps):
        return  # leave group['lr'] alone: some optimizers manage it themselves
    f = lr_factor(cfg, step)
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * f
