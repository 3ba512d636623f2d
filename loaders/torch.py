"""The plain reference loader (torch DataLoader), with two decode modes.

Data: on a converted dataset, the converter's webdataset shards (JPEG bytes read by offset from the
tars, labels from each `.cls` member: `samples.SampleTable`); the original source folder is never read
(it holds files the converter skipped). Without a manifest, a plain ImageFolder tree.

* `decode="host"`: DataLoader workers decode with PIL and crop/resize (`resized_crop`, antialiased
  bilinear), the uint8 batch goes to the device and is normalised there in fp32 and cast once.
* `decode="device"`: workers only read bytes and hand over one packed uint8 tensor per batch plus
  offsets; the batch is decoded with `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA) and
  cropped, resized, flipped and normalised for the whole batch on the device (`batch_decode.py`). The
  same code runs on the CPU, where CI tests it against the host path. `decode="auto"`: device on CUDA,
  host otherwise.

Both modes finish each batch (copy to the device, decode, normalise) on a background thread, on a CUDA
stream of its own, two batches ahead of the loop (`prefetch.py`: event wait + record_stream hand-over).
On CUDA the workers' tensors are pinned (DataLoader pin_memory), so the copies do not block. The workers
persist across epochs (one DataLoader per loader); the epoch and resolution reach them through a small
shared-memory tensor, the batches through a sampler that reads the loader's epoch.

Crop boxes and flips come from the shared sampler (`crop_sampler.train_crops`, keyed by (seed, epoch,
index), the same draw as the DALI and FFCV backends) in both modes, so an epoch is the same whatever the
number of workers, and a resumed run replays it exactly. Order: one
permutation of all images per (seed, epoch), rank r taking r, r+W, ... (`samples.rank_order`).
"""

from __future__ import annotations

import atexit
import functools
import io
import math
import weakref
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
from .prefetch import prefetch
from .samples import SampleTable, epoch_batches, sample_table, samples_per_rank

__all__ = ["TorchLoader", "DECODE_MODES"]

DECODE_MODES = ("auto", "host", "device")


class _Samples(Dataset):
    """A batch of indices -> [(uint8 CHW image, label)] decoded on the host, or [(encoded bytes, label,
    index)]. Batched (`__getitems__`, which the DataLoader calls with each batch of its batch sampler) so
    the batch's crops are drawn in one vectorised call.

    The epoch and the resolution live in a shared-memory tensor (`set_epoch`), so that persistent
    workers (copies of this object made when they started) see what the loader sets before each epoch."""

    def __init__(self, table: SampleTable, opts: LoaderOptions, *, decode_here: bool):
        self.table, self.opts, self.decode_here = table, opts, decode_here
        self._state = torch.tensor([0, opts.resolution], dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, resolution: int) -> None:
        self._state[0], self._state[1] = int(epoch), int(resolution)

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._state[0] = int(value)

    def _current_opts(self) -> LoaderOptions:
        """The options at the resolution set for this epoch (this process's copy follows the shared one)."""
        r = int(self._state[1])
        if self.opts.resolution != r:
            self.opts = self.opts.with_resolution(r)
        return self.opts

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
        o = self._current_opts()
        r = o.resolution
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


def _collate_packed(items):
    """A batch of (bytes, label, index) -> (packed uint8 tensor, offsets, labels, indices): four tensors
    that cross from a worker in shared memory (and are pinned on CUDA), instead of a pickled list."""
    blobs, labels, index = zip(*items)
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(b) for b in blobs], dtype=torch.int64).cumsum(0)
    packed = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if offsets[-1] else torch.empty(0, dtype=torch.uint8)
    return packed, offsets, torch.tensor(labels, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)


def unpack(packed: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The encoded images of a packed batch, as views (1-D uint8 tensors)."""
    o = offsets.tolist()
    return [packed[o[i]:o[i + 1]] for i in range(len(o) - 1)]


class _EpochBatches:
    """The DataLoader's batch sampler: the batches of the loader's current epoch (from its `start_at`
    batch), read at each iter(), so one DataLoader (and its persistent workers) serves every epoch."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        return iter([b.tolist() for b in epoch_batches(len(ld.table), ld.opts, ld.epoch)][ld._skip:])

    def __len__(self) -> int:
        return len(self.loader)


def _close_if_alive(ref: "weakref.ref[TorchLoader]") -> None:
    loader = ref()
    if loader is not None:
        loader.close()


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
        self._start = self._skip = 0
        self._scale, self._shift = opts.normalization.scale_shift_tensors(opts.device)
        self._dl: DataLoader | None = None
        self._close_at_exit = None     # set while persistent workers run: close() at the interpreter's exit

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
        if self._close_at_exit is not None:
            atexit.unregister(self._close_at_exit)
            self._close_at_exit = None
        dl, self._dl = self._dl, None
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()       # the persistent workers end here, not at garbage collection
        self.table.close()

    def _loader(self) -> DataLoader:
        """The one DataLoader of this loader, made at the first epoch; its workers persist."""
        if self._dl is None:
            o = self.opts
            host = self.decode == "host"
            self._dl = DataLoader(self.dataset, batch_sampler=_EpochBatches(self), num_workers=o.workers,
                                  pin_memory=o.device.type == "cuda", collate_fn=None if host else _collate_packed,
                                  persistent_workers=o.workers > 0, prefetch_factor=4 if o.workers > 0 else None,
                                  worker_init_fn=ignore_stop_signals if o.workers > 0 else None)
            if o.workers > 0:
                # A loader nobody closed shuts its workers down at exit, before multiprocessing's own exit
                # handler (registered earlier, so run later) terminates them: they wait out stop signals.
                self._close_at_exit = functools.partial(_close_if_alive, weakref.ref(self))
                atexit.register(self._close_at_exit)
        return self._dl

    def __iter__(self):
        self.dataset.set_epoch(self.epoch, self.opts.resolution)
        self._skip, self._start = self._start, 0   # start_at: the sampler leaves out the batches done
        # the decode thread reads this epoch's settings, not the loader's (set_epoch may come before it ends)
        make = functools.partial(self._host_batch if self.decode == "host" else self._device_batch,
                                 epoch=self.epoch, opts=self.opts)
        return prefetch(self._loader(), make, device=self.opts.device, depth=2)

    def _host_batch(self, batch, *, epoch: int, opts: LoaderOptions):
        o = opts
        images, labels = batch
        images = images.to(o.device, non_blocking=True)      # pinned by the DataLoader on CUDA
        if o.whole_image:  # (B, 2, C, H, W): crop and whole image of each sample
            x = Views(*(batch_decode.normalize_cast(images[:, k], self._scale, self._shift, dtype=o.dtype,
                                                    channels_last=o.channels_last) for k in (0, 1)))
        else:
            x = batch_decode.normalize_cast(images, self._scale, self._shift, dtype=o.dtype,
                                            channels_last=o.channels_last)
        return x, labels.to(o.device, non_blocking=True)

    def _device_batch(self, batch, *, epoch: int, opts: LoaderOptions):
        o = opts
        packed, offsets, labels, index = batch
        index = index.tolist()
        images = batch_decode.decode_batch(unpack(packed, offsets), o.device,
                                           where=lambda i: self.table.where(index[i]))
        heights, widths = [int(img.shape[-2]) for img in images], [int(img.shape[-1]) for img in images]
        if o.train:
            boxes, flips = train_crops(o, epoch=epoch, indices=index, heights=heights, widths=widths)
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
        return x, labels.to(o.device, non_blocking=True)
