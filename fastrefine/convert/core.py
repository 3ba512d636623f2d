"""The conversion: scan -> lock OUT -> clean shards (process pool) -> .beton -> manifest, resumable.

Every split goes through the same two stages:

1. *Clean shards.* Each candidate file is decoded, oriented, made RGB, shrunk and encoded as a JPEG once,
   by a pool of worker processes; the results are written in a fixed (seeded, shuffled for train) order
   into webdataset tar shards with DALI's index. With `dali` among the formats they are the product
   (`OUT/dali/`); otherwise they are scratch space (`OUT/.work/`, deleted at the end).
2. *FFCV.* `OUT/{split}.beton` is written from those same JPEG bytes (`ffcv_writer.write_beton`): no
   image is decoded from its source twice or encoded twice.

The whole run holds an exclusive lock on OUT (`lock.out_lock`). Resume: each shard, and each `.beton`, has
a record with a fingerprint of its inputs and settings and the size and sampled checksum of its files;
a rerun redoes only what is missing, damaged or stale. The manifest is written last, atomically, and
lists every output file with its size and sampled checksum (`fastrefine.manifest.check_recorded_file`).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from ..atomic import clean_stale_temporaries, read_json_marker, temporary_of, write_text
from ..progress import RateColumn
from ..errors import RunError, UsageError
from ..manifest import FILES_KEY, MANIFEST_NAME, MANIFEST_VERSION, file_digest
from . import turbo
from .imaging import Cleaned, clean_many
from .lock import LOCK_NAME, out_lock
from .options import ConvertOptions
from .scan import SourceScan, SplitScan, scan_source
from .shards import (ShardPlan, fingerprint, load_complete_record, plan_shards, remove_stale, write_shard,
                     write_sizes)

SHUFFLE_SEED = 0
MARKER = ".fastrefine-convert.json"     # written first, so a half-done OUT still says what it holds
WORK = ".work"                          # scratch shards when only FFCV is asked for
DALI_DIR = "dali"
BETON_WRITER = "direct-v1"              # part of a .beton's fingerprint: files of an older writer are redone
# Part of every shard's fingerprint. 2: plain JPEG sources are decoded DCT-scaled by TurboJPEG and shrunk
# by OpenCV (`turbo.py`), which gives other pixels than version 1's PIL-only path, so older shards are redone.
CLEAN_VERSION = 2


@dataclass
class SplitRun:
    """What happened to one split in this run (for the summary), and its totals (for the manifest)."""
    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    encoded: int = 0                     # candidate files decoded in this run
    written: int = 0                     # of which became images
    skipped_now: int = 0
    beton: dict[str, Any] | None = None  # the .beton's record (fingerprint, file digest, summary)
    beton_written: bool = False
    seconds: float = 0.0
    shard_records: list[dict[str, Any]] = field(default_factory=list)
    shard_plans: list[ShardPlan] = field(default_factory=list)
    sizes: dict[str, Any] | None = None  # the digest of its image-size file (DALI shards only)


def convert(*, src: Path, out: Path, layout: str, options: ConvertOptions, console: Console | None = None) -> dict:
    opts = options
    if "ffcv" in opts.formats:
        try:
            import ffcv  # noqa: F401  (checked now, before anything is written)
        except ImportError as e:
            raise UsageError(f"format ffcv needs the ffcv package ({e}); install fastrefine[ffcv]") from None
    console = console or Console()
    out = Path(out).expanduser().resolve()
    _refuse_out_inside_src(out=out, src=Path(src).expanduser().resolve())
    scan = scan_source(src=Path(src), layout=layout, splits=opts.splits, limit_per_class=opts.limit_per_class)
    _guard_out(out=out, source=scan.source)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    with out_lock(out):
        old_manifest = _guard_out(out=out, source=scan.source)      # again, now that no one else writes
        for folder in (out, out / DALI_DIR, out / WORK):
            clean_stale_temporaries(folder)
        if not (out / MARKER).is_file():
            write_text(out / MARKER, json.dumps({"source": str(scan.source)}) + "\n")
        settings = {"layout": layout, "max_side": opts.max_side, "quality": opts.quality,
                    "shard_size": opts.shard_size, "seed": SHUFFLE_SEED,
                    "limit_per_class": opts.limit_per_class, "strict": opts.strict, "version": CLEAN_VERSION}
        shard_dir = out / (DALI_DIR if "dali" in opts.formats else WORK)
        runs = _run_splits(scan=scan, out=out, shard_dir=shard_dir, settings=settings, opts=opts,
                           console=console)
        if "dali" not in opts.formats and (out / WORK).is_dir():
            shutil.rmtree(out / WORK)
        if "dali" in opts.formats:
            for run in runs:
                run.sizes = write_sizes(out / _sizes_rel(run.name), run.shard_records)
        manifest = _build_manifest(scan=scan, runs=runs, opts=opts)
        did_work = any(r.encoded or r.beton_written for r in runs)
        if not did_work and old_manifest is not None and _same(old_manifest, manifest):
            console.print(f"{out}: already complete for {', '.join(opts.formats)} / "
                          f"{', '.join(opts.splits)}; nothing to do", markup=False, highlight=False)
            return old_manifest
        write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    _print_summary(console=console, runs=runs, out=out)
    return manifest


def _refuse_out_inside_src(*, out: Path, src: Path) -> None:
    """OUT inside SRC would be scanned as part of the source (a class folder of its own, at worst)."""
    if out == src or src in out.parents:
        raise UsageError(f"{out}: the output folder is inside the source folder {src}; choose an OUT "
                         f"outside it")


def _own_temporary(name: str) -> bool:
    """A temporary of the marker or the manifest: what a convert killed while writing its marker leaves
    beside the lock. It does not make OUT foreign; a dead process's is removed under the lock, a live
    one's belongs to a convert that holds the lock."""
    return temporary_of(name) in (MARKER, MANIFEST_NAME)


