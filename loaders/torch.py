"""The plain reference loader (torch DataLoader), with two decode modes.

Data: on a converted dataset, the converter's webdataset shards (JPEG bytes read by offset from the
tars, labels from each `.cls` member: `samples.SampleTable`); the original source folder is never read
(it holds files the converter skipped). Without a manifest, a plain ImageFolder tree.

* `decode="host"`: DataLoader workers decode with PIL and crop/resize (`resized_crop`, antialiased
  bilinear), the uint8 batch goes to the device and is normalised there in fp32 and cast once.
* `decode="device"`: workers only read bytes; the batch is decoded with `torchvision.io.decode_jpeg(
  list, device=...)` (nvJPEG on CUDA) and cropped, resized, flipped and normalised for the whole batch
  on the device (`batch_decode.py`). The same code runs on the CPU, where CI tests it against the host
  path. `decode="auto"`: device on CUDA, host otherwise.

Crop boxes and flips come from the shared sampler (`crop_sampler.train_crops`, keyed by (seed, epoch,
index), the same draw as the DALI and FFCV backends) in both modes, so an epoch is the same whatever the
number of workers, and a resumed run replays it exactly. Order: one
permutation of all images per (seed, epoch), rank r taking r, r+W, ... (`samples.rank_order`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from fastrefine.errors import RunError, UsageError
from fastrefine.preempt import ignore_stop_signals

from . import batch_decode
from .base import LoaderBase, LoaderOptions, Views
from .crop_sampler import train_crops
from .samples import SampleTable, epoch_batches, sample_table, samples_per_rank

__all__ = ["TorchLoader", "DECODE_MODES"]

DECODE_MODES = ("auto", "host", "device")


class _Samples(Dataset):
    """A batch of indices -> [(uint8 CHW image, label)] decoded on the host, or [(encoded bytes, label,
    index)]. Batched (`__getitems__`, which the DataLoader calls with each batch of its batch sampler) so
    the batch's crops are drawn in one vectorised call."""

    def __init__(self, table: SampleTable, opts: LoaderOptions, *, decode_here: bool):
        self.table, self.opts, self.decode_here = table, opts, decode_here
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]):
        t = self.table
        if not self.decode_here:  # bytes, not tensors: a worker's tensors each cross in shared memory
            return [(t.read(i).tobytes(), int(t.labels[i]), i) for i in indices]
        images = []
        for i in indices:
            try:
                images.append(Image.open(io.BytesIO(t.read(i).tobytes())))  # lazy: the header only
            except (UnidentifiedImageError, OSError) as e:
                raise RunError(f"{t.where(i)}: cannot decode the image ({e})") from None
        o, r = self.opts, self.opts.resolution
        if o.train:
            boxes, flips = train_crops(o, epoch=self.epoch, indices=indices,
                                       heights=[im.height for im in images], widths=[im.width for im in images])
        out = []
        for k, (i, im) in enumerate(zip(indices, images)):
            try:
                with im:
                    img = im.convert("RGB")
            except OSError as e:
                raise RunError(f"{t.where(i)}: cannot decode the image ({e})") from None
            label = int(t.labels[i])
            if o.train:
                top, left, h, w = (int(v) for v in boxes[k])
                whole = TF.resize(img, [r, r], antialias=True) if o.whole_image else None
                img = TF.resized_crop(img, top, left, h, w, [r, r], antialias=True)
                if flips[k]:
                    img = TF.hflip(img)
                if whole is not None:  # the refinery's view: the uncropped image, same flip
                    whole = TF.hflip(whole) if flips[k] else whole
                    out.append((torch.stack([TF.pil_to_tensor(img), TF.pil_to_tensor(whole)]), label))
                    continue
            else:
                img = TF.center_crop(TF.resize(img, o.val_resize, antialias=True), [r, r])
            out.append((TF.pil_to_tensor(img), label))
        return out


def _collate_bytes(items):
    blobs, labels, index = zip(*items)
    return list(blobs), torch.tensor(labels, dtype=torch.int64), list(index)


