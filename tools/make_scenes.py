#!/usr/bin/env python
"""Scenes of several objects from an ImageFolder of object photos: a benchmark whose crops miss the label.

    python tools/make_scenes.py data/fm28 data/scenes-k2 --objects 2 --size 64
    python tools/make_scenes.py data/fm28 data/scenes-k2-holdout --objects 2 --holdout 0.2

Each scene is a `--size` px square canvas holding K objects of K different classes, pasted at random
positions with random sizes (side in `--object-side` x size). The scene's label is the class of the
largest object (the one covering most pixels), which sits anywhere on the canvas. A RandomResizedCrop
of such a scene often shows another object, or none of the labelled one: the crop-label mismatch that
Label Refinery's refinery is meant to correct. K = 1 is the plain photo, placed off centre.

Objects are pasted with a per-pixel maximum, so bright objects on a dark ground (Fashion-MNIST) overlap
without hard edges; the ground is the per-channel minimum of the source photos' corners (black for
Fashion-MNIST). Objects are placed so that each keeps at least `--visible` of its box unoccluded by
the larger ones (a few tries, then the scene is drawn again).

Output, the ImageNet-style tree `fastrefine convert folder` takes:
    OUT/train/<class>/<scene>.JPEG     (class folders named as in SRC)
    OUT/val/<class>/<scene>.JPEG
    OUT/scenes.json                    per split, per scene: file, label, and its objects (class index,
                                       class name, box [x0, y0, x1, y1] in canvas pixels, source photo)
    OUT/classes.txt                    SRC's class folder names in index order

With `--holdout F`, both splits are drawn from SRC/train (a fraction F of each class's photos, the last
ones in sorted order, for OUT/val): a held-out part of the training split to choose a protocol on,
never SRC/val.
The same arguments give the same files (every scene has its own generator seeded by (seed, split, index)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
SCENES_NAME = "scenes.json"


class SceneError(Exception):
    """A source tree or an argument that cannot make scenes; printed as one line, exit 2."""


def list_folder(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    """(class names sorted, per class its image files sorted) of one ImageFolder split."""
    if not split_dir.is_dir():
        raise SceneError(f"{split_dir}: not a folder (expected SRC/train and SRC/val with one folder per class)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SceneError(f"{split_dir}: no class folders")
    files = []
    for c in classes:
        fs = sorted(p for p in (split_dir / c).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not fs:
            raise SceneError(f"{split_dir / c}: no images")
        files.append(fs)
    return classes, files


def object_box(img: np.ndarray, *, threshold: int = 16) -> tuple[int, int, int, int]:
    """The tight box (x0, y0, x1, y1) of pixels brighter than `threshold` above the ground; the whole image
    if none are."""
    mask = img.max(axis=2) > threshold
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0, 0, img.shape[1], img.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def load_object(path: Path) -> np.ndarray:
    """An RGB uint8 photo cut to its object's tight box (the ground around it dropped)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise SceneError(f"{path}: cannot read the image ({e})") from None
    x0, y0, x1, y1 = object_box(arr)
    return arr[y0:y1, x0:x1]


def _overlap(a, b) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def make_scene(rng: np.random.Generator, *, pools: list[list[Path]], classes: list[str], k: int, size: int,
               side: tuple[float, float], visible: float, cache: dict) -> tuple[np.ndarray, dict]:
    """One scene: (HxWx3 uint8 canvas, record). Objects are drawn largest first; each later (smaller) one is
    placed where it hides at most 1 - `visible` of any earlier box and keeps `visible` of its own."""
    for _ in range(100):
        cls = rng.choice(len(pools), size=k, replace=False)
        sides = np.sort(rng.uniform(side[0], side[1], size=k) * size)[::-1]
        canvas = np.zeros((size, size, 3), np.uint8)
        objects, boxes = [], []
        ok = True
        for c, s in zip(cls, sides):
            src = pools[c][int(rng.integers(len(pools[c])))]
            if src not in cache:
                cache[src] = load_object(src)
            obj = cache[src]
            h0, w0 = obj.shape[:2]
            scale = s / max(h0, w0)
            w, h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
            for _try in range(30):
                x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
                box = (x0, y0, x0 + w, y0 + h)
                area = w * h
                if all(_overlap(box, b) <= (1 - visible) * min(area, (b[2] - b[0]) * (b[3] - b[1])) for b in boxes):
                    break
            else:
                ok = False
                break
            patch = np.asarray(Image.fromarray(obj).resize((w, h), Image.BILINEAR))
            region = canvas[y0:y0 + h, x0:x0 + w]
            np.maximum(region, patch, out=region)
            boxes.append(box)
            objects.append({"class": int(c), "name": classes[c], "box": list(box), "source": str(src)})
        if ok:
            # the label: the object covering most pixels (boxes are drawn largest first, so objects[0])
            areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
            label = objects[int(np.argmax(areas))]["class"]
            return canvas, {"label": label, "objects": objects}
    raise SceneError(f"cannot place {k} objects of side {side} x {size} px with {visible} visible in 100 tries; "
                     f"use a smaller --object-side or --visible")


