"""FFCV backend: reads the converter's `.beton` files (fields `image` RGBImageField, `label` IntField).

Image pipeline: a decoder, then on the CPU NormalizeCast (normalise + cast + the train flip, one pass)
-> ToTensor -> ToTorchImage (channels_last); on CUDA the decoder flips -> ToTensor -> ToDevice ->
ToTorchImage, and torch normalises the uint8 batch on the GPU in one fp32 expression, cast once.

Decoders (`decoder=`):
- "fast" (default): `CropDecoder`, this module's own. Per sample it draws the RandomResizedCrop box
  (train; torchvision's `RandomResizedCrop.get_params` distribution) or takes FFCV's centre box (val),
  then makes FFCV's own C call `ffcv.libffcv.imdecode` decode only what the box needs: the box's
  16-pixel-aligned window (TurboJPEG's lossless crop) when the box is small, and at the smallest DCT
  scale n/8 (n = 1..8) that still leaves the box at or above the output size; then OpenCV's INTER_AREA
  resize of the box to the output size (FFCV's `resize_crop`), as the stock decoder does.
- "stock": FFCV's `RandomResizedCropRGBImageDecoder` / `CenterCropRGBImageDecoder` (full decode, then
  crop + resize), kept for comparison (`fastrefine bench loader --ffcv-decoders fast,stock`).

Randomness: the fast decoder draws each sample's box and flip from the shared counter-based sampler
(`crop_sampler`, its numba form: the torch and DALI backends draw the same boxes and flips), keyed by
(seed, epoch, sample index), never numba's per-thread generator, which FFCV does not seed:
two loaders with the same seed hand out the same batches, a resumed epoch is the same epoch, and the
number of workers changes nothing. The flip is drawn the same way wherever it is applied (NormalizeCast
on the CPU, the decoder itself on CUDA). The seed and epoch reach FFCV's compiled code through a small
buffer the operations allocate, filled before each epoch's thread starts. With "stock", the crop comes
from FFCV's unseeded generator (not reproducible); the flip is still seeded when normalising in FFCV.

Which library normalises (`normalizer=`; the loader's `normalize_on` says where: "host" or "device"):
- "ffcv" (CPU only): `NormalizeCast`, this module's own FFCV operation, on the uint8 HWC numpy batch
  inside FFCV's compiled worker threads, *before* ToTensor: (x - mean) / std computed in fp32 and
  written straight in opts.dtype (fp32; bf16 rounded to nearest-even and written as its 16 bits;
  fp16 by a lookup table), one pass, no later cast. (FFCV's own NormalizeImage does fp32/fp16 by a
  table lookup and has no bf16; placed after ToTensor its CPU kernel never finishes.) FFCV's GPU
  normalisation needs cupy, which this project does not ship, so "ffcv" is refused on CUDA.
- "torch": uint8 crosses to the device (4x fewer bytes than fp32), then one fp32 multiply-add
  ((x * 1/std) + (-mean/std), fp32 constants) and one cast to opts.dtype.
- default (None): "ffcv" on the CPU, "torch" on CUDA.
On the CPU no ToDevice runs (it would be a copy onto the same device). Images normalised in FFCV are
FFCV's own output buffers, which it recycles `batches_ahead + 2` batches later: a batch stays valid
while the next one is drawn, which is all a training loop needs; `copy=True` hands out copies that a
caller may keep for ever. Labels are always copied (a few bytes).

Threads: FFCV's `Compiler.set_num_threads(n)` also calls `torch.set_num_threads(n)` (at import, in
`Loader()`, in `Loader.__iter__` and in each epoch thread). This module imports FFCV and builds its
Loader with torch's thread count restored afterwards, starts epochs itself (never through
`Loader.__iter__`), and the epoch thread's own call changes only that thread's count. `workers` says how
many FFCV threads decode. An epoch that is abandoned (the consumer stops early) stops its FFCV thread
when the iterator is dropped or the loader is closed; a FFCV thread that dies fails the iteration with
a RunError naming the file instead of leaving the consumer waiting.

Files: at construction the `.beton`'s size is checked against its own header and allocation table
(a truncated or partly copied file fails at once, naming it), and against the size and checksum the
converter recorded in the manifest (`fastrefine.manifest.check_recorded_file`).

Order: RANDOM (default) or QUASI_RANDOM (`order=`; reads pages in a shuffled order, for datasets larger
than RAM with `os_cache=False`), both deterministic from seed + epoch via FFCV's own traversal orders.
With world_size > 1, train uses `RankStrideOrder`: the same seed+epoch permutation of all N samples on
every rank, rank r taking positions r, r+W, ... cut to N // W, so ranks never overlap and all run the
same number of steps. (FFCV's own `distributed=True` asks torch.distributed for rank and world size,
ignoring the loader's options, pads ranks with duplicate samples and refuses QUASI_RANDOM.) Val with
world_size > 1 reads `indices=` the rank's stride shard in sequence: every image exactly once overall.

Modules: this one holds the loader and the file checks; `ffcv_decoder` the crop decoder, `ffcv_normalize`
NormalizeCast, `ffcv_kernels` their numba kernels, `ffcv_runtime` FFCV's import, epoch thread and order.
"""

