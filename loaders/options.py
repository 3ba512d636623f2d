"""Each backend's own options: the recipe's `[loader.ffcv]`, `[loader.dali]` and `[loader.torch]` tables.

Each is a frozen dataclass whose fields are the backend constructor's keyword options, loaded as
strictly as the rest of the recipe (an unknown key names its dotted path). This module imports no
backend library, so a recipe loads on a machine without DALI or FFCV.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


def _opt(default, *, lo: float | None = None, hi: float | None = None, doc: str = ""):
    return field(default=default, metadata={"lo": lo, "hi": hi, "doc": doc, "lo_open": False})


NVJPEG_DEVICE_PADDING = 211_025_920  # bytes (201 MiB): NVIDIA's ResNet-50 DALI example
NVJPEG_HOST_PADDING = 140_544_512    # bytes (134 MiB)
NVJPEG_WIDTH_HINT, NVJPEG_HEIGHT_HINT = 5980, 6430  # the largest ImageNet image, for the hardware decoder


@dataclass(frozen=True)
class FfcvOptions:
    decoder: Literal["fast", "stock"] = _opt(
        "fast", doc="fast: fastrefine's decoder (seeded per-sample boxes and flips, reproducible; decodes at the "
                    "size the box needs); stock: FFCV's own crop decoders (unseeded crops), for comparison")
    order: Literal["random", "quasi_random"] = _opt(
        "random", doc="quasi_random reads pages in a shuffled order: for datasets larger than RAM (with os_cache = false)")
    os_cache: bool = _opt(True, doc="true: the OS page cache holds the file; false: FFCV's own process cache")
    batches_ahead: int = _opt(3, lo=1, doc="batches FFCV prepares ahead of the loop")


@dataclass(frozen=True)
class DaliOptions:
    prefetch: int = _opt(2, lo=1, doc="DALI's prefetch queue depth (batches)")
    hw_decoder_load: float = _opt(
        0.65, lo=0.0, hi=1.0,
        doc="GPU only: share of the JPEG data for the hardware decoder (A100/H100/H200; DALI's default 0.65)")
    # nvJPEG sizes of NVIDIA's ResNet-50 DALI example (DALI's examples/use_cases/pytorch/resnet50): buffers
    # and hardware-decoder preallocation for the largest ImageNet image, so no reallocation mid-run
    preallocate_width_hint: int = _opt(
        NVJPEG_WIDTH_HINT, lo=0, doc="GPU only: image width for which nvJPEG's hardware decoder preallocates "
                                     "(0: none; default 5980, NVIDIA's ResNet-50 example)")
    preallocate_height_hint: int = _opt(
        NVJPEG_HEIGHT_HINT, lo=0, doc="GPU only: image height for which nvJPEG's hardware decoder preallocates "
                                      "(0: none; default 6430, NVIDIA's ResNet-50 example)")
    device_memory_padding: int = _opt(
        NVJPEG_DEVICE_PADDING, lo=0, doc="GPU only: bytes of nvJPEG device buffer preallocated per thread "
                                         "(default 211,025,920, NVIDIA's ResNet-50 example)")
    host_memory_padding: int = _opt(
        NVJPEG_HOST_PADDING, lo=0, doc="GPU only: bytes of nvJPEG pinned host buffer preallocated per thread, "
                                       "twice (default 140,544,512, NVIDIA's ResNet-50 example)")


@dataclass(frozen=True)
class TorchOptions:
    decode: Literal["auto", "host", "device"] = _opt(
        "auto", doc="host: PIL in DataLoader workers; device: batched decode_jpeg (nvJPEG on CUDA) and "
                    "crop/resize/flip/normalise on the device; auto: device on CUDA, host otherwise")


def as_kwargs(options) -> dict:
    """The dataclass as the backend constructor's keyword options."""
    return dataclasses.asdict(options) if options is not None else {}
