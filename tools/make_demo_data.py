#!/usr/bin/env python
"""Export Debian's Fashion-MNIST as an ImageNet-style JPEG folder (the demo and test data).

    python tools/make_demo_data.py data/fashion-mnist --size 64
    python tools/make_demo_data.py data/fm-small --size 64 --limit-per-class 200
    python tools/make_demo_data.py data/imagenet-like --imagenet-like --images 2000

--imagenet-like writes 500x375 JPEGs of real photos with ImageNet's bytes per image (mosaics of 30
photos of a class; `--content upscaled` for one smooth photo each) under train/class<c>/ and
val/class<c>/: the data of the loader benchmarks in docs/benchmarks.md.
"""

import argparse
import sys

from fastrefine.fashion_mnist import export_fashion_mnist, export_imagenet_like
from fastrefine.errors import FastRefineError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (train/ and val/ go inside)")
    ap.add_argument("--size", type=int, default=64, help="side of the upscaled square JPEGs (default 64)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ap.add_argument("--limit-per-class", type=int, default=None, help="export at most K images per class per split")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--imagenet-like", action="store_true",
                    help="500x375 JPEGs with ImageNet's detail per image, for loader benchmarks (see above)")
    ap.add_argument("--images", type=int, default=2000, help="with --imagenet-like: train images in all (default 2000)")
    ap.add_argument("--content", default="mosaic", choices=["mosaic", "upscaled"],
                    help="with --imagenet-like: what the JPEGs show (default mosaic)")
    a = ap.parse_args()
    try:
        if a.imagenet_like:
            counts = export_imagenet_like(a.out, images=a.images, content=a.content)
        else:
            counts = export_fashion_mnist(a.out, size=a.size, quality=a.quality,
                                          limit_per_class=a.limit_per_class, workers=a.workers)
    except FastRefineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{a.out}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
