"""An exponential moving average of the student's weights (run.ema = DECAY).

After every optimizer update each floating-point parameter and buffer of the copy moves towards the
student's: ema = decay * ema + (1 - decay) * weight (one fused lerp over all of them, on the student's
device). BatchNorm running statistics are averaged the same way; integer buffers (BN's batch counter) are
copied. Under DDP every rank holds the same weights after an update, so every rank's average is the same.
The round evaluates the copy beside the raw weights each epoch, saves it in last.pt (resume) and as
ema.pt (the weights layout: what `refinery.use = "ema"` hands the next round).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEma:
    def __init__(self, model: nn.Module, *, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._pair(model)

    def _pair(self, model: nn.Module) -> None:
        """The (average, weight) tensor pairs, found once: state_dict tensors share the modules' storage."""
        mine, theirs = self.module.state_dict(), model.state_dict()
        if mine.keys() != theirs.keys():
            raise ValueError("the EMA copy and the model have different state dict keys")
        floats = [k for k in mine if mine[k].is_floating_point()]
        self._avg = [mine[k] for k in floats]
        self._cur = [theirs[k] for k in floats]
        self._copy = [(mine[k], theirs[k]) for k in mine if not mine[k].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the model's current weights (call after each optimizer update)."""
        torch._foreach_lerp_(self._avg, self._cur, 1.0 - self.decay)
        for dst, src in self._copy:
            dst.copy_(src)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)  # copies in place: the pairs stay valid
