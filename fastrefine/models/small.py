"""Small networks sized for the CPU demo (Fashion-MNIST at 32-64 px on a few cores).

tiny_cnn: four conv-BN-ReLU blocks (widths w, 2w, 4w, 8w) with a 2x2 max-pool between blocks,
global average pool, linear. About 100 k parameters at the default width 16.

small_resnet: a narrow pre-downsampled ResNet: a 3x3/2 stem, three stages of basic residual blocks
(widths w, 2w, 4w; stages 2 and 3 halve the resolution), global average pool, linear. About
0.6 M parameters at the default width 32 with blocks (1, 1, 2).

tiny_cnn's three 2x2/2 max-pools need inputs of at least 8x8; small_resnet pads every strided conv
and so takes any input size.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import PooledClassifier, init_weights

TINY_CNN_MIN_INPUT_SIZE = 8
SMALL_RESNET_MIN_INPUT_SIZE = 1


def _conv_bn(*, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class TinyCNN(PooledClassifier):
    def __init__(self, *, num_classes: int, width: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        channels = 3
        for index, out_channels in enumerate(widths):
            if index > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            layers += [*_conv_bn(in_channels=channels, out_channels=out_channels), nn.ReLU(inplace=True)]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with a ReLU between, added to the input (projected by a 1x1 conv when the shape changes)."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(in_channels=in_channels, out_channels=out_channels, stride=stride),
            nn.ReLU(inplace=True),
            *_conv_bn(in_channels=out_channels, out_channels=out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                *_conv_bn(in_channels=in_channels, out_channels=out_channels, kernel_size=1, stride=stride)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SmallResNet(PooledClassifier):
    def __init__(self, *, num_classes: int, width: int, blocks: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels=3, out_channels=width, stride=2), nn.ReLU(inplace=True)]
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(in_channels=channels, out_channels=out_channels, stride=stride))
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)


def tiny_cnn(*, num_classes: int, width: int = 16) -> TinyCNN:
    """Four conv-BN-ReLU blocks of widths (w, 2w, 4w, 8w); ~100 k parameters at width 16."""
    return TinyCNN(num_classes=num_classes, width=width)


def small_resnet(*, num_classes: int, width: int = 32, blocks: tuple[int, ...] = (1, 1, 2)) -> SmallResNet:
    """A narrow three-stage ResNet of basic blocks; ~0.6 M parameters at width 32."""
    return SmallResNet(num_classes=num_classes, width=width, blocks=tuple(blocks))
