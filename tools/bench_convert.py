"""Images/s of `fastrefine convert` per format, against FFCV's own DatasetWriter on the same folder.

Builds two folders from REAL Fashion-MNIST images (Debian's idx files; nothing random):
  small:    N images at 64x64 (28 px upscaled), 10 classes;
  imagenet: N images at 500x375 (28 px upscaled, so ImageNet-sized files, not ImageNet content).
For each folder it times, on this machine and in this run:
  ours ffcv / ours dali / ours both  (fastrefine.convert.convert_dataset, train split only, fresh OUT),
  plain ffcv  (torchvision ImageFolder -> ffcv DatasetWriter, same fields and workers),
and prints a table plus JSON (`--json PATH`).

    .venv/bin/python tools/bench_convert.py --n 2000 --workers 2 --json /tmp/bench_convert.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from fastrefine.fashion_mnist import load_fashion_mnist

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def make_folder(*, root: Path, n: int, size: tuple[int, int]) -> Path:
    """root/train/<class>/*.JPEG and a small root/val, from the first n Fashion-MNIST training images."""
    images, labels = load_fashion_mnist("train", FMNIST)
    images, labels = images[:n], labels[:n]
    for split, idx in (("train", range(n)), ("val", range(min(50, n)))):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray(images[i], mode="L").resize(size, Image.Resampling.BICUBIC).convert("RGB")
            img.save(root / split / CLASSES[labels[i]] / f"{i:06d}.JPEG", quality=90)
    return root


def time_ours(*, src: Path, out: Path, formats: tuple[str, ...], workers: int, max_side: int) -> float:
    from fastrefine.convert import convert_dataset

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    convert_dataset(src=src, out=out, layout="folder", formats=formats, max_side=max_side, workers=workers,
                    splits=("train",), progress=False)
    return time.perf_counter() - start


def time_plain_ffcv(*, src: Path, out: Path, workers: int, max_side: int) -> float:
    """FFCV's documented path, called plainly: ImageFolder -> DatasetWriter."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dataset = ImageFolder(str(src / "train"))
    writer = DatasetWriter(str(out / "plain.beton"), {
        "image": RGBImageField(write_mode="proportion", max_resolution=max_side, jpeg_quality=90),
        "label": IntField()}, num_workers=workers)
    writer.from_indexed_dataset(dataset)
    return time.perf_counter() - start


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="build the folders here and keep them")
    args = parser.parse_args()
    import ffcv.writer  # noqa: F401  (import cost, ~seconds, must not land in the first timed run)
    import torchvision.datasets  # noqa: F401
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "n": args.n, "workers": args.workers, "max_side": args.max_side, "rows": []}
    for label, size in (("small 64x64", (64, 64)), ("imagenet-sized 500x375", (500, 375))):
        src = make_folder(root=base / label.split()[0], n=args.n, size=size)
        # warm the page cache and imports once, so the first timed run is not penalised
        time_ours(src=src, out=base / "warm", formats=("dali",), workers=args.workers, max_side=args.max_side)
        row = {"folder": label}
        for name, formats in (("ours_ffcv", ("ffcv",)), ("ours_dali", ("dali",)), ("ours_both", ("ffcv", "dali"))):
            row[name] = args.n / time_ours(src=src, out=base / "out", formats=formats, workers=args.workers,
                                           max_side=args.max_side)
        row["plain_ffcv"] = args.n / time_plain_ffcv(src=src, out=base / "plain", workers=args.workers,
                                                     max_side=args.max_side)
        row["ratio_ours_ffcv_to_plain"] = row["ours_ffcv"] / row["plain_ffcv"]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{results['date']}  {results['machine']}  n={args.n} workers={args.workers} "
          f"max_side={args.max_side}")
    print(f"{'folder':<24}{'ours ffcv':>11}{'ours dali':>11}{'ours both':>11}{'plain ffcv':>12}{'ratio':>8}")
    for r in results["rows"]:
        print(f"{r['folder']:<24}{r['ours_ffcv']:>11.0f}{r['ours_dali']:>11.0f}{r['ours_both']:>11.0f}"
              f"{r['plain_ffcv']:>12.0f}{r['ratio_ours_ffcv_to_plain']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
