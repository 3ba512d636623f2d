"""Loader throughput on this machine: torchvision baseline, DALI, FFCV and the raw JPEG decode ceiling.

    .venv/bin/python tools/bench_loaders.py --images 2000 --batches 30 --repeats 3

Builds (once) an ImageNet-sized tree of real Fashion-MNIST photos as 500x375 RGB JPEGs (mosaics with
ImageNet's bytes per image by default, see make_tree), converts it with `convert_dataset` (max side
`--max-side`, default 256, q90), then times each backend's train split at `--res` (224) px, `--repeats` times each (median, min, max).
Loaders are timed with `fastrefine bench`'s own protocol (`time_batches`: first batch apart, warm-up
batches, then repeats of timed batches). Rows that are not loaders, to show where the time goes:
"decode" (the ceiling: FFCV's TurboJPEG decode only, a process per core), "decode-cv2" (OpenCV's),
"decode+resize" (full decode + random crop + resize to 224 in numba threads, nothing else: what a
loader that decodes whole images must at least do) and "ffcv-uint8" (the FFCV loader's decode + crop
+ resize + flip, uint8 out). "ffcv" uses fastrefine's FFCV decoder (the default), "ffcv-stock" FFCV's
own; `fastrefine bench loader --ffcv-decoders fast,stock --rounds N` times the two in turn.
"""

from __future__ import annotations

import os

# DALI and then FFCV in one process under numba's TBB layer (picked up from Debian's libtbb, which
# OpenCV pulls in) ended in "terminate called without an active exception" (exit 134) at interpreter
# exit; OpenMP, also thread-safe for FFCV's loader thread, does not. Set before numba loads.
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_tree(root: Path, *, images: int, classes: int = 10, content: str = "mosaic") -> None:
    """An ImageNet-sized tree of real Fashion-MNIST photos as 500x375 RGB JPEGs (quality 90).

    content="mosaic": each image tiles 30 different photos of one class, each shown at 84x84 (3x),
    so the picture has the detail of a natural photo: converted at max side 256 / q90 they average
    ~17 kB (2.8 bits per pixel), which is what FFCV's documentation reports for ImageNet at 256 px,
    q90 (22.01 GB for the 1.28 M training images). content="upscaled": one photo upscaled to
    500x375, flat and smooth (~5 kB, 0.8 bits per pixel at 256 px), far cheaper to decode than
    ImageNet; the figures before 2026-11-29 10:00 used it."""
    from PIL import Image

    from fastrefine.fashion_mnist import load_fashion_mnist
    if (root / "train").is_dir():
        return
    if content not in ("mosaic", "upscaled"):
        raise SystemExit(f"--content {content!r}: expected 'mosaic' or 'upscaled'")
    pics, labels = load_fashion_mnist("train")
    per = images // classes
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
                im.convert("RGB").save(folder / f"{i:05d}.jpg", quality=90)


def jpeg_stats(items: list) -> dict:
    """Mean bytes and bits per pixel of the converted JPEGs (how much detail a decoder must undo).
    `items` as `fastrefine.bench.prepare_blobs(..., decoder="turbo")` gives them: (bytes, height, width)."""
    sizes = [len(data) for data, _, _ in items]
    pixels = [h * w for _, h, w in items]
    return dict(mean_bytes=round(float(np.mean(sizes))), bits_per_pixel=round(8 * sum(sizes) / sum(pixels), 2))


