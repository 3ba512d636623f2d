"""Data loaders behind one interface: `build(...)` returns a BatchLoader (see base.py).

Backends: "torch" (torchvision ImageFolder + DataLoader, the plain reference), "dali" (NVIDIA DALI:
GPU decode with a GPU, CPU-only mode without) and "ffcv" (FFCV .beton files). "auto" picks DALI with
a GPU, else FFCV, else torch, and says why.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Mapping

import torch

from fastrefine.errors import UsageError

from .base import IMAGENET_MEAN, IMAGENET_STD, BatchLoader, LoaderBase, LoaderOptions, Normalization

log = logging.getLogger("fastrefine.loaders")

BACKENDS = ("torch", "dali", "ffcv")

__all__ = ["build", "resolve_backend", "BatchLoader", "LoaderOptions", "BACKENDS",
           "IMAGENET_MEAN", "IMAGENET_STD", "backend_available", "LoaderBase", "Normalization"]


def backend_available(name: str) -> tuple[bool, str]:
    """(works here, why not). Imports the backend's library, nothing more."""
    if name == "torch":
        return True, ""
    if name == "dali":
        if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
            return False, "nvidia-dali is not installed (pip install 'fastrefine[dali]')"
        try:
            import nvidia.dali  # noqa: F401
        except Exception as e:  # a broken install: say what broke
            return False, f"nvidia.dali failed to import: {e}"
        return True, ""
    if name == "ffcv":
        if importlib.util.find_spec("ffcv") is None:
            return False, "ffcv is not installed (pip install 'fastrefine[ffcv]' after apt-get install libturbojpeg0-dev libopencv-dev pkg-config)"
        try:
            from .ffcv import import_ffcv
            import_ffcv()  # FFCV's import sets torch's thread count; this import puts it back
        except Exception as e:
            return False, f"ffcv failed to import: {e}"
        return True, ""
    raise UsageError(f"unknown loader backend {name!r}; expected one of {BACKENDS} or 'auto'")


def resolve_backend(name: str, *, device: torch.device, data: Path | None = None) -> tuple[str, str]:
    """Turn 'auto' into a backend, returning (backend, reason)."""
    if name != "auto":
        ok, why = backend_available(name)
        if not ok:
            raise UsageError(f"loader.backend = {name!r} does not work here: {why}")
        return name, "asked for in the recipe"
    formats: set[str] | None = None
    if data is not None and (Path(data) / "manifest.json").is_file():
        from fastrefine.manifest import read_manifest
        formats = set(read_manifest(data).formats)
    order = ["dali", "ffcv", "torch"] if device.type == "cuda" else ["ffcv", "dali", "torch"]
    reasons = []
    for cand in order:
        ok, why = backend_available(cand)
        if ok and formats is not None and cand in ("dali", "ffcv") and cand not in formats:
            ok, why = False, f"the dataset was not converted to {cand}"
        if ok:
            lead = "GPU present" if device.type == "cuda" else "no GPU"
            skipped = "; ".join(reasons)
            return cand, f"auto: {lead}, picked {cand}" + (f" ({skipped})" if skipped else "")
        reasons.append(f"{cand}: {why}")
    raise UsageError("no loader backend works: " + "; ".join(reasons))  # torch always works


def build(*, data: str | Path, backend: str = "auto", backend_options: Mapping[str, Mapping] | None = None,
          **options) -> BatchLoader:
    """Build a loader for `data` (a converted dataset folder, or an ImageFolder root for torch/dali).

    Keyword options are the fields of LoaderOptions (split, batch_size, resolution, device, ...).
    `backend_options` maps a backend name to its own keyword options (a recipe's `[loader.ffcv]`,
    `[loader.dali]`, `[loader.torch]` tables); only the chosen backend's are passed on.
    """
    opts = LoaderOptions(**options)
    data = Path(data)
    if not data.exists():
        raise UsageError(f"data folder {data} does not exist")
    name, reason = resolve_backend(backend, device=opts.device, data=data)
    log.debug("loader backend %s for %s (%s)", name, opts.split, reason)
    extra = dict((backend_options or {}).get(name) or {})
    if name == "torch":
        from .torch import TorchLoader
        return TorchLoader(data, opts, **extra)
    if name == "dali":
        from .dali import DaliLoader
        return DaliLoader(data, opts, **extra)
    from .ffcv import FfcvLoader
    return FfcvLoader(data, opts, **extra)
