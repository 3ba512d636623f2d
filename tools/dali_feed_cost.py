"""Time the DALI loader's feed alone: per train batch, the JPEG views, the labels and the crop boxes and
flips handed to DALI's external source (DALI's pipeline does not run). Needs nvidia-dali (CPU mode).

    .venv/bin/python tools/dali_feed_cost.py data/fashion-mnist-fast [--batch 256] [--batches 60]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fastrefine.loaders import build
from fastrefine.loaders.samples import epoch_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=60)
    args = ap.parse_args()
    ld = build(data=args.data, backend="dali", split="train", batch_size=args.batch, resolution=160,
               device=torch.device("cpu"), workers=1, seed=0)
    ld.feed.start(epoch_batches(ld.total, ld.opts, 0)[:args.batches], 0)
    ld.feed()
    ld.feed()                                  # warm-up: the tars' first pages, numpy's first calls
    times = []
    while ld.feed.batches:
        t0 = time.perf_counter()
        ld.feed()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    sizes = "recorded sizes" if ld.table.heights is not None else "sizes from the JPEG headers"
    print(f"{args.data} ({sizes}): feed per train batch of {args.batch}: median {np.median(ms):.2f} ms, "
          f"p10 {np.percentile(ms, 10):.2f}, p90 {np.percentile(ms, 90):.2f}, over {len(ms)} batches")
    ld.close()


if __name__ == "__main__":
    main()
