"""Export Debian's Fashion-MNIST (real 28x28 product photos) as an ImageNet-style JPEG folder.

    OUT/train/<wnid>/<idx>.JPEG   60,000 (or --limit-per-class per class)
    OUT/val/<wnid>/<idx>.JPEG     10,000
    OUT/LOC_synset_mapping.txt    "wnid name" per line, as ImageNet ships it
    OUT/classes.txt               class names, one per line, in index order

Images are upscaled to `size` px RGB JPEGs so the JPEG decode path is exercised for real.
Idempotent: a split whose marker file matches the settings is left alone.
"""

from __future__ import annotations

import gzip
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import atomic_write, read_json_marker, write_json, write_text
from .errors import UsageError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot"]
# wnid-like folder names (n + 8 digits), so the tree looks like ImageNet's
WNIDS = [f"n9{i:07d}" for i in range(len(CLASS_NAMES))]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST container format), gzip or plain."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UsageError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, source: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels uint8 [N]) of 'train' or 'val' (the t10k set)."""
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = source / img_name, source / lbl_name
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise UsageError(f"{p} not found: install Debian's dataset-fashion-mnist "
                             f"(apt-get install dataset-fashion-mnist)")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if len(images) != len(labels):
        raise UsageError(f"{img_path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def select(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    """Indices to export: all, or the first `limit_per_class` of each class (source order)."""
    if not limit_per_class:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(keep))


def _write_chunk(args) -> int:
    out_dir, size, quality, items = args
    for index, label, pixels in items:
        path = Path(out_dir) / WNIDS[label] / f"{index:05d}.JPEG"
        img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        atomic_write(path, lambda fh, img=img: img.save(fh, format="JPEG", quality=quality))
    return len(items)


def export_fashion_mnist(out: str | Path, *, size: int = 64, quality: int = 90,
                         limit_per_class: int | None = None, workers: int | None = None,
                         source: Path = FASHION_MNIST_DIR, progress: bool = True) -> dict:
    """Write the ImageNet-style tree; returns {split: images}. Re-running with the same settings is a no-op."""
    if size < 8:
        raise UsageError(f"--size: expected >= 8, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "LOC_synset_mapping.txt", "".join(f"{w} {n}\n" for w, n in zip(WNIDS, CLASS_NAMES)))
    write_text(out / "classes.txt", "".join(n + "\n" for n in CLASS_NAMES))
    settings = {"size": size, "quality": quality, "limit_per_class": limit_per_class or 0}
    counts = {}
    for split in ("train", "val"):
        images, labels = load_fashion_mnist(split, source)
        idx = select(labels, limit_per_class)
        marker = out / f".fastrefine-demo-{split}.json"  # beside, not inside, the split: no stray file in it
        done = read_json_marker(marker)
        if done == {**settings, "count": len(idx)}:
            counts[split] = len(idx)
            continue
        for w in WNIDS:
            (out / split / w).mkdir(parents=True, exist_ok=True)
        items = [(int(i), int(labels[i]), images[i]) for i in idx]
        chunks = [items[k:k + 500] for k in range(0, len(items), 500)]
        jobs = [(str(out / split), size, quality, c) for c in chunks]
        _run_jobs(jobs, total=len(items), label=f"demo {split}", workers=workers, progress=progress)
        write_json(marker, {**settings, "count": len(idx)})
        counts[split] = len(idx)
    return counts


def _run_jobs(jobs, *, total: int, label: str, workers: int | None, progress: bool) -> None:
    from .progress import progress_bar

    workers = workers or os.cpu_count() or 1
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(label, total=total, info="")
        if workers == 1:
            for j in jobs:
                bar.advance(task, _write_chunk(j))
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for n in pool.map(_write_chunk, jobs):
                bar.advance(task, n)


def export_imagenet_like(out: str | Path, *, images: int = 2000, classes: int = 10, content: str = "mosaic",
                         source: Path = FASHION_MNIST_DIR) -> dict:
    """An ImageNet-sized folder tree of real Fashion-MNIST photos as 500x375 RGB JPEGs (quality 90), for
    loader benchmarks: OUT/train/class<c>/ (images // classes each) and OUT/val/class<c>/ (a tenth of that).

    content="mosaic": each image tiles 30 different photos of one class, each shown at 84x84 (3x), so the
    picture has the detail of a natural photo: converted at max side 256 / q90 they average ~16 kB (2.6
    bits per pixel), close to what FFCV's documentation reports for ImageNet at 256 px, q90 (22.01 GB for
    the 1.28 M training images, ~17 kB). content="upscaled": one photo upscaled to 500x375, flat and
    smooth (~5 kB, 0.8 bits per pixel at 256 px), far cheaper to decode than ImageNet.
    Re-running with the same settings is a no-op (a marker beside the splits). Returns {split: images}."""
    if content not in ("mosaic", "upscaled"):
        raise UsageError(f"--content {content!r}: expected 'mosaic' or 'upscaled'")
    if not 1 <= classes <= len(CLASS_NAMES) or images < classes:
        raise UsageError(f"--images {images} / --classes {classes}: expected 1 to {len(CLASS_NAMES)} classes "
                         f"and at least one image per class")
    root = Path(out)
    per = images // classes
    counts = {"train": per * classes, "val": max(1, per // 10) * classes}
    settings = {"images": images, "classes": classes, "content": content, **counts}
    marker = root / ".fastrefine-imagenet-like.json"
    if read_json_marker(marker) == settings:
        return counts
    pics, labels = load_fashion_mnist("train", source)
    rng = np.random.default_rng(0)
    tile, rows, cols = 84, 5, 6  # 420x504 of tiles, cropped to 375x500
    for split, lo, n in (("train", 0, per), ("val", per, max(1, per // 10))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            own = np.flatnonzero(labels == c)
            for i in own[lo:lo + n]:
                if content == "upscaled":
                    im = Image.fromarray(pics[i]).resize((500, 375), Image.BICUBIC)
                else:
                    picks = rng.choice(own, rows * cols, replace=False)
                    tiles = [np.asarray(Image.fromarray(pics[k]).resize((tile, tile), Image.BICUBIC))
                             for k in picks]
                    grid = np.stack(tiles).reshape(rows, cols, tile, tile).transpose(0, 2, 1, 3)
                    im = Image.fromarray(grid.reshape(rows * tile, cols * tile)[:375, :500])
                im = im.convert("RGB")
                atomic_write(folder / f"{i:05d}.jpg", lambda fh, im=im: im.save(fh, format="JPEG", quality=90))
    write_json(marker, settings)
    return counts
