"""Pieces the hand-written models share: weight initialisation and the pooled linear head."""

from __future__ import annotations

import torch
from torch import nn


def init_weights(model: nn.Module, *, leaky_slope: float | None = None) -> None:
    """He-normal (fan_out) convolutions, unit/zero norm layers, N(0, 0.01) linear layers, zero biases.

    `leaky_slope` sets the gain for LeakyReLU networks (Darknet's 0.1); None means ReLU.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if leaky_slope is None:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", a=leaky_slope, nonlinearity="leaky_relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class PooledClassifier(nn.Module):
    """features -> global average pool -> linear classifier. Subclasses set `features`, `pool`, `classifier`."""

    features: nn.Module
    pool: nn.Module
    classifier: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
