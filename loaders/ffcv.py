"""FFCV backend: reads the converter's `.beton` files (fields `image` RGBImageField, `label` IntField).

Image pipeline: RandomResizedCropRGBImageDecoder (train) or CenterCropRGBImageDecoder (val), then
on the CPU NormalizeCast (normalise + cast + the train flip, one pass) -> ToTensor -> ToTorchImage
(channels_last); on CUDA RandomHorizontalFlip (train) -> ToTensor -> ToDevice -> ToTorchImage, and
torch normalises the uint8 batch on the GPU.

Where normalisation runs (`normalize_in=`):
- "ffcv" (CPU only): `NormalizeCast`, this module's own FFCV operation, on the uint8 HWC numpy batch
  inside FFCV's compiled worker threads, *before* ToTensor: (x - mean) / std computed in fp32 and
  written straight in opts.dtype (fp32; bf16 rounded to nearest-even and written as its 16 bits;
  fp16 by a lookup table), one pass, no later cast. (FFCV's own NormalizeImage does fp32/fp16 by a
  table lookup and has no bf16; placed after ToTensor its CPU kernel never finishes.) FFCV's GPU
  normalisation needs cupy, which this project does not ship, so "ffcv" is refused on CUDA.
- "torch": uint8 crosses to the device (4x fewer bytes than fp32), then one torch expression casts to
  opts.dtype and normalises there.
- default (None): "ffcv" on the CPU (its kernel runs in FFCV's worker threads, torch's elementwise ops
  would run in the training thread; see docs/loaders.md), "torch" on CUDA.
On the CPU no ToDevice runs (it would be a copy onto the same device). Images normalised in FFCV are
FFCV's own output buffers, which it recycles `batches_ahead + 2` batches later: a batch stays valid
while the next one is drawn, which is all a training loop needs; `copy=True` hands out copies that a
caller may keep for ever. Labels are always copied (a few bytes).

Order: RANDOM (default) or QUASI_RANDOM (`order=`; reads pages in a shuffled order, for datasets larger
than RAM with `os_cache=False`), both deterministic from seed + epoch via FFCV's own traversal orders.
With world_size > 1, train uses `RankStrideOrder`: the same seed+epoch permutation of all N samples on
every rank, rank r taking positions r, r+W, ... cut to N // W, so ranks never overlap and all run the
same number of steps. (FFCV's own `distributed=True` asks torch.distributed for rank and world size,
ignoring the loader's options, pads ranks with duplicate samples and refuses QUASI_RANDOM.) Val with
world_size > 1 reads `indices=` the rank's stride shard in sequence: every image exactly once overall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from fastrefine.errors import UsageError
from fastrefine.manifest import MANIFEST_NAME, read_manifest

from .base import LoaderBase, LoaderOptions, mean_std_tensors, shard_indices

ORDERS = ("random", "quasi_random")


def _traversal_base():
    from ffcv.traversal_order.base import TraversalOrder
    return TraversalOrder


class RankStrideOrder:
    """An FFCV traversal order (FFCV calls `order(loader)` on the instance it is handed): one global
    permutation per epoch from (seed, epoch), rank r keeps positions r, r+W, ... cut to N // W."""

    def __init__(self, *, seed: int, rank: int, world_size: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __call__(self, loader):
        outer = self

        class _Bound(_traversal_base()):
            def sample_order(self, epoch: int) -> Sequence[int]:
                return outer.sample_order(self.indices, epoch)

        return _Bound(loader)

    def sample_order(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        perm = np.random.default_rng(self.seed + epoch).permutation(indices)
        per_rank = len(indices) // self.world_size
        return perm[self.rank::self.world_size][:per_rank]


def _as_ffcv_order(order):
    """Register RankStrideOrder as a virtual TraversalOrder so FFCV's isinstance check accepts it."""
    _traversal_base().register(RankStrideOrder)
    return order


_NORMALIZE_CAST = None


def normalize_cast_op(mean: Sequence[float], std: Sequence[float], dtype: torch.dtype, flip_prob: float = 0.0):
    """An FFCV operation: uint8 HWC images -> (x - mean) / std in `dtype` (fp32, bf16 or fp16), in
    FFCV's parallel compiled stage, mirrored left-right with probability `flip_prob` in the same pass
    (what FFCV's RandomHorizontalFlip does in a pass of its own). `mean`/`std` in pixel units."""
    global _NORMALIZE_CAST
    if _NORMALIZE_CAST is None:
        _NORMALIZE_CAST = _define_normalize_cast()
    return _NORMALIZE_CAST(np.asarray(mean, np.float32), np.asarray(std, np.float32), dtype, flip_prob)


def _define_normalize_cast():
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class NormalizeCast(Operation):
        # the numpy dtype FFCV allocates and the torch dtype the loader views it as
        STORAGE = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.int16}

        def __init__(self, mean: np.ndarray, std: np.ndarray, dtype: torch.dtype, flip_prob: float):
            super().__init__()
            self.flip_prob = float(flip_prob)
            if dtype not in self.STORAGE:
                raise UsageError(f"FFCV loader: cannot normalise to {dtype} (fp32, bf16 or fp16)")
            self.scale, self.shift = (1.0 / std).astype(np.float32), (-mean / std).astype(np.float32)
            self.torch_dtype, self.storage = dtype, np.dtype(self.STORAGE[dtype])
            # fp16 (numba has no CPU half type): the 256 x 3 possible outputs, as their 16 bits
            table = torch.from_numpy(np.arange(256, dtype=np.float32)[:, None] * self.scale + self.shift)
            self.table = table.to(torch.float16).view(torch.int16).numpy().copy()

        def generate_code(self):
            prange, scale, shift, table = Compiler.get_iterator(), self.scale, self.shift, self.table
            mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[self.torch_dtype]
            flip_prob = self.flip_prob

            def normalize_cast(images, dst):
                height, width = images.shape[1], images.shape[2]
                row = width * 3
                # numba's per-thread RNG, as FFCV's own RandomHorizontalFlip (not seeded by FFCV)
                flips = np.random.rand(images.shape[0]) < flip_prob
                sc, sh = np.empty(row, np.float32), np.empty(row, np.float32)  # per-channel values along a row
                for k in range(row):
                    sc[k], sh[k] = scale[k % 3], shift[k % 3]
                for i in prange(images.shape[0]):
                    src, out = images[i].reshape(height, row), dst[i].reshape(height, row)
                    tmp = np.empty(row, np.float32)  # per image: each thread its own row buffer
                    bits = tmp.view(np.uint32)
                    for y in range(height):
                        if mode == 2:  # fp16: a table lookup on the uint8 value
                            for p in range(width):
                                q = width - 1 - p if flips[i] else p
                                for c in range(3):
                                    out[y, 3 * q + c] = table[src[y, 3 * p + c], c]
                            continue
                        for k in range(row):  # a straight loop: LLVM vectorises it
                            tmp[k] = np.float32(src[y, k]) * sc[k] + sh[k]
                        if mode == 0 and not flips[i]:
                            out[y, :] = tmp
                        elif mode == 0:
                            for p in range(width):
                                q = width - 1 - p
                                out[y, 3 * q], out[y, 3 * q + 1], out[y, 3 * q + 2] = tmp[3 * p], tmp[3 * p + 1], tmp[3 * p + 2]
                        else:  # fp32 -> bf16, round to nearest even: the top 16 bits after rounding
                            for p in range(width):
                                q = width - 1 - p if flips[i] else p
                                for c in range(3):
                                    b = bits[3 * p + c]
                                    out[y, 3 * q + c] = np.int16((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16)
                return dst

            normalize_cast.is_parallel = True
            return normalize_cast

        def declare_state_and_memory(self, previous_state):
            if previous_state.dtype != np.uint8 or len(previous_state.shape) != 3:
                raise UsageError("FFCV loader: NormalizeCast expects uint8 HWC images")
            return (replace(previous_state, jit_mode=True, dtype=self.storage),
                    AllocationQuery(previous_state.shape, self.storage))

    return NormalizeCast


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


class FfcvLoader(LoaderBase):
    """BatchLoader over an FFCV .beton. Extra keyword options: `order` ("random" | "quasi_random"),
    `os_cache` (let the OS page cache hold the file; False = FFCV's own process cache),
    `normalize_in` ("torch" | "ffcv" | None = by device), `batches_ahead`, `copy` (hand out copies of
    the images normalised in FFCV instead of FFCV's recycled buffers)."""

    backend = "ffcv"

    def __init__(self, data: Path, opts: LoaderOptions, *, order: str = "random", os_cache: bool = True,
                 normalize_in: str | None = None, batches_ahead: int = 3, copy: bool = False):
        if normalize_in is None:
            normalize_in = "ffcv" if opts.device.type == "cpu" else "torch"
        if order not in ORDERS:
            raise UsageError(f"FFCV loader: order {order!r}, expected one of {ORDERS}")
        if normalize_in not in ("torch", "ffcv"):
            raise UsageError(f"FFCV loader: normalize_in {normalize_in!r}, expected 'torch' or 'ffcv'")
        if normalize_in == "ffcv" and opts.device.type != "cpu":
            raise UsageError("FFCV loader: normalize_in='ffcv' runs on the CPU only (FFCV's GPU "
                             "NormalizeImage needs cupy); use 'torch'")
        if not 0 <= opts.rank < opts.world_size:
            raise UsageError(f"FFCV loader: rank {opts.rank} is outside world_size {opts.world_size}")
        self.opts = opts
        self.path = beton_path(Path(data), opts.split)
        self.batch_size = opts.batch_size
        self.resolution = opts.resolution
        self.normalize_in = normalize_in
        self.normalize_on = "host" if normalize_in == "ffcv" else "device"
        self.copy = copy
        self._mean, self._std = mean_std_tensors(opts)
        self._decoder = None
        self._loader = self._make_loader(order=order, os_cache=os_cache, batches_ahead=batches_ahead)
        self.total = int(self._loader.reader.num_samples)

    # -- construction --------------------------------------------------------------------------
    def _image_pipeline(self) -> list:
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        o, r = self.opts, self.resolution
        if o.train:
            self._decoder = RandomResizedCropRGBImageDecoder((r, r), scale=o.scale, ratio=o.ratio)
        else:
            self._decoder = CenterCropRGBImageDecoder((r, r), ratio=o.val_crop_ratio)
        ops, flip_prob = [self._decoder], o.flip_prob
        if self.normalize_in == "ffcv":  # the flip happens inside NormalizeCast's pass
            ops.append(normalize_cast_op(np.array(o.mean) * 255, np.array(o.std) * 255, o.dtype, flip_prob))
        elif flip_prob > 0:
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
        if not o.do_shuffle:
            indices = None if o.world_size == 1 else np.array(
                shard_indices(n, rank=o.rank, world_size=o.world_size))
            return OrderOption.SEQUENTIAL, indices
        if o.world_size == 1:
            return (OrderOption.RANDOM if order == "random" else OrderOption.QUASI_RANDOM), None
        if order == "quasi_random":  # pages shuffled within a fixed rank shard
            return OrderOption.QUASI_RANDOM, np.arange(o.rank, n, o.world_size)[: n // o.world_size]
        return _as_ffcv_order(RankStrideOrder(seed=o.seed, rank=o.rank, world_size=o.world_size)), None

    def _make_loader(self, *, order: str, os_cache: bool, batches_ahead: int):
        from ffcv.loader import Loader
        from ffcv.reader import Reader

        n = int(Reader(str(self.path)).num_samples)
        if n < self.opts.world_size:
            raise UsageError(f"{self.path}: {n} images, fewer than world_size {self.opts.world_size}")
        ffcv_order, indices = self._order_and_indices(order, n)
        try:
            return Loader(str(self.path), batch_size=self.batch_size, num_workers=max(1, self.opts.workers),
                          os_cache=os_cache, order=ffcv_order, distributed=False, seed=self.opts.seed,
                          indices=indices, drop_last=self.opts.do_drop_last, batches_ahead=batches_ahead,
                          pipelines={"image": self._image_pipeline(), "label": self._label_pipeline()})
        except ValueError as e:  # e.g. QUASI_RANDOM with os_cache=True
            raise UsageError(f"FFCV loader for {self.path}: {e}") from e

    # -- the interface -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        n = len(self._loader.first_traversal_order)
        return (n // self.batch_size) * self.batch_size if self.opts.do_drop_last else n

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        self._loader.next_epoch = epoch  # FFCV's orders derive the permutation from seed + epoch

    def set_resolution(self, resolution: int) -> None:
        """Change the decoder's output size; FFCV re-plans its buffers and recompiles next epoch."""
        if resolution < 1:
            raise UsageError(f"FFCV loader: resolution must be positive, got {resolution}")
        if resolution == self.resolution:
            return
        self.resolution = resolution
        self._decoder.output_size = (resolution, resolution)
        self._loader.generate_code()  # re-collects the allocation plan, which reads output_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # labels are copied out of FFCV's recycled buffers; images are when normalised in torch or with copy=True
        for images, labels in self._loader:
            yield self._finish(images), labels.reshape(-1).to(torch.int64, copy=True)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize_in == "ffcv":  # already normalised, in opts.dtype's bits (see NormalizeCast)
            out = images.view(self.opts.dtype)
            if self.copy:
                out = out.clone(memory_format=torch.channels_last)
        else:
            out = images.to(self.opts.dtype, memory_format=torch.channels_last).sub_(self._mean).div_(self._std)
        return out if self.opts.channels_last else out.contiguous()
