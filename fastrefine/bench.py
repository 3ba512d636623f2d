"""`fastrefine bench`: throughput on this node, measured one way (DESIGN.md convention 8).

    fastrefine bench decode DATA             JPEG decode only: the ceiling a loader can reach
    fastrefine bench loader DATA             each loader backend alone, beside a torchvision baseline
    fastrefine bench step --model M          the training step alone on synthetic device tensors
    fastrefine bench train RECIPE            loader + step end to end, and both alone, in one process

Protocol: `warmup` untimed calls, then `repeats` (>= 3) timed blocks of `iters` calls; each block is
timed with CUDA events on a GPU, or with perf_counter around a device synchronisation elsewhere. Every
figure is reported as the median over the blocks with min/max and the interquartile range, and every
block is kept in the JSON (`--json OUT`) beside the hardware, the versions, the git revision and the
full settings. First calls (start-up, torch.compile) are timed apart, never inside a block.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import statistics
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch

from .errors import RunError, UsageError

log = logging.getLogger("fastrefine.bench")

JPEG_SUFFIXES = (".jpg", ".jpeg")
MIN_REPEATS = 3


# ------------------------------------------------------------------------------------------ protocol

def spread(values: list[float]) -> dict:
    """Median, min, max and quartiles of a list of numbers, plus the list itself."""
    vals = sorted(float(v) for v in values)
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else (vals[0],) * 3
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "q1": q1, "q3": q3,
            "repeats": [float(v) for v in values]}


def make_sync(device: torch.device) -> Callable[[], None]:
    """Wait for the device to finish queued work (a no-op on the CPU, where ops run synchronously)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_block(fn: Callable[[], object], *, iters: int, sync: Callable[[], None], events: bool) -> float:
    if events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return time.perf_counter() - t0


def measure(fn: Callable[[], object], *, warmup: int, iters: int, repeats: int, sync: Callable[[], None],
            events: bool = False) -> list[float]:
    """Seconds per block of `iters` calls of `fn`, one per repeat, after `warmup` untimed calls."""
    if repeats < MIN_REPEATS:
        raise UsageError(f"--repeats must be at least {MIN_REPEATS} (a median over one run is not a "
                         f"measurement), got {repeats}")
    if iters < 1 or warmup < 0:
        raise UsageError(f"iterations must be >= 1 and warm-up >= 0, got {iters} and {warmup}")
    for _ in range(warmup):
        fn()
    sync()
    return [_time_block(fn, iters=iters, sync=sync, events=events) for _ in range(repeats)]


def rates(seconds: list[float], *, items: int) -> dict:
    """items/s per repeat (items done in each timed block), as a spread."""
    return spread([items / max(s, 1e-12) for s in seconds])


def first_call(fn: Callable[[], object], *, sync: Callable[[], None]) -> float:
    """Seconds of one call, synchronised: start-up and compile time, reported apart."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def pick_device(choice: str) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu or cuda, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if choice == "cuda" else torch.device("cpu")


def clock_name(device: torch.device) -> str:
    return "CUDA events" if device.type == "cuda" else "time.perf_counter (CPU ops are synchronous)"


# --------------------------------------------------------------------------------------- the record

def versions() -> dict:
    """Installed versions of what the figures depend on (None when absent)."""
    out: dict = {}
    for dist in ("torch", "torchvision", "numpy", "opencv-python", "pillow", "ffcv", "numba", "typer"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    dali = [d for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]
    out["nvidia-dali"] = f"{dali[0].metadata['Name']} {dali[0].version}" if dali else None
    return out


def make_record(*, command: str, settings: dict, results: list[dict], summary: dict | None = None,
                notes: list[str] | None = None) -> dict:
    from .records import git_revision, hardware
    return {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_revision(),
            "hardware": hardware(), "versions": versions(), "settings": settings, "results": results,
            "load_average": list(os.getloadavg()),  # other work on this machine skews the figures
            "summary": summary or {}, "notes": notes or []}


def write_json(path: Path | None, record: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _fmt_rate(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f})"


def _table(title: str, columns: list[str], rows: list[list[str]]):
    from rich.table import Table
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t


def _csv(text: str, *, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"{what}: expected a comma list, got {text!r}")
    return items


# -------------------------------------------------------------------------------------------- decode

def _blobs_from_tars(tars: list[Path], *, limit: int) -> list[bytes]:
    blobs: list[bytes] = []
    for shard in tars:
        with tarfile.open(shard) as tf:
            for member in tf:
                if member.isfile() and member.name.lower().endswith(JPEG_SUFFIXES):
                    blobs.append(tf.extractfile(member).read())
                    if len(blobs) >= limit:
                        return blobs
    return blobs


def _blobs_from_beton(path: Path, *, limit: int) -> list[bytes]:
    """The JPEG bytes FFCV stored (RGBImageField samples in 'jpg' mode; raw-pixel samples are skipped)."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    names = [n for n in reader.metadata.dtype.names
             if reader.metadata[n].dtype.names and {"mode", "data_ptr"} <= set(reader.metadata[n].dtype.names)]
    if not names:
        raise UsageError(f"{path}: no RGBImageField in this .beton")
    meta = reader.metadata[names[0]]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    blobs: list[bytes] = []
    with open(path, "rb") as f:
        for mode, ptr in zip(meta["mode"].tolist(), meta["data_ptr"].tolist()):
            if mode != 0:  # 1 = raw pixels, nothing to decode
                continue
            f.seek(ptr)
            blobs.append(f.read(sizes[ptr]))
            if len(blobs) >= limit:
                break
    return blobs


