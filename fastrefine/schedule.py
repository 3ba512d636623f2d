"""Learning-rate schedules as pure functions of the fractional epoch, applied per iteration."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .recipe import Recipe, ScheduleConfig, lr_scale


@dataclass(frozen=True)
class LrSchedule:
    """A round's learning rate at each fractional epoch: the recipe's schedule around the round's lr as
    the recipe gives it (for optim.reference_batch images), times the batch scaling (`scale`,
    recipe.lr_scale). The scaling is applied here and nowhere else."""
    cfg: ScheduleConfig
    base_lr: float        # the round's lr as written: [[rounds]] lr or [optim].lr
    scale: float          # global batch / reference_batch, or 1 (lr_scaling = "none")
    total_epochs: int

    def __call__(self, epoch: float) -> float:
        return self.scale * lr_at(epoch, cfg=self.cfg, base_lr=self.base_lr, total_epochs=self.total_epochs)

    @property
    def peak(self) -> float:
        """The highest lr of the schedule (a step schedule's largest step), scaled."""
        if self.cfg.kind == "step":
            return self.scale * max(st[2] for st in self.cfg.steps)
        return self.scale * self.base_lr


def round_schedule(recipe: Recipe, index: int, *, world_size: int) -> LrSchedule:
    """Round `index`'s LrSchedule for this many processes."""
    rd = recipe.rounds[index]
    return LrSchedule(cfg=recipe.schedule, base_lr=rd.lr,
                      scale=lr_scale(recipe, world_size=world_size), total_epochs=rd.epochs)


def lr_at(epoch: float, *, cfg: ScheduleConfig, base_lr: float, total_epochs: int) -> float:
    """The learning rate at fractional epoch `epoch` (0 = start of training).

    step:       the paper's regime: [[start_epoch, end_epoch, lr], ...], start inclusive, end exclusive,
                epochs counted from 0; the last entry's lr holds after its end. `base_lr` is not used.
    cosine:     base_lr * (r + (1 - r) * (1 + cos(pi * t / T)) / 2), r = final_lr_ratio.
    triangular: FFCV's: linear from 0 to base_lr at peak_epoch, then linear to r * base_lr at T.
    constant:   base_lr.
    Linear warm-up (warmup_epochs > 0) multiplies any kind but triangular, which warms up by design.
    """
    t = max(0.0, epoch)
    if cfg.kind == "step":
        lr = cfg.steps[-1][2]
        for start, end, value in cfg.steps:
            if start <= t < end:
                lr = value
                break
        else:
            if t < cfg.steps[0][0]:
                lr = cfg.steps[0][2]
    elif cfg.kind == "cosine":
        frac = min(1.0, t / max(total_epochs, 1e-9))
        r = cfg.final_lr_ratio
        lr = base_lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * frac)))
    elif cfg.kind == "triangular":
        peak = min(cfg.peak_epoch, total_epochs)
        if t < peak:
            return base_lr * t / peak
        span = max(total_epochs - peak, 1e-9)
        frac = min(1.0, (t - peak) / span)
        return base_lr * (1 - frac) + base_lr * cfg.final_lr_ratio * frac
    else:
        lr = base_lr
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        lr *= t / cfg.warmup_epochs
    return lr


def resolution_at(epoch: int, *, start: int, end: int, from_epoch: int, to_epoch: int, multiple: int) -> int:
    """Progressive resizing: `start` up to from_epoch, linear to `end` at to_epoch, rounded to `multiple`."""
    if epoch <= from_epoch or to_epoch <= from_epoch:
        res = start if epoch <= from_epoch else end
    elif epoch >= to_epoch:
        res = end
    else:
        res = start + (end - start) * (epoch - from_epoch) / (to_epoch - from_epoch)
    return max(multiple, int(round(res / multiple)) * multiple)