def _guard_out(*, out: Path, source: Path) -> dict | None:
    """Refuse an OUT that is a file, holds another source's conversion, or holds unrelated files."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if not out.exists():
        return None
    found = {}
    for name in (MANIFEST_NAME, MARKER):
        path = out / name
        if path.is_file():
            try:
                found[name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UsageError(f"{path}: unreadable ({e}); not writing into {out}") from None
            other = found[name].get("source") if isinstance(found[name], dict) else None
            if other != str(source):
                raise UsageError(f"{out}: holds a conversion of {other}, not {source}; "
                                 f"choose another OUT or delete that one")
    if not found and any(p.name != LOCK_NAME and not _own_temporary(p.name) for p in out.iterdir()):
        raise UsageError(f"{out}: not empty and holds no fastrefine conversion; choose an empty folder")
    return found.get(MANIFEST_NAME)


def _ordered(scan: SplitScan) -> list:
    """Train is shuffled (seeded) so that reading shards in order is not class-sorted; val keeps its order."""
    cands = list(scan.candidates)
    if scan.name == "train":
        random.Random(SHUFFLE_SEED).shuffle(cands)
    return cands


def _run_splits(*, scan: SourceScan, out: Path, shard_dir: Path, settings: dict, opts: ConvertOptions,
                console: Console) -> list[SplitRun]:
    """Stage 1 (clean shards) for every split with the pool, then stage 2 (the .beton files)."""
    runs = []
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               RateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with _Pool(workers=opts.processes) as pool, \
            Progress(*columns, console=console, disable=not opts.progress) as bar:
        for name, split in scan.splits.items():
            start = time.perf_counter()
            run = SplitRun(name=name)
            run.shard_plans = plan_shards(split=name, candidates=_ordered(split), shard_size=opts.shard_size,
                                          settings=settings)
            fp = fingerprint({"shards": [p.fingerprint for p in run.shard_plans], "mode": opts.ffcv_mode,
                              "writer": BETON_WRITER})
            if "ffcv" in opts.formats:
                run.beton = {"fingerprint": fp}
                record = None if opts.force else _load_beton_record(out=out, split=name, fp=fp)
                if record is not None:
                    run.beton, run.summary = record, record["summary"]
            if "dali" in opts.formats or (run.beton is not None and "file" not in run.beton):
                _make_shards(run=run, split=split, scan=scan, shard_dir=shard_dir, opts=opts, pool=pool, bar=bar)
                run.summary = _summarise(split=split, records=run.shard_records, num_classes=len(scan.classes))
            if name == "train":
                _refuse_classes_without_images(summary=run.summary, scan=scan)
            run.seconds = time.perf_counter() - start
            runs.append(run)
        for run in runs:
            if run.beton is not None and "file" not in run.beton:
                start = time.perf_counter()
                _make_beton(run=run, out=out, shard_dir=shard_dir, opts=opts, bar=bar)
                run.seconds += time.perf_counter() - start
    return runs


def _make_shards(*, run: SplitRun, split: SplitScan, scan: SourceScan, shard_dir: Path, opts: ConvertOptions,
                 pool: "_Pool", bar: Progress) -> None:
    shard_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(folder=shard_dir, split=run.name, keep=len(run.shard_plans))
    records: dict[int, dict] = {}
    if not opts.force:
        for plan in run.shard_plans:
            record = load_complete_record(plan=plan, folder=shard_dir)
            if record is not None:
                records[plan.number] = record
    todo = [p for p in run.shard_plans if p.number not in records]
    total = sum(len(p.items) for p in todo)
    task = bar.add_task(f"{run.name}: clean shards", total=total)

    def counted(result: Cleaned) -> None:
        run.encoded += 1
        if result.ok:
            run.written += 1
        else:
            run.skipped_now += 1
        bar.advance(task)

    if total:
        paths = [str(scan.source / cand.path) for plan in todo for _, cand in plan.items]
        stream = pool.clean(paths=paths, max_side=opts.max_side, quality=opts.quality, strict=opts.strict)
        for plan in todo:
            records[plan.number] = write_shard(plan=plan, cleaned=stream, folder=shard_dir, on_item=counted)
    run.shard_records = [records[p.number] for p in run.shard_plans]


def _refuse_classes_without_images(*, summary: dict, scan: SourceScan) -> None:
    """A train class whose every file was skipped (undecodable, too large, ...) would be a class with no
    examples: refused like an empty class folder, naming the folder and the first file's reason."""
    empty = [c for c in scan.classes if summary["label_counts"][c.index] == 0]
    if not empty:
        return
    folder = scan.splits["train"].folder or "train"
    first = next((s for s in summary["skipped"] if Path(s["path"]).parent.name == empty[0].wnid), None)
    why = f"; {first['path']}: {first['reason']}" if first else ""
    names = ", ".join(c.wnid for c in empty[:10]) + (f" (+{len(empty) - 10} more)" if len(empty) > 10 else "")
    raise UsageError(f"{scan.source / folder}: class folder(s) with no decodable image: {names}{why}; "
                     f"remove them or add images (each would be a class with no examples)")