def _blobs_from_folder(root: Path, *, limit: int) -> list[bytes]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in JPEG_SUFFIXES)
    return [p.read_bytes() for p in files[:limit]]


def _image_folder(data: Path, split: str) -> Path:
    """An ImageFolder root for `split`: the manifest's source tree, DATA/split, or DATA itself."""
    if (data / "manifest.json").is_file():
        from .manifest import read_manifest
        m = read_manifest(data)
        folder = m.folder(split) or Path(m.raw.get("source", "")) / split
        if not folder.is_dir():
            raise UsageError(f"{data}: the original {split!r} folder {folder} is not there; pass "
                             f"--baseline-folder")
        return folder
    return data / split if (data / split).is_dir() else data


def jpeg_blobs(data: Path, *, split: str, limit: int, source: str) -> tuple[list[bytes], str]:
    """Up to `limit` JPEG files as bytes, read before any timing, and where they came from."""
    data = Path(data)
    if not data.exists():
        raise UsageError(f"data folder {data} does not exist")
    has_manifest = (data / "manifest.json").is_file()
    if source == "auto":
        source = "folder"
        if has_manifest:
            from .manifest import read_manifest
            fmts = read_manifest(data).formats
            source = "dali" if "dali" in fmts else "ffcv" if "ffcv" in fmts else "folder"
    if source in ("dali", "ffcv") and not has_manifest:
        raise UsageError(f"--source {source}: {data} has no manifest.json (convert it first)")
    if source == "dali":
        from .manifest import read_manifest
        tars = read_manifest(data).dali_shards(split)[0]
        blobs, where = _blobs_from_tars(tars, limit=limit), f"DALI webdataset shards ({len(tars)} tar)"
    elif source == "ffcv":
        from .manifest import read_manifest
        beton = read_manifest(data).ffcv_file(split)
        blobs, where = _blobs_from_beton(beton, limit=limit), f"FFCV {beton.name} (jpg-mode samples)"
    elif source == "folder":
        root = _image_folder(data, split)
        blobs, where = _blobs_from_folder(root, limit=limit), f"JPEG files under {root}"
    else:
        raise UsageError(f"--source: expected auto, dali, ffcv or folder, got {source!r}")
    if not blobs:
        raise UsageError(f"{data}: no JPEG images found ({where})")
    return blobs, where


DECODERS = {"cv2": "cv2.imdecode (OpenCV's bundled libjpeg-turbo, accurate IDCT)",
            "pil": "PIL.Image (Pillow's libjpeg-turbo; the torch loader's decoder)",
            "turbo": "FFCV's imdecode: libjpeg-turbo's TurboJPEG API with TJFLAG_FASTDCT (the FFCV loader's "
                     "own decoder, the fastest here)"}


def fastest_decoder() -> str:
    """'turbo' where FFCV (and so its TurboJPEG binding) imports, else 'cv2'."""
    try:
        import ffcv.libffcv  # noqa: F401
    except Exception:  # noqa: BLE001  FFCV missing or its native library not loadable
        return "cv2"
    return "turbo"


def prepare_blobs(blobs: list[bytes], *, decoder: str) -> list:
    """What decode_one takes: the bytes, or for 'turbo' (which needs the size up front) the bytes as a
    numpy array with the height and width read from the JPEG header, outside the timed work."""
    if decoder != "turbo":
        return blobs
    import io

    import numpy as np
    from PIL import Image
    items = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            width, height = im.size
        items.append((np.frombuffer(b, np.uint8), height, width))
    return items


