"""libjpeg-turbo's TurboJPEG API through ctypes: the converter's fast path for JPEG sources.

What it buys over PIL, measured on 500x375 q90 photos shrunk to max side 256 (one core, AMD EPYC,
`docs/convert.md`): PIL decodes at full size and its bicubic resize costs twice the decode; TurboJPEG
decodes straight to a DCT-scaled size (any of libjpeg-turbo's M/8 factors, not only PIL's 1/2, 1/4,
1/8), so the resize left to do is small, and OpenCV does that step.

The library is the system one (Debian's `libturbojpeg0`, which FFCV's compiled part links too); where it
or OpenCV is missing, `codec()` returns None and the converter keeps to PIL alone. Only the TurboJPEG 2.x
functions are used; libjpeg-turbo 3.x still exports them.

Decoding is strict: any libjpeg warning (a truncated file, corrupt data) makes `decode_at_least` return
None, and the caller falls back to PIL, which then decides whether the file is usable and says why not;
`decode_checked` also returns the warning's text, which the manifest lists beside the file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np

TJPF_RGB = 0            # pixel format: 3 bytes per pixel, R G B
TJSAMP_420 = 2          # chroma subsampling of what we encode (PIL's default at these qualities)
TJERR_WARNING = 0       # tjGetErrorCode: the decode went on past damaged data (the pixels may be wrong)


class _ScalingFactor(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_local = threading.local()       # TurboJPEG handles are not thread-safe: one pair per thread
_factors: list[tuple[int, int]] = []


def _load() -> ctypes.CDLL | None:
    """Load libturbojpeg once per process and declare the signatures used; None (with the reason kept in
    `_lib_error`) where it is absent."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    name = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        _lib_error = f"libturbojpeg not loadable ({e})"
        return None
    try:
        _declare(lib)
    except AttributeError as e:             # a library without the TurboJPEG 2.x functions
        _lib_error = f"libturbojpeg ({name}) lacks a function: {e}"
        return None
    count = ctypes.c_int(0)
    table = lib.tjGetScalingFactors(ctypes.byref(count))
    factors = [(table[i].num, table[i].denom) for i in range(count.value)]
    # Shrinking factors only, smallest first: decode_at_least takes the first that is big enough.
    _factors[:] = sorted((f for f in factors if f[0] <= f[1]), key=lambda f: f[0] / f[1])
    if not _factors:
        _lib_error = "libturbojpeg reports no scaling factors"
        return None
    _lib = lib
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """The signatures of the functions used (an AttributeError where one is missing)."""
    vp, cp, ci, ul = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_ulong
    pi = ctypes.POINTER(ctypes.c_int)
    lib.tjInitDecompress.restype = vp
    lib.tjInitCompress.restype = vp
    lib.tjDecompressHeader3.argtypes = [vp, cp, ul, pi, pi, pi, pi]
    lib.tjDecompress2.argtypes = [vp, cp, ul, vp, ci, ci, ci, ci, ci]
    lib.tjCompress2.argtypes = [vp, vp, ci, ci, ci, ci, ctypes.POINTER(vp), ctypes.POINTER(ul), ci, ci, ci]
    lib.tjFree.argtypes = [vp]
    lib.tjGetScalingFactors.restype = ctypes.POINTER(_ScalingFactor)
    lib.tjGetScalingFactors.argtypes = [pi]
    lib.tjGetErrorCode.argtypes = [vp]
    lib.tjGetErrorStr2.argtypes = [vp]
    lib.tjGetErrorStr2.restype = cp


def _handles(lib: ctypes.CDLL) -> tuple[int, int]:
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = (lib.tjInitDecompress(), lib.tjInitCompress())
        if not pair[0] or not pair[1]:
            raise RuntimeError("libturbojpeg: tjInitDecompress/tjInitCompress failed")
        _local.pair = pair
    return pair


def scaled(size: int, factor: tuple[int, int]) -> int:
    """TurboJPEG's TJSCALED: the size a dimension decodes to at `factor` (rounded up)."""
    num, denom = factor
    return (size * num + denom - 1) // denom


def pick_factor(*, width: int, height: int, at_least: tuple[int, int]) -> tuple[int, int]:
    """The smallest of the library's scaling factors that leaves both sides at least `at_least`."""
    want_w, want_h = at_least
    for factor in _factors:
        if scaled(width, factor) >= want_w and scaled(height, factor) >= want_h:
            return factor
    return (1, 1)


