"""`NormalizeCast`, fastrefine's FFCV operation: uint8 HWC crops -> (x - mean) / std written straight in
the loader's dtype (fp32; bf16 rounded to nearest-even as its 16 bits; fp16 by a lookup table), the
seeded train flip in the same pass, inside FFCV's parallel compiled stage (see fastrefine.loaders.ffcv).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fastrefine.errors import UsageError

from .base import Normalization
from .ffcv_kernels import kernels
from .ffcv_runtime import import_ffcv, params_query


def normalize_cast_op(normalization: Normalization, flip_prob: float = 0.0):
    """An FFCV operation: uint8 HWC images -> (x - mean) / std in `normalization.dtype` (fp32, bf16 or
    fp16) by its `scale_shift()`, in FFCV's parallel compiled stage, mirrored left-right in the same pass
    for the samples whose seeded flip draw (seed, epoch, index) comes out below `flip_prob`."""
    return _normalize_cast_class()(normalization, flip_prob)


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
                    (AllocationQuery(previous_state.shape, self.storage), params_query()))

    return NormalizeCast
