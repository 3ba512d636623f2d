"""`fastrefine bench loader`: each loader backend alone, beside the torchvision ImageFolder baseline."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import RunError, UsageError

from .decode import _image_folder, fastest_decoder, run_decode
from .protocol import clock_name, make_record, pick_device, time_batches

log = logging.getLogger("fastrefine.bench")


def baseline_loader(*, folder: Path, resolution: int, batch_size: int, workers: int, device: torch.device):
    """The torchvision way: ImageFolder + PIL + RandomResizedCrop/flip/ToTensor/Normalize, host workers."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from ..loaders import IMAGENET_MEAN, IMAGENET_STD
    tf = transforms.Compose([transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                    pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    class Baseline:
        backend, normalize_on = "torchvision-baseline", "host"

        def __iter__(self):
            for x, y in dl:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return Baseline()


def _loader_case(name: str, make: Callable[[], object], **timing) -> dict:
    try:
        res = time_batches(make, **timing)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a backend that fails is a result (with its reason), not a crash
        log.warning("loader %s failed: %s: %s", name, type(e).__name__, e)
        return {"backend": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
    res.pop("loader", None)
    return {"backend": name, **res}


def run_loader(*, data: Path, backends: list[str], split: str, resolution: int, batch_size: int, batches: int,
               warmup: int, repeats: int, workers: int | None, device: str, baseline_folder: Path | None,
               baseline_workers: int, ceiling: bool, ceiling_images: int) -> dict:
    from ..engine import resolve_precision
    from ..loaders import BACKENDS, build
    data = Path(data)
    if not data.exists():
        raise UsageError(f"data folder {data} does not exist")
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise UsageError(f"--backend: unknown {bad}; expected a comma list of {', '.join(BACKENDS)}")
    dev = pick_device(device)
    dtype = resolve_precision("auto", dev).input_dtype
    workers = workers or os.cpu_count() or 1
    folder = Path(baseline_folder) if baseline_folder else _image_folder(data, split)
    if not folder.is_dir():
        raise UsageError(f"--baseline-folder {folder} is not a folder")
    timing = dict(batches=batches, warmup=warmup, repeats=repeats, device=dev)
    # the ceiling first: its process pool forks, and forking after DALI/FFCV started threads is unsafe
    decode = None if not ceiling else run_decode(data=data, split=split, images=ceiling_images, source="auto",
                                                 decoder=fastest_decoder(), workers=workers, warmup=1,
                                                 repeats=repeats)
    results = []
    for name in backends:
        make = (lambda name=name: build(data=data, backend=name, split=split, batch_size=batch_size,
                                        resolution=resolution, device=dev, dtype=dtype, workers=workers))
        results.append(_loader_case(name, make, **timing))
    results.append(_loader_case("torchvision-baseline", lambda: baseline_loader(
        folder=folder, resolution=resolution, batch_size=batch_size, workers=baseline_workers, device=dev),
        **timing))
    summary = _loader_summary(results)
    if decode is not None:
        summary["decode_ceiling_images_per_s"] = decode["summary"]["ceiling_images_per_s"]
        summary["decode_ceiling_decoder"] = decode["settings"]["decoder"]
        if summary.get("best_images_per_s"):
            summary["best_over_ceiling"] = summary["best_images_per_s"] / summary["decode_ceiling_images_per_s"]
    settings = {"data": str(data), "backends": backends, "split": split, "resolution": resolution,
                "batch_size": batch_size, "batches": batches, "warmup": warmup, "repeats": repeats,
                "workers": workers, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
                "baseline_folder": str(folder), "baseline_workers": baseline_workers, "clock": clock_name(dev)}
    rec = make_record(command="loader", settings=settings, results=results, summary=summary,
                      notes=["images/s over `batches` batches per repeat, after `warmup` batches and the "
                             "first batch (start-up, timed apart)"])
    rec["decode"] = decode
    return rec


def _loader_summary(results: list[dict]) -> dict:
    ok = {r["backend"]: r["images_per_s"]["median"] for r in results if r.get("ok")}
    base = ok.pop("torchvision-baseline", None)
    summary: dict = {"baseline_images_per_s": base}
    if ok:
        best = max(ok, key=ok.get)
        summary.update(best_backend=best, best_images_per_s=ok[best])
        if base:
            summary["best_over_baseline"] = ok[best] / base
    summary["failed"] = {r["backend"]: r["error"] for r in results if not r.get("ok")}
    return summary

