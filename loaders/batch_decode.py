"""Batch JPEG decode and augmentation on the loader's device, without DALI (the torch backend's
`decode="device"` mode).

A batch of encoded images (uint8 CPU tensors) is decoded in one call to `torchvision.io.decode_jpeg(
list, device=...)`: nvJPEG's batched decoder on CUDA, libjpeg-turbo on the CPU (the same code, so CI
tests it). Then, for the whole batch at once: each image's crop box (train: the shared sampler's
RandomResizedCrop per (seed, epoch, sample), as the host path; val: the box that "resize the shorter side to
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

CANVAS_BYTES = 512 * 2**20  # images of one roi_align call are padded into one fp32 canvas of at most this


def _decode_jpeg():
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    return ImageReadMode, decode_image, decode_jpeg


def is_jpeg(blob: torch.Tensor) -> bool:
    return blob.numel() > 3 and int(blob[0]) == 0xFF and int(blob[1]) == 0xD8


def device_decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One batched `decode_jpeg` call on `device` (nvJPEG on CUDA). Raises RuntimeError when the decoder
    rejects any image of the list (nvJPEG never decodes CMYK JPEGs).

    On CUDA the calling stream is synchronised first: torchvision allocates the outputs on the caller's
    stream but decodes on a stream of its own that does not wait for the caller's (its
    decode_jpegs_cuda.cpp records an event after the decode, none before), so a block freed by a kernel
    still queued on the caller's stream could be written while that kernel reads it. The torch loader
    calls this from its decode thread, on a stream of its own, where the wait costs the training nothing.
    """
    ImageReadMode, _, decode_jpeg = _decode_jpeg()
    if device.type == "cuda":  # an event wait, not Stream.synchronize: sync debug mode "error" allows it
        torch.cuda.current_stream(device).record_event().synchronize()
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image decoders deprecated (in favour of TorchCodec) on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)


def host_decode(blob: torch.Tensor) -> torch.Tensor:
    """One image decoded on the CPU (libjpeg-turbo, which converts CMYK/YCCK JPEGs; PNG and the rest)."""
    ImageReadMode, decode_image, _ = _decode_jpeg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(blob, mode=ImageReadMode.RGB)


def decode_batch(blobs: list[torch.Tensor], device: torch.device, where=None) -> list[torch.Tensor]:
    """Encoded images (1-D uint8 CPU tensors) -> (3, H, W) uint8 tensors on `device`.

    JPEGs go to `device_decode` in one batched call (nvJPEG on CUDA). When the decoder rejects the
    batch, each JPEG is tried alone on the device and only the ones it rejects (a CMYK file) are decoded
    on the CPU and moved: the batch goes on. Anything else (a PNG in an ImageFolder tree) is decoded on the
    CPU. An image no decoder reads is an error naming its file (`where(i)`).
    """
    jpeg = [i for i, b in enumerate(blobs) if is_jpeg(b)]
    out: list[torch.Tensor | None] = [None] * len(blobs)
    if jpeg:
        try:
            decoded = device_decode([blobs[i] for i in jpeg], device)
        except RuntimeError:
            decoded = []
            for i in jpeg:           # find the rejected images; the others stay on the device decoder
                try:
                    decoded.append(device_decode([blobs[i]], device)[0])
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(jpeg, decoded):
            out[i] = img
    for i, b in enumerate(blobs):
        if out[i] is None:
            try:
                out[i] = host_to(host_decode(b), device)
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


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. On CUDA it is pinned first and copied without blocking the host (a
    non_blocking copy from pageable memory is a synchronous one; the pinned block goes back to torch's
    host cache only when the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def pad_edges(slot: torch.Tensor, image: torch.Tensor) -> None:
    """Copy a (3, h, w) image into the top-left of a larger (3, H, W) `slot` and fill the rest by
    repeating its last row and column (edge replication, as roi_align does at the canvas border)."""
    h, w = image.shape[-2:]
    slot[:, :h, :w].copy_(image)
    slot[:, h:, :w].copy_(slot[:, h - 1:h, :w].expand(-1, slot.shape[-2] - h, -1))
    slot[:, :, w:].copy_(slot[:, :, w - 1:w].expand(-1, -1, slot.shape[-1] - w))


def crop_resize(images: list[torch.Tensor], boxes: list[tuple[float, float, float, float]], resolution: int,
                *, canvas_bytes: int = CANVAS_BYTES) -> torch.Tensor:
    """(3, H_i, W_i) uint8 images and their (top, left, h, w) boxes -> (B, 3, r, r) fp32 in 0..255.

    Images are padded into a shared fp32 canvas, each with its last row and column repeated into the
    padding (`pad_edges`), so a box at an image's bottom or right edge samples that edge as it would on
    the image alone (roi_align clamps to the canvas, not to the image); one roi_align call per canvas (one
    for the whole batch unless the images are large: a canvas holds at most `canvas_bytes`)."""
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
        canvas = torch.empty((stop - start, 3, max_h, max_w), dtype=torch.float32, device=device)
        for k in range(start, stop):
            pad_edges(canvas[k - start], images[k])
        rois = torch.tensor([[k - start, left, top, left + w, top + h]
                             for k, (top, left, h, w) in zip(range(start, stop), boxes[start:stop])],
                            dtype=torch.float32)
        rois = host_to(rois, device)
        out[start:stop] = roi_align(canvas, rois, output_size=(resolution, resolution), spatial_scale=1.0,
                                    sampling_ratio=-1, aligned=True)
        start = stop
    return out


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
        mask = host_to(torch.tensor(flips, dtype=torch.bool), x.device).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return normalize_cast(x, scale, shift, dtype=dtype, channels_last=channels_last)
