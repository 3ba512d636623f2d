"""A generated ImageFolder tree of JPEGs that a small net can learn, for machines without a data set
(the GPU tests and the device check: a bare GPU host has neither Fashion-MNIST nor ImageNet).

    ROOT/train/class0/00000.jpg ...   ROOT/val/class0/00000.jpg ...

Class c is a pattern a convolution sees at any crop: stripes at angle 180 * c / classes degrees, in a
colour of its own, over a background of smooth noise; the period, phase, brightness and the image
size vary per image (sizes drawn from `sizes`, so a batch mixes sizes as real photos do). Every image
is a function of (seed, split, class, index): the same call writes the same bytes.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_image(*, cls: int, classes: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One (height, width, 3) uint8 picture of class `cls`."""
    angle = math.pi * cls / classes + rng.normal(0, 0.05)
    period = rng.uniform(0.12, 0.25) * min(width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    wave = np.cos(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 2 * math.pi))
    r, g, b = colorsys.hsv_to_rgb(cls / classes, 0.7, 1.0)
    colour = np.array([r, g, b], dtype=np.float32) * rng.uniform(150, 230)
    coarse = rng.normal(0, 18, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    noise = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.BILINEAR), dtype=np.float32) - 128
    img = 40 + (0.5 + 0.5 * wave[..., None]) * colour + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_tree(root: Path | str, *, classes: int = 10, train_per_class: int = 40,
                         val_per_class: int = 10, sizes: tuple[tuple[int, int], ...] = ((48, 40), (40, 48), (32, 32)),
                         quality: int = 90, seed: int = 0) -> dict[str, int]:
    """Write ROOT/{train,val}/class<c>/<i>.jpg; `sizes` are (width, height) pairs drawn per image.
    Returns the number of images per split."""
    root = Path(root)
    counts = {}
    for split_no, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for cls in range(classes):
            folder = root / split / f"class{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng((seed, split_no, cls, i))
                width, height = sizes[int(rng.integers(len(sizes)))]
                pixels = synthetic_image(cls=cls, classes=classes, width=width, height=height, rng=rng)
                Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=quality)
        counts[split] = classes * per_class
    return counts
