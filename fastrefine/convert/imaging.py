"""Turn one source file into clean JPEG bytes, or into a reason it was skipped.

This is the function the process pool runs for every image, so it imports nothing heavy: PIL, numpy,
the standard library and, for the fast path, libturbojpeg and OpenCV. It never raises for a bad image;
it returns a `Cleaned` whose `reason` says why the file was skipped.

Two paths give the same kind of result:
- fast (`turbo.py`): a plain RGB or grayscale JPEG with no EXIF rotation is decoded by TurboJPEG straight
  to the smallest DCT scale that still covers the target size, shrunk the rest of the way by OpenCV and
  encoded by TurboJPEG. Any libjpeg warning sends the file to the PIL path instead; the warning is kept
  with the image (the manifest lists it), or the image is skipped with `strict`.
- PIL: everything else (PNG or other content, CMYK, 16-bit, EXIF-rotated, damaged files), and every file
  where libturbojpeg or OpenCV is missing. PIL refuses truncated files and names what is wrong.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import turbo

# Sources of more pixels are refused from their header, before any decode: a progressive JPEG holds ~3
# bytes of DCT coefficients per pixel while it decodes, whatever the scale (384 MB at this limit), and
# a 15 kB file can claim 13000x13000. 128 MP still takes the largest camera photos (11648x8736, 102 MP).
MAX_PIXELS = 128_000_000

# Modes PIL can hand back that `.convert("RGB")` maps badly (16/32-bit integer, float).
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class Cleaned:
    """What one source file became: `data` (JPEG bytes) with its size, or `kind`+`reason` when skipped."""

    data: bytes | None = None
    width: int = 0
    height: int = 0
    kind: str = ""                  # short category of a skip: "empty", "unreadable", "truncated", ...
    reason: str = ""                # one human line naming what was wrong
    notes: tuple[str, ...] = field(default_factory=tuple)   # what was repaired: "cmyk", "png-content", ...
    warning: str = ""               # libjpeg's warning on a kept image (damaged data it stepped over)

    @property
    def ok(self) -> bool:
        return self.data is not None


def target_size(*, width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side at most `max_side`, aspect kept, never upscaled."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def check_pixels(width: int, height: int) -> str | None:
    """Why a source of this size is refused (one line), or None: more than MAX_PIXELS pixels."""
    if width * height > MAX_PIXELS:
        return (f"{width}x{height} = {width * height / 1e6:.0f} MP, more than the {MAX_PIXELS / 1e6:.0f} MP "
                f"fastrefine decodes")
    return None


def clean_image(path: str, max_side: int, quality: int, strict: bool = False) -> Cleaned:
    """Decode `path` (a JPEG at the smallest DCT scale that still reaches the target size, anything else
    at full size), apply EXIF orientation, make it RGB, shrink it, and encode it as a JPEG: the one
    encode of this image, whose bytes both the DALI shards and the `.beton` store. Plain JPEGs take the
    TurboJPEG path, the rest PIL's (see the module's docstring).

    Truncated files are refused because PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` is left at False. A JPEG
    on which libjpeg warns (corrupt data it stepped over) is kept with the warning, or skipped when
    `strict`. A source of more than MAX_PIXELS pixels is refused from its header, before any decode.
    """
    try:
        source = _read_regular(path)
        if source is None:
            return Cleaned(kind="not-regular-file", reason="not a regular file when it was read; never opened")
        if not source:
            return Cleaned(kind="empty", reason="empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # MAX_PIXELS is checked below
            img = Image.open(io.BytesIO(source))
        with img:
            too_large = check_pixels(*img.size)
            if too_large:
                return Cleaned(kind="too-large", reason=f"too many pixels ({too_large})")
            notes = _describe_source(img=img, path=path)
            fast, warning = _fast_path(img=img, data=source, max_side=max_side, quality=quality, notes=notes)
            if fast is not None:
                return fast
            if warning is None and img.format == "JPEG":
                warning = _jpeg_warning(source)
            if warning and strict:
                return Cleaned(kind="jpeg-warning", reason=f"libjpeg warns: {warning} (skipped: --strict)")
            rgb = _to_rgb(img=img, max_side=max_side, notes=notes)
    except UnidentifiedImageError:
        return Cleaned(kind="unreadable", reason="not an image PIL can identify")
    except Image.DecompressionBombError as e:
        return Cleaned(kind="too-large", reason=f"too many pixels ({e})")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in text.lower() else "corrupt"
        return Cleaned(kind=kind, reason=f"cannot decode: {text}")
    data = _encode_jpeg(img=rgb, quality=quality)
    return Cleaned(data=data, width=rgb.width, height=rgb.height, notes=tuple(notes), warning=warning or "")


def _read_regular(path: str) -> bytes | None:
    """The file's bytes, or None when `path` is no longer a regular file (replaced by a FIFO or a device
    after the scan): opened without blocking, checked before any read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def _fast_path(*, img: Image.Image, data: bytes, max_side: int, quality: int,
               notes: list[str]) -> tuple[Cleaned | None, str | None]:
    """(the TurboJPEG path's result for a plain JPEG, see the module's docstring, or None to take the PIL
    path; libjpeg's warning when the decode ended with one, None when it did not run or had none)."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None, None
    codec = turbo.codec()
    if codec is None:
        return None, None
    try:
        if img.getexif().get(0x0112, 1) not in (None, 1):
            return None, None                    # rotated: the PIL path turns it and notes it
    except Exception:
        return None, None                        # a broken EXIF block: the PIL path notes it
    size = target_size(width=img.width, height=img.height, max_side=max_side)
    try:
        pixels, warning = codec.decode_checked(data, size)
        if pixels is None:
            return None, warning
        encoded = codec.encode(turbo.shrink(pixels, size), quality)
    except RuntimeError:                         # the library could not start or encode: PIL does it
        return None, None
    return Cleaned(data=encoded, width=size[0], height=size[1], notes=tuple(notes)), None


def _jpeg_warning(data: bytes) -> str | None:
    """libjpeg's warning on a JPEG the fast path does not take (rotated, CMYK, ...); None without
    libturbojpeg."""
    codec = turbo.codec()
    if codec is None:
        return None
    try:
        return codec.warning_of(data)
    except RuntimeError:
        return None


def _describe_source(*, img: Image.Image, path: str) -> list[str]:
    notes: list[str] = []
    suffix = os.path.splitext(path)[1].lower()
    if img.format == "PNG" and suffix in (".jpg", ".jpeg"):
        notes.append("png-content")
    if img.mode == "CMYK":
        notes.append("cmyk")
    elif img.mode in ("L", "LA", "1") or img.mode in _WIDE_MODES:
        notes.append("grayscale")
    return notes


def _to_rgb(*, img: Image.Image, max_side: int, notes: list[str]) -> Image.Image:
    """Full decode (so truncation surfaces here), orientation, colour, size."""
    if img.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays at least the target size.
        want = target_size(width=img.width, height=img.height, max_side=max_side)
        img.draft("RGB", want)
    img.load()
    img = _apply_orientation(img=img, notes=notes)
    if img.mode in _WIDE_MODES:
        img = _wide_to_l(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    size = target_size(width=img.width, height=img.height, max_side=max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img


def _apply_orientation(*, img: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is no reason to drop the pixels
        notes.append("bad-exif-ignored")
        return img
    if orientation in (None, 1):
        return img
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:
        notes.append("bad-exif-ignored")
        return img
    notes.append("exif-rotated")
    return out


def _encode_jpeg(*, img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit or float grayscale -> 8-bit, scaled by the type's range (16-bit) or the image's maximum."""
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    if img.mode == "F" and top <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def clean_many(paths: list[str], max_side: int, quality: int, strict: bool = False) -> list[Cleaned]:
    """`clean_image` over a chunk of paths: the task the process pool runs (one per chunk keeps the
    pickling overhead low)."""
    return [clean_image(p, max_side, quality, strict) for p in paths]