def decode_one(blob, *, decoder: str):
    """JPEG bytes -> HxWx3 uint8 pixels, nothing else (no resize, no crop, no colour conversion)."""
    if decoder == "turbo":
        import numpy as np
        from ffcv.libffcv import imdecode
        data, height, width = blob
        out = np.empty((height, width, 3), np.uint8)
        return out if imdecode(data, out, height, width, height, width, 0, 0, 1, 1, False, False) == 0 else None
    if decoder == "cv2":
        import cv2
        import numpy as np
        return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
    import io

    import numpy as np
    from PIL import Image
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


def _single_thread_decoder(decoder: str) -> None:
    if decoder == "cv2":
        import cv2
        cv2.setNumThreads(1)


_WORKER: dict = {}  # per worker process only: the blobs it was handed at start-up


def _pool_init(blobs: list[bytes], decoder: str) -> None:
    _single_thread_decoder(decoder)
    _WORKER["blobs"], _WORKER["decoder"] = blobs, decoder


def _pool_decode(bounds: tuple[int, int]) -> int:
    start, stop = bounds
    blobs, decoder = _WORKER["blobs"], _WORKER["decoder"]
    for b in blobs[start:stop]:
        decode_one(b, decoder=decoder)
    return stop - start


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def bench_decode(*, blobs: list[bytes], decoder: str, workers: int, warmup: int, repeats: int) -> list[dict]:
    """Images/s decoding every blob once per timed block: in this process, then with a process pool."""
    if decoder not in DECODERS:
        raise UsageError(f"--decoder: expected one of {sorted(DECODERS)}, got {decoder!r}")
    _single_thread_decoder(decoder)
    blobs = prepare_blobs(blobs, decoder=decoder)
    if decode_one(blobs[0], decoder=decoder) is None:
        raise RunError(f"{decoder} could not decode the first image")

    def one_pass() -> None:
        for b in blobs:
            decode_one(b, decoder=decoder)

    sync = lambda: None  # noqa: E731  host-only work
    single = measure(one_pass, warmup=warmup, iters=1, repeats=repeats, sync=sync)
    results = [{"mode": "1 process", "processes": 1, "images": len(blobs),
                "images_per_s": rates(single, items=len(blobs)), "seconds": single}]
    chunks = _chunks(len(blobs), workers * 4)
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_pool_init,
                             initargs=(blobs, decoder)) as pool:
        def pool_pass() -> None:
            done = sum(pool.map(_pool_decode, chunks))
            assert done == len(blobs)

        pooled = measure(pool_pass, warmup=max(1, warmup), iters=1, repeats=repeats, sync=sync)
    results.append({"mode": f"{workers} processes", "processes": workers, "images": len(blobs),
                    "images_per_s": rates(pooled, items=len(blobs)), "seconds": pooled})
    return results


def run_decode(*, data: Path, split: str, images: int, source: str, decoder: str, workers: int | None,
               warmup: int, repeats: int) -> dict:
    workers = workers or os.cpu_count() or 1
    blobs, where = jpeg_blobs(data, split=split, limit=images, source=source)
    results = bench_decode(blobs=blobs, decoder=decoder, workers=workers, warmup=warmup, repeats=repeats)
    settings = {"data": str(data), "split": split, "images": len(blobs), "source": where, "decoder": decoder,
                "decoder_detail": DECODERS[decoder], "workers": workers, "warmup": warmup, "repeats": repeats,
                "mean_jpeg_bytes": sum(map(len, blobs)) / len(blobs), "clock": "time.perf_counter"}
    return make_record(command="decode", settings=settings, results=results,
                       summary={"ceiling_images_per_s": results[-1]["images_per_s"]["median"],
                                "per_core_images_per_s": results[0]["images_per_s"]["median"]},
                       notes=["decode only: JPEG bytes already in memory, no crop/resize/normalise"])


# -------------------------------------------------------------------------------------------- loader

def cycle(loader) -> Iterator:
    """Batches forever: a new epoch (set_epoch) whenever the loader runs dry."""
    epoch = 0
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RunError(f"{type(loader).__name__} yielded no batch (batch size larger than the split?)")
        epoch += 1
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)