def _beton_record_path(*, out: Path, split: str) -> Path:
    return out / f"{split}.beton.json"


def _load_beton_record(*, out: Path, split: str, fp: str) -> dict | None:
    """The .beton's record if the file on disk is the one it describes (size and sampled checksum)."""
    record = read_json_marker(_beton_record_path(out=out, split=split))
    if record is None or record.get("fingerprint") != fp or not isinstance(record.get("file"), dict):
        return None
    beton = out / f"{split}.beton"
    try:
        if beton.stat().st_size != record["file"].get("bytes") or file_digest(beton) != record["file"]:
            return None
    except OSError:
        return None
    return record


def _make_beton(*, run: SplitRun, out: Path, shard_dir: Path, opts: ConvertOptions, bar: Progress) -> None:
    from .ffcv_writer import CleanSamples, write_beton

    if run.summary["count"] == 0:
        raise RunError(f"split {run.name}: no readable images, nothing to write into {run.name}.beton")
    _beton_record_path(out=out, split=run.name).unlink(missing_ok=True)
    kept = [(p, r) for p, r in zip(run.shard_plans, run.shard_records) if r["count"]]
    samples = CleanSamples(tar_paths=[shard_dir / f"{p.stem}.tar" for p, _ in kept], records=[r for _, r in kept])
    path = out / f"{run.name}.beton"
    task = bar.add_task(f"{run.name}: write {path.name} ({opts.ffcv_mode})", total=len(samples))
    write_beton(path=path, samples=samples, write_mode=opts.ffcv_mode, max_side=opts.max_side,
                threads=opts.processes, advance=lambda: bar.advance(task))
    run.beton = {"fingerprint": run.beton["fingerprint"], "file": file_digest(path), "summary": run.summary}
    write_text(_beton_record_path(out=out, split=run.name), json.dumps(run.beton, separators=(",", ":")))
    run.beton_written = True


def _summarise(*, split: SplitScan, records: list[dict], num_classes: int) -> dict[str, Any]:
    label_counts = [0] * num_classes
    notes: Counter = Counter()
    skipped = [s.as_dict() for s in split.skipped]
    warned = []
    for record in records:
        for m in record["members"]:
            label_counts[m["label"]] += 1
            if m.get("warning"):
                warned.append({"path": m["source"], "warning": m["warning"]})
        skipped.extend(record["skipped"])
        notes.update(record["notes"])
    skipped.sort(key=lambda s: s["path"])
    warned.sort(key=lambda s: s["path"])
    return {"count": sum(label_counts), "label_counts": label_counts, "skipped": skipped,
            "repaired": dict(sorted(notes.items())), "warned": warned}


