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

Randomness: the fast decoder draws each sample's box and flip from a counter-based generator keyed by
(seed, epoch, sample index) (splitmix64), never numba's per-thread generator, which FFCV does not seed:
two loaders with the same seed hand out the same batches, a resumed epoch is the same epoch, and the
number of workers changes nothing. The flip is drawn the same way wherever it is applied (NormalizeCast
on the CPU, the decoder itself on CUDA). The seed and epoch reach FFCV's compiled code through a small
buffer the operations allocate, filled before each epoch's thread starts. With "stock", the crop comes
from FFCV's unseeded generator (not reproducible); the flip is still seeded when normalising in FFCV.

Where normalisation runs (`normalize_in=`):
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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from fastrefine import manifest as _manifest
from fastrefine.errors import RunError, UsageError
from fastrefine.manifest import MANIFEST_NAME, read_manifest

from . import crop_sampler
from .base import LoaderBase, LoaderOptions, Normalization, shard_indices

log = logging.getLogger("fastrefine.loaders")

ORDERS = ("random", "quasi_random")
DECODERS = ("fast", "stock")
# TurboJPEG's lossless crop wants the window's top-left corner on an MCU boundary (8 px for 4:4:4,
# 16 for 4:2:0/4:2:2); 16 suits both. Another subsampling makes the call fail and the decoder falls
# back to decoding the whole image (at the same DCT scale), so nothing is lost but the speed-up.
MCU = 16
# The decoder cuts the box's window out before decoding (TurboJPEG's lossless crop) only when the box
# covers less than WINDOW_BELOW of an image of at least WINDOW_MIN_PIXELS: the crop re-encodes the
# window, which costs more than the decode it saves on small images or large boxes. Measured on the
# 2-core dev machine (train epochs, batch 64, images/s, stock FFCV decoder in brackets): 500x375 images
# at 160 px: no window 841, below 0.25 880, below 0.5 824 (502); 256x192 images at 224 px: no window
# 1,191, below 0.25 1,112, below 0.5 1,045 (1,069).
WINDOW_BELOW = 0.25
WINDOW_MIN_PIXELS = 1 << 17


# ------------------------------------------------------------------------------ FFCV and torch threads

