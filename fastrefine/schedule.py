"""Learning-rate schedules as pure functions of the fractional epoch, applied per iteration."""

from __future__ import annotations

import math

from .recipe import ScheduleConfig


def lr_at(epoch: float, *, cfg: ScheduleConfig, base_lr: float, total_epochs: int, scale: float = 1.0) -> float:
    """The learning rate at fractional epoch `epoch` (0 = start of training).

    step:       the paper's regime: [[start_epoch, end_epoch, lr], ...], start inclusive, end exclusive,
                epochs counted from 0; the last entry's lr holds after its end. `base_lr` is not used;
                the steps' lrs are multiplied by `scale` (the linear batch scaling, recipe.lr_scale).
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
        lr *= scale
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
