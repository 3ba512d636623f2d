"""`fastrefine bench loader`: each loader backend alone, beside the torchvision ImageFolder baseline, the
JPEG decode ceiling and (with `--decode-resize`) the least a loader that decodes whole images must do."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import UsageError

from .baseline import NAME as BASELINE, BaselineLoader
from .decode import _image_folder, fastest_decoder, run_decode, run_decode_resize
from .protocol import check_batch, check_workers, clock_name, make_record, pick_device, rates, time_batches

log = logging.getLogger("fastrefine.bench")

TORCH_DECODES = ("auto", "host", "device")


@dataclass
class Case:
    """One timed loader: its label in the table, how to build it, what the record adds about it."""
    label: str
    make: Callable[[], object]
    extra: dict = field(default_factory=dict)


def _check_choices(*, data: Path, backends: list[str], ffcv_decoders: list[str], torch_decodes: list[str],
                   rounds: int, resolution: int, batch_size: int) -> None:
    """Every option checked before anything is timed: one line naming the option."""
    from ..loaders import BACKENDS
    from ..loaders.ffcv import DECODERS
    if not data.exists():
        raise UsageError(f"data folder {data} does not exist")
    for opt, given, allowed in (("--backend", backends, BACKENDS), ("--ffcv-decoders", ffcv_decoders, DECODERS),
                                ("--torch-decodes", torch_decodes, TORCH_DECODES)):
        bad = [x for x in given if x not in allowed]
        if bad:
            raise UsageError(f"{opt}: unknown {bad}; expected a comma list of {', '.join(allowed)}")
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    check_batch(resolution=resolution, batch_size=batch_size)


def _backend_cases(*, data: Path, backends: list[str], ffcv_decoders: list[str], torch_decodes: list[str],
                   build_options: dict) -> list[Case]:
    """One case per backend, or per FFCV decoder / torch decode mode when several are asked for."""
    from ..loaders import build
    cases = []
    for name in backends:
        variants = {"ffcv": ffcv_decoders, "torch": torch_decodes}.get(name, [None])
        key = "decoder" if name == "ffcv" else "decode"
        for dec in variants:
            options = {name: {key: dec}} if dec else None
            label = f"{name}[{dec}]" if dec and len(variants) > 1 else name
            cases.append(Case(label, lambda name=name, options=options: build(
                data=data, backend=name, backend_options=options, **build_options),
                {"decoder": dec} if dec else {}))
    return cases


def _time_case(name: str, make: Callable[[], object], **timing) -> tuple[dict, object | None]:
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


def _time_rounds(cases: list[Case], *, rounds: int, batches: int, timing: dict) -> list[dict]:
    """Build each case once, then time the cases in turn, round after round (A B A B ...); each figure is
    over all its rounds' repeats. A case that fails keeps its reason and is not timed again."""
    records: dict[str, dict] = {}
    loaders: dict[str, object] = {}
    try:
        for r in range(rounds):
            for case in cases:
                if r and case.label not in loaders:  # failed earlier
                    continue
                make = case.make if r == 0 else (lambda ld=loaders[case.label]: ld)
                rec, ld = _time_case(case.label, make, **timing)
                if not rec.get("ok"):
                    records[case.label] = {**rec, **case.extra}
                    stale = loaders.pop(case.label, None)
                    if hasattr(stale, "close"):
                        stale.close()
                elif r == 0:
                    records[case.label] = {**rec, **case.extra}
                    loaders[case.label] = ld
                else:  # a later round's repeats join the first's (start-up stays the first round's)
                    first = records[case.label]
                    first["seconds"] = first["seconds"] + rec["seconds"]
                    first["images_per_s"] = rates(first["seconds"], items=batches * int(rec["batch_shape"][0]))
        results = [records[case.label] for case in cases]
        for rec in results:
            if rec.get("ok"):
                rec["rounds"] = rounds
                if hasattr(loaders.get(rec["backend"]), "workers"):
                    rec["workers_in_use"] = loaders[rec["backend"]].workers
        return results
    finally:
        for ld in loaders.values():
            if hasattr(ld, "close"):
                ld.close()


