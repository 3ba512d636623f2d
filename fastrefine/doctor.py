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


def _check_dali() -> str:
    """Build and run a one-op DALI pipeline, on the GPU if there is one, else in CPU-only mode."""
    import numpy as np
    import torch
    from nvidia.dali import fn, pipeline_def

    gpu = torch.cuda.is_available()

    @pipeline_def(batch_size=2, num_threads=1, device_id=0 if gpu else None)
    def pipe():
        x = fn.random.uniform(range=(0.0, 1.0), shape=(3,))
        return x.gpu() if gpu else x

    p = pipe()
    p.build()
    (out,) = p.run()
    if gpu:
        out = out.as_cpu()
    assert np.asarray(out.as_array()).shape == (2, 3)
    return "GPU (mixed decode)" if gpu else "CPU-only mode (device_id=None)"


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
    versions = {}
    # distribution metadata, not module __version__ (ffcv 1.0.2 reports "0.0.3rc1" from its module)
    for label, dists in (("nvidia-dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")),
                         ("ffcv", ("ffcv",)), ("numpy", ("numpy",)), ("numba", ("numba",)),
                         ("opencv", ("opencv-python", "opencv-python-headless")), ("pillow", ("pillow",)),
                         ("typer", ("typer",)), ("rich", ("rich",))):
        versions[label] = _dist_version(dists)
    report["versions"] = versions
    backends = {"torch": (True, "torchvision ImageFolder + DataLoader (reference)")}
    backends["dali"] = _try(_check_dali)
    backends["ffcv"] = _try(_check_ffcv)
    report["backends"] = {k: {"works": ok, "detail": d} for k, (ok, d) in backends.items()}
    return report


def _dist_version(names) -> str:
    from importlib.metadata import PackageNotFoundError, version
    for name in names:
        try:
            return f"{version(name)} ({name})" if len(names) > 1 else version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


def _bf16_ok() -> str:
    import torch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    return ""


def render(report: dict, console) -> None:
    from rich.table import Table

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
        b.add_row(name, "[green]yes[/]" if info["works"] else "[red]no[/]", info["detail"])
    console.print(b)