@contextlib.contextmanager
def keep_torch_threads():
    """Restore this thread's torch thread count after FFCV code that sets it (FFCV's
    `Compiler.set_num_threads` calls `torch.set_num_threads`)."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def import_ffcv() -> None:
    """Import FFCV without letting its import-time `Compiler.set_num_threads(1)` change torch's threads.
    Every FFCV import of fastrefine goes through here first (later imports are no-ops)."""
    with keep_torch_threads():
        import ffcv.fields.rgb_image  # noqa: F401
        import ffcv.libffcv  # noqa: F401
        import ffcv.loader  # noqa: F401


# ---------------------------------------------------------------------- per-sample random draws, boxes

@functools.lru_cache(maxsize=None)
def kernels():
    """numba-compiled functions shared by the decoder, NormalizeCast, the tests and the benches.

    The crop sampler's own functions (random_box, flip_draw, sample_key, ...) come from
    `crop_sampler.jitted()`, the numba form of the sampler every backend shares."""
    import numba

    jit = numba.njit(nogil=True)
    sampler = crop_sampler.jitted()
    sample_key, random_box, flip_draw = sampler.sample_key, sampler.random_box, sampler.flip_draw

    @jit
    def center_box(height, width, ratio):
        """FFCV's CenterCropRGBImageDecoder box: a square of int(ratio * shorter side), centred."""
        c = np.int64(ratio * min(height, width))
        return (height - c) // 2, (width - c) // 2, c, c

    @jit
    def dct_eighths(h, w, out_h, out_w):
        """The smallest n of 1, 2, 4, 8 with the box, decoded at scale n/8, still >= the output size.
        Only these four scales have libjpeg-turbo's SIMD inverse DCTs: 3/8, 5/8, 6/8 and 7/8 run its
        plain C ones and decoded slower than 8/8 here (1,900 vs 1,320 us a 500x375 image)."""
        n = np.int64(8)
        while n > 1 and h * (n // 2) >= 8 * out_h and w * (n // 2) >= 8 * out_w:
            n //= 2
        return n

    @jit
    def area_taps(start, length, out, limit):
        """Box-filter taps of `out` output pixels over the source span [start, start + length)
        (fractional: a box measured on a DCT-scaled image; length >= out): for each output its first
        source pixel, how many, and each one's share of the output's footprint."""
        scale = length / out
        first, count = np.empty(out, np.int64), np.empty(out, np.int64)
        weights = np.zeros((out, np.int64(np.ceil(scale)) + 2), np.float32)
        for o in range(out):
            a, b = start + o * scale, start + (o + 1) * scale
            i0 = max(np.int64(0), np.int64(np.floor(a)))
            i1 = min(np.int64(np.ceil(b)), limit)
            first[o], count[o] = i0, i1 - i0
            for t in range(i1 - i0):
                weights[o, t] = (min(b, i0 + t + 1.0) - max(a, np.float64(i0 + t))) / scale
        return first, count, weights

    @numba.njit(nogil=True, boundscheck=False)
    def area_resize(src, top, height, left, width, dst):
        """OpenCV's INTER_AREA downscale of the box (top, left, height, width) of src (rows of RGB
        bytes, (H, W * 3)) into dst (h, w, 3), the box at least as large as dst. The box may have
        fractional edges (a box of the original image measured on a DCT-scaled decode): edge pixels
        count with the share of them inside it. Area-weighted means in float32, rounded half to even
        as OpenCV's saturate_cast. Against FFCV's `resize_crop` (OpenCV) on integer boxes: every value
        within 1 grey level, 0.003% of them off by one (sums in another order); about 3x faster (1,380
        vs 450 us a 318 px box to 160 px): a vectorised pass down the rows, then one across."""
        out_h, out_w = dst.shape[0], dst.shape[1]
        yf, yc, yw = area_taps(top, height, out_h, src.shape[0])
        xf, xc, xw = area_taps(left, width, out_w, src.shape[1] // 3)
        c0 = xf[0]
        n3 = (xf[out_w - 1] + xc[out_w - 1] - c0) * 3
        row = np.empty(n3, np.float32)
        for y in range(out_h):
            s = src[yf[y], c0 * 3:c0 * 3 + n3]
            wt = yw[y, 0]
            for q in range(n3):
                row[q] = wt * np.float32(s[q])
            for t in range(1, yc[y]):
                wt = yw[y, t]
                s = src[yf[y] + t, c0 * 3:c0 * 3 + n3]
                for q in range(n3):  # contiguous: LLVM vectorises it
                    row[q] += wt * np.float32(s[q])
            for x in range(out_w):
                a0, a1, a2 = np.float32(0.0), np.float32(0.0), np.float32(0.0)
                for t in range(xc[x]):
                    wt, p = xw[x, t], 3 * (xf[x] - c0 + t)
                    a0 += wt * row[p]
                    a1 += wt * row[p + 1]
                    a2 += wt * row[p + 2]
                dst[y, x, 0] = np.uint8(min(255.0, max(0.0, np.rint(a0))))
                dst[y, x, 1] = np.uint8(min(255.0, max(0.0, np.rint(a1))))
                dst[y, x, 2] = np.uint8(min(255.0, max(0.0, np.rint(a2))))

    @jit
    def mirror(img):
        width = img.shape[1]
        for y in range(img.shape[0]):
            for x in range(width // 2):
                for c in range(img.shape[2]):
                    a = img[y, x, c]
                    img[y, x, c] = img[y, width - 1 - x, c]
                    img[y, width - 1 - x, c] = a

    import types
    return types.SimpleNamespace(sample_key=sample_key, flip_draw=flip_draw, random_box=random_box,
                                 center_box=center_box, dct_eighths=dct_eighths, mirror=mirror,
                                 area_taps=area_taps, area_resize=area_resize)


# ------------------------------------------------------------------------------------ FFCV operations

class RankStrideOrder:
    """An FFCV traversal order (FFCV calls `order(loader)` on the instance it is handed): one global
    permutation per epoch from (seed, epoch), rank r keeps positions r, r+W, ... cut to N // W."""

    def __init__(self, *, seed: int, rank: int, world_size: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __call__(self, loader):
        from ffcv.traversal_order.base import TraversalOrder
        outer = self

        class _Bound(TraversalOrder):
            def sample_order(self, epoch: int) -> Sequence[int]:
                return outer.sample_order(self.indices, epoch)

        return _Bound(loader)

    def sample_order(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        perm = np.random.default_rng(self.seed + epoch).permutation(indices)
        per_rank = len(indices) // self.world_size
        return perm[self.rank::self.world_size][:per_rank]


def _as_ffcv_order(order):
    """Register RankStrideOrder as a virtual TraversalOrder so FFCV's isinstance check accepts it."""
    from ffcv.traversal_order.base import TraversalOrder
    TraversalOrder.register(RankStrideOrder)
    return order


def normalize_cast_op(normalization: Normalization, flip_prob: float = 0.0):
    """An FFCV operation: uint8 HWC images -> (x - mean) / std in `normalization.dtype` (fp32, bf16 or
    fp16) by its `scale_shift()`, in FFCV's parallel compiled stage, mirrored left-right in the same pass
    for the samples whose seeded flip draw (seed, epoch, index) comes out below `flip_prob`."""
    return _normalize_cast_class()(normalization, flip_prob)


def crop_decoder_op(output_size: tuple[int, int], *, train: bool, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                    center_ratio: float = 0.875, flip_prob: float = 0.0):
    """fastrefine's FFCV decoder (see the module docstring): seeded boxes, decode at the size they need."""
    return _crop_decoder_class()(output_size, train=train, scale=scale, ratio=ratio, center_ratio=center_ratio,
                                 flip_prob=flip_prob)


def _params_query():
    """The (seed, epoch) pair an epoch-seeded operation reads, one per sample slot (filled per epoch)."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    return AllocationQuery((2,), np.dtype("<i8"))


@functools.lru_cache(maxsize=None)
def _normalize_cast_class():
    import_ffcv()
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class NormalizeCast(Operation):
        # the numpy dtype FFCV allocates and the torch dtype the loader views it as
        STORAGE = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.int16}
        epoch_seeded = True  # its last buffer holds (seed, epoch), filled before each epoch

        def __init__(self, normalization: Normalization, flip_prob: float):
            super().__init__()
            self.flip_prob = float(flip_prob)
            dtype = normalization.dtype
            if dtype not in self.STORAGE:
                raise UsageError(f"FFCV loader: cannot normalise to {dtype} (fp32, bf16 or fp16)")
            self.scale, self.shift = normalization.scale_shift()
            self.torch_dtype, self.storage = dtype, np.dtype(self.STORAGE[dtype])
            # fp16 (numba has no CPU half type): the 256 x 3 possible outputs, as their 16 bits
            table = torch.from_numpy(np.arange(256, dtype=np.float32)[:, None] * self.scale + self.shift)
            self.table = table.to(torch.float16).view(torch.int16).numpy().copy()

        def generate_code(self):
            prange, scale, shift, table = Compiler.get_iterator(), self.scale, self.shift, self.table
            mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[self.torch_dtype]
            flip_prob = self.flip_prob
            flip_draw = kernels().flip_draw

            def normalize_cast(images, storage, indices):
                dst, params = storage
                seed, epoch = params[0, 0], params[0, 1]
                height, width = images.shape[1], images.shape[2]
                row = width * 3
                sc, sh = np.empty(row, np.float32), np.empty(row, np.float32)  # per-channel values along a row
                for q in range(row):
                    sc[q], sh[q] = scale[q % 3], shift[q % 3]
                for i in prange(images.shape[0]):
                    flip = flip_draw(seed, epoch, indices[i], flip_prob)
                    src, out = images[i].reshape(height, row), dst[i].reshape(height, row)
                    tmp = np.empty(row, np.float32)  # per image: each thread its own row buffer
                    bits = tmp.view(np.uint32)
                    for y in range(height):
                        if mode == 2:  # fp16: a table lookup on the uint8 value
                            for p in range(width):
                                q = width - 1 - p if flip else p
                                for c in range(3):
                                    out[y, 3 * q + c] = table[src[y, 3 * p + c], c]
                            continue
                        for q in range(row):  # a straight loop: LLVM vectorises it
                            tmp[q] = np.float32(src[y, q]) * sc[q] + sh[q]
                        if mode == 0 and not flip:
                            out[y, :] = tmp
                        elif mode == 0:
                            for p in range(width):
                                q = width - 1 - p
                                out[y, 3 * q], out[y, 3 * q + 1], out[y, 3 * q + 2] = tmp[3 * p], tmp[3 * p + 1], tmp[3 * p + 2]
                        else:  # fp32 -> bf16, round to nearest even: the top 16 bits after rounding
                            for p in range(width):
                                q = width - 1 - p if flip else p
                                for c in range(3):
                                    b = bits[3 * p + c]
                                    out[y, 3 * q + c] = np.int16((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16)
                return dst[:images.shape[0]]

            normalize_cast.is_parallel = True
            normalize_cast.with_indices = True  # FFCV passes the batch's sample indices
            return normalize_cast

        def declare_state_and_memory(self, previous_state):
            if previous_state.dtype != np.uint8 or len(previous_state.shape) != 3:
                raise UsageError("FFCV loader: NormalizeCast expects uint8 HWC images")
            return (replace(previous_state, jit_mode=True, dtype=self.storage),
                    (AllocationQuery(previous_state.shape, self.storage), _params_query()))

    return NormalizeCast


@functools.lru_cache(maxsize=None)
def _crop_decoder_class():
    import_ffcv()
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    # a SimpleRGBImageDecoder subclass, as FFCV's own crop decoders: FFCV takes the first operation of a
    # pipeline as its decoder only if it is an instance of the field's decoder class
    class CropDecoder(SimpleRGBImageDecoder):
        """RGBImageField -> uint8 (h, w, 3) crops: train a seeded RandomResizedCrop box, val FFCV's
        centre box; JPEGs decoded through `imdecode` with the box's window and a DCT scale."""

        epoch_seeded = True

        def __init__(self, output_size, *, train: bool, scale, ratio, center_ratio: float, flip_prob: float):
            super().__init__()
            self.output_size = tuple(output_size)
            self.train, self.scale, self.ratio = bool(train), tuple(scale), tuple(ratio)
            self.center_ratio, self.flip_prob = float(center_ratio), float(flip_prob)

        def declare_state_and_memory(self, previous_state):
            max_h, max_w = int(self.metadata["height"].max()), int(self.metadata["width"].max())
            shape = (self.output_size[0], self.output_size[1], 3)
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                    (AllocationQuery(shape, np.dtype("<u1")),
                     AllocationQuery((max_h * max_w * 3,), np.dtype("<u1")),
                     _params_query()))

        def generate_code(self):
            k = kernels()
            sample_key, flip_draw, random_box, center_box = k.sample_key, k.flip_draw, k.random_box, k.center_box
            dct_eighths, mirror, area_resize = k.dct_eighths, k.mirror, k.area_resize
            mem_read, my_range = self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            jpg = int(IMAGE_MODES["jpg"])
            out_h, out_w = int(self.output_size[0]), int(self.output_size[1])
            train, center_ratio, flip_prob = self.train, self.center_ratio, self.flip_prob
            s_lo, s_hi = float(self.scale[0]), float(self.scale[1])
            r_lo, r_hi = float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))
            window_below, window_min, mcu = float(WINDOW_BELOW), np.int64(WINDOW_MIN_PIXELS), np.int64(MCU)
            stream_crop = crop_sampler.STREAM_CROP

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, params = my_storage
                seed, epoch = params[0, 0], params[0, 1]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.int64(field["height"]), np.int64(field["width"])
                    if train:
                        top, left, h, w = random_box(sample_key(seed, epoch, source_ix, stream_crop),
                                                     height, width, s_lo, s_hi, r_lo, r_hi)
                    else:
                        top, left, h, w = center_box(height, width, center_ratio)
                    if field["mode"] == jpg:
                        n = dct_eighths(h, w, out_h, out_w)
                        temp = temp_storage[dst_ix]
                        y0, x0, wh, ww = np.int64(0), np.int64(0), height, width
                        status = -1
                        if height * width >= window_min and h * w < window_below * height * width:
                            y0, x0 = (top // mcu) * mcu, (left // mcu) * mcu
                            wh, ww = top + h - y0, left + w - x0
                            status = imdecode_c(image_data, temp, np.uint32(height), np.uint32(width),
                                                np.uint32(wh), np.uint32(ww), np.uint32(x0), np.uint32(y0),
                                                np.uint32(n), np.uint32(8), True, False)
                        if status != 0:  # the whole image (or a window TurboJPEG refused)
                            y0, x0, wh, ww = np.int64(0), np.int64(0), height, width
                            imdecode_c(image_data, temp, np.uint32(height), np.uint32(width),
                                       np.uint32(height), np.uint32(width), np.uint32(0), np.uint32(0),
                                       np.uint32(n), np.uint32(8), False, False)
                        sh, sw = (wh * n + 7) // 8, (ww * n + 7) // 8  # TJSCALED: what TurboJPEG wrote
                        pic = temp[:sh * sw * 3].reshape(sh, sw, 3)
                        rows = temp[:sh * sw * 3].reshape(sh, sw * 3)
                    else:
                        n, y0, x0 = np.int64(8), np.int64(0), np.int64(0)
                        pic = image_data.reshape(height, width, 3)
                        rows = image_data.reshape(height, width * 3)
                    if h >= out_h and w >= out_w:  # a downscale: our INTER_AREA, on the exact box
                        f = n / 8.0  # scaled pixel k holds source pixels [k / f, (k + 1) / f)
                        area_resize(rows, (top - y0) * f, h * f, (left - x0) * f, w * f, destination[dst_ix])
                    else:  # an upscale (never DCT-scaled): OpenCV's, as the stock decoder
                        resize_c(pic, top - y0, top - y0 + h, left - x0, left - x0 + w, destination[dst_ix])
                    if flip_draw(seed, epoch, source_ix, flip_prob):
                        mirror(destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return CropDecoder


@functools.lru_cache(maxsize=None)
def _epoch_class():
    import_ffcv()
    from ffcv.loader.epoch_iterator import EpochIterator

    class Epoch(EpochIterator):
        """FFCV's EpochIterator with three changes: its thread starts only once the (seed, epoch)
        buffers of the epoch-seeded operations are filled; an exception in the thread is kept in
        `error` (the consumer polls `is_alive`); `stop()` ends the thread even when nobody reads on."""

        def __init__(self, loader, order, *, seed: int, epoch: int):
            self.error: BaseException | None = None
            self._hold = True
            super().__init__(loader, order)  # ends with self.start(): held until the buffers are filled
            for node_id, node in loader.graph.id_to_node.items():
                op = getattr(node, "operation", None) or getattr(node, "decoder", None)
                if getattr(op, "epoch_seeded", False):
                    self.memory_allocations["operation"][node_id][-1][...] = (seed, epoch)
            self._hold = False
            self.start()

        def start(self):
            if not self._hold:
                super().start()

        def run(self):
            try:
                super().run()  # its Compiler.set_num_threads changes this thread's torch threads only
            except BaseException as e:  # noqa: BLE001  reported to the consumer by the loader
                self.error = e

        def stop(self, *, timeout: float = 120.0) -> bool:
            """End the thread (it finishes the batch in hand) and release the epoch's memory context."""
            self.terminate_event.set()
            self.iter_ixes = iter(())  # no further batch: the thread's next() ends the epoch
            deadline = time.monotonic() + timeout
            while self.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    while True:  # room for the thread's last put (the end-of-epoch marker)
                        self.output_queue.get_nowait()
                self.join(0.05)
            if self.is_alive():
                return False
            self.close()
            return True

        def close(self):
            self.terminate_event.set()
            if not self.closed:
                self.closed = True
                self.memory_context.__exit__(None, None, None)

    return Epoch


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
    check_recorded = getattr(_manifest, "check_recorded_file", None)
    if data_dir is not None and check_recorded is not None:
        check_recorded(data_dir, path)
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
    `os_cache` (let the OS page cache hold the file; False = FFCV's own process cache), `normalize_in`
    ("torch" | "ffcv" | None = by device), `batches_ahead`, `copy` (hand out copies of the images
    normalised in FFCV instead of FFCV's recycled buffers).

    `workers`: the FFCV threads that decode (opts.workers, at least 1), for the run's record."""

    backend = "ffcv"

    def __init__(self, data: Path, opts: LoaderOptions, *, decoder: str = "fast", order: str = "random",
                 os_cache: bool = True, normalize_in: str | None = None, batches_ahead: int = 3,
                 copy: bool = False):
        if normalize_in is None:
            normalize_in = "ffcv" if opts.device.type == "cpu" else "torch"
        if decoder not in DECODERS:
            raise UsageError(f"FFCV loader: decoder {decoder!r}, expected one of {DECODERS}")
        if order not in ORDERS:
            raise UsageError(f"FFCV loader: order {order!r}, expected one of {ORDERS}")
        if normalize_in not in ("torch", "ffcv"):
            raise UsageError(f"FFCV loader: normalize_in {normalize_in!r}, expected 'torch' or 'ffcv'")
        if normalize_in == "ffcv" and opts.device.type != "cpu":
            raise UsageError("FFCV loader: normalize_in='ffcv' runs on the CPU only (FFCV's GPU "
                             "NormalizeImage needs cupy); use 'torch'")
        if batches_ahead < 1:
            raise UsageError(f"FFCV loader: batches_ahead must be at least 1, got {batches_ahead}")
        self.opts = opts
        data = Path(data)
        self.path = beton_path(data, opts.split)
        self.decoder = decoder
        self.workers = max(1, opts.workers)
        self.normalize_in = normalize_in
        self.normalize_on = "host" if normalize_in == "ffcv" else "device"
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
        in_ffcv = self.normalize_in == "ffcv"  # then NormalizeCast flips, in its own pass
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
        if not o.do_shuffle:
            indices = None if o.world_size == 1 else np.array(
                shard_indices(n, rank=o.rank, world_size=o.world_size))
            return OrderOption.SEQUENTIAL, indices
        if o.world_size == 1:
            return (OrderOption.RANDOM if order == "random" else OrderOption.QUASI_RANDOM), None
        if order == "quasi_random":  # pages shuffled within a fixed rank shard
            return OrderOption.QUASI_RANDOM, np.arange(o.rank, n, o.world_size)[: n // o.world_size]
        return _as_ffcv_order(RankStrideOrder(seed=o.seed, rank=o.rank, world_size=o.world_size)), None

    def _make_loader(self, *, order: str, os_cache: bool, batches_ahead: int, n: int):
        import_ffcv()
        from ffcv.loader import Loader

        ffcv_order, indices = self._order_and_indices(order, n)
        try:
            with keep_torch_threads():  # Loader() calls Compiler.set_num_threads(num_workers)
                return Loader(str(self.path), batch_size=self.batch_size, num_workers=self.workers,
                              os_cache=os_cache, order=ffcv_order, distributed=False, seed=self.opts.seed,
                              indices=indices, drop_last=self.opts.do_drop_last, batches_ahead=batches_ahead,
                              pipelines={"image": self._image_pipeline(), "label": self._label_pipeline()})
        except ValueError as e:  # e.g. QUASI_RANDOM with os_cache=True
            raise UsageError(f"FFCV loader for {self.path}: {e}") from e

    # -- the interface -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        n = len(self._ffcv().first_traversal_order)
        return (n // self.batch_size) * self.batch_size if self.opts.do_drop_last else n

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
            it = _epoch_class()(loader, order[:len(loader) * self.batch_size], seed=self.opts.seed, epoch=epoch)
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
        if self.normalize_in == "ffcv":  # already normalised, in opts.dtype's bits (see NormalizeCast)
            out = images.view(self.opts.dtype)
            if self.copy:
                out = out.clone(memory_format=torch.channels_last)
        else:  # one fp32 multiply-add per element, written once in opts.dtype
            out = torch.empty(images.shape, dtype=self.opts.dtype, device=images.device,
                              memory_format=torch.channels_last)
            torch.addcmul(self._shift, images, self._scale, out=out)
        return out if self.opts.channels_last else out.contiguous()
