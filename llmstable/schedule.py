"""Learning-rate schedules as pure functions of the step: lr_at(step) = optimizer.lr * lr_factor(step, ...).

Steps count optimizer updates from 0. Every schedule starts with a linear warmup from lr/warmup_steps to lr;
with `warmup_fraction` set, the warm-up is that share of the run's steps (rounded), so a shorter run of a study
has the same schedule shape.
- cosine: half a cosine from lr down to min_lr_ratio * lr at the last step (the SPAM/GaLore recipe: floor 10%).
- linear: a straight line from lr down to min_lr_ratio * lr.
- constant: lr after warmup.
- wsd: warmup, stable at lr, then a linear decay to min_lr_ratio * lr over the last decay_fraction of the steps
  (Hu et al. 2024, MiniCPM, arXiv 2404.06395).
"""

from __future__ import annotations

import math

from llmstable.config import ScheduleConfig


def warmup_steps(total_steps: int, cfg: ScheduleConfig) -> int:
    """The warm-up's length in steps: warmup_fraction of the run when set, else warmup_steps."""
    if cfg.warmup_fraction is not None:
        return round(cfg.warmup_fraction * total_steps)
    return cfg.warmup_steps


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The multiplier on the peak learning rate at optimizer step `step` (0-based) of `total_steps`."""
    warmup = warmup_steps(total_steps, cfg)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - 1 - decay_start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    if cfg.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.name={cfg.name!r} is not one of: cosine, linear, constant, wsd")
