"""The one interface every loader backend implements.

The training loop iterates `(images, labels)` pairs that are already on the target device,
normalised, in NCHW memory with channels_last strides, in the dtype the loop asked for; labels are
int64 on the same device. It never asks which backend produced them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from fastrefine.errors import UsageError

DEFAULT_SCALE = (0.08, 1.0)     # RandomResizedCrop's area range (torchvision's, the paper's)
DEFAULT_RATIO = (3 / 4, 4 / 3)  # and its aspect-ratio range
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """How a loader normalised its images: x = (pixel / 255 - mean) / std, handed out in `dtype`.

    The trainer and the adversarial jitter read it from the loader (`loader.normalization`), never
    from a module-level constant, so a loader that normalises differently cannot silently disagree.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dtype: torch.dtype = torch.float32

    def pixel_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 (3,) mean and std in 0..255 pixel units: x = (pixel - mean) / std (DALI's form)."""
        return np.asarray(self.mean, np.float64) * 255.0, np.asarray(self.std, np.float64) * 255.0

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 (3,) factors with pixel * scale + shift == (pixel / 255 - mean) / std, computed in
        float64 and rounded once: the one fp32 multiply-add every backend normalises with."""
        mean, std = self.pixel_mean_std()
        return (1.0 / std).astype(np.float32), (-mean / std).astype(np.float32)

    def scale_shift_tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """`scale_shift()` as fp32 (1, 3, 1, 1) tensors on `device`, for a torch.addcmul on NCHW batches."""
        return tuple(torch.from_numpy(v).view(1, 3, 1, 1).to(device) for v in self.scale_shift())


class Views(NamedTuple):
    """A train batch with `refinery_view = "image"`: the student's crops and, for the refinery, the
    whole uncropped images resized to the same side (same flip, same normalisation)."""

    crop: torch.Tensor
    image: torch.Tensor


@dataclass(frozen=True)
class LoaderOptions:
    """Everything a backend needs, resolved once by `build`.

    Train: RandomResizedCrop(scale, ratio) at `resolution` + horizontal flip (`flip=False` turns it
    off: digits, text); drops the last partial batch. Val: resize the shorter side to
    round(resolution / val_crop_ratio), center crop `resolution`; keeps every image, and across
    `world_size` ranks each image is seen exactly once.

    Checked once, here, for every backend: the split, a positive batch size and resolution, a rank
    inside the world size, three-channel mean/std with std > 0, scale and ratio ranges. A loader's
    resolution change goes through `with_resolution`, so it is checked by the same code.
    """

    split: str
    batch_size: int
    resolution: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    workers: int = 2
    scale: tuple[float, float] = DEFAULT_SCALE
    ratio: tuple[float, float] = DEFAULT_RATIO
    val_crop_ratio: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels_last: bool = True
    flip: bool = True            # train only: a random horizontal flip with probability 0.5
    shuffle: bool | None = None  # not given: shuffle train, not val
    drop_last: bool | None = None  # not given: drop on train, keep on val
    augment: bool | None = None    # not given: the train split's transform on train, val's on val; False: the
                                   # val transform on either split (`fastrefine eval --split train`)
    refinery_view: str = "crop"  # train only, "image": yield Views(crop, whole image) as the images (torch loader)
    # derived once in __post_init__ (and again by `with_resolution`), read as plain attributes
    train: bool = field(init=False)        # the train transform (random crop, flip)
    flip_prob: float = field(init=False)   # 0.5 with the train transform and flip on, else 0
    whole_image: bool = field(init=False)  # train with refinery_view "image"
    val_resize: int = field(init=False)    # the val transform's shorter side before the centre crop

    def __post_init__(self) -> None:
        where = f"{self.split} loader"
        if self.split not in ("train", "val"):
            raise UsageError(f"loader split {self.split!r}; expected 'train' or 'val'")
        if self.batch_size < 1:
            raise UsageError(f"{where}: batch_size must be positive, got {self.batch_size}")
        if self.resolution < 1:
            raise UsageError(f"{where}: resolution must be positive, got {self.resolution}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UsageError(f"{where}: rank {self.rank} is outside world_size {self.world_size}")
        if self.workers < 0:
            raise UsageError(f"{where}: workers must be 0 or more, got {self.workers}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UsageError(f"{where}: mean and std need 3 values each, std > 0 (got {self.mean}, {self.std})")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise UsageError(f"{where}: scale must be 0 < lo <= hi, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise UsageError(f"{where}: ratio must be 0 < lo <= hi, got {self.ratio}")
        if not 0 < self.val_crop_ratio <= 1:
            raise UsageError(f"{where}: val_crop_ratio must be in (0, 1], got {self.val_crop_ratio}")
        # what a left-out option means, resolved here once: every reader sees booleans
        train = self.split == "train" if self.augment is None else bool(self.augment)
        resolved = {"augment": train, "train": train,
                    "shuffle": train if self.shuffle is None else bool(self.shuffle),
                    "drop_last": train if self.drop_last is None else bool(self.drop_last),
                    "flip_prob": 0.5 if (train and self.flip) else 0.0,
                    "whole_image": train and self.refinery_view == "image",
                    "val_resize": int(round(self.resolution / self.val_crop_ratio))}
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    def with_resolution(self, resolution: int) -> "LoaderOptions":
        """These options at another resolution (progressive resizing), checked as at construction."""
        return dataclasses.replace(self, resolution=int(resolution))

    @property
    def normalization(self) -> Normalization:
        return Normalization(mean=tuple(self.mean), std=tuple(self.std), dtype=self.dtype)


@runtime_checkable
class BatchLoader(Protocol):
    backend: str          # "torch" | "dali" | "ffcv"
    batch_size: int
    resolution: int
    num_samples: int      # images this rank yields per epoch (after drop_last)
    normalize_on: str     # where normalisation runs, for the record: "device" | "host"

    @property
    def normalization(self) -> Normalization: ...

    def close(self) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def set_resolution(self, resolution: int) -> None: ...


class LoaderBase:
    """What every backend shares: its options (`opts`, whose resolution is the loader's), the
    normalisation it applied, `set_epoch` / `set_resolution` and an idempotent `close()`.

    `close()` releases what the loader holds between epochs (threads, pipelines, pinned or device
    memory); a loader is also a context manager. Backends override `close` when they hold anything,
    and `_resolution_changed` when a new size needs work (FFCV regenerates its code).
    """

    opts: LoaderOptions
    epoch: int = 0

    @property
    def normalization(self) -> Normalization:
        return self.opts.normalization

    @property
    def batch_size(self) -> int:
        return self.opts.batch_size

    @property
    def resolution(self) -> int:
        return self.opts.resolution

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_resolution(self, resolution: int) -> None:
        """Images of the next epoch come out at `resolution` x `resolution` (checked by LoaderOptions)."""
        if resolution == self.opts.resolution:
            return
        self.opts = self.opts.with_resolution(resolution)
        self._resolution_changed()

    def _resolution_changed(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_indices(n: int, *, rank: int, world_size: int) -> range:
    """The stride shard used for val: rank r gets r, r+W, r+2W, ... so the ranks cover [0, n) once."""
    return range(rank, n, world_size)