def _build_manifest(*, scan: SourceScan, runs: list[SplitRun], opts: ConvertOptions) -> dict:
    splits, skipped, warned, files = {}, [], [], {}
    for run in runs:
        s = run.summary
        entry: dict[str, Any] = {"count": s["count"], "label_counts": s["label_counts"]}
        if "ffcv" in opts.formats:
            entry["ffcv"] = {"file": f"{run.name}.beton", "write_mode": opts.ffcv_mode}
            files[f"{run.name}.beton"] = run.beton["file"]
        if "dali" in opts.formats:
            kept = [(p.stem, r) for p, r in zip(run.shard_plans, run.shard_records) if r["count"]]
            entry["dali"] = {"format": "webdataset", "shards": [f"{DALI_DIR}/{k}.tar" for k, _ in kept],
                             "index": [f"{DALI_DIR}/{k}.idx" for k, _ in kept], "ext": ["jpg", "cls"],
                             "file_lists": [f"{DALI_DIR}/{p.stem}.json" for p in run.shard_plans],
                             "shuffled": run.name == "train", "sizes": _sizes_rel(run.name)}
            files[_sizes_rel(run.name)] = run.sizes
            for stem, record in kept:
                files[f"{DALI_DIR}/{stem}.tar"] = record["tar"]
                files[f"{DALI_DIR}/{stem}.idx"] = record["idx"]
        folder = scan.splits[run.name].folder
        if folder is not None and opts.limit_per_class is None:
            entry["folder"] = folder
        entry["skipped_count"] = len(s["skipped"])
        entry["skipped_kinds"] = dict(sorted(Counter(x["kind"] for x in s["skipped"]).items()))
        entry["repaired"] = s["repaired"]
        # kept although libjpeg warned (damaged data it stepped over); --strict skips them instead
        entry["warned_count"] = len(s.get("warned", []))
        splits[run.name] = entry
        skipped.extend(s["skipped"])
        warned.extend(s.get("warned", []))
    return {"version": MANIFEST_VERSION, "dataset": scan.layout, "source": str(scan.source),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "max_side": opts.max_side, "quality": opts.quality, "jpeg_path": turbo.describe(),
            "formats": list(opts.formats),
            "ffcv_mode": opts.ffcv_mode, "shard_size": opts.shard_size, "shuffle_seed": SHUFFLE_SEED,
            "classes": [{"index": c.index, "wnid": c.wnid, "name": c.name, "description": c.description}
                        for c in scan.classes],
            "strict": opts.strict, "splits": splits, "skipped": skipped, "warned": warned, FILES_KEY: files}


def _sizes_rel(split: str) -> str:
    return f"{DALI_DIR}/{split}.sizes.npy"


def _same(old: dict, new: dict) -> bool:
    strip = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    return strip(old) == strip(new)


def _print_summary(*, console: Console, runs: list[SplitRun], out: Path) -> None:
    table = Table(title=Text(f"fastrefine convert -> {out}"))
    for col in ("split", "images", "decoded now", "skipped", "skip reasons", "libjpeg warned", "seconds",
                "images/s"):
        table.add_column(col, justify="left" if col in ("split", "skip reasons") else "right")
    for run in runs:
        kinds = Counter(x["kind"] for x in run.summary["skipped"])
        reasons = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "-"
        rate = f"{run.encoded / run.seconds:.0f}" if run.encoded and run.seconds > 0 else "-"
        table.add_row(run.name, str(run.summary["count"]), str(run.encoded), str(len(run.summary["skipped"])),
                      reasons, str(len(run.summary.get("warned", []))), f"{run.seconds:.1f}", rate)
    console.print(table)


class _Pool:
    """Lazily started process pool (spawn: no forked copies of the caller's threads) with an ordered,
    bounded stream of results, so memory stays flat on ImageNet-sized inputs."""

    def __init__(self, *, workers: int):
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> "_Pool":
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            # queued chunks are cancelled; running ones (at most 32 images each) are waited for
            self._executor.shutdown(wait=True, cancel_futures=True)

    def clean(self, *, paths: list[str], max_side: int, quality: int, strict: bool) -> Iterator[Cleaned]:
        chunk = max(1, min(32, len(paths) // (self.workers * 4) or 1))
        if self.workers == 1:
            for i in range(0, len(paths), chunk):
                yield from clean_many(paths[i:i + chunk], max_side, quality, strict)
            return
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"))
        pending: deque = deque()
        for i in range(0, len(paths), chunk):
            pending.append((paths[i], self._executor.submit(clean_many, paths[i:i + chunk], max_side, quality,
                                                            strict)))
            if len(pending) >= self.workers * 4:
                yield from self._result(*pending.popleft())
        while pending:
            yield from self._result(*pending.popleft())

    @staticmethod
    def _result(first: str, future) -> list[Cleaned]:
        try:
            return future.result()
        except BrokenProcessPool:
            raise RunError(f"a decode worker died while converting the chunk starting at {first} "
                           f"(killed, or out of memory); rerun to resume") from None


__all__ = ["convert"]
