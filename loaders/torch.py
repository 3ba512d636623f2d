"""The plain reference loader: torchvision ImageFolder + DataLoader, PIL decode on host workers.

Augmentation parameters come from a per-sample RNG seeded by (seed, epoch, index), so an epoch is
the same whatever the number of workers, and a resumed run replays it exactly.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from fastrefine.errors import UsageError

from .base import LoaderBase, LoaderOptions, mean_std_tensors, shard_indices


def _resolve_folder(data: Path, split: str) -> tuple[Path, list[str] | None]:
    """The ImageFolder root of `split` and, for a converted dataset, its class order (wnids)."""
    manifest = data / "manifest.json"
    if manifest.is_file():
        from fastrefine.manifest import read_manifest
        m = read_manifest(data)
        folder = m.folder(split)
        if folder is None:
            source = Path(m.raw.get("source", ""))
            folder = source / split
        if not folder.is_dir():
            raise UsageError(f"torch backend needs an ImageFolder tree for {split!r}; {folder} is not a "
                             f"folder (the Kaggle flat val layout is read by the dali/ffcv backends only)")
        return folder, [c.wnid for c in m.classes]
    folder = data / split
    if not folder.is_dir():
        raise UsageError(f"{data}: no manifest.json and no {split}/ class folders")
    return folder, None


def sample_crop(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): 10 tries at area/aspect, else the central crop."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Folder(Dataset):
    def __init__(self, root: Path, classes: list[str] | None, opts: LoaderOptions):
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        classes = classes if classes is not None else found
        missing = sorted(set(found) - set(classes))
        if missing:
            raise UsageError(f"{root}: class folders {missing[:5]} are not in the dataset's class list")
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = make_dataset(str(root), self.class_to_idx, extensions=IMG_EXTENSIONS,
                                    allow_empty=True)
        if not self.samples:
            raise UsageError(f"{root}: no images found")
        self.opts = opts
        self.epoch = 0
        self.resolution = opts.resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        o, r = self.opts, self.resolution
        if o.train:
            rng = random.Random(hash((o.seed, self.epoch, index)))
            top, left, h, w = sample_crop(rng, img.width, img.height, o.scale, o.ratio)
            img = TF.resized_crop(img, top, left, h, w, [r, r], antialias=True)
            if rng.random() < o.flip_prob:
                img = TF.hflip(img)
        else:
            img = TF.center_crop(TF.resize(img, int(round(r / o.val_crop_ratio)), antialias=True), [r, r])
        return TF.pil_to_tensor(img), label


class TorchLoader(LoaderBase):
    backend = "torch"
    normalize_on = "device"

    def __init__(self, data: Path, opts: LoaderOptions):
        root, classes = _resolve_folder(Path(data), opts.split)
        self.opts = opts
        self.dataset = _Folder(root, classes, opts)
        self.batch_size = opts.batch_size
        self.resolution = opts.resolution
        self.epoch = 0
        self._mean, self._std = mean_std_tensors(opts)

    # -- which indices this rank reads this epoch --
    def _indices(self) -> list[int]:
        o, n = self.opts, len(self.dataset)
        if not o.do_shuffle and not o.do_drop_last:
            return list(shard_indices(n, rank=o.rank, world_size=o.world_size))
        order = list(range(n))
        if o.do_shuffle:
            # ints only in the seed tuple: str hashes vary between processes
            random.Random(hash((o.seed, self.epoch, -1))).shuffle(order)
        per_rank = n // o.world_size  # equal shares so every rank runs the same number of steps
        mine = order[o.rank * per_rank:(o.rank + 1) * per_rank]
        if o.do_drop_last:
            mine = mine[: len(mine) // o.batch_size * o.batch_size]
        return mine

    @property
    def num_samples(self) -> int:
        return len(self._indices())

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_resolution(self, resolution: int) -> None:
        self.resolution = resolution

    def __iter__(self):
        self.dataset.epoch, self.dataset.resolution = self.epoch, self.resolution
        o = self.opts
        dl = DataLoader(self.dataset, batch_size=o.batch_size, sampler=self._indices(),
                        num_workers=o.workers, pin_memory=o.device.type == "cuda",
                        drop_last=False, persistent_workers=False,
                        prefetch_factor=4 if o.workers > 0 else None)
        memory = torch.channels_last if o.channels_last else torch.contiguous_format
        for images, labels in dl:
            images = images.to(o.device, non_blocking=True).to(dtype=o.dtype, memory_format=memory)
            images.sub_(self._mean).div_(self._std)
            yield images, labels.to(o.device, non_blocking=True)
