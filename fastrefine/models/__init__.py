"""The model registry: every network fastrefine trains, by name.

    model = create_model("darknet19", num_classes=1000)
    model = create_model("mobilenet_v1", num_classes=1000, width=0.5)
    list_models()                                   # sorted names
    model_info("resnet50", num_classes=1000, resolution=224)   # {"params": ..., "flops": ...}

Nothing is ever pretrained (nothing can be downloaded). Each model carries the smallest input side
it accepts; below it, the forward raises a UsageError that names the model and the size instead of
a shape error from deep inside a pooling layer.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode, which counts a multiply-add as 2 FLOPs
(convolutions and linear layers only; BatchNorm, activations and pooling count 0).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models as tv

from fastrefine.errors import UsageError
from fastrefine.models import alexnet, darknet, mobilenet, small

__all__ = ["create_model", "list_models", "model_info", "min_input_size"]

# torchvision's VGG has five 2x2/2 max-pools (total stride 32); ResNet pads every conv and pool.
_VGG_MIN_INPUT_SIZE = 32
_RESNET_MIN_INPUT_SIZE = 1


def _vgg16(*, num_classes: int, dropout: float = 0.5) -> nn.Module:
    """torchvision's VGG-16 with BatchNorm (vgg16_bn), untrained."""
    return tv.vgg16_bn(weights=None, num_classes=num_classes, dropout=dropout)


def _vgg19(*, num_classes: int, dropout: float = 0.5) -> nn.Module:
    """torchvision's VGG-19 with BatchNorm (vgg19_bn), untrained."""
    return tv.vgg19_bn(weights=None, num_classes=num_classes, dropout=dropout)


def _resnet18(*, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """torchvision's ResNet-18, untrained."""
    return tv.resnet18(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


def _resnet34(*, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """torchvision's ResNet-34, untrained."""
    return tv.resnet34(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


def _resnet50(*, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """torchvision's ResNet-50, untrained."""
    return tv.resnet50(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    min_input_size: int


_REGISTRY: MappingProxyType[str, _Entry] = MappingProxyType(
    {
        "darknet19": _Entry(darknet.darknet19, darknet.MIN_INPUT_SIZE),
        "mobilenet_v1": _Entry(mobilenet.mobilenet_v1, mobilenet.MIN_INPUT_SIZE),
        "mobilenet_v1_075": _Entry(mobilenet.mobilenet_v1_075, mobilenet.MIN_INPUT_SIZE),
        "mobilenet_v1_050": _Entry(mobilenet.mobilenet_v1_050, mobilenet.MIN_INPUT_SIZE),
        "mobilenet_v1_025": _Entry(mobilenet.mobilenet_v1_025, mobilenet.MIN_INPUT_SIZE),
        "alexnet": _Entry(alexnet.alexnet, alexnet.MIN_INPUT_SIZE),
        "alexnet_bn": _Entry(alexnet.alexnet_bn, alexnet.MIN_INPUT_SIZE),
        "vgg16": _Entry(_vgg16, _VGG_MIN_INPUT_SIZE),
        "vgg19": _Entry(_vgg19, _VGG_MIN_INPUT_SIZE),
        "resnet18": _Entry(_resnet18, _RESNET_MIN_INPUT_SIZE),
        "resnet34": _Entry(_resnet34, _RESNET_MIN_INPUT_SIZE),
        "resnet50": _Entry(_resnet50, _RESNET_MIN_INPUT_SIZE),
        "tiny_cnn": _Entry(small.tiny_cnn, small.TINY_CNN_MIN_INPUT_SIZE),
        "small_resnet": _Entry(small.small_resnet, small.SMALL_RESNET_MIN_INPUT_SIZE),
    }
)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


# What each option accepts, checked before a builder runs: (test, what was expected).
_OPTION_CHECKS: MappingProxyType[str, tuple[Callable[[object], bool], str]] = MappingProxyType(
    {
        "width": (lambda v: _is_number(v) and v > 0, "a positive number (a multiplier or a channel count)"),
        "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "zero_init_residual": (lambda v: isinstance(v, bool), "true or false"),
        "blocks": (
            lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_positive_int(b) for b in v),
            "a non-empty list of positive integers",
        ),
    }
)
# small models build channel counts from `width` directly, so it must be a whole number there.
_INTEGER_WIDTH_MODELS = frozenset({"tiny_cnn", "small_resnet"})


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def _accepted_options(entry: _Entry) -> list[str]:
    parameters = inspect.signature(entry.builder).parameters
    return [key for key in parameters if key != "num_classes"]


def _check_options(name: str, entry: _Entry, options: dict[str, object]) -> None:
    accepted = _accepted_options(entry)
    for key, value in options.items():
        if key not in accepted:
            known = ", ".join(accepted) if accepted else "none"
            raise UsageError(f"model {name!r} has no option {key!r}; its options: {known}")
        test, expected = _OPTION_CHECKS[key]
        if not test(value):
            raise UsageError(f"model {name!r}: option {key!r} must be {expected}, got {value!r}")
        if key == "width" and name in _INTEGER_WIDTH_MODELS and not _is_positive_int(value):
            raise UsageError(f"model {name!r}: option 'width' is a channel count, a positive integer, got {value!r}")


class _MinInputSize:
    """Forward pre-hook: a clear UsageError when the input is smaller than the model can take.

    A plain callable class (not a closure) so that models stay picklable and deep-copyable.
    """

    def __init__(self, *, name: str, min_size: int) -> None:
        self.name = name
        self.min_size = min_size

    def __call__(self, module: nn.Module, args: tuple[object, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4 and min(x.shape[-2:]) < self.min_size:
            height, width = x.shape[-2:]
            raise UsageError(
                f"model {self.name!r} needs inputs of at least {self.min_size}x{self.min_size} pixels, "
                f"got {height}x{width}; raise the resolution or pick a model that takes small inputs"
            )


def min_input_size(name: str) -> int:
    """The smallest input side (pixels) the named model accepts."""
    return _entry(name).min_input_size


def create_model(name: str, *, num_classes: int, **options: object) -> nn.Module:
    """Build the named model, untrained, with `num_classes` outputs and the given options."""
    entry = _entry(name)
    if not _is_positive_int(num_classes):
        raise UsageError(f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")
    _check_options(name, entry, options)
    model = entry.builder(num_classes=int(num_classes), **options)
    if entry.min_input_size > 1:
        model.register_forward_pre_hook(_MinInputSize(name=name, min_size=entry.min_input_size))
    return model


def model_info(name: str, *, num_classes: int, resolution: int, **options: object) -> dict[str, int]:
    """Parameter count and forward FLOPs (batch 1, eval mode, 3 x resolution x resolution input).

    FLOPs follow FlopCounterMode: a multiply-add counts 2.
    """
    if not _is_positive_int(resolution):
        raise UsageError(f"model_info: resolution must be a positive integer, got {resolution!r}")
    model = create_model(name, num_classes=num_classes, **options).eval()
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    return {"params": int(params), "flops": int(counter.get_total_flops())}