class TorchLoader(LoaderBase):
    """BatchLoader over a torch DataLoader. Keyword option: `decode` ("auto" | "host" | "device")."""

    backend = "torch"
    normalize_on = "device"

    def __init__(self, data: Path, opts: LoaderOptions, *, decode: str = "auto"):
        if decode not in DECODE_MODES:
            raise UsageError(f"loader.torch.decode = {decode!r}; expected one of {DECODE_MODES}")
        self.opts = opts
        self.decode = ("device" if opts.device.type == "cuda" else "host") if decode == "auto" else decode
        self.table = sample_table(Path(data), opts.split)
        if len(self.table) < opts.world_size:
            raise UsageError(f"{data}: split {opts.split!r} has {len(self.table)} images, fewer than "
                             f"world_size {opts.world_size}")
        self.dataset = _Samples(self.table, opts, decode_here=self.decode == "host")
        self.epoch = 0
        self._start = 0
        self._scale, self._shift = opts.normalization.scale_shift_tensors(opts.device)

    @property
    def num_samples(self) -> int:
        return samples_per_rank(len(self.table), self.opts)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def start_at(self, batch: int) -> None:
        """The next epoch's iteration starts at its batch `batch` (a resumed mid-epoch checkpoint): the
        same batches and crops as the rest of an uninterrupted epoch."""
        self._start = batch

    def close(self) -> None:
        self.table.close()

    def __iter__(self):
        self.dataset.epoch, self.dataset.opts = self.epoch, self.opts
        o = self.opts
        batches = [b.tolist() for b in epoch_batches(len(self.table), o, self.epoch)][self._start:]
        self._start = 0
        host = self.decode == "host"
        dl = DataLoader(self.dataset, batch_sampler=batches, num_workers=o.workers,
                        pin_memory=o.device.type == "cuda" and host,
                        collate_fn=None if host else _collate_bytes, persistent_workers=False,
                        worker_init_fn=ignore_stop_signals if o.workers > 0 else None,
                        prefetch_factor=4 if o.workers > 0 else None)
        for batch in dl:
            if host:
                images, labels = batch
                images = images.to(o.device, non_blocking=True)
                if o.whole_image:  # (B, 2, C, H, W): crop and whole image of each sample
                    x = Views(*(batch_decode.normalize_cast(images[:, k], self._scale, self._shift, dtype=o.dtype,
                                                            channels_last=o.channels_last) for k in (0, 1)))
                else:
                    x = batch_decode.normalize_cast(images, self._scale, self._shift, dtype=o.dtype,
                                                    channels_last=o.channels_last)
            else:
                x, labels = self._device_batch(*batch)
            yield x, labels.to(o.device, non_blocking=True)

    def _device_batch(self, blobs: list[bytes], labels: torch.Tensor, index: list[int]):
        o = self.opts
        blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        images = batch_decode.decode_batch(blobs, o.device, where=lambda i: self.table.where(index[i]))
        heights, widths = [int(img.shape[-2]) for img in images], [int(img.shape[-1]) for img in images]
        if o.train:
            boxes, flips = train_crops(o, epoch=self.epoch, indices=index, heights=heights, widths=widths)
            boxes, flips = boxes.tolist(), flips.tolist()
        else:
            boxes = [batch_decode.center_box(w, h, o.resolution, o.val_crop_ratio) for h, w in zip(heights, widths)]
            flips = [False] * len(images)
        kw = dict(flips=flips, resolution=o.resolution, scale=self._scale, shift=self._shift, dtype=o.dtype,
                  channels_last=o.channels_last)
        x = batch_decode.device_batch(images, boxes=boxes, **kw)
        if o.whole_image:  # the refinery's view: each whole image, same flip
            whole = [(0, 0, img.shape[-2], img.shape[-1]) for img in images]
            x = Views(x, batch_decode.device_batch(images, boxes=whole, **kw))
        return x, labels
