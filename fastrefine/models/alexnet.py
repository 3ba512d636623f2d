"""AlexNet: torchvision's, and the BatchNorm variant that Label Refinery trained.

The Label Refinery paper's AlexNet puts BatchNorm after every convolution (convs without bias):
64-11/4, 192-5, 384-3, 256-3, 256-3, three 3x3/2 max-pools, then a 6x6 adaptive average pool and
a classifier of dropout + Linear 4096 + BatchNorm1d + ReLU, twice, and a final Linear.

Both need inputs of at least 63x63 pixels: the three unpadded 3x3/2 max-pools after an 11x11/4
conv leave nothing to pool below that (at 32 px the last pool sees a 1x1 map).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights
from torchvision.models import AlexNet

MIN_INPUT_SIZE = 63


def _conv_bn_relu(
    *, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _linear_bn_relu(*, in_features: int, out_features: int, dropout: float) -> list[nn.Module]:
    return [
        nn.Dropout(p=dropout),
        nn.Linear(in_features, out_features, bias=False),
        nn.BatchNorm1d(out_features),
        nn.ReLU(inplace=True),
    ]


class AlexNetBN(nn.Module):
    def __init__(self, *, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels=3, out_channels=64, kernel_size=11, stride=4, padding=2),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv_bn_relu(in_channels=64, out_channels=192, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv_bn_relu(in_channels=192, out_channels=384, kernel_size=3, stride=1, padding=1),
            *_conv_bn_relu(in_channels=384, out_channels=256, kernel_size=3, stride=1, padding=1),
            *_conv_bn_relu(in_channels=256, out_channels=256, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            *_linear_bn_relu(in_features=256 * 6 * 6, out_features=4096, dropout=dropout),
            *_linear_bn_relu(in_features=4096, out_features=4096, dropout=dropout),
            nn.Linear(4096, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet(*, num_classes: int, dropout: float = 0.5) -> AlexNet:
    """torchvision's AlexNet (no BatchNorm), untrained."""
    return AlexNet(num_classes=num_classes, dropout=dropout)


def alexnet_bn(*, num_classes: int, dropout: float = 0.5) -> AlexNetBN:
    """AlexNet with BatchNorm after every conv and hidden linear layer, as Label Refinery trained it."""
    return AlexNetBN(num_classes=num_classes, dropout=dropout)