def time_batches(make_loader: Callable[[], object], *, batches: int, warmup: int, repeats: int,
                 device: torch.device) -> dict:
    """Build a loader, time its first batch apart, then `repeats` blocks of `batches` batches."""
    sync = make_sync(device)
    t0 = time.perf_counter()
    loader = make_loader()
    it = cycle(loader)
    images, labels = next(it)
    sync()
    startup = time.perf_counter() - t0
    batch = int(labels.shape[0])
    seconds = measure(lambda: next(it), warmup=warmup, iters=batches, repeats=repeats, sync=sync,
                      events=device.type == "cuda")
    return {"ok": True, "startup_s": startup, "images_per_s": rates(seconds, items=batches * batch),
            "seconds": seconds, "batch_shape": list(images.shape), "dtype": str(images.dtype).replace("torch.", ""),
            "device": str(images.device), "channels_last": images.is_contiguous(memory_format=torch.channels_last),
            "normalize_on": getattr(loader, "normalize_on", "?"), "loader": loader}


def baseline_loader(*, folder: Path, resolution: int, batch_size: int, workers: int, device: torch.device):
    """The torchvision way: ImageFolder + PIL + RandomResizedCrop/flip/ToTensor/Normalize, host workers."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from .loaders import IMAGENET_MEAN, IMAGENET_STD
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
    from .engine import resolve_precision
    from .loaders import BACKENDS, build
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


# ---------------------------------------------------------------------------------------------- step

def flops_bound(*, student: str, refinery: str, num_classes: int, resolution: int) -> dict:
    """Refinery overhead bound 1 + F_r / (3 F_s): a student step is ~3 forwards, the refinery's is 1."""
    from .models import model_info
    fs = model_info(student, num_classes=num_classes, resolution=resolution)["flops"]
    fr = model_info(refinery, num_classes=num_classes, resolution=resolution)["flops"]
    return {"student_flops": fs, "refinery_flops": fr, "bound": 1 + fr / (3 * fs)}


class PeakMemory:
    """Peak memory of one case: CUDA max_memory_allocated, or the process's peak RSS on the CPU.

    On Linux the RSS peak (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so each case gets
    its own peak; where that is not allowed, getrusage's ru_maxrss (the process's lifetime peak) is used.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else self._cpu_method()

    @staticmethod
    def _cpu_method() -> str:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return "process peak RSS (VmHWM, reset via /proc/self/clear_refs)"
        except OSError:
            return "process peak RSS (resource.getrusage ru_maxrss, lifetime peak: not reset between cases)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif "clear_refs" in self.method:
            Path("/proc/self/clear_refs").write_text("5")

    def current_mib(self) -> float:
        """What is held now (CUDA allocated, or the process RSS): the floor the peak is read against."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if "clear_refs" in self.method:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def make_bench_step(*, student: torch.nn.Module, refinery: torch.nn.Module | None, precision, compile: bool):
    """The trainer's own step (engine.build_step) around a student and an optional refinery."""
    from .engine import build_step, make_clipper, make_optimizer
    from .refinery import NoRefinery, Refinery, make_loss, no_jitter
    optimizer = make_optimizer(student, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-5,
                               decay_norm_and_bias=False)
    scaler = precision.scaler()
    ref = Refinery(refinery) if refinery is not None else NoRefinery()
    if compile:
        student = torch.compile(student)
        if refinery is not None:
            ref.model = torch.compile(ref.model)
    return build_step(student=student, refinery=ref, loss_fn=make_loss(refined=refinery is not None),
                      jitter=no_jitter, optimizer=optimizer, scaler=scaler, autocast=precision.autocast,
                      clip=make_clipper(0.0, scaler, optimizer))


def synthetic_batch(*, batch_size: int, resolution: int, num_classes: int, device: torch.device,
                    dtype: torch.dtype, channels_last: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normal images and random labels, already on the device: a shape/speed input, not data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, resolution, resolution, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device, dtype).contiguous(memory_format=_memory_format(channels_last)), y.to(device)


def step_case(*, student: str, refinery: str | None, num_classes: int, resolution: int, batch_size: int,
              device: torch.device, precision, channels_last: bool, compile: bool, warmup: int, iters: int,
              repeats: int, memory: PeakMemory) -> dict:
    from .models import create_model
    torch.manual_seed(0)
    fmt = _memory_format(channels_last)
    memory.reset()
    before = memory.current_mib()
    s = create_model(student, num_classes=num_classes).to(device, memory_format=fmt).train()
    r = create_model(refinery, num_classes=num_classes).to(device, memory_format=fmt) if refinery else None
    step = make_bench_step(student=s, refinery=r, precision=precision, compile=compile)
    del r  # the Refinery holds its own (BN-folded) copy; the unfolded weights must not count as its memory
    images, labels = synthetic_batch(batch_size=batch_size, resolution=resolution, num_classes=num_classes,
                                     device=device, dtype=precision.input_dtype, channels_last=channels_last)
    sync = make_sync(device)
    first = first_call(lambda: step(images, labels), sync=sync)
    seconds = measure(lambda: step(images, labels), warmup=warmup, iters=iters, repeats=repeats, sync=sync,
                      events=device.type == "cuda")
    per_step = spread([t / iters for t in seconds])
    return {"case": f"{student} + {refinery}" if refinery else f"{student} alone", "student": student,
            "refinery": refinery, "first_call_s": first, "compile": compile,
            "images_per_s": rates(seconds, items=iters * batch_size), "step_s": per_step,
            "peak_memory_mib": memory.peak_mib(), "memory_before_mib": before, "seconds": seconds}


