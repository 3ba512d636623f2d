"""The converter's TurboJPEG path (`fastrefine/convert/turbo.py`) against its PIL path, on real
Fashion-MNIST photos upscaled to ImageNet-like sizes. CPU only; skipped where libturbojpeg or OpenCV
is missing (then the converter uses PIL alone, which test_convert.py covers)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastrefine.convert import imaging, turbo
from fastrefine.fashion_mnist import load_fashion_mnist

FMNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(turbo.codec() is None, reason=f"converter fast path unavailable: {turbo.describe()}")


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    images, _ = load_fashion_mnist("val", FMNIST)
    return images[:12]


def _write(path: Path, img28: np.ndarray, size: tuple[int, int], **kw) -> Path:
    img = Image.fromarray(img28, mode="L").resize(size, Image.Resampling.BICUBIC)
    img.convert(kw.pop("mode", "RGB")).save(path, format="JPEG", quality=kw.pop("quality", 90), **kw)
    return path


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def _pil_only(monkeypatch) -> None:
    monkeypatch.setattr(turbo, "codec", lambda: None)


@pytest.fixture
def fast_calls(monkeypatch) -> list:
    """Records every decode the fast path makes, so a test can tell which path ran."""
    calls: list = []
    real = turbo.Codec.decode_checked

    def spy(self, data, at_least):
        out = real(self, data, at_least)
        calls.append(out[0] is not None)
        return out

    monkeypatch.setattr(turbo.Codec, "decode_checked", spy)
    return calls


@pytest.mark.parametrize("size, factor", [((500, 375), (5, 8)), ((512, 384), (1, 2)), ((2000, 1500), (1, 4)),
                                          ((4000, 3000), (1, 8)), ((300, 200), (7, 8)), ((256, 100), (1, 1))])
def test_factor_is_the_smallest_that_covers_the_target(size, factor):
    want = imaging.target_size(width=size[0], height=size[1], max_side=256)
    assert turbo.pick_factor(width=size[0], height=size[1], at_least=want) == factor
    assert turbo.scaled(size[0], factor) >= want[0] and turbo.scaled(size[1], factor) >= want[1]


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1200, 900), (4000, 3000)])
def test_fast_path_agrees_with_pil_path(tmp_path, photos, size, fast_calls, monkeypatch):
    """Same size, same picture: PSNR >= 32 dB between the two paths' outputs (measured 35.8-50 dB;
    what differs is the last resize step, OpenCV bicubic after the DCT scaling vs PIL's bicubic)."""
    for i, img28 in enumerate(photos[:4]):
        path = _write(tmp_path / f"{i}.jpg", img28, size)
        fast = imaging.clean_image(str(path), 256, 90)
        assert fast.ok and fast_calls[-1] is True
        with monkeypatch.context() as m:
            _pil_only(m)
            slow = imaging.clean_image(str(path), 256, 90)
        assert (fast.width, fast.height) == (slow.width, slow.height) == imaging.target_size(
            width=size[0], height=size[1], max_side=256)
        a, b = _pixels(fast.data), _pixels(slow.data)
        assert a.shape == b.shape == (fast.height, fast.width, 3)
        psnr = 10 * np.log10(255.0 ** 2 / ((a - b) ** 2).mean())
        assert psnr >= 32, f"image {i} at {size}: PSNR {psnr:.1f} dB"
    assert len(fast_calls) == 4


def test_grayscale_jpeg_takes_fast_path_and_comes_out_rgb(tmp_path, photos, fast_calls):
    path = _write(tmp_path / "gray.jpg", photos[0], (400, 300), mode="L")
    out = imaging.clean_image(str(path), 256, 90)
    assert fast_calls == [True]
    assert out.notes == ("grayscale",)
    img = Image.open(io.BytesIO(out.data))
    assert img.mode == "RGB" and img.size == (256, 192)
    arr = np.asarray(img, dtype=np.int16)
    assert np.abs(arr[..., 0] - arr[..., 1]).max() <= 3        # gray stays gray (chroma ~0 after 4:2:0)


