"""NVIDIA DALI backend: GPU decode (nvJPEG, "mixed") with CUDA, every op on the CPU without.

Data: `samples.SampleTable`: the converter's webdataset shards (JPEG bytes by offset, found through
DALI's index file beside each tar; labels from the `.cls` members, ASCII digits decoded on purpose by
`ascii_labels`), or, with no manifest, an ImageFolder tree. The loader feeds DALI itself through
`fn.external_source`: per batch the encoded bytes, the labels and (train) each image's crop box and flip.

Order: every epoch one permutation of all N images from (seed, epoch); rank r reads positions r, r+W,
... cut to N // W (disjoint ranks, equal step counts, a different share each epoch). Val: rank r reads
r, r+W, ... in order, a short last batch, every image once across ranks. Crop boxes and flips are drawn
per (seed, epoch, sample) for the whole batch at once by the shared sampler (`crop_sampler.train_crops`,
the torch and FFCV backends' draw), from the image sizes the converter recorded (older conversions:
each JPEG's header), and handed to `fn.decoders.image_slice` (ROI decode) as absolute pixels: an epoch
is the same whatever happened before it, so a resumed run replays it exactly.

Pipelines: one per resolution, built lazily at the first epoch that needs it and reset between epochs
(never rebuilt: DALI's memory pools never shrink, and a pipeline built per epoch ran GPUs out of memory
after a few epochs, NVIDIA/DALI issues 5087 and 5609). A resolution change builds one for the new size
and drops the old one, then `nvidia.dali.backend.ReleaseUnusedMemory()`; `close()` drops everything.
An epoch abandoned early (max steps, bench, `next(iter(...))`) stops the feed and drains the few
batches DALI had prefetched before the pipeline is reset.

Output: `crop_mirror_normalize` computes (x - mean) / std in fp32 and writes fp16 itself or fp32
(bf16: the fp32 batch cast once in torch; DALI has no bf16), as HWC: the NHWC batch viewed as NCHW is
channels_last with no copy.
"""

from __future__ import annotations

import collections
import gc
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fastrefine.errors import RunError, UsageError

from .base import LoaderBase, LoaderOptions
from .crop_sampler import train_crops
from .options import NVJPEG_DEVICE_PADDING, NVJPEG_HEIGHT_HINT, NVJPEG_HOST_PADDING, NVJPEG_WIDTH_HINT
from .samples import SampleTable, ascii_labels, epoch_batches, sample_table, samples_per_rank

__all__ = ["DaliLoader", "ascii_labels", "dali_error_line"]

log = logging.getLogger("fastrefine.loaders.dali")


