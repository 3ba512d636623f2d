"""The one interface every loader backend implements.

The training loop iterates `(images, labels)` pairs that are already on the target device,
normalised, in NCHW memory with channels_last strides, in the dtype the loop asked for; labels are
int64 on the same device. It never asks which backend produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol, runtime_checkable

import torch

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
    dtype: torch.dtype


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
    round(resolution / val_crop_ratio), center crop `resolution`; keeps every image, and across `world_size` ranks each image is seen exactly once.
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
    shuffle: bool | None = None  # None: shuffle train, not val
    drop_last: bool | None = None  # None: drop on train, keep on val
    augment: bool | None = None    # None: the train split's transform on train, val's on val; False: the
                                   # val transform on either split (`fastrefine eval --split train`)
    refinery_view: str = "crop"  # train only, "image": yield Views(crop, whole image) as the images (torch loader)

    @property
    def train(self) -> bool:
        """The train transform (random crop, flip): the train split, unless `augment` says otherwise."""
        return self.split == "train" if self.augment is None else self.augment

    @property
    def do_shuffle(self) -> bool:
        return self.train if self.shuffle is None else self.shuffle

    @property
    def do_drop_last(self) -> bool:
        return self.train if self.drop_last is None else self.drop_last

    @property
    def val_resize(self) -> int:
        return int(round(self.resolution / self.val_crop_ratio))

    @property
    def whole_image(self) -> bool:
        return self.train and self.refinery_view == "image"

    @property
    def flip_prob(self) -> float:
        return 0.5 if (self.train and self.flip) else 0.0

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
    """What every backend shares: the normalisation it applied and an idempotent `close()`.

    `close()` releases what the loader holds between epochs (threads, pipelines, pinned or device
    memory); a loader is also a context manager. Backends override `close` when they hold anything.
    """

    opts: LoaderOptions

    @property
    def normalization(self) -> Normalization:
        return self.opts.normalization

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_indices(n: int, *, rank: int, world_size: int) -> range:
    """The stride shard used for val: rank r gets r, r+W, r+2W, ... so the ranks cover [0, n) once."""
    return range(rank, n, world_size)