def test_small_image_is_never_enlarged(tmp_path, photos, fast_calls):
    path = _write(tmp_path / "small.jpg", photos[1], (120, 90))
    out = imaging.clean_image(str(path), 256, 90)
    assert fast_calls == [True] and (out.width, out.height) == (120, 90)


def test_truncated_jpeg_is_refused_through_the_pil_path(tmp_path, photos, fast_calls):
    whole = _write(tmp_path / "whole.jpg", photos[2], (500, 375)).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    out = imaging.clean_image(str(cut), 256, 90)
    assert fast_calls == [False]                     # TurboJPEG warned, so PIL judged the file
    assert not out.ok and out.kind == "truncated"


def test_a_warning_pil_tolerates_still_converts(tmp_path, photos, fast_calls):
    """Stray bytes between two header markers: libjpeg warns ("extraneous bytes before marker"), the fast
    path steps aside, and PIL, which decodes such files, converts it."""
    whole = _write(tmp_path / "whole.jpg", photos[3], (500, 375)).read_bytes()
    assert whole[:4] == b"\xff\xd8\xff\xe0"                  # SOI, then the APP0 segment
    after_app0 = 4 + int.from_bytes(whole[4:6], "big")
    odd = tmp_path / "odd.jpg"
    odd.write_bytes(whole[:after_app0] + b"\x00\x11" + whole[after_app0:])
    out = imaging.clean_image(str(odd), 256, 90)
    assert fast_calls == [False]
    assert out.ok and (out.width, out.height) == (256, 192)
    assert "Corrupt JPEG data" in out.warning and "extraneous bytes" in out.warning     # kept, with its warning
    strict = imaging.clean_image(str(odd), 256, 90, strict=True)
    assert not strict.ok and strict.kind == "jpeg-warning" and "extraneous bytes" in strict.reason
    assert imaging.clean_image(str(tmp_path / "whole.jpg"), 256, 90, strict=True).warning == ""  # a clean file


def test_rotated_and_cmyk_jpegs_take_the_pil_path(tmp_path, photos, fast_calls):
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _write(tmp_path / "rot.jpg", photos[4], (400, 300), exif=exif.tobytes())
    cmyk = _write(tmp_path / "cmyk.jpg", photos[5], (400, 300), mode="CMYK")
    out_r = imaging.clean_image(str(rotated), 256, 90)
    out_c = imaging.clean_image(str(cmyk), 256, 90)
    assert fast_calls == []
    assert out_r.notes == ("exif-rotated",) and (out_r.width, out_r.height) == (192, 256)
    assert out_c.notes == ("cmyk",) and (out_c.width, out_c.height) == (256, 192)


def test_encode_roundtrips_through_pil(photos):
    codec = turbo.codec()
    rgb = np.repeat(np.asarray(Image.fromarray(photos[6], mode="L").resize((64, 48)))[..., None], 3, axis=2)
    data = codec.encode(rgb, 95)
    back = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
    assert back.shape == (48, 64, 3) and np.abs(back - rgb).mean() < 2.0


def test_missing_library_means_the_pil_path(monkeypatch, tmp_path, photos):
    """Where libturbojpeg cannot be loaded, codec() is None, the manifest line says why, and images
    still convert (through PIL)."""
    for name in ("_lib", "_lib_error", "_codec"):
        monkeypatch.setattr(turbo, name, None)
    monkeypatch.setattr(turbo.ctypes.util, "find_library", lambda name: "libturbojpeg-not-here.so.0")
    assert turbo.codec() is None
    assert turbo.describe().startswith("pil (libturbojpeg not loadable")
    out = imaging.clean_image(str(_write(tmp_path / "a.jpg", photos[7], (500, 375))), 256, 90)
    assert out.ok and (out.width, out.height) == (256, 192)