def _refinery_names(spec: list[str], *, student: str) -> list[str | None]:
    out: list[str | None] = [None]
    for s in spec:
        if s == "none":
            continue
        out.append(student if s == "same" else s)
    return out


def run_step(*, model: str, refineries: list[str], num_classes: int, resolution: int, batch_size: int,
             precision: str, device: str, channels_last: bool, compile: bool, warmup: int, iters: int,
             repeats: int) -> dict:
    from .engine import resolve_precision
    from .models import create_model
    create_model(model, num_classes=num_classes)  # an unknown name fails here, before any timing
    names = _refinery_names(refineries, student=model)
    for n in names[1:]:
        create_model(n, num_classes=num_classes)
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    memory = PeakMemory(dev)
    common = dict(num_classes=num_classes, resolution=resolution, batch_size=batch_size, device=dev,
                  precision=prec, channels_last=channels_last, compile=compile, warmup=warmup, iters=iters,
                  repeats=repeats, memory=memory)
    results = [step_case(student=model, refinery=n, **common) for n in names]
    alone = results[0]["step_s"]["median"]
    for r in results[1:]:
        r["measured_ratio"] = r["step_s"]["median"] / alone
        r.update(flops_bound(student=model, refinery=r["refinery"], num_classes=num_classes,
                             resolution=resolution))
    settings = {"model": model, "refineries": [n for n in names if n], "num_classes": num_classes,
                "resolution": resolution, "batch_size": batch_size, "precision": prec.name,
                "device": str(dev), "channels_last": channels_last, "compile": compile, "warmup": warmup,
                "iters": iters, "repeats": repeats, "clock": clock_name(dev), "memory": memory.method,
                "threads": torch.get_num_threads()}
    notes = ["synthetic input: random normal tensors and random labels already on the device "
             "(a shape/speed benchmark; no data is read)",
             "bound = 1 + F_refinery / (3 F_student), FLOPs from FlopCounterMode via models.model_info; "
             "measured_ratio = median step time with the refinery / without",
             "first_call_s is the first step, timed apart (includes torch.compile when compile is on)"]
    return make_record(command="step", settings=settings, results=results, notes=notes)


# --------------------------------------------------------------------------------------------- train

def _refinery_arch(recipe, index: int, device: torch.device):
    """The round's refinery as a module: the real checkpoint if given as a path, else its architecture
    (an earlier round's model), randomly initialised -- speed does not depend on the weights."""
    from .models import create_model
    from .recipe import round_refinery
    from .rounds import load_model_from_checkpoint
    spec = round_refinery(recipe, index)
    if spec == "none":
        return None, "none"
    names = [r.name for r in recipe.rounds]
    if spec in names:
        name, opts = recipe.round_model(recipe.rounds[names.index(spec)])
        return create_model(name, num_classes=_num_classes(recipe), **opts), f"{name} (round {spec}, random weights)"
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"round {recipe.rounds[index].name!r}: refinery {spec!r} is neither a round nor a file")
    model, meta = load_model_from_checkpoint(path, device=device)
    return model, f"{meta['model_name']} ({path})"


def _num_classes(recipe) -> int:
    from .rounds import dataset_num_classes
    return recipe.data.num_classes or dataset_num_classes(Path(recipe.data.path))


def _recipe_loader(recipe, *, device: torch.device, dtype: torch.dtype):
    """The recipe's train loader exactly as `fastrefine run` builds it for its first epoch."""
    from .rounds import make_loaders, train_resolution
    train, _, _, _ = make_loaders(recipe, device=device, dtype=dtype, seed=recipe.run.seed,
                                  train_res=train_resolution(recipe, 0), with_val=False)
    return train


def timed_loop(*, it: Iterator, step: Callable, steps: int, sync: Callable[[], None]) -> dict:
    """K end-to-end steps; time waiting in next(it) apart from the whole (synchronised before each read)."""
    wait = 0.0
    images = 0
    t_start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        sync()
        t1 = time.perf_counter()
        step(x, y)
        sync()
        wait += t1 - t0
        images += int(y.shape[0])
    total = time.perf_counter() - t_start
    return {"seconds": total, "wait_s": wait, "images": images}


