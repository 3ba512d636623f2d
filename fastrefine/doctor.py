"""`fastrefine doctor`: what this machine has, and which loader backends actually run here."""

from __future__ import annotations

import os
import platform
import sys
import traceback


def _try(fn) -> tuple[bool, str]:
    try:
        return True, fn() or ""
    except Exception as e:  # doctor reports every failure instead of stopping at the first
        last = traceback.extract_tb(e.__traceback__)[-1]
        return False, f"{type(e).__name__}: {e} ({os.path.basename(last.filename)}:{last.lineno})"


def _jpeg_bytes() -> bytes:
    """A small JPEG to decode for real (a smooth gradient: this checks a decoder, it measures nothing)."""
    import io

    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _check_dali() -> str:
    """Decode one JPEG for real with DALI: the "mixed" (nvJPEG) decoder with a GPU, the CPU one without."""
    import numpy as np
    import torch
    from nvidia.dali import fn, pipeline_def, types

    gpu = torch.cuda.is_available()
    data = np.frombuffer(_jpeg_bytes(), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=0 if gpu else None)
    def pipe():
        jpeg = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        return fn.decoders.image(jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    if gpu:
        out = out.as_cpu()
    shape = np.asarray(out.as_array()).shape
    assert shape == (1, 48, 64, 3), shape
    return "GPU: decoded a JPEG with nvJPEG (mixed)" if gpu else "CPU-only mode (device_id=None): decoded a JPEG"


def _check_torch_gpu_decode() -> str:
    """The torch backend's GPU path: torchvision.io.decode_jpeg on CUDA (nvJPEG), one real JPEG."""
    import torch
    from torchvision.io import decode_jpeg
    if not torch.cuda.is_available():
        return "no GPU: host decode (PIL)"
    img = decode_jpeg(torch.frombuffer(bytearray(_jpeg_bytes()), dtype=torch.uint8), device="cuda")
    assert img.is_cuda and tuple(img.shape) == (3, 48, 64), tuple(img.shape)
    return "GPU decode (torchvision nvJPEG) and host decode (PIL)"


def _check_ffcv() -> str:
    """Import FFCV's loader and its compiled libffcv (which links libturbojpeg at run time)."""
    import ffcv.libffcv  # noqa: F401  the compiled part: fails here if libturbojpeg/opencv are missing
    import ffcv.loader  # noqa: F401
    from ffcv.fields.rgb_image import RGBImageField  # noqa: F401
    return "CPU decode (libturbojpeg)"


def collect() -> dict:
    import torch
    import torchvision

    report: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_bf16_autocast": _try(lambda: _bf16_ok())[0],
    }
    from .environment import versions
    report["versions"] = {k: (v or "not installed") for k, v in versions().items()}
    backends = {"torch": _try(_check_torch_gpu_decode)}
    backends["dali"] = _try(_check_dali)
    backends["ffcv"] = _try(_check_ffcv)
    report["backends"] = {k: {"works": ok, "detail": d} for k, (ok, d) in backends.items()}
    return report


def _bf16_ok() -> str:
    import torch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    return ""


def render(report: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(title="fastrefine doctor", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for key in ("python", "platform", "cpus", "torch", "torchvision", "cuda_available", "cuda_version"):
        t.add_row(key, str(report[key]))
    t.add_row("gpus", ", ".join(report["gpus"]) or "none")
    t.add_row("cpu bf16 autocast", "yes" if report["cpu_bf16_autocast"] else "no")
    for mod, v in report["versions"].items():
        t.add_row(mod, v)
    console.print(t)
    b = Table(title="loader backends")
    for col in ("backend", "works here", "detail"):
        b.add_column(col)
    for name, info in report["backends"].items():
        b.add_row(name, "yes" if info["works"] else "no", Text(info["detail"]))
    console.print(b)
