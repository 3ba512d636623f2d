"""Darknet-19, the YOLO9000 classifier (Redmon & Farhadi 2017, Table 6).

Eighteen body convolutions (3x3, with 1x1 squeezes between), each without bias and followed by
BatchNorm and LeakyReLU(0.1); five 2x2/2 max-pools; then a 1x1 convolution (with bias) to the
classes, the nineteenth conv layer, and a global average pool.
Total stride 32, so inputs must be at least 32x32 pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights

# The paper's body: an int is a conv's output channels ("3x3" unless marked), "M" a 2x2/2 max-pool.
# 1x1 convs squeeze between the 3x3 ones from the third stage on.
_BODY: tuple[tuple[int, int] | str, ...] = (
    (32, 3), "M",
    (64, 3), "M",
    (128, 3), (64, 1), (128, 3), "M",
    (256, 3), (128, 1), (256, 3), "M",
    (512, 3), (256, 1), (512, 3), (256, 1), (512, 3), "M",
    (1024, 3), (512, 1), (1024, 3), (512, 1), (1024, 3),
)

MIN_INPUT_SIZE = 32


def _conv_bn_leaky(*, in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1, inplace=True),
    )


def _body(*, in_channels: int) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in _BODY:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels, kernel_size = item
        layers.append(_conv_bn_leaky(in_channels=channels, out_channels=out_channels, kernel_size=kernel_size))
        channels = out_channels
    return nn.Sequential(*layers), channels


class Darknet19(nn.Module):
    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.features, channels = _body(in_channels=3)
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        init_weights(self, leaky_slope=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.head(self.features(x))), 1)


def darknet19(*, num_classes: int) -> Darknet19:
    """Darknet-19 at its paper size: 20.8 M parameters and 5.58 G multiply-adds at 224 for 1000 classes."""
    return Darknet19(num_classes=num_classes)