def run_train(*, recipe_path: Path, overrides: list[str], round_name: str | None, steps: int, warmup: int,
              repeats: int) -> dict:
    from .distributed import init_distributed
    from .engine import resolve_precision
    from .models import create_model
    from .recipe import load_recipe
    recipe = load_recipe(recipe_path, overrides)
    if not recipe.rounds:
        raise UsageError(f"{recipe_path}: the recipe has no [[rounds]]")
    names = [r.name for r in recipe.rounds]
    if round_name is not None and round_name not in names:
        raise UsageError(f"--round {round_name!r}: the recipe's rounds are {names}")
    index = names.index(round_name) if round_name else len(names) - 1
    if repeats < MIN_REPEATS:
        raise UsageError(f"--repeats must be at least {MIN_REPEATS}, got {repeats}")
    _, dev = init_distributed(recipe.run.device)
    prec = resolve_precision(recipe.run.precision, dev)
    num_classes = _num_classes(recipe)
    fmt = _memory_format(recipe.run.channels_last)
    model_name, opts = recipe.round_model(recipe.rounds[index])
    torch.manual_seed(recipe.run.seed)
    student = create_model(model_name, num_classes=num_classes, **opts).to(dev, memory_format=fmt)
    ref_model, ref_desc = _refinery_arch(recipe, index, dev)
    if ref_model is not None:
        ref_model = ref_model.to(dev, memory_format=fmt)
    step = make_bench_step(student=student, refinery=ref_model, precision=prec, compile=recipe.run.compile)
    del ref_model  # the step's Refinery holds its own (BN-folded) copy
    sync = make_sync(dev)
    t0 = time.perf_counter()
    loader = _recipe_loader(recipe, device=dev, dtype=prec.input_dtype)
    it = cycle(loader)
    x0, y0 = (t.clone() for t in next(it))  # kept while the loader runs on: FFCV recycles its own buffers
    sync()
    startup = time.perf_counter() - t0
    first = first_call(lambda: step(x0, y0), sync=sync)
    for _ in range(warmup):
        step(*next(it))
    sync()
    loops = [timed_loop(it=it, step=step, steps=steps, sync=sync) for _ in range(repeats)]
    e2e = {"case": "end to end (loader + step)", "images_per_s": spread([lp["images"] / lp["seconds"] for lp in loops]),
           "data_wait_fraction": spread([lp["wait_s"] / lp["seconds"] for lp in loops]), "loops": loops}
    batch = int(y0.shape[0])
    loader_s = measure(lambda: next(it), warmup=1, iters=steps, repeats=repeats, sync=sync)
    step_s = measure(lambda: step(x0, y0), warmup=1, iters=steps, repeats=repeats, sync=sync,
                     events=dev.type == "cuda")
    alone_loader = {"case": "loader alone", "images_per_s": rates(loader_s, items=steps * batch), "seconds": loader_s}
    alone_step = {"case": "step alone (one real batch reused)", "images_per_s": rates(step_s, items=steps * batch),
                  "seconds": step_s}
    results = [e2e, alone_loader, alone_step]
    summary = _train_summary(e2e, alone_loader, alone_step)
    settings = {"recipe": str(recipe_path), "overrides": list(overrides), "round": names[index],
                "model": model_name, "model_options": opts, "refinery": ref_desc, "backend": loader.backend,
                "normalize_on": getattr(loader, "normalize_on", "?"), "batch_size": batch,
                "resolution": int(x0.shape[-1]), "dtype": str(x0.dtype).replace("torch.", ""),
                "precision": prec.name, "device": str(dev), "compile": recipe.run.compile, "steps": steps,
                "warmup": warmup, "repeats": repeats, "startup_s": startup, "first_step_s": first,
                "clock": "time.perf_counter with a device sync before each reading",
                "threads": torch.get_num_threads()}
    notes = ["data_wait_fraction = time inside next(iter) / whole loop time (device synced before each reading)",
             "input-bound when data_wait_fraction > 0.1 or the loader alone is slower than the step alone"]
    return make_record(command="train", settings=settings, results=results, summary=summary, notes=notes)


def _train_summary(e2e: dict, loader: dict, step: dict) -> dict:
    lo, st = loader["images_per_s"]["median"], step["images_per_s"]["median"]
    wait = e2e["data_wait_fraction"]["median"]
    bound = min(lo, st)
    return {"end_to_end_images_per_s": e2e["images_per_s"]["median"], "loader_alone_images_per_s": lo,
            "step_alone_images_per_s": st, "min_alone_images_per_s": bound,
            "end_to_end_over_min_alone": e2e["images_per_s"]["median"] / bound,
            "data_wait_fraction": wait, "input_bound": bool(wait > 0.1 or lo < st),
            "slower_alone": "loader" if lo < st else "step"}


