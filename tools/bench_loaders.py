"""Loader throughput on this machine: torchvision baseline, DALI, FFCV and the raw JPEG decode ceiling.

    .venv/bin/python tools/bench_loaders.py --work /tmp/loaderbench --images 2000 --batches 30

Builds (once) an ImageNet-sized tree of real Fashion-MNIST photos upscaled to 500x375 RGB JPEG,
converts it with `convert_dataset` (max side 256), then times each backend's train split at 224 px.
`measure_loader` is the one timing protocol (warm-up batches, then timed batches) and is what
`fastrefine bench loader` can call.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


def measure_loader(loader, *, batches: int, warmup: int) -> float:
    """Images/s over `batches` batches after `warmup` untimed ones (an epoch restarts if it runs out).
    Tensors are touched (a sum on the device) so that lazy or asynchronous producers are paid for."""
    seen, it, start = 0, iter(loader), None
    for step in range(warmup + batches):
        if step == warmup:
            start = time.perf_counter()
            seen = 0
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        x.sum()  # noqa: forces the batch to exist; on CUDA this would need a synchronize too
        if x.is_cuda:
            torch.cuda.synchronize()
        seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def make_tree(root: Path, *, images: int, classes: int = 10) -> None:
    """Real Fashion-MNIST photos upscaled to 500x375 RGB JPEG (quality 90), ImageFolder layout."""
    from PIL import Image

    from fastrefine.demo import load_fashion_mnist
    if (root / "train").is_dir():
        return
    pics, labels = load_fashion_mnist("train")
    per = images // classes
    for split, lo, n in (("train", 0, per), ("val", per, max(1, per // 10))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == c)[lo:lo + n]:
                im = Image.fromarray(pics[i]).resize((500, 375), Image.BICUBIC).convert("RGB")
                im.save(folder / f"{i:05d}.jpg", quality=90)


class DecodeOnly:
    """The ceiling: decode every converted JPEG (libjpeg-turbo via OpenCV, GIL released) on `workers`
    threads, no crop, no resize, no normalisation. Yields the number of images decoded per batch."""

    def __init__(self, shards: list[Path], *, batch: int, workers: int):
        import cv2
        cv2.setNumThreads(1)
        self.cv2, self.batch, self.pool = cv2, batch, ThreadPoolExecutor(workers)
        self.blobs = []
        for shard in shards:
            with tarfile.open(shard) as tf:
                self.blobs += [np.frombuffer(tf.extractfile(m).read(), np.uint8)
                               for m in tf if m.name.endswith(".jpg")]

    def _decode(self, blob):
        return self.cv2.imdecode(blob, self.cv2.IMREAD_COLOR)

    def __iter__(self):
        for k in range(0, len(self.blobs) - self.batch + 1, self.batch):
            yield sum(im is not None for im in self.pool.map(self._decode, self.blobs[k:k + self.batch]))


def decode_ceiling(shards: list[Path], *, batches: int, warmup: int, batch: int, workers: int) -> float:
    dec = DecodeOnly(shards, batch=batch, workers=workers)
    seen, it, start = 0, iter(dec), None
    for step in range(warmup + batches):
        if step == warmup:
            start, seen = time.perf_counter(), 0
        try:
            n = next(it)
        except StopIteration:
            it = iter(dec)
            n = next(it)
        seen += n
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/loaderbench"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=["torchvision", "dali", "ffcv", "ffcv-torch", "decode"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    from fastrefine.bench import baseline_loader
    from fastrefine.loaders import build
    from fastrefine.loaders.base import LoaderOptions
    from fastrefine.manifest import read_manifest

    src, conv = args.work / "src", args.work / "conv"
    make_tree(src, images=args.images)
    if not (conv / "manifest.json").is_file():
        from fastrefine.convert import convert_dataset
        convert_dataset(src=src, out=conv, layout="folder", max_side=256, quality=90, progress=False)
    dtype = getattr(torch, args.dtype)
    common = dict(split="train", batch_size=args.batch, resolution=args.res, device=torch.device("cpu"),
                  dtype=dtype, workers=args.workers)
    timing = dict(batches=args.batches, warmup=args.warmup)
    results = {}
    for name in args.only:
        if name == "torchvision":
            ld = baseline_loader(folder=src / "train", resolution=args.res, batch_size=args.batch,
                                 workers=args.workers, device=torch.device("cpu"))
            row = dict(out="float32", normalize="host (DataLoader workers)", data="original 500x375")
        elif name == "decode":
            shards, _ = read_manifest(conv).dali_shards("train")
            results[name] = dict(images_per_s=decode_ceiling(shards, batch=args.batch, workers=args.workers,
                                                               **timing),
                                 out="uint8 HWC", normalize="none", data="converted, max side 256")
            print(name, results[name], flush=True)
            continue
        elif name == "ffcv-torch":
            from fastrefine.loaders.ffcv import FfcvLoader
            ld = FfcvLoader(conv, LoaderOptions(**common), normalize_in="torch")
            row = dict(out=args.dtype, normalize="device (torch ops on the uint8 batch)",
                       data="converted, max side 256")
        else:
            ld = build(data=conv, backend=name, **common)
            row = dict(out=args.dtype, normalize=f"{ld.normalize_on} ({name})", data="converted, max side 256")
        results[name] = dict(images_per_s=measure_loader(ld, **timing), **row)
        print(name, results[name], flush=True)
        del ld
    (args.work / "bench_loaders.json").write_text(json.dumps(
        dict(results=results, args={k: str(v) for k, v in vars(args).items()},
             cpus=torch.get_num_threads()), indent=1))


if __name__ == "__main__":
    main()