def run_loader(*, data: Path, backends: list[str], split: str, resolution: int, batch_size: int, batches: int,
               warmup: int, repeats: int, workers: int | None, device: str, baseline_folder: Path | None,
               baseline_workers: int, ceiling: bool, ceiling_images: int, ffcv_decoders: list[str] | None = None,
               rounds: int = 1, baseline: bool = True, torch_decodes: list[str] | None = None,
               decode_resize: bool = False) -> dict:
    """Every case is built once; with `rounds` > 1 the cases are timed in turn, round after round
    (A B A B ...), so that other work on the machine falls on all of them alike. `ffcv_decoders` makes one
    FFCV case per decoder ("ffcv[fast]", "ffcv[stock]": the same .beton side by side); `torch_decodes` one
    torch case per decode mode ("torch[host]": PIL in workers, "torch[device]": batched decode_jpeg,
    nvJPEG on CUDA). `ceiling`: JPEG decode alone on all cores (`bench decode`); `decode_resize`: full
    decode + random crop + resize in numba threads on the same images, no loader around it."""
    from ..precision import resolve_precision
    data = Path(data)
    ffcv_decoders, torch_decodes = list(ffcv_decoders or ["fast"]), list(torch_decodes or ["auto"])
    _check_choices(data=data, backends=backends, ffcv_decoders=ffcv_decoders, torch_decodes=torch_decodes,
                   rounds=rounds, resolution=resolution, batch_size=batch_size)
    dev = pick_device(device)
    dtype = resolve_precision("auto", dev).input_dtype
    workers = check_workers(workers, option="--workers")
    if baseline_workers:  # 0: the baseline loads in this process
        check_workers(baseline_workers, option="--baseline-workers")
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
    bound = None if not decode_resize else run_decode_resize(
        data=data, split=split, images=ceiling_images, resolution=resolution, batch_size=batch_size,
        workers=workers, batches=batches, warmup=warmup, repeats=repeats)
    cases = _backend_cases(data=data, backends=backends, ffcv_decoders=ffcv_decoders, torch_decodes=torch_decodes,
                           build_options=dict(split=split, batch_size=batch_size, resolution=resolution, device=dev,
                                              dtype=dtype, workers=workers))
    if baseline:
        cases.append(Case(BASELINE, lambda: BaselineLoader(folder=folder, resolution=resolution,
                                                          batch_size=batch_size, workers=baseline_workers,
                                                          device=dev)))
    results = _time_rounds(cases, rounds=rounds, batches=batches, timing=timing)
    summary = _loader_summary(results, decode=decode, bound=bound)
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
                             "the box needs), stock = FFCV's RandomResizedCrop/CenterCrop decoders",
                             "decode_resize: full decode (TurboJPEG, fast DCT) + random crop + resize (OpenCV "
                             "INTER_AREA) into uint8 buffers in numba threads; no flip, no normalisation, no "
                             "loader: not a loader, the least one that decodes whole images must do"])
    rec["decode"] = decode
    rec["decode_resize"] = bound
    return rec


def _loader_summary(results: list[dict], *, decode: dict | None, bound: dict | None) -> dict:
    """The best backend against the baseline, the decode ceiling and the decode + resize bound."""
    ok = {r["backend"]: r["images_per_s"]["median"] for r in results if r.get("ok")}
    base = ok.pop(BASELINE, None)
    summary: dict = {"baseline_images_per_s": base}
    best = max(ok, key=ok.get) if ok else None
    if best:
        summary.update(best_backend=best, best_images_per_s=ok[best])
        if base:
            summary["best_over_baseline"] = ok[best] / base
    summary["failed"] = {r["backend"]: r["error"] for r in results if not r.get("ok")}
    ceiling_rate = None
    if decode is not None:
        ceiling_rate = decode["summary"]["ceiling_images_per_s"]
        summary["decode_ceiling_images_per_s"] = ceiling_rate
        summary["decode_ceiling_decoder"] = decode["settings"]["decoder"]
        if best:
            summary["best_over_ceiling"] = ok[best] / ceiling_rate
        for rec in results:
            if rec.get("ok"):
                rec["over_ceiling"] = rec["images_per_s"]["median"] / ceiling_rate
    if bound is not None:
        rate = bound["images_per_s"]["median"]
        summary["decode_resize_images_per_s"] = rate
        if best:
            summary["best_over_decode_resize"] = ok[best] / rate
        if ceiling_rate:
            summary["decode_resize_over_ceiling"] = rate / ceiling_rate
    ffcv_rates = {rec["decoder"]: rec["images_per_s"]["median"] for rec in results
                  if rec.get("ok") and rec.get("decoder") and str(rec.get("backend", "")).startswith("ffcv")}
    if "fast" in ffcv_rates and "stock" in ffcv_rates:
        summary["ffcv_fast_over_stock"] = ffcv_rates["fast"] / ffcv_rates["stock"]
    return summary