# ----------------------------------------------------------------------------------------------- CLI

def _show_decode(console, rec: dict) -> None:
    s = rec["settings"]
    rows = [[r["mode"], str(r["images"]), _fmt_rate(r["images_per_s"])] for r in rec["results"]]
    console.print(_table(f"JPEG decode ceiling: {s['decoder_detail']}; {s['source']}",
                         ["mode", "images", "images/s median (min-max)"], rows))


def _show_loader(console, rec: dict) -> None:
    rows = [[r["backend"], _fmt_rate(r["images_per_s"]), r["dtype"], r["normalize_on"], f"{r['startup_s']:.1f}"]
            if r.get("ok") else [r["backend"], "failed (below)", "-", "-", "-"] for r in rec["results"]]
    s = rec["settings"]
    console.print(_table(f"Loaders alone: {s['resolution']} px, batch {s['batch_size']}, {s['batches']} batches x "
                         f"{s['repeats']} repeats, {s['device']}",
                         ["backend", "images/s median (min-max)", "dtype", "normalise on", "start-up s"], rows))
    sm = rec["summary"]
    for name, why in sm.get("failed", {}).items():
        console.print(f"{name} failed: {why}", highlight=False, markup=False)
    if sm.get("decode_ceiling_images_per_s"):
        console.print(f"decode ceiling ({sm.get('decode_ceiling_decoder', 'cv2')}, all cores): "
                      f"{sm['decode_ceiling_images_per_s']:,.0f} images/s",
                      highlight=False)
    for key in ("best_over_baseline", "best_over_ceiling"):
        if key in sm:
            console.print(f"{key.replace('_', ' ')} ({sm['best_backend']}): {sm[key]:.2f}", highlight=False)


def _show_step(console, rec: dict) -> None:
    rows = []
    for r in rec["results"]:
        ratio = f"{r['measured_ratio']:.2f}" if "measured_ratio" in r else "-"
        bound = f"{r['bound']:.2f}" if "bound" in r else "-"
        rows.append([r["case"], _fmt_rate(r["images_per_s"]), f"{1000 * r['step_s']['median']:.1f}",
                     ratio, bound, f"{r['peak_memory_mib']:.0f}", f"{r['first_call_s']:.2f}"])
    s = rec["settings"]
    console.print(_table(f"Train step alone (synthetic tensors): {s['resolution']} px, batch {s['batch_size']}, "
                         f"{s['precision']}, {s['device']}{', compiled' if s['compile'] else ''}",
                         ["case", "images/s median (min-max)", "step ms", "measured ratio", "FLOPs bound",
                          "peak MiB", "first call s"], rows))
    console.print(f"peak memory: {s['memory']}", highlight=False)


def _show_train(console, rec: dict) -> None:
    rows = [[r["case"], _fmt_rate(r["images_per_s"])] for r in rec["results"]]
    s, sm = rec["settings"], rec["summary"]
    console.print(_table(f"End to end: {s['model']} + refinery {s['refinery']}, {s['backend']} loader, "
                         f"{s['resolution']} px, batch {s['batch_size']}, {s['device']}",
                         ["case", "images/s median (min-max)"], rows))
    console.print(f"data-wait fraction {sm['data_wait_fraction']:.2f}; input-bound: {sm['input_bound']}; "
                  f"end to end / min(alone) = {sm['end_to_end_over_min_alone']:.2f}", highlight=False)


