"""NVIDIA DALI backend: one pipeline definition, GPU decode (nvJPEG) with CUDA, CPU-only mode without.

Data: the converter's webdataset shards (`manifest.json` -> `dali_shards(split)`: `{key}.jpg` plus
`{key}.cls` holding the class index as ASCII digits), or, with no manifest, a plain ImageFolder tree
(`DATA/SPLIT/class/*.jpg` or `DATA/class/*.jpg`) read with DALI's file reader.

Epochs: DALI's reader keeps its random state inside the running pipeline, so an epoch's order could
not be reproduced from (seed, epoch). The loader therefore builds a fresh pipeline at the start of every
epoch, seeded from (seed, epoch, rank), and drops it when the epoch ends: the same epoch gives the same
order, a new epoch a new one, and `set_resolution` takes effect at the next epoch for free.

Sharding: the reader splits the N samples into `world_size` contiguous shards of floor/ceil(N/W)
samples (`stick_to_shard=True`, so a rank never wanders to another shard). Train yields
floor(floor(N/W) / batch) full batches on every rank (equal counts, so DDP never waits for a rank
that ran dry). Val yields exactly the rank's shard: the reader runs with `pad_last_batch=False`
(samples past the shard's end wrap round to its start) and the loader trims the last batch to the
shard size itself, so across ranks every image is seen once.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from fastrefine.errors import RunError, UsageError
from fastrefine.manifest import MANIFEST_NAME, read_manifest

from .base import LoaderBase, LoaderOptions

log = logging.getLogger("fastrefine.loaders.dali")

READER_NAME = "reader"
MAX_LABEL_DIGITS = 19  # int64 holds any 18-digit number


@dataclass(frozen=True)
class DaliSource:
    """What the reader reads: webdataset shards (label bytes) or an ImageFolder root (label ints)."""

    kind: str  # "webdataset" | "folder"
    count: int  # images in the split (all ranks); -1 for folder until the reader says
    shards: tuple[str, ...] = ()
    index: tuple[str, ...] = ()
    root: str = ""


def find_source(data: Path, split: str) -> DaliSource:
    """Resolve the split's files: the manifest's webdataset shards, else an ImageFolder tree."""
    if (data / MANIFEST_NAME).is_file():
        manifest = read_manifest(data)
        shards, index = manifest.dali_shards(split)
        for p in (*shards, *index):
            if not p.is_file():
                raise UsageError(f"{data / MANIFEST_NAME}: split {split!r} lists {p}, which does not exist")
        return DaliSource("webdataset", manifest.count(split),
                          tuple(map(str, shards)), tuple(map(str, index)))
    root = data / split if (data / split).is_dir() else data
    if not any(p.is_dir() for p in root.iterdir()):
        raise UsageError(f"{data}: neither a converted dataset ({MANIFEST_NAME}) nor an ImageFolder "
                         f"tree (no class folders in {root})")
    return DaliSource("folder", -1, root=str(root))


def check_label_entry(shard: str) -> None:
    """Read the first `.cls` member of a shard and check it holds ASCII digits, naming the file if not."""
    with tarfile.open(shard) as tf:
        for member in tf:
            if member.name.endswith(".cls"):
                raw = tf.extractfile(member).read().strip()
                if not raw.isdigit() or len(raw) > MAX_LABEL_DIGITS:
                    raise UsageError(f"{shard}: {member.name} holds {raw[:20]!r}, expected the class "
                                     f"index as ASCII digits")
                return
    raise UsageError(f"{shard}: no .cls member (labels) in the shard")


def ascii_labels(raw: torch.Tensor) -> torch.Tensor:
    """(B, L) uint8 rows of ASCII digits, zero-padded on the right (by DALI's pad) -> (B,) int64.

    Bytes outside '0'..'9' (padding, a trailing newline) are ignored. Runs where `raw` is, no sync.
    """
    raw = raw.to(torch.int64)
    is_digit = (raw >= 48) & (raw <= 57)
    digits = torch.where(is_digit, raw - 48, torch.zeros_like(raw))
    # place value of digit i = 10 ** (number of digits after it in the row)
    after = is_digit.flip(1).cumsum(1).flip(1) - is_digit.long()
    return (digits * torch.pow(10, after)).sum(1)


def dali_dtype(dtype: torch.dtype):
    """DALI's crop_mirror_normalize writes fp32 or fp16; bf16 is cast from fp32 on the device."""
    from nvidia.dali import types
    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def epoch_seed(*, seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**31 - 1)


def make_pipeline(*, source: DaliSource, opts: LoaderOptions, resolution: int, seed: int,
                  device_id: int | None, shuffle_buffer: int, prefetch: int):
    """The one pipeline definition. `device_id=None` runs every op on the CPU; otherwise the decoder
    is "mixed" (nvJPEG) and everything after it runs on the GPU."""
    from nvidia.dali import fn, pipeline_def, types

    decoder_device = "cpu" if device_id is None else "mixed"
    mean = [m * 255 for m in opts.mean]
    std = [s * 255 for s in opts.std]

    @pipeline_def(batch_size=opts.batch_size, num_threads=max(1, opts.workers), device_id=device_id,
                  seed=seed, prefetch_queue_depth=prefetch)
    def image_pipeline():
        shard = dict(shard_id=opts.rank, num_shards=opts.world_size, random_shuffle=opts.do_shuffle,
                     initial_fill=shuffle_buffer, pad_last_batch=False, stick_to_shard=True,
                     name=READER_NAME)
        if source.kind == "webdataset":
            jpegs, labels = fn.readers.webdataset(paths=list(source.shards), index_paths=list(source.index),
                                                  ext=["jpg", "cls"], missing_component_behavior="error",
                                                  **shard)
            labels = fn.pad(labels, axes=(0,), fill_value=0)  # ragged ASCII digits -> one (B, L) array
        else:
            jpegs, labels = fn.readers.file(file_root=source.root, **shard)
        if opts.train:
            images = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB,
                                                   random_area=list(opts.scale),
                                                   random_aspect_ratio=list(opts.ratio), num_attempts=10)
            images = fn.resize(images, resize_x=resolution, resize_y=resolution,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip(probability=opts.flip_prob) if opts.flip else 0
            crop = {}
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=int(round(resolution / opts.val_crop_ratio)),
                               interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = 0
            crop = dict(crop=(resolution, resolution), crop_pos_x=0.5, crop_pos_y=0.5)
        # HWC out: the NHWC batch viewed as NCHW (permute, no copy) *is* channels_last.
        images = fn.crop_mirror_normalize(images, dtype=dali_dtype(opts.dtype), output_layout="HWC",
                                          mean=mean, std=std, mirror=mirror, **crop)
        if device_id is not None:
            labels = labels.gpu()
        return images, labels

    return image_pipeline()


class DaliLoader(LoaderBase):
    """BatchLoader over DALI. Extra keyword options: `shuffle_buffer` (reader's shuffle buffer, in
    samples; the webdataset reader shuffles only inside it), `prefetch` (DALI's queue depth)."""

    backend = "dali"
    normalize_on = "device"  # crop_mirror_normalize, on the GPU with CUDA, in DALI's CPU ops without

    def __init__(self, data: Path, opts: LoaderOptions, *, shuffle_buffer: int = 4096, prefetch: int = 2):
        if opts.device.type not in ("cpu", "cuda"):
            raise UsageError(f"DALI loader: device {opts.device} is neither cpu nor cuda")
        if not 0 <= opts.rank < opts.world_size:
            raise UsageError(f"DALI loader: rank {opts.rank} is outside world_size {opts.world_size}")
        self.opts = opts
        self.data = Path(data)
        self.batch_size = opts.batch_size
        self.resolution = opts.resolution
        self.shuffle_buffer = shuffle_buffer
        self.prefetch = prefetch
        self.device_id = None if opts.device.type == "cpu" else (
            opts.device.index if opts.device.index is not None else torch.cuda.current_device())
        self.source = find_source(self.data, opts.split)
        if self.source.kind == "webdataset":
            check_label_entry(self.source.shards[0])
        self.epoch = 0
        self._pipe = self._build()  # also tells the file reader's size; reused by the first epoch
        total = self._pipe.reader_meta(READER_NAME)["epoch_size"]
        if self.source.kind == "webdataset" and total != self.source.count:
            raise RunError(f"{self.data / MANIFEST_NAME}: split {opts.split!r} says {self.source.count} "
                           f"images, DALI's reader found {total} in the shards")
        self.total = int(total)
        if self.total < opts.world_size:
            raise UsageError(f"{self.data}: split {opts.split!r} has {self.total} images, fewer than "
                             f"world_size {opts.world_size}")

    # -- sizes ---------------------------------------------------------------------------------
    def _shard_size(self, rank: int) -> int:
        n, w = self.total, self.opts.world_size
        return (rank + 1) * n // w - rank * n // w

    @property
    def num_samples(self) -> int:
        if self.opts.do_drop_last:
            return len(self) * self.batch_size
        return self._shard_size(self.opts.rank)

    def __len__(self) -> int:
        if self.opts.do_drop_last:  # the smallest shard decides, so every rank runs as many steps
            return (self.total // self.opts.world_size) // self.batch_size
        return -(-self._shard_size(self.opts.rank) // self.batch_size)

    # -- epochs and resolution -----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._pipe = None

    def set_resolution(self, resolution: int) -> None:
        if resolution < 1:
            raise UsageError(f"DALI loader: resolution must be positive, got {resolution}")
        if resolution != self.resolution:
            self.resolution = resolution
            self._pipe = None

    def _build(self):
        seed = epoch_seed(seed=self.opts.seed, epoch=self.epoch, rank=self.opts.rank)
        pipe = make_pipeline(source=self.source, opts=self.opts, resolution=self.resolution, seed=seed,
                             device_id=self.device_id, shuffle_buffer=self.shuffle_buffer,
                             prefetch=self.prefetch)
        try:
            pipe.build()
        except RuntimeError as e:
            raise RunError(f"DALI could not build its pipeline for {self.data} ({self.opts.split}): {e}") from e
        return pipe

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = self._pipe if self._pipe is not None else self._build()
        self._pipe = None  # an epoch's pipeline is used once; the next __iter__ builds a fresh one
        it = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER_NAME,
                                 last_batch_policy=LastBatchPolicy.FILL, auto_reset=False)
        remaining = self.num_samples
        try:
            for _, out in zip(range(len(self)), it):
                images, labels = out[0]["images"], out[0]["labels"]
                take = min(remaining, images.shape[0])
                remaining -= take
                yield self._finish(images[:take], labels[:take])
        finally:
            del it, pipe

    def _finish(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NHWC DALI batch -> NCHW channels_last view in opts.dtype on opts.device; labels int64."""
        images = images.permute(0, 3, 1, 2)
        if images.dtype != self.opts.dtype:
            images = images.to(self.opts.dtype, memory_format=torch.channels_last)
        if not self.opts.channels_last:
            images = images.contiguous()
        if self.source.kind == "webdataset":
            labels = ascii_labels(labels)
        labels = labels.reshape(-1).to(self.opts.device, torch.int64, non_blocking=True)
        return images.to(self.opts.device, non_blocking=True), labels
