"""MobileNet v1 (Howard et al. 2017) with the width multiplier.

A 3x3/2 full convolution, then thirteen depthwise-separable blocks (3x3 depthwise conv + 1x1
pointwise conv, each followed by BatchNorm and ReLU), global average pool, one linear layer.
The width multiplier scales every layer's channels; at width 1.0 and 1000 classes it has 4.2 M
parameters. Total stride 32 with padded convs, so small inputs shrink to 1x1 instead of failing.
"""

from __future__ import annotations

from torch import nn

from .common import PooledClassifier, init_weights

# (output channels at width 1.0, stride) of each depthwise-separable block, in the paper's Table 1.
_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2), (128, 1),
    (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)
_STEM_CHANNELS = 32

MIN_INPUT_SIZE = 1


def _scaled(channels: int, *, width: float) -> int:
    return max(1, int(round(channels * width)))


def _conv_bn_relu(
    *, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _separable(*, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        _conv_bn_relu(
            in_channels=in_channels, out_channels=in_channels, kernel_size=3, stride=stride, groups=in_channels
        ),
        _conv_bn_relu(in_channels=in_channels, out_channels=out_channels, kernel_size=1, stride=1),
    )


class MobileNetV1(PooledClassifier):
    def __init__(self, *, num_classes: int, width: float) -> None:
        super().__init__()
        channels = _scaled(_STEM_CHANNELS, width=width)
        layers: list[nn.Module] = [_conv_bn_relu(in_channels=3, out_channels=channels, kernel_size=3, stride=2)]
        for out_channels, stride in _BLOCKS:
            out_channels = _scaled(out_channels, width=width)
            layers.append(_separable(in_channels=channels, out_channels=out_channels, stride=stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)


def mobilenet_v1(*, num_classes: int, width: float = 1.0) -> MobileNetV1:
    """MobileNet v1; `width` is the paper's multiplier alpha (1.0, 0.75, 0.5, 0.25 in the paper)."""
    return MobileNetV1(num_classes=num_classes, width=float(width))


def mobilenet_v1_075(*, num_classes: int) -> MobileNetV1:
    """MobileNet v1 at width 0.75."""
    return mobilenet_v1(num_classes=num_classes, width=0.75)


def mobilenet_v1_050(*, num_classes: int) -> MobileNetV1:
    """MobileNet v1 at width 0.5."""
    return mobilenet_v1(num_classes=num_classes, width=0.5)


def mobilenet_v1_025(*, num_classes: int) -> MobileNetV1:
    """MobileNet v1 at width 0.25."""
    return mobilenet_v1(num_classes=num_classes, width=0.25)
