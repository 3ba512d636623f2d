"""Batch JPEG decode and augmentation on the loader's device, without DALI (the torch backend's
`decode="device"` mode).

A batch of encoded images (uint8 CPU tensors) is decoded in one call to `torchvision.io.decode_jpeg(
list, device=...)`: nvJPEG's batched decoder on CUDA, libjpeg-turbo on the CPU (the same code, so CI
tests it). Then, for the whole batch at once: each image's crop box (train: RandomResizedCrop drawn per
(seed, epoch, sample), as the host path; val: the box that "resize the shorter side to
round(r / val_crop_ratio), center crop r" takes from the original) is cut out and resized to r x r by
one `torchvision.ops.roi_align` call over the images padded into one canvas (`aligned=True`, pixel
centres at +0.5 as in PIL and torchvision's resize; `sampling_ratio=-1`: ceil(box / r) x ceil(box / r)
bilinear samples averaged per output pixel, which is how the downscale is antialiased), flipped where
the flip was drawn, normalised in fp32 and cast once to the output dtype, channels_last.

Versus the host path (PIL decode + antialiased bilinear `resized_crop`) on the same boxes the output
differs by resampling only: measured on the Fashion-MNIST test data, see tests/test_loader_torch.py.
"""

from __future__ import annotations

import warnings

import torch

from fastrefine.errors import RunError

from .base import LoaderOptions

CANVAS_BYTES = 512 * 2**20  # images of one roi_align call are padded into one fp32 canvas of at most this


def _decode_jpeg():
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    return ImageReadMode, decode_image, decode_jpeg


def is_jpeg(blob: torch.Tensor) -> bool:
    return blob.numel() > 3 and int(blob[0]) == 0xFF and int(blob[1]) == 0xD8


def decode_batch(blobs: list[torch.Tensor], device: torch.device, where=None) -> list[torch.Tensor]:
    """Encoded images (1-D uint8 CPU tensors) -> (3, H, W) uint8 tensors on `device`.

    JPEGs go to `decode_jpeg` in one batched call (nvJPEG on CUDA); anything else (a PNG in an
    ImageFolder tree) is decoded on the CPU and moved. `where(i)` names the file of blob i in errors.
    """
    ImageReadMode, decode_image, decode_jpeg = _decode_jpeg()
    jpeg = [i for i, b in enumerate(blobs) if is_jpeg(b)]
    out: list[torch.Tensor | None] = [None] * len(blobs)
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image decoders deprecated (in favour of TorchCodec) on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        if jpeg:
            try:
                decoded = decode_jpeg([blobs[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                decoded = None
            if decoded is None:      # name the image that failed: decode them one by one on the CPU
                for i in jpeg:
                    try:
                        decode_jpeg(blobs[i], mode=ImageReadMode.RGB)
                    except RuntimeError as e:
                        name = where(i) if where else f"image {i} of the batch"
                        raise RunError(f"{name}: JPEG decode failed ({str(e).splitlines()[0]})") from None
                raise RunError(f"{where(jpeg[0]) if where else 'a batch'}: batched JPEG decode on {device} "
                               f"failed although every image decodes alone on the CPU")
            for i, img in zip(jpeg, decoded):
                out[i] = img
        for i, b in enumerate(blobs):
            if out[i] is None:
                try:
                    out[i] = decode_image(b, mode=ImageReadMode.RGB).to(device)
                except RuntimeError as e:
                    name = where(i) if where else f"image {i} of the batch"
                    raise RunError(f"{name}: decode failed ({str(e).splitlines()[0]})") from None
    return out


def center_box(width: int, height: int, resolution: int, val_crop_ratio: float) -> tuple[float, float, float, float]:
    """(top, left, h, w) in original pixels of torchvision's resize(shorter -> round(r / ratio)) then
    center_crop(r): the same window, as a box."""
    short = int(round(resolution / val_crop_ratio))
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_h, new_w = short, int(short * width / height)
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    sy, sx = height / new_h, width / new_w
    return top * sy, left * sx, resolution * sy, resolution * sx


def crop_resize(images: list[torch.Tensor], boxes: list[tuple[float, float, float, float]], resolution: int,
                *, canvas_bytes: int = CANVAS_BYTES) -> torch.Tensor:
    """(3, H_i, W_i) uint8 images and their (top, left, h, w) boxes -> (B, 3, r, r) fp32 in 0..255.

    Images are padded into a shared fp32 canvas; one roi_align call per canvas (one for the whole batch
    unless the images are large: a canvas holds at most `canvas_bytes`)."""
    from torchvision.ops import roi_align
    device = images[0].device
    out = torch.empty((len(images), 3, resolution, resolution), dtype=torch.float32, device=device)
    start = 0
    while start < len(images):
        stop, max_h, max_w = start, 0, 0
        while stop < len(images):
            h, w = images[stop].shape[-2:]
            nh, nw = max(max_h, h), max(max_w, w)
            if stop > start and (stop - start + 1) * 3 * nh * nw * 4 > canvas_bytes:
                break
            max_h, max_w, stop = nh, nw, stop + 1
        canvas = torch.zeros((stop - start, 3, max_h, max_w), dtype=torch.float32, device=device)
        for k in range(start, stop):
            h, w = images[k].shape[-2:]
            canvas[k - start, :, :h, :w].copy_(images[k])
        rois = torch.tensor([[k - start, left, top, left + w, top + h]
                             for k, (top, left, h, w) in zip(range(start, stop), boxes[start:stop])],
                            dtype=torch.float32).to(device, non_blocking=True)
        out[start:stop] = roi_align(canvas, rois, output_size=(resolution, resolution), spatial_scale=1.0,
                                    sampling_ratio=-1, aligned=True)
        start = stop
    return out


def scale_shift(opts: LoaderOptions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (1, 3, 1, 1) factors with x * scale + shift == (x / 255 - mean) / std for 0..255 pixels."""
    mean = torch.tensor(opts.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(opts.std, dtype=torch.float64).view(1, 3, 1, 1)
    return (1.0 / (255.0 * std)).float().to(device), (-mean / std).float().to(device)


def normalize_cast(pixels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, dtype: torch.dtype,
                   channels_last: bool) -> torch.Tensor:
    """uint8 or fp32 pixels in 0..255 -> (x / 255 - mean) / std computed in fp32, rounded once to `dtype`.

    (Three bf16 passes with bf16-rounded mean/std, as the torch loader did, err by up to 0.020; one
    rounding of the fp32 result by at most half a bf16 step: 0.0078 in [2, 4).)"""
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    y = torch.addcmul(shift, pixels.float() if pixels.dtype != torch.float32 else pixels, scale)
    return y if dtype == torch.float32 else y.to(dtype)


def device_batch(images: list[torch.Tensor], *, boxes, flips: list[bool], resolution: int,
                 scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Decoded images -> the loader's batch: crop + resize (one roi_align), flip, normalise + cast."""
    x = crop_resize(images, boxes, resolution)
    if any(flips):
        mask = torch.tensor(flips, dtype=torch.bool).to(x.device, non_blocking=True).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return normalize_cast(x, scale, shift, dtype=dtype, channels_last=channels_last)