def decode_resize_bound(items: list, *, batch: int, workers: int, res: int, batches: int,
                        repeats: int) -> list[float]:
    """What a CPU loader that decodes whole images must at least do per train sample, with nothing else:
    FFCV's own full decode (TurboJPEG, fast DCT) + random crop + resize to res x res (OpenCV INTER_AREA),
    in numba threads, into reused buffers; no flip, no normalisation, no loader machinery. fastrefine's
    FFCV decoder does less (it decodes at the size the crop needs) and can pass it. Images/s per repeat.
    `items`: (bytes, height, width) as for jpeg_stats."""
    import numba
    from ffcv.fields.rgb_image import get_random_crop
    from ffcv.libffcv import imdecode, resize_crop

    dims = np.array([(h, w) for _, h, w in items], np.uint32)
    offsets = np.concatenate([[0], np.cumsum([len(data) for data, _, _ in items])]).astype(np.int64)
    flat = np.concatenate([data for data, _, _ in items])
    dec, rsz, crop = (numba.njit(f, nogil=True) for f in (imdecode, resize_crop, get_random_crop))
    scale, ratio = np.array((0.08, 1.0)), np.array((3 / 4, 4 / 3))

    @numba.njit(parallel=True, nogil=True)
    def run(idx, tmp, out):
        for j in numba.prange(len(idx)):
            i = idx[j]
            h, w = dims[i, 0], dims[i, 1]
            dec(flat[offsets[i]:offsets[i + 1]], tmp[j], h, w, h, w, 0, 0, 1, 1, False, False)
            pic = tmp[j][:h * w * 3].reshape(h, w, 3)
            y, x, ch, cw = crop(h, w, scale, ratio)
            rsz(pic, y, y + ch, x, x + cw, out[j])

    numba.set_num_threads(workers)
    tmp = np.empty((batch, int(dims.max()) ** 2 * 3), np.uint8)
    out = np.empty((batch, res, res, 3), np.uint8)
    starts = list(range(0, len(items) - batch + 1, batch))
    run(np.arange(batch), tmp, out)  # compile
    rates = []
    for _ in range(repeats):
        t0, seen = time.perf_counter(), 0
        for k in range(batches):
            s = starts[k % len(starts)]
            run(np.arange(s, s + batch), tmp, out)
            seen += batch
        rates.append(seen / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/loaderbench-mosaic"))
    ap.add_argument("--content", default="mosaic", choices=["mosaic", "upscaled"],
                    help="what the 500x375 JPEGs show (see make_tree); a new --work folder per content")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--max-side", type=int, default=256, help="the converted images' longer side")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*",
                    default=["decode", "decode-cv2", "decode+resize", "torchvision", "dali", "ffcv", "ffcv-stock",
                             "ffcv-torch", "ffcv-uint8"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    from fastrefine.bench import spread, time_batches
    from fastrefine.bench.decode import bench_decode, fastest_decoder, jpeg_blobs, prepare_blobs
    from fastrefine.bench.loader import baseline_loader
    from fastrefine.loaders import build
    from fastrefine.loaders.base import LoaderOptions

    def summary(stats: dict) -> dict:  # a fastrefine.bench spread, rounded for the table
        return dict(images_per_s=round(stats["median"]), min=round(stats["min"]), max=round(stats["max"]))

    src = args.work / "src"
    conv = args.work / ("conv" if args.max_side == 256 else f"conv{args.max_side}")
    make_tree(src, images=args.images, content=args.content)
    if not (conv / "manifest.json").is_file():
        from fastrefine.convert import convert_dataset
        convert_dataset(src=src, out=conv, layout="folder", max_side=args.max_side, quality=90, progress=False)
    cpu = torch.device("cpu")
    common = dict(split="train", batch_size=args.batch, resolution=args.res, device=cpu,
                  dtype=getattr(torch, args.dtype), workers=args.workers)
    converted = f"converted, max side {args.max_side}"
    blobs, _ = jpeg_blobs(conv, split="train", limit=args.images, source="dali")
    items = prepare_blobs(blobs, decoder="turbo")  # (bytes, height, width): read once, used below
    results = {}
    for name in args.only:
        if name in ("decode", "decode-cv2"):  # the ceiling: decode only, a process per core
            decoder = fastest_decoder() if name == "decode" else "cv2"
            rows = bench_decode(blobs=blobs, decoder=decoder, workers=args.workers, warmup=1, repeats=args.repeats)
            results[name] = dict(out="uint8 HWC", normalize="none", data=converted, decoder=decoder,
                                 **jpeg_stats(items), **summary(rows[-1]["images_per_s"]))
            print(name, results[name], flush=True)
            continue
        if name == "decode+resize":
            rates = decode_resize_bound(items, batch=args.batch, workers=args.workers, res=args.res,
                                        batches=args.batches, repeats=args.repeats)
            results[name] = dict(out="uint8 HWC", normalize="none (not a loader)", data=converted,
                                 **summary(spread(rates)))
            print(name, results[name], flush=True)
            continue
        if name == "torchvision":
            ld = baseline_loader(folder=src / "train", resolution=args.res, batch_size=args.batch,
                                 workers=args.workers, device=cpu)
            row = dict(out="float32", normalize="host (DataLoader workers)", data="original 500x375")
        elif name in ("ffcv-torch", "ffcv-uint8"):
            from fastrefine.loaders.ffcv import FfcvLoader
            ld = FfcvLoader(conv, LoaderOptions(**common), normalize_in="torch")
            row = dict(out=args.dtype, normalize="device (torch ops on the uint8 batch)", data=converted,
                       decoder=ld.decoder)
            if name == "ffcv-uint8":
                ld = RawFfcv(ld)
                row = dict(out="uint8 NHWC", normalize="none (not a loader)", data=converted)
        elif name == "ffcv-stock":
            ld = build(data=conv, backend="ffcv", backend_options={"ffcv": {"decoder": "stock"}}, **common)
            row = dict(out=args.dtype, normalize=f"{ld.normalize_on} (ffcv)", data=converted, decoder="stock")
        else:
            ld = build(data=conv, backend=name, **common)
            row = dict(out=args.dtype, normalize=f"{ld.normalize_on} ({name})", data=converted)
            if name == "ffcv":
                row["decoder"] = ld.decoder
        # fastrefine bench's own protocol: first batch apart (numba/DALI start-up), warm-up, repeats
        timed = time_batches(lambda ld=ld: ld, batches=args.batches, warmup=args.warmup, repeats=args.repeats,
                             device=cpu)
        results[name] = dict(**row, **summary(timed["images_per_s"]))
        print(name, results[name], flush=True)
        del ld, timed
    loaders = {k: v["images_per_s"] for k, v in results.items() if k in ("dali", "ffcv", "ffcv-stock", "ffcv-torch")}
    if loaders and "torchvision" in results and "decode" in results:
        best = max(loaders, key=loaders.get)
        results["ratios"] = dict(best=best, vs_baseline=round(loaders[best] / results["torchvision"]["images_per_s"], 2),
                                 vs_decode_ceiling=round(loaders[best] / results["decode"]["images_per_s"], 3))
        if "decode+resize" in results:
            results["ratios"]["vs_decode_resize"] = round(loaders[best] / results["decode+resize"]["images_per_s"], 3)
            results["ratios"]["decode_resize_vs_decode"] = round(
                results["decode+resize"]["images_per_s"] / results["decode"]["images_per_s"], 3)
        print("ratios", results["ratios"])
    (args.work / "bench_loaders.json").write_text(json.dumps(
        dict(results=results, args={k: str(v) for k, v in vars(args).items()},
             cpus=torch.get_num_threads(), time=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), indent=1))


class RawFfcv:
    """FFCV's own batches, untouched (uint8 NHWC when normalize_in='torch'): the augmentation's cost."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):  # through the loader's own epoch (seeded, stopped when dropped), minus _finish
        loader = self.loader
        it = loader._start_epoch()
        try:
            while (batch := loader._next_batch(it)) is not None:
                yield batch
        finally:
            loader._stop(it)


if __name__ == "__main__":
    main()