def write_split(*, name: str, pools: list[list[Path]], classes: list[str], out: Path, count: int, a) -> list[dict]:
    cache: dict = {}
    records = []
    per_class = [0] * len(classes)
    for c in classes:
        (out / name / c).mkdir(parents=True, exist_ok=True)
    split_id = {"train": 0, "val": 1}[name]
    for i in range(count):
        rng = np.random.default_rng([a.seed, split_id, i])
        canvas, rec = make_scene(rng, pools=pools, classes=classes, k=a.objects, size=a.size,
                                 side=tuple(a.object_side), visible=a.visible, cache=cache)
        label = rec["label"]
        rel = f"{name}/{classes[label]}/scene{i:07d}.JPEG"
        tmp = out / (rel + ".tmp")
        Image.fromarray(canvas).save(tmp, format="JPEG", quality=a.quality)
        os.replace(tmp, out / rel)
        per_class[label] += 1
        records.append({"file": rel, **rec})
    return records


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="ImageFolder of object photos: SRC/train/<class>/*, SRC/val/<class>/*")
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--objects", type=int, default=2, help="K, objects per scene, each of a different class (default 2)")
    ap.add_argument("--size", type=int, default=64, help="canvas side in px (default 64)")
    ap.add_argument("--object-side", type=float, nargs=2, default=(0.3, 0.6), metavar=("LO", "HI"),
                    help="object's longer side as a fraction of the canvas side (default 0.3 0.6)")
    ap.add_argument("--visible", type=float, default=0.75,
                    help="each object keeps at least this share of its box unoccluded (default 0.75)")
    ap.add_argument("--train", type=int, default=5000, help="train scenes (default 5000)")
    ap.add_argument("--val", type=int, default=2000, help="val scenes (default 2000)")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="F in (0, 1): draw both splits from SRC/train, val from the last F of each class's photos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    try:
        if a.objects < 1:
            raise SceneError(f"--objects {a.objects}: expected at least 1")
        lo, hi = a.object_side
        if not 0 < lo <= hi <= 1:
            raise SceneError(f"--object-side {lo} {hi}: expected 0 < LO <= HI <= 1")
        if not 0 <= a.holdout < 1:
            raise SceneError(f"--holdout {a.holdout}: expected a fraction in [0, 1)")
        classes, train_files = list_folder(a.src / "train")
        if a.objects > len(classes):
            raise SceneError(f"--objects {a.objects}: {a.src} has only {len(classes)} classes")
        if a.holdout:
            cut = [max(1, int(round(len(fs) * (1 - a.holdout)))) for fs in train_files]
            if any(c >= len(fs) for c, fs in zip(cut, train_files)):
                raise SceneError(f"{a.src / 'train'}: a class has too few photos to hold out {a.holdout} of them")
            pools = {"train": [fs[:c] for fs, c in zip(train_files, cut)],
                     "val": [fs[c:] for fs, c in zip(train_files, cut)]}
        else:
            val_classes, val_files = list_folder(a.src / "val")
            if val_classes != classes:
                raise SceneError(f"{a.src}: train/ and val/ have different class folders")
            pools = {"train": train_files, "val": val_files}
        a.out.mkdir(parents=True, exist_ok=True)
        manifest = {"source": str(a.src), "objects": a.objects, "size": a.size, "object_side": [lo, hi],
                    "visible": a.visible, "seed": a.seed, "holdout": a.holdout, "classes": classes,
                    "label": "the class of the largest object", "box": "[x0, y0, x1, y1] in canvas pixels",
                    "splits": {}}
        for name, count in (("train", a.train), ("val", a.val)):
            manifest["splits"][name] = write_split(name=name, pools=pools[name], classes=classes, out=a.out,
                                                   count=count, a=a)
        tmp = a.out / (SCENES_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, a.out / SCENES_NAME)
        (a.out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    except SceneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {a.train} train and {a.val} val scenes of {a.objects} objects, {a.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