def register(app, *, handle_errors, console) -> None:
    """Add `decode`, `loader`, `step` and `train` to the `fastrefine bench` typer app."""
    import typer

    json_opt = typer.Option(None, "--json", help="Also write everything (settings, every repeat) as JSON here.")
    repeats_opt = typer.Option(3, "--repeats", min=MIN_REPEATS, help="Timed repeats (median and spread).")

    @app.command("decode")
    @handle_errors
    def decode(data: Path = typer.Argument(..., help="A converted folder (manifest.json) or an ImageFolder tree."),
               split: str = typer.Option("train", "--split"),
               images: int = typer.Option(2000, "--images", min=1, help="JPEGs to read into memory and decode."),
               source: str = typer.Option("auto", "--source", help="auto, dali (shard JPEGs), ffcv (.beton) or folder."),
               decoder: str = typer.Option("cv2", "--decoder", help="cv2 (OpenCV's libjpeg-turbo), pil (the torch loader's) or turbo (FFCV's own TurboJPEG call, fast DCT; the loader bench's ceiling)."),
               workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Pool size (default: all cores)."),
               warmup: int = typer.Option(1, "--warmup", min=0), repeats: int = repeats_opt,
               json_out: Optional[Path] = json_opt):
        """JPEG decode alone (no augmentation), one process and all cores: the loaders' ceiling."""
        rec = run_decode(data=data, split=split, images=images, source=source, decoder=decoder, workers=workers,
                         warmup=warmup, repeats=repeats)
        _show_decode(console, rec)
        write_json(json_out, rec)

    @app.command("loader")
    @handle_errors
    def loader(data: Path = typer.Argument(..., help="A converted folder (manifest.json) or an ImageFolder tree."),
               backend: str = typer.Option("dali,ffcv,torch", "--backend", help="Comma list of backends."),
               split: str = typer.Option("train", "--split"),
               resolution: int = typer.Option(224, "--resolution", min=8),
               batch_size: int = typer.Option(256, "--batch-size", min=1),
               batches: int = typer.Option(20, "--batches", min=1, help="Batches per timed repeat."),
               warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed batches after the first."),
               repeats: int = repeats_opt,
               workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Loader workers (default: all cores)."),
               device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
               baseline_folder: Optional[Path] = typer.Option(None, "--baseline-folder", help="Original JPEG ImageFolder for the torchvision baseline (default: the split's source folder)."),
               baseline_workers: int = typer.Option(2, "--baseline-workers", min=0),
               ceiling: bool = typer.Option(True, "--ceiling/--no-ceiling", help="Also measure the decode ceiling."),
               ceiling_images: int = typer.Option(1000, "--ceiling-images", min=1),
               json_out: Optional[Path] = json_opt):
        """Each loader backend alone beside the torchvision ImageFolder baseline; failures say why."""
        rec = run_loader(data=data, backends=_csv(backend, what="--backend"), split=split, resolution=resolution,
                         batch_size=batch_size, batches=batches, warmup=warmup, repeats=repeats, workers=workers,
                         device=device, baseline_folder=baseline_folder, baseline_workers=baseline_workers,
                         ceiling=ceiling, ceiling_images=ceiling_images)
        _show_loader(console, rec)
        write_json(json_out, rec)

    @app.command("step")
    @handle_errors
    def step(model: str = typer.Option("resnet18", "--model"),
             refinery: str = typer.Option("same", "--refinery", help="Comma list: a model name, same, none."),
             resolution: int = typer.Option(224, "--resolution", min=1),
             batch_size: int = typer.Option(64, "--batch-size", min=1),
             num_classes: int = typer.Option(1000, "--classes", min=1),
             precision: str = typer.Option("auto", "--precision", help="auto, bf16, fp16 (CUDA) or fp32."),
             device: str = typer.Option("auto", "--device"),
             channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
             compile: bool = typer.Option(False, "--compile", help="torch.compile student and refinery (first call timed apart)."),
             warmup: int = typer.Option(2, "--warmup", min=0), iters: int = typer.Option(5, "--iters", min=1),
             repeats: int = repeats_opt, json_out: Optional[Path] = json_opt):
        """The train step alone on synthetic device tensors: student alone vs student + refinery."""
        if precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UsageError(f"--precision: expected auto, bf16, fp16 or fp32, got {precision!r}")
        rec = run_step(model=model, refineries=_csv(refinery, what="--refinery"), num_classes=num_classes,
                       resolution=resolution, batch_size=batch_size, precision=precision, device=device,
                       channels_last=channels_last, compile=compile, warmup=warmup, iters=iters, repeats=repeats)
        _show_step(console, rec)
        write_json(json_out, rec)

    @app.command("train")
    @handle_errors
    def train(recipe: Path = typer.Argument(..., help="A recipe TOML."),
              overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE"),
              round_name: Optional[str] = typer.Option(None, "--round", help="Which round (default: the last)."),
              steps: int = typer.Option(20, "--steps", min=1, help="Steps per timed repeat."),
              warmup: int = typer.Option(3, "--warmup", min=0), repeats: int = repeats_opt,
              json_out: Optional[Path] = json_opt):
        """Loader + step end to end from a recipe, the data-wait share, and each alone."""
        rec = run_train(recipe_path=recipe, overrides=overrides, round_name=round_name, steps=steps,
                        warmup=warmup, repeats=repeats)
        _show_train(console, rec)
        write_json(json_out, rec)