class Codec:
    """Decode a JPEG to at least a given size in one DCT-scaled pass; encode RGB pixels as a JPEG."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib

    def decode_at_least(self, data: bytes, at_least: tuple[int, int]) -> np.ndarray | None:
        """`data` decoded to uint8 HxWx3 RGB at the smallest DCT scale whose size is at least `at_least`
        (width, height), accurate integer IDCT; None on any error or warning (the caller's PIL path
        then judges the file)."""
        return self.decode_checked(data, at_least)[0]

    def decode_checked(self, data: bytes, at_least: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
        """(decode_at_least's pixels or None, libjpeg's warning when the decode ended with one: corrupt
        data the decoder stepped over, such as "Corrupt JPEG data: premature end of data segment")."""
        return self._decode(data, at_least)

    def warning_of(self, data: bytes) -> str | None:
        """libjpeg's warning on `data` (decoded at the smallest DCT scale: the entropy decode, where damage
        shows, is the same at every scale), or None."""
        return self._decode(data, (1, 1))[1]

    def _decode(self, data: bytes, at_least: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
        lib = self._lib
        dec, _ = _handles(lib)
        w, h, sub, space = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if lib.tjDecompressHeader3(dec, data, len(data), ctypes.byref(w), ctypes.byref(h), ctypes.byref(sub),
                                   ctypes.byref(space)) != 0:
            return None, self._warning(dec)
        factor = pick_factor(width=w.value, height=h.value, at_least=at_least)
        out_w, out_h = scaled(w.value, factor), scaled(h.value, factor)
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        if lib.tjDecompress2(dec, data, len(data), out.ctypes.data, out_w, 0, out_h, TJPF_RGB, 0) != 0:
            return None, self._warning(dec)
        return out, None

    def _warning(self, handle) -> str | None:
        """The failed call's message if libjpeg only warned; None for a fatal error (the PIL path then
        says what it is)."""
        if self._lib.tjGetErrorCode(handle) != TJERR_WARNING:
            return None
        return (self._lib.tjGetErrorStr2(handle) or b"libjpeg warning").decode("utf-8", "replace")

    def encode(self, rgb: np.ndarray, quality: int) -> bytes:
        """uint8 HxWx3 RGB -> baseline JPEG bytes, 4:2:0, accurate DCT."""
        lib = self._lib
        _, enc = _handles(lib)
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        height, width = rgb.shape[:2]
        buf, size = ctypes.c_void_p(), ctypes.c_ulong(0)
        if lib.tjCompress2(enc, rgb.ctypes.data, width, 0, height, TJPF_RGB, ctypes.byref(buf), ctypes.byref(size),
                           TJSAMP_420, quality, 0) != 0:
            if buf:
                lib.tjFree(buf)
            raise RuntimeError(f"libturbojpeg could not encode a {width}x{height} image")
        try:
            return ctypes.string_at(buf, size.value)
        finally:
            lib.tjFree(buf)


_codec: Codec | None = None


def codec() -> Codec | None:
    """This process's codec, or None where libturbojpeg or OpenCV (the resize step) is missing."""
    global _codec
    if _codec is None:
        lib = _load()
        if lib is None or resizer() is None:
            return None
        _codec = Codec(lib)
    return _codec


_cv2 = None
_cv2_tried = False


def resizer():
    """OpenCV, set to one thread (a converter worker is one process per core), or None."""
    global _cv2, _cv2_tried
    if not _cv2_tried:
        _cv2_tried = True
        try:
            import cv2
        except ImportError:
            return None
        cv2.setNumThreads(1)
        _cv2 = cv2
    return _cv2


def shrink(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The step left after a DCT-scaled decode, to exactly `size` (width, height). The decode already
    low-passed the image to its own grid, so a step of at most 1.5x is bicubic; a larger one (the factors
    are coarse at the small end: 1/4 can leave up to 2x, and 1/8, the smallest, any ratio on a huge image)
    averages areas, which does not alias."""
    cv2 = resizer()
    width, height = size
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    ratio = max(rgb.shape[1] / width, rgb.shape[0] / height)
    method = cv2.INTER_CUBIC if ratio <= 1.5 else cv2.INTER_AREA
    return cv2.resize(rgb, (width, height), interpolation=method)


def describe() -> str:
    """One line for the manifest: which path cleans JPEG sources in this environment."""
    if codec() is not None:
        return "turbojpeg-dct-scaled+opencv"
    return f"pil ({_lib_error or 'opencv missing'})"
