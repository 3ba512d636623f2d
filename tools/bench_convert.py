"""Images/s of `fastrefine convert` per format against FFCV's own DatasetWriter, and its peak memory.

Builds folders of REAL Fashion-MNIST images (Debian's idx files; nothing random), N train images in 10
class folders, upscaled to 500x375 JPEGs (ImageNet-sized files, not ImageNet content), and with `--small`
also 64x64. For each folder it times, in this run and with the project's one benchmark protocol
(`fastrefine.bench.measure`: warm-up, then `--repeats` timed runs, median/min/max reported):
  ours both / ours ffcv / ours dali  (convert_dataset, train split only, fresh OUT each run),
  plain ffcv  (torchvision ImageFolder -> ffcv DatasetWriter, RGBImageField proportion, same workers),
and with `--rss 2000,10000` the peak RSS of `convert --format both` on each count (each in a fresh
process: its own peak and its decode workers' largest, each worker's own VmHWM sampled while it runs).

    .venv/bin/python tools/bench_convert.py --n 2000 --workers 2 --json bench-convert.json
    .venv/bin/python tools/bench_convert.py --n 0 --rss 2000,10000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

# Nothing heavy at module level: the converter's spawn workers import this module again as __mp_main__,
# and torch (which fastrefine.bench imports) would cost every worker seconds of start-up.

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def make_folder(*, root: Path, n: int, size: tuple[int, int]) -> Path:
    """root/train/<class>/*.JPEG and a small root/val, from the first n Fashion-MNIST training images."""
    from PIL import Image

    from fastrefine.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("train", FMNIST)
    for split, idx in (("train", range(n)), ("val", range(min(50, n)))):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            j = i % len(images)
            img = Image.fromarray(images[j], mode="L").resize(size, Image.Resampling.BICUBIC).convert("RGB")
            img.save(root / split / CLASSES[labels[j]] / f"{i:06d}.JPEG", quality=90)
    return root


def run_ours(*, src: Path, out: Path, formats: tuple[str, ...], workers: int, max_side: int) -> None:
    from fastrefine.convert import ConvertOptions, convert_dataset

    shutil.rmtree(out, ignore_errors=True)
    with open(os.devnull, "w") as null, redirect_stderr(null), redirect_stdout(null):
        convert_dataset(src=src, out=out, layout="folder", options=ConvertOptions(
            formats=formats, max_side=max_side, workers=workers, splits=("train",), progress=False))


def run_plain_ffcv(*, src: Path, out: Path, workers: int, max_side: int) -> None:
    """FFCV's documented path, called plainly: ImageFolder -> DatasetWriter (its tqdm bar silenced)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dataset = ImageFolder(str(src / "train"))
    writer = DatasetWriter(str(out / "plain.beton"), {
        "image": RGBImageField(write_mode="proportion", max_resolution=max_side, jpeg_quality=90),
        "label": IntField()}, num_workers=workers)
    with open(os.devnull, "w") as null, redirect_stderr(null):
        writer.from_indexed_dataset(dataset)


def _children() -> set[str]:
    pids: set[str] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update((task / "children").read_text().split())
        except OSError:
            pass
    return pids


def peak_rss_child(src: Path, out: Path, workers: int, max_side: int) -> None:
    """In a fresh process: convert --format both, print {"self_mib", "children_mib"} peak RSS. A worker's
    peak is its own VmHWM, the last sample of those taken every 50 ms while it lives: a spawned worker is
    for a moment a forked copy of this process before it execs, which getrusage's RUSAGE_CHILDREN (and
    an early sample) would count as the worker's."""
    import threading

    from fastrefine.bench.protocol import proc_status_kib
    from fastrefine.convert import ConvertOptions, convert_dataset

    last_hwm: dict[str, int] = {}      # per worker, its latest sample: VmHWM only grows once it has exec'd
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for pid in _children():
                hwm = proc_status_kib("VmHWM", pid)
                if hwm:
                    last_hwm[pid] = hwm

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(os.devnull, "w") as null, redirect_stderr(null), redirect_stdout(null):
        convert_dataset(src=src, out=out, layout="folder", options=ConvertOptions(
            max_side=max_side, workers=workers, splits=("train",), progress=False))
    done.set()
    sampler.join()
    print(json.dumps({"self_mib": proc_status_kib("VmHWM") / 1024, "children_mib": max(last_hwm.values(), default=0) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="train images per folder (0: no timing)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="also time a 64x64 folder")
    parser.add_argument("--rss", default="", help="comma list of image counts for the peak-RSS runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="build the folders here and keep them")
    parser.add_argument("--rss-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from fastrefine.bench import make_record, measure, spread, write_json
    if args.rss_child:
        peak_rss_child(*args.rss_child, workers=args.workers, max_side=args.max_side)
        return
    import ffcv.writer  # noqa: F401  (import cost, ~seconds, must not land in a timed run)
    import torchvision.datasets  # noqa: F401
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    results = []
    sizes = [("imagenet-sized 500x375", (500, 375))] + ([("small 64x64", (64, 64))] if args.small else [])
    try:
        for label, size in sizes if args.n else []:
            src = make_folder(root=base / f"src-{size[0]}", n=args.n, size=size)
            cases = {
                "ours both": lambda: run_ours(src=src, out=base / "out", formats=("ffcv", "dali"),
                                              workers=args.workers, max_side=args.max_side),
                "plain ffcv": lambda: run_plain_ffcv(src=src, out=base / "plain", workers=args.workers,
                                                     max_side=args.max_side),
                "ours ffcv": lambda: run_ours(src=src, out=base / "out", formats=("ffcv",),
                                              workers=args.workers, max_side=args.max_side),
                "ours dali": lambda: run_ours(src=src, out=base / "out", formats=("dali",),
                                              workers=args.workers, max_side=args.max_side),
            }
            row = {"folder": label, "images": args.n}
            for name, fn in cases.items():
                seconds = measure(fn, warmup=args.warmup, iters=1, repeats=args.repeats, sync=lambda: None)
                row[name] = spread([args.n / s for s in seconds])
                print(f"{label:<24}{name:<12}{row[name]['median']:>8.0f} img/s  "
                      f"(min {row[name]['min']:.0f}, max {row[name]['max']:.0f}, load {os.getloadavg()[0]:.1f})",
                      flush=True)
            row["ratio both / plain"] = row["ours both"]["median"] / row["plain ffcv"]["median"]
            row["ratio ffcv / plain"] = row["ours ffcv"]["median"] / row["plain ffcv"]["median"]
            print(f"{label:<24}ours both / plain ffcv = {row['ratio both / plain']:.2f}, "
                  f"ours ffcv / plain ffcv = {row['ratio ffcv / plain']:.2f}", flush=True)
            results.append(row)
            shutil.rmtree(src, ignore_errors=True)
        for count in [int(c) for c in args.rss.split(",") if c.strip()]:
            src = make_folder(root=base / f"rss-{count}", n=count, size=(500, 375))
            out = base / f"rss-out-{count}"
            done = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--max-side",
                                   str(args.max_side), "--rss-child", str(src), str(out)],
                                  capture_output=True, text=True, check=True)
            peak = json.loads(done.stdout.strip().splitlines()[-1])
            results.append({"peak_rss_images": count, **peak})
            print(f"peak RSS, convert --format both of {count} images: main process {peak['self_mib']:.0f} MiB, "
                  f"largest decode worker {peak['children_mib']:.0f} MiB", flush=True)
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    settings = {"n": args.n, "workers": args.workers, "max_side": args.max_side, "repeats": args.repeats,
                "warmup": args.warmup, "rss": args.rss}
    write_json(args.json, make_record(command=" ".join(sys.argv), settings=settings, results=results))


if __name__ == "__main__":
    main()
