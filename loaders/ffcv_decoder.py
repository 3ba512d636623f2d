"""`CropDecoder`, fastrefine's FFCV decoder ("fast"): per sample the shared sampler's box (train) or
FFCV's centre box (val), decoded at the DCT scale and window the box needs, then an INTER_AREA resize
(see fastrefine.loaders.ffcv for the whole story and the measurements behind the constants).
"""

from __future__ import annotations

import functools

import numpy as np

from . import crop_sampler
from .ffcv_kernels import kernels
from .ffcv_runtime import import_ffcv, params_query

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


def crop_decoder_op(output_size: tuple[int, int], *, train: bool, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                    center_ratio: float = 0.875, flip_prob: float = 0.0):
    """fastrefine's FFCV decoder (see the module docstring): seeded boxes, decode at the size they need."""
    return _crop_decoder_class()(output_size, train=train, scale=scale, ratio=ratio, center_ratio=center_ratio,
                                 flip_prob=flip_prob)


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
                     params_query()))

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
