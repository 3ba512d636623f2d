"""`fastrefine bench loader`: each loader backend alone, beside the torchvision ImageFolder baseline."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import UsageError

from .decode import _image_folder, fastest_decoder, run_decode
from .protocol import clock_name, make_record, pick_device, rates, time_batches

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


def _loader_case(name: str, make: Callable[[], object], **timing) -> tuple[dict, object | None]:
    """One timed block of repeats: (record, the loader, to time again or close), or a failure record."""
    try:
        res = time_batches(make, **timing)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a backend that fails is a result (with its reason), not a crash
        log.warning("loader %s failed: %s: %s", name, type(e).__name__, e)
        return {"backend": name, "ok": False, "error": f"{type(e).__name__}: {e}"}, None
    loader = res.pop("loader", None)
    return {"backend": name, **res}, loader


def _merge_round(record: dict, more: dict, *, items: int) -> None:
    """Add a later round's repeats to a case's record (its start-up stays the first round's)."""
    record["seconds"] = record["seconds"] + more["seconds"]
    record["images_per_s"] = rates(record["seconds"], items=items)


def run_loader(*, data: Path, backends: list[str], split: str, resolution: int, batch_size: int, batches: int,
               warmup: int, repeats: int, workers: int | None, device: str, baseline_folder: Path | None,
               baseline_workers: int, ceiling: bool, ceiling_images: int, ffcv_decoders: list[str] | None = None,
               rounds: int = 1, baseline: bool = True, torch_decodes: list[str] | None = None) -> dict:
    """Every case is built once; with `rounds` > 1 the cases are timed in turn, round after round
    (A B A B ...), so that other work on the machine falls on all of them alike, and each case's
    figure is taken over all its repeats. `ffcv_decoders` makes one FFCV case per decoder
    ("ffcv[fast]", "ffcv[stock]": the same .beton side by side); `torch_decodes` one torch case per decode
    mode ("torch[host]": PIL in workers, "torch[device]": batched decode_jpeg, nvJPEG on CUDA)."""
    from ..loaders import BACKENDS, build
    from ..precision import resolve_precision
    data = Path(data)
    if not data.exists():
        raise UsageError(f"data folder {data} does not exist")
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise UsageError(f"--backend: unknown {bad}; expected a comma list of {', '.join(BACKENDS)}")
    from ..loaders.ffcv import DECODERS
    ffcv_decoders = list(ffcv_decoders or ["fast"])
    bad = [d for d in ffcv_decoders if d not in DECODERS]
    if bad:
        raise UsageError(f"--ffcv-decoders: unknown {bad}; expected a comma list of {', '.join(DECODERS)}")
    torch_decodes = list(torch_decodes or ["auto"])
    bad = [d for d in torch_decodes if d not in ("auto", "host", "device")]
    if bad:
        raise UsageError(f"--torch-decodes: unknown {bad}; expected a comma list of auto, host, device")
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    dev = pick_device(device)
    dtype = resolve_precision("auto", dev).input_dtype
    workers = workers or os.cpu_count() or 1
    folder = None
    if baseline:
        folder = Path(baseline_folder) if baseline_folder else _image_folder(data, split)
        if not folder.is_dir():
            raise UsageError(f"--baseline-folder {folder} is not a folder")
    timing = dict(batches=batches, warmup=warmup, repeats=repeats, device=dev)
    # the ceiling first: its process pool forks, and forking after DALI/FFCV started threads is unsafe
    decode = None if not ceiling else run_decode(data=data, split=split, images=ceiling_images, source="auto",
                                                 decoder=fastest_decoder(), workers=workers, warmup=1,
                                                 repeats=repeats)
    cases: list[tuple[str, Callable[[], object], dict]] = []
    for name in backends:
        variants = {"ffcv": ffcv_decoders, "torch": torch_decodes}.get(name, [None])
        for dec in variants:
            key = "decoder" if name == "ffcv" else "decode"
            extra = {"decoder": dec} if dec else {}
            options = {name: {key: dec}} if dec else None
            label = f"{name}[{dec}]" if dec and len(variants) > 1 else name
            cases.append((label, lambda name=name, options=options: build(
                data=data, backend=name, split=split, batch_size=batch_size, resolution=resolution, device=dev,
                dtype=dtype, workers=workers, backend_options=options), extra))
    if baseline:
        cases.append(("torchvision-baseline", lambda: baseline_loader(
            folder=folder, resolution=resolution, batch_size=batch_size, workers=baseline_workers, device=dev), {}))
    records: dict[str, dict] = {}
    loaders: dict[str, object] = {}
    try:
        for r in range(rounds):
            for label, make, extra in cases:
                if r and label not in loaders:  # failed in round 0
                    continue
                maker = make if r == 0 else (lambda ld=loaders[label]: ld)
                rec, ld = _loader_case(label, maker, **timing)
                if r == 0:
                    records[label] = {**rec, **extra}
                    if ld is not None:
                        loaders[label] = ld
                elif rec.get("ok"):
                    _merge_round(records[label], rec, items=batches * int(rec["batch_shape"][0]))
                else:
                    records[label] = {**rec, **extra}
                    loaders.pop(label, None)
    finally:
        for ld in loaders.values():
            if hasattr(ld, "close"):
                ld.close()
    results = [records[label] for label, _, _ in cases]
    for rec in results:
        if rec.get("ok"):
            rec["rounds"] = rounds
            if hasattr(loaders.get(rec["backend"]), "workers"):
                rec["workers_in_use"] = loaders[rec["backend"]].workers
    summary = _loader_summary(results)
    if decode is not None:
        ceiling_rate = decode["summary"]["ceiling_images_per_s"]
        summary["decode_ceiling_images_per_s"] = ceiling_rate
        summary["decode_ceiling_decoder"] = decode["settings"]["decoder"]
        if summary.get("best_images_per_s"):
            summary["best_over_ceiling"] = summary["best_images_per_s"] / ceiling_rate
        for rec in results:
            if rec.get("ok"):
                rec["over_ceiling"] = rec["images_per_s"]["median"] / ceiling_rate
    ffcv_rates = {rec["decoder"]: rec["images_per_s"]["median"] for rec in results
                  if rec.get("ok") and rec.get("decoder") and str(rec.get("backend", "")).startswith("ffcv")}
    if "fast" in ffcv_rates and "stock" in ffcv_rates:
        summary["ffcv_fast_over_stock"] = ffcv_rates["fast"] / ffcv_rates["stock"]
    settings = {"data": str(data), "backends": backends, "ffcv_decoders": ffcv_decoders,
                "torch_decodes": torch_decodes, "split": split,
                "resolution": resolution, "batch_size": batch_size, "batches": batches, "warmup": warmup,
                "repeats": repeats, "rounds": rounds, "workers": workers, "device": str(dev),
                "dtype": str(dtype).replace("torch.", ""), "baseline": baseline,
                "baseline_folder": str(folder) if folder else None, "baseline_workers": baseline_workers,
                "clock": clock_name(dev)}
    rec = make_record(command="loader", settings=settings, results=results, summary=summary,
                      notes=["images/s over `batches` batches per repeat, after `warmup` batches and the "
                             "first batch (start-up, timed apart); with rounds > 1 the cases take turns and "
                             "each figure is over all its rounds' repeats",
                             "ffcv `decoder`: fast = fastrefine's CropDecoder (seeded boxes, decode at the size "
                             "the box needs), stock = FFCV's RandomResizedCrop/CenterCrop decoders"])
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

