"""The optimizer (SGD with weight decay grouped by module type), gradient clipping and the lr setter."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def param_groups(model: nn.Module, *, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Two groups by module type: weights of conv/linear layers decay; norm layers and biases do not."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, norm_types) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, nesterov: bool, weight_decay: float,
                   decay_norm_and_bias: bool) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay=weight_decay, decay_norm_and_bias=decay_norm_and_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def make_clipper(max_norm: float | None, scaler: torch.amp.GradScaler, optimizer) -> Callable[[nn.Module], None]:
    """What the step calls before the update: clip the gradients' global norm to `max_norm` (optim.grad_clip),
    unscaled first; None: nothing."""
    if max_norm is None:
        return lambda model: None
    if max_norm <= 0:
        raise ValueError(f"max_norm: expected a norm > 0 or None, got {max_norm}")  # the recipe refuses it first

    def clip(model: nn.Module) -> None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return clip


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