def dali_dtype(dtype: torch.dtype):
    """DALI's crop_mirror_normalize writes fp32 or fp16; bf16 is cast from fp32 on the device."""
    from nvidia.dali import types
    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def dali_error_line(error: BaseException) -> str:
    """DALI's multi-line message cut to one plain line: the failing operator and the cause DALI gives
    after "encountered:" (its traceback into our pipeline definition is dropped). Square brackets in
    it are text: the caller prints plain text, never markup."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    op = next((ln.rstrip(",") for ln in lines if ln.startswith("Error in ") and "operator" in ln), "")
    cause = ""
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1:]
        cause = next((ln for ln in after if not ln.startswith("Current pipeline object")), "")
    if not cause:
        skip = ("Critical error in pipeline", "Current pipeline object", "which was used in", "File ")
        cause = next((ln for ln in lines if not ln.startswith(skip) and not ln.startswith("Error in ")),
                     type(error).__name__)
    return (f"{op}: {cause}" if op else cause)[:400]


class EpochFeed:
    """The external source's callable: hands DALI the epoch's batches in order, then StopIteration.

    Remembers the batches DALI has taken but not yet returned (`pending`), so an error names the
    files of the batch it was working on."""

    def __init__(self, table: SampleTable, opts: LoaderOptions):
        self.table, self.opts = table, opts
        self.batches: collections.deque = collections.deque()
        self.pending: collections.deque = collections.deque()
        self.epoch = 0

    def start(self, batches: list[np.ndarray], epoch: int) -> None:
        self.batches, self.epoch = collections.deque(batches), epoch
        self.pending.clear()

    def stop(self) -> None:
        self.batches.clear()

    def __call__(self):
        if not self.batches:
            raise StopIteration
        idx = self.batches.popleft()
        self.pending.append(idx)
        t, o = self.table, self.opts
        blobs = [t.read(int(i)) for i in idx]
        labels = [np.array([t.labels[i]], dtype=np.int64) for i in idx]
        if not o.train:
            return blobs, labels
        heights, widths = t.image_sizes(idx, blobs)
        boxes, flips = train_crops(o, epoch=self.epoch, indices=idx, heights=heights, widths=widths)
        # dense (B, ...) arrays: DALI takes each as a whole batch
        anchors = np.ascontiguousarray(boxes[:, [1, 0]], dtype=np.int32)   # (left, top): axis_names "WH"
        shapes = np.ascontiguousarray(boxes[:, [3, 2]], dtype=np.int32)    # (w, h)
        return blobs, labels, anchors, shapes, flips.astype(np.int32)


def decoder_options(*, device_id: int | None, hw_decoder_load: float, preallocate_width_hint: int,
                    preallocate_height_hint: int, device_memory_padding: int, host_memory_padding: int) -> dict:
    """nvJPEG's tuning arguments of DALI's decoders; they apply to the "mixed" backend only, so none
    are passed on the CPU."""
    if device_id is None:
        return {}
    return dict(hw_decoder_load=hw_decoder_load, preallocate_width_hint=preallocate_width_hint,
                preallocate_height_hint=preallocate_height_hint, device_memory_padding=device_memory_padding,
                host_memory_padding=host_memory_padding)


def make_pipeline(*, feed: EpochFeed, opts: LoaderOptions, resolution: int, device_id: int | None,
                  prefetch: int, decoder: dict):
    """The one pipeline definition. `device_id=None` runs every op on the CPU; otherwise the decoder
    is "mixed" (nvJPEG) and everything after it runs on the GPU."""
    from nvidia.dali import fn, pipeline_def, types

    decoder_device = "cpu" if device_id is None else "mixed"
    mean, std = (v.tolist() for v in opts.normalization.pixel_mean_std())

    @pipeline_def(batch_size=opts.batch_size, num_threads=max(1, opts.workers), device_id=device_id,
                  seed=(opts.seed * 1_000_003 + opts.rank) % (2**31 - 1), prefetch_queue_depth=prefetch)
    def image_pipeline():
        if opts.train:
            jpegs, labels, anchor, shape, mirror = fn.external_source(
                source=feed, num_outputs=5, batch=True,
                dtype=[types.UINT8, types.INT64, types.INT32, types.INT32, types.INT32])
            # EXIF orientation is not applied: the boxes were drawn on the image as stored (the
            # converter has already applied it to converted data)
            images = fn.decoders.image_slice(jpegs, anchor, shape, device=decoder_device,
                                             output_type=types.RGB, axis_names="WH",
                                             adjust_orientation=False, **decoder)
            images = fn.resize(images, resize_x=resolution, resize_y=resolution,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            crop = {}
        else:
            jpegs, labels = fn.external_source(source=feed, num_outputs=2, batch=True,
                                               dtype=[types.UINT8, types.INT64])
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                                       adjust_orientation=False, **decoder)
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


def _release_unused_memory() -> None:
    try:
        from nvidia.dali import backend
    except ImportError:
        return
    release = getattr(backend, "ReleaseUnusedMemory", None)
    if release is not None:
        release()


class DaliLoader(LoaderBase):
    """BatchLoader over DALI. Keyword options (`DaliOptions`): `prefetch` (DALI's queue depth) and,
    used only with a GPU, nvJPEG's `hw_decoder_load`, `preallocate_width_hint`,
    `preallocate_height_hint`, `device_memory_padding`, `host_memory_padding`."""

    backend = "dali"
    normalize_on = "device"  # crop_mirror_normalize, on the GPU with CUDA, in DALI's CPU ops without

    def __init__(self, data: Path, opts: LoaderOptions, *, prefetch: int = 2, hw_decoder_load: float = 0.65,
                 preallocate_width_hint: int = NVJPEG_WIDTH_HINT, preallocate_height_hint: int = NVJPEG_HEIGHT_HINT,
                 device_memory_padding: int = NVJPEG_DEVICE_PADDING, host_memory_padding: int = NVJPEG_HOST_PADDING):
        if opts.device.type not in ("cpu", "cuda"):
            raise UsageError(f"DALI loader: device {opts.device} is neither cpu nor cuda")
        if prefetch < 1:
            raise UsageError(f"loader.dali.prefetch must be at least 1, got {prefetch}")
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise UsageError(f"loader.dali.hw_decoder_load must be within [0, 1], got {hw_decoder_load}")
        self.opts = opts
        self.data = Path(data)
        self.prefetch = prefetch
        self.device_id = None if opts.device.type == "cpu" else (
            opts.device.index if opts.device.index is not None else torch.cuda.current_device())
        self.decoder = decoder_options(device_id=self.device_id, hw_decoder_load=hw_decoder_load,
                                       preallocate_width_hint=preallocate_width_hint,
                                       preallocate_height_hint=preallocate_height_hint,
                                       device_memory_padding=device_memory_padding,
                                       host_memory_padding=host_memory_padding)
        self.table = sample_table(self.data, opts.split)
        self.total = len(self.table)
        if self.total < opts.world_size:
            raise UsageError(f"{self.data}: split {opts.split!r} has {self.total} images, fewer than "
                             f"world_size {opts.world_size}")
        self.feed = EpochFeed(self.table, opts)
        self.epoch, self._start = 0, 0
        self._pipes: dict[int, object] = {}  # resolution -> built pipeline (at most one)
        self.builds = 0                      # pipelines built so far (tests and logs)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return samples_per_rank(self.total, self.opts)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    # -- epochs, resolution, pipelines ---------------------------------------------------------
    def start_at(self, batch: int) -> None:
        """The next epoch's iteration starts at its batch `batch` (a resumed mid-epoch checkpoint): the
        same batches and crops as the rest of an uninterrupted epoch."""
        self._start = batch

    def _pipeline(self):
        pipe = self._pipes.get(self.resolution)
        if pipe is not None:
            return pipe
        if self._pipes:               # progressive resizing moved on: the old size is never read again
            self._drop_pipelines()
        pipe = make_pipeline(feed=self.feed, opts=self.opts, resolution=self.resolution,
                             device_id=self.device_id, prefetch=self.prefetch, decoder=self.decoder)
        try:
            pipe.build()
        except RuntimeError as e:
            raise RunError(f"{self.data}: DALI could not build its {self.opts.split} pipeline: "
                           f"{dali_error_line(e)}") from None
        self.builds += 1
        self._pipes[self.resolution] = pipe
        return pipe

    def _drop_pipelines(self) -> None:
        self._pipes.clear()
        gc.collect()                  # the pipeline's memory is freed when its Python object goes
        if self.device_id is not None:
            _release_unused_memory()

    def close(self) -> None:
        self.feed.stop()
        self._drop_pipelines()
        self.table.close()

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = self._pipeline()
        batches = epoch_batches(self.total, self.opts, self.epoch)[self._start:]
        self._start = 0
        self.feed.start(batches, self.epoch)
        failed = True
        try:
            for _ in range(len(batches)):
                out = self._run(pipe)
                self.feed.pending.popleft()
                yield self._finish(*out)
            failed = False
        finally:
            self.feed.stop()          # an abandoned epoch: no new batches, drain what DALI prefetched
            try:
                while True:
                    pipe.run()
            except StopIteration:
                pipe.reset()
            except Exception as e:    # DALI or the feed failed: the pipeline is not reused, build anew
                self._pipes.pop(self.resolution, None)
                if not failed:
                    raise RunError(f"{self.data}: DALI failed at the end of a {self.opts.split} epoch: "
                                   f"{dali_error_line(e)}") from None

    def _run(self, pipe):
        try:
            return pipe.run()
        except StopIteration:
            raise
        except RuntimeError as e:
            self.feed.stop()
            files = self._batch_files()
            raise RunError(f"{files}: DALI failed on a {self.opts.split} batch read from it: "
                           f"{dali_error_line(e)}") from None

    def _batch_files(self) -> str:
        """The file (the bad image when PIL can tell which) of the batch DALI was working on."""
        if not self.feed.pending:
            return str(self.data)
        idx = [int(i) for i in self.feed.pending[0]]
        import io
        from PIL import Image
        for i in idx:
            try:
                with Image.open(io.BytesIO(self.table.read(i).tobytes())) as im:
                    im.load()
            except Exception:
                return self.table.where(i)
        names = sorted({self.table.files[self.table.file_id[i]] for i in idx})
        return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more shard(s))"

    def _finish(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """DALI outputs -> NCHW channels_last images in opts.dtype on opts.device; labels int64."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        stream = torch.cuda.current_stream(self.opts.device) if self.device_id is not None else None

        def as_torch(tl):
            t = tl.as_tensor()
            dst = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.opts.device)
            return feed_ndarray(t, dst, cuda_stream=stream)

        x = as_torch(images).permute(0, 3, 1, 2)  # NHWC -> NCHW view: channels_last
        if x.dtype != self.opts.dtype:
            x = x.to(self.opts.dtype)             # bf16: the fp32 result rounded once
        if not self.opts.channels_last:
            x = x.contiguous()
        return x, as_torch(labels).reshape(-1)