from __future__ import annotations

import logging
import queue
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fastrefine import manifest as _manifest
from fastrefine.errors import RunError, UsageError
from fastrefine.manifest import MANIFEST_NAME, read_manifest

from .base import LoaderBase, LoaderOptions, shard_indices
from .ffcv_decoder import WINDOW_BELOW, WINDOW_MIN_PIXELS, crop_decoder_op  # noqa: F401  (benches read them)
from .ffcv_kernels import kernels  # noqa: F401  (tests and benches)
from .ffcv_normalize import normalize_cast_op
from .ffcv_runtime import RankStrideOrder, as_ffcv_order, epoch_class, import_ffcv, keep_torch_threads

log = logging.getLogger("fastrefine.loaders")

ORDERS = ("random", "quasi_random")
DECODERS = ("fast", "stock")


# ------------------------------------------------------------------------------------------- files

def beton_path(data: Path, split: str) -> Path:
    if (data / MANIFEST_NAME).is_file():
        path = read_manifest(data).ffcv_file(split)
    elif data.suffix == ".beton":
        path = data
    else:
        path = data / f"{split}.beton"
    if not path.is_file():
        raise UsageError(f"FFCV loader: {path} does not exist (convert the dataset with --format ffcv)")
    return path


def check_beton(path: Path, *, data_dir: Path | None = None) -> int:
    """Fail fast, naming the file, when a `.beton` disagrees with what the converter recorded for it
    (`fastrefine.manifest.check_recorded_file`) or is shorter than its own header, metadata and
    allocation table say; return its sample count."""
    if data_dir is not None:
        _manifest.check_recorded_file(data_dir, path)
    import_ffcv()
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType

    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise UsageError(f"{path}: truncated .beton ({size} bytes, less than FFCV's {HeaderType.itemsize}-byte header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    table_at = int(header["alloc_table_ptr"])
    fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    if table_at > size or fields_end > size:
        raise UsageError(f"{path}: truncated .beton ({size:,} bytes; its header puts the allocation table "
                         f"at byte {table_at:,})")
    try:
        reader = Reader(str(path))
    except Exception as e:  # noqa: BLE001  FFCV's own message, on one line
        raise UsageError(f"{path}: not a readable FFCV .beton ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    n = int(reader.num_samples)
    if len(reader.metadata) != n or fields_end + reader.metadata.nbytes > size:
        raise UsageError(f"{path}: truncated .beton (metadata for {len(reader.metadata)} of {n} samples)")
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        raise UsageError(f"{path}: damaged .beton (an allocation runs past the allocation table)")
    for name in reader.metadata.dtype.names:
        meta = reader.metadata[name]
        if meta.dtype.names and "data_ptr" in meta.dtype.names:
            missing = int((~np.isin(meta["data_ptr"], table["ptr"])).sum())
            if missing:
                raise UsageError(f"{path}: truncated .beton ({missing} of {n} {name!r} records missing from its "
                                 f"allocation table: {size:,} bytes, expected {table_at + n * ALLOC_TABLE_TYPE.itemsize:,} or more)")
    return n


# ------------------------------------------------------------------------------------------ loader

class FfcvLoader(LoaderBase):
    """BatchLoader over an FFCV .beton. Extra keyword options (the recipe's `[loader.ffcv]`, see
    `loaders.options.FfcvOptions`): `decoder` ("fast" | "stock"), `order` ("random" | "quasi_random"),
    `os_cache` (let the OS page cache hold the file; False = FFCV's own process cache), `normalizer`
    ("torch" | "ffcv" | None = by device), `batches_ahead`, `copy` (hand out copies of the images
    normalised in FFCV instead of FFCV's recycled buffers).

    `workers`: the FFCV threads that decode (opts.workers, at least 1), for the run's record."""

    backend = "ffcv"

    def __init__(self, data: Path, opts: LoaderOptions, *, decoder: str = "fast", order: str = "random",
                 os_cache: bool = True, normalizer: str | None = None, batches_ahead: int = 3,
                 copy: bool = False):
        if normalizer is None:
            normalizer = "ffcv" if opts.device.type == "cpu" else "torch"
        if decoder not in DECODERS:
            raise UsageError(f"FFCV loader: decoder {decoder!r}, expected one of {DECODERS}")
        if order not in ORDERS:
            raise UsageError(f"FFCV loader: order {order!r}, expected one of {ORDERS}")
        if normalizer not in ("torch", "ffcv"):
            raise UsageError(f"FFCV loader: normalizer {normalizer!r}, expected 'torch' or 'ffcv'")
        if normalizer == "ffcv" and opts.device.type != "cpu":
            raise UsageError("FFCV loader: normalizer='ffcv' runs on the CPU only (FFCV's GPU "
                             "NormalizeImage needs cupy); use 'torch'")
        if batches_ahead < 1:
            raise UsageError(f"FFCV loader: batches_ahead must be at least 1, got {batches_ahead}")
        self.opts = opts
        data = Path(data)
        self.path = beton_path(data, opts.split)
        self.decoder = decoder
        self.workers = max(1, opts.workers)
        self.normalizer = normalizer
        self.normalize_on = "host" if normalizer == "ffcv" else "device"
        self.copy = copy
        # (x - mean) / std as one fp32 multiply-add: x * (1/std) + (-mean/std), cast once
        self._scale, self._shift = opts.normalization.scale_shift_tensors(opts.device)
        self._decoder = None
        self._epochs: set = set()
        n = check_beton(self.path, data_dir=data if (data / MANIFEST_NAME).is_file() else None)
        if n < opts.world_size:
            raise UsageError(f"{self.path}: {n} images, fewer than world_size {opts.world_size}")
        self._loader = self._make_loader(order=order, os_cache=os_cache, batches_ahead=batches_ahead, n=n)
        self.total = n

    # -- construction --------------------------------------------------------------------------
    def _image_pipeline(self) -> list:
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        o, r = self.opts, self.resolution
        flip_prob = o.flip_prob
        in_ffcv = self.normalizer == "ffcv"  # then NormalizeCast flips, in its own pass
        if self.decoder == "fast":
            self._decoder = crop_decoder_op((r, r), train=o.train, scale=o.scale, ratio=o.ratio,
                                            center_ratio=o.val_crop_ratio, flip_prob=0.0 if in_ffcv else flip_prob)
        elif o.train:
            self._decoder = RandomResizedCropRGBImageDecoder((r, r), scale=o.scale, ratio=o.ratio)
        else:
            self._decoder = CenterCropRGBImageDecoder((r, r), ratio=o.val_crop_ratio)
        ops = [self._decoder]
        if in_ffcv:
            ops.append(normalize_cast_op(o.normalization, flip_prob))
        elif flip_prob > 0 and self.decoder == "stock":  # FFCV's own flip (numba's unseeded generator)
            ops.append(RandomHorizontalFlip(flip_prob))
        ops.append(ToTensor())
        if o.device.type != "cpu":  # on the CPU it would only copy the batch into another CPU buffer
            ops.append(ToDevice(o.device, non_blocking=True))
        return ops + [ToTorchImage(channels_last=True, convert_back_int16=False)]

    def _label_pipeline(self) -> list:
        from ffcv.fields.decoders import IntDecoder
        from ffcv.transforms import ToDevice, ToTensor
        # no FFCV Squeeze: it makes a batch of one 0-d, and ToDevice then dies in FFCV's worker thread
        # (the main thread would wait for that batch forever); reshape in torch instead
        return [IntDecoder(), ToTensor(), ToDevice(self.opts.device, non_blocking=True)]

    def _order_and_indices(self, order: str, n: int):
        from ffcv.loader import OrderOption
        o = self.opts
        if not o.shuffle:
            indices = None if o.world_size == 1 else np.array(
                shard_indices(n, rank=o.rank, world_size=o.world_size))
            return OrderOption.SEQUENTIAL, indices
        if o.world_size == 1:
            return (OrderOption.RANDOM if order == "random" else OrderOption.QUASI_RANDOM), None
        if order == "quasi_random":  # pages shuffled within a fixed rank shard
            return OrderOption.QUASI_RANDOM, np.arange(o.rank, n, o.world_size)[: n // o.world_size]
        return as_ffcv_order(RankStrideOrder(seed=o.seed, rank=o.rank, world_size=o.world_size)), None

    def _make_loader(self, *, order: str, os_cache: bool, batches_ahead: int, n: int):
        import_ffcv()
        from ffcv.loader import Loader

        ffcv_order, indices = self._order_and_indices(order, n)
        try:
            with keep_torch_threads():  # Loader() calls Compiler.set_num_threads(num_workers)
                return Loader(str(self.path), batch_size=self.batch_size, num_workers=self.workers,
                              os_cache=os_cache, order=ffcv_order, distributed=False, seed=self.opts.seed,
                              indices=indices, drop_last=self.opts.drop_last, batches_ahead=batches_ahead,
                              pipelines={"image": self._image_pipeline(), "label": self._label_pipeline()})
        except ValueError as e:  # e.g. QUASI_RANDOM with os_cache=True
            raise UsageError(f"FFCV loader for {self.path}: {e}") from e

    # -- the interface -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        n = len(self._ffcv().first_traversal_order)
        return (n // self.batch_size) * self.batch_size if self.opts.drop_last else n

    def __len__(self) -> int:
        return len(self._ffcv())

    def set_epoch(self, epoch: int) -> None:
        self._ffcv().next_epoch = epoch  # FFCV's orders derive the permutation from seed + epoch

    def _resolution_changed(self) -> None:
        """Change the decoder's output size; FFCV re-plans its buffers and recompiles next epoch."""
        from ffcv.pipeline.compiler import Compiler
        loader = self._ffcv()
        self._decoder.output_size = (self.resolution, self.resolution)
        with keep_torch_threads():  # code is generated for this loader's thread count
            Compiler.set_num_threads(self.workers)
            loader.generate_code()  # re-collects the allocation plan, which reads output_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._start_epoch()
        try:
            while True:
                batch = self._next_batch(epoch)
                if batch is None:
                    return
                images, labels = batch
                # labels are copied out of FFCV's recycled buffers; images are when normalised in torch or with copy=True
                yield self._finish(images), labels.reshape(-1).to(torch.int64, copy=True)
        finally:  # also when the consumer stops early: the epoch's thread must not run on
            self._stop(epoch)

    def close(self) -> None:
        """Stop every running epoch and release FFCV's loader (its buffers, memory manager, code)."""
        for epoch in list(self._epochs):
            self._stop(epoch)
        self._loader = None

    # -- epochs --------------------------------------------------------------------------------
    def _ffcv(self):
        if self._loader is None:
            raise UsageError(f"FFCV loader for {self.path} is closed")
        return self._loader

    def _start_epoch(self):
        """What FFCV's Loader.__iter__ does, minus its Compiler.set_num_threads (torch's threads), with
        an epoch thread that knows (seed, epoch) and reports its death."""
        loader = self._ffcv()
        epoch = int(loader.next_epoch)
        order = loader.next_traversal_order()
        loader.next_epoch += 1
        with keep_torch_threads():
            if loader.code is None:
                loader.generate_code()
            it = epoch_class()(loader, order[:len(loader) * self.batch_size], seed=self.opts.seed, epoch=epoch)
        self._epochs.add(it)
        return it

    def _next_batch(self, it):
        """The next batch of the epoch thread, None at its end; a RunError naming the file if the
        thread died (FFCV's own __next__ would wait for ever)."""
        from ffcv.loader.epoch_iterator import IS_CUDA
        while True:
            try:
                item = it.output_queue.get(timeout=0.2)
                break
            except queue.Empty:
                if it.is_alive():
                    continue
                try:  # it may have put its last item just before it ended
                    item = it.output_queue.get_nowait()
                    break
                except queue.Empty:
                    why = f"{type(it.error).__name__}: {it.error}" if it.error is not None else "it ended without a batch"
                    raise RunError(f"{self.path}: FFCV's loader thread failed ({' '.join(why.split())})") from it.error
        if item is None:
            return None
        slot, result = item
        if IS_CUDA:  # as FFCV's __next__: wait for that slot's copy stream
            it.current_stream.wait_stream(it.cuda_streams[slot])
        return result

    def _stop(self, it) -> None:
        self._epochs.discard(it)
        if not it.stop():
            log.warning("%s: an FFCV epoch thread did not stop within its time limit", self.path)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalizer == "ffcv":  # already normalised, in opts.dtype's bits (see NormalizeCast)
            out = images.view(self.opts.dtype)
            if self.copy:
                out = out.clone(memory_format=torch.channels_last)
        else:  # one fp32 multiply-add per element, written once in opts.dtype
            out = torch.empty(images.shape, dtype=self.opts.dtype, device=images.device,
                              memory_format=torch.channels_last)
            torch.addcmul(self._shift, images, self._scale, out=out)
        return out if self.opts.channels_last else out.contiguous()
