"""Learning-rate schedules as a multiplier of each group's base_lr.

`step` is the 0-based index of the optimizer update about to be taken (0 .. total_steps-1). Every
phase is measured as "fraction of its steps done once this update is taken", so:

* warm-up: linear, (step+1)/warmup_steps — the first update is not wasted at lr 0 and the last
  warm-up update is at exactly 1;
* "constant": 1 after warm-up;
* "cosine": half a cosine from 1 down to min_lr_ratio, reached at the last update (total_steps-1);
* "wsd" (warmup-stable-decay): 1 until the last `decay_fraction` of the run, then decays to
  min_lr_ratio at the last update with the "1-sqrt" shape, 1 - sqrt(progress), which Hägele et al.
  (2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations") found to beat
  linear and cosine cool-downs. The decay never starts before warm-up ends.

Steps past the end keep the final value.
"""

from __future__ import annotations

import math

import torch

from levante.config import ScheduleConfig
from levante.errors import LevanteError


def _progress(step: int, start: int, total_steps: int) -> float:
    """Fraction of the phase [start, total_steps) completed after update `step`, in [0, 1]."""
    length = total_steps - start
    if length <= 0:
        return 0.0
    return min(1.0, max(0.0, (step + 1 - start) / length))


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The lr multiplier for 0-based update `step` of a `total_steps` run (see the module docstring)."""
    if cfg.name not in ("wsd", "cosine", "constant"):
        raise LevanteError(f"schedule.name must be 'wsd', 'cosine' or 'constant', got '{cfg.name}'")
    if total_steps <= 0:
        raise LevanteError(f"schedule: total_steps must be positive, got {total_steps}")
    if cfg.warmup_steps < 0:
        raise LevanteError(f"schedule.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.decay_fraction <= 1:
        raise LevanteError(f"schedule.decay_fraction must be in [0, 1], got {cfg.decay_fraction}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise LevanteError(f"schedule.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    warmup = min(cfg.warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        t = _progress(step, warmup, total_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    # "wsd"
    decay_steps = round(cfg.decay_fraction * total_steps)
    start = max(warmup, total_steps - decay_steps)
    if step < start:
        return 1.0
    t = _progress(step, start, total_steps)
    return floor + (1 - floor) * (1 - math.sqrt(t))


def apply_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Set every group's lr to base_lr * multiplier (a group without base_lr adopts its current lr)."""
    for group in optimizer.param_groups:
        base = group.setdefault("base_lr", group["lr"])
        group["lr"] = base * multiplier
