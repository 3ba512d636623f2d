"""The one benchmark protocol (DESIGN.md convention 8): every `fastrefine bench` command and every
tool that times something uses these functions.

`warmup` untimed calls, then `repeats` (>= 3) timed blocks of `iters` calls; each block is timed with
CUDA events on a GPU, or with perf_counter around a device synchronisation elsewhere. Every figure is
reported as the median over the blocks with min/max and the interquartile range, and every block is
kept in the JSON record beside the hardware, the versions, the git revision and the settings. First
calls (start-up, torch.compile) are timed apart, never inside a block.
"""

from __future__ import annotations

import logging
import statistics
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import RunError, UsageError

log = logging.getLogger("fastrefine.bench")

MIN_REPEATS = 3


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


def time_block(fn: Callable[[], object], *, iters: int, sync: Callable[[], None], events: bool) -> float:
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
    return [time_block(fn, iters=iters, sync=sync, events=events) for _ in range(repeats)]


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


WORKERS_PER_CORE = 4  # a pool of more processes than 4 per core measures the scheduler, not the work


def check_workers(workers: int | None, *, option: str) -> int:
    """A process or thread count for a bench: None means all cores; more than WORKERS_PER_CORE per core is
    refused with one line (a typo like 100000 would start that many processes)."""
    cores = os.cpu_count() or 1
    if workers is None:
        return cores
    top = WORKERS_PER_CORE * cores
    if not 1 <= workers <= top:
        raise UsageError(f"{option} {workers}: expected 1 to {top} ({WORKERS_PER_CORE} per core, "
                         f"{cores} cores here)")
    return workers


MAX_RESOLUTION = 4096          # as a recipe's loader.resolution: past any training resolution
MAX_BATCH_BYTES = 8 * 2**30    # one fp32 image batch: 224 px x 256 is 154 MB, 1024 px x 256 3.2 GB


def check_batch(*, resolution: int, batch_size: int) -> None:
    """A bench's --resolution and --batch-size: 8 to MAX_RESOLUTION px, and one fp32 batch of at most
    MAX_BATCH_BYTES (a loader holds a few, a step several activations of it); else one line."""
    if not 8 <= resolution <= MAX_RESOLUTION:
        raise UsageError(f"--resolution {resolution}: expected 8 to {MAX_RESOLUTION} px")
    batch_bytes = batch_size * 3 * resolution * resolution * 4
    if batch_bytes > MAX_BATCH_BYTES:
        raise UsageError(f"--resolution {resolution} with --batch-size {batch_size}: one fp32 batch is "
                         f"{batch_bytes / 2**30:.1f} GiB, more than the {MAX_BATCH_BYTES / 2**30:.0f} GiB "
                         f"a bench allows; lower either")


def clock_name(device: torch.device) -> str:
    return "CUDA events" if device.type == "cuda" else "time.perf_counter (CPU ops are synchronous)"


# --------------------------------------------------------------------------------------- the record

def make_record(*, command: str, settings: dict, results: list[dict], summary: dict | None = None,
                notes: list[str] | None = None) -> dict:
    from ..environment import git_revision, hardware, versions
    return {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_revision(),
            "hardware": hardware(), "versions": versions(), "settings": settings, "results": results,
            "load_average": list(os.getloadavg()),  # other work on this machine skews the figures
            "summary": summary or {}, "notes": notes or []}


def write_json(path: Path | None, record: dict) -> None:
    """The record at `path` (none when None): atomically to a file, straight to a stream (output.py)."""
    if path is not None:
        from ..output import write_json_report
        write_json_report(Path(path), record)


def proc_status_kib(field: str, pid: str = "self") -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...); None where the process or the field is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith(f"{field}:")), None)


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
        kib = proc_status_kib("VmRSS")
        return float("nan") if kib is None else kib / 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if "clear_refs" in self.method:
            kib = proc_status_kib("VmHWM")
            if kib is not None:
                return kib / 1024
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ batches

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

