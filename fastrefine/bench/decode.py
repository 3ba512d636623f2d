"""`fastrefine bench decode`: JPEG decode alone, one process and all cores: the loaders' ceiling."""

from __future__ import annotations

import functools
import itertools
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


from ..errors import RunError, UsageError

from .protocol import check_workers, make_record, measure, rates

JPEG_SUFFIXES = (".jpg", ".jpeg")


def _blobs_from_tars(tars: list[Path], *, limit: int) -> list[bytes]:
    blobs: list[bytes] = []
    for shard in tars:
        with tarfile.open(shard) as tf:
            for member in tf:
                if member.isfile() and member.name.lower().endswith(JPEG_SUFFIXES):
                    blobs.append(tf.extractfile(member).read())
                    if len(blobs) >= limit:
                        return blobs
    return blobs


def _blobs_from_beton(path: Path, *, limit: int) -> list[bytes]:
    """The JPEG bytes FFCV stored (RGBImageField samples in 'jpg' mode; raw-pixel samples are skipped)."""
    from ..loaders.ffcv import import_ffcv
    import_ffcv()  # FFCV's import sets torch's thread count; import_ffcv puts it back
    from ffcv.reader import Reader
    reader = Reader(str(path))
    names = [n for n in reader.metadata.dtype.names
             if reader.metadata[n].dtype.names and {"mode", "data_ptr"} <= set(reader.metadata[n].dtype.names)]
    if not names:
        raise UsageError(f"{path}: no RGBImageField in this .beton")
    meta = reader.metadata[names[0]]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    blobs: list[bytes] = []
    with open(path, "rb") as f:
        for mode, ptr in zip(meta["mode"].tolist(), meta["data_ptr"].tolist()):
            if mode != 0:  # 1 = raw pixels, nothing to decode
                continue
            f.seek(ptr)
            blobs.append(f.read(sizes[ptr]))
            if len(blobs) >= limit:
                break
    return blobs


def _blobs_from_folder(root: Path, *, limit: int) -> list[bytes]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in JPEG_SUFFIXES)
    return [p.read_bytes() for p in files[:limit]]


def _image_folder(data: Path, split: str) -> Path:
    """An ImageFolder root for `split`: the manifest's source tree, DATA/split, or DATA itself."""
    if (data / "manifest.json").is_file():
        from ..manifest import read_manifest
        m = read_manifest(data)
        folder = m.folder(split) or Path(m.raw.get("source", "")) / split
        if not folder.is_dir():
            raise UsageError(f"{data}: the original {split!r} folder {folder} is not there; pass "
                             f"--baseline-folder")
        return folder
    return data / split if (data / split).is_dir() else data


def jpeg_blobs(data: Path, *, split: str, limit: int, source: str) -> tuple[list[bytes], str]:
    """Up to `limit` JPEG files as bytes, read before any timing, and where they came from."""
    data = Path(data)
    if not data.exists():
        raise UsageError(f"data folder {data} does not exist")
    has_manifest = (data / "manifest.json").is_file()
    if source == "auto":
        source = "folder"
        if has_manifest:
            from ..manifest import read_manifest
            fmts = read_manifest(data).formats
            source = "dali" if "dali" in fmts else "ffcv" if "ffcv" in fmts else "folder"
    if source in ("dali", "ffcv") and not has_manifest:
        raise UsageError(f"--source {source}: {data} has no manifest.json (convert it first)")
    if source == "dali":
        from ..manifest import read_manifest
        tars = read_manifest(data).dali_shards(split)[0]
        blobs, where = _blobs_from_tars(tars, limit=limit), f"DALI webdataset shards ({len(tars)} tar)"
    elif source == "ffcv":
        from ..manifest import read_manifest
        beton = read_manifest(data).ffcv_file(split)
        blobs, where = _blobs_from_beton(beton, limit=limit), f"FFCV {beton.name} (jpg-mode samples)"
    elif source == "folder":
        root = _image_folder(data, split)
        blobs, where = _blobs_from_folder(root, limit=limit), f"JPEG files under {root}"
    else:
        raise UsageError(f"--source: expected auto, dali, ffcv or folder, got {source!r}")
    if not blobs:
        raise UsageError(f"{data}: no JPEG images found ({where})")
    return blobs, where


DECODERS = {"cv2": "cv2.imdecode (OpenCV's bundled libjpeg-turbo, accurate IDCT)",
            "pil": "PIL.Image (Pillow's libjpeg-turbo; the torch loader's decoder)",
            "turbo": "FFCV's imdecode: libjpeg-turbo's TurboJPEG API with TJFLAG_FASTDCT (the FFCV loader's "
                     "own decoder, the fastest here)"}


def fastest_decoder() -> str:
    """'turbo' where FFCV (and so its TurboJPEG binding) imports, else 'cv2'."""
    try:
        from ..loaders.ffcv import import_ffcv
        import_ffcv()  # FFCV's import sets torch's thread count; import_ffcv puts it back
    except Exception:  # noqa: BLE001  FFCV missing or its native library not loadable
        return "cv2"
    return "turbo"


def prepare_blobs(blobs: list[bytes], *, decoder: str) -> list:
    """What decode_one takes: the bytes, or for 'turbo' (which needs the size up front) the bytes as a
    numpy array with the height and width read from the JPEG header, outside the timed work."""
    if decoder != "turbo":
        return blobs
    import io

    import numpy as np
    from PIL import Image
    items = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            width, height = im.size
        items.append((np.frombuffer(b, np.uint8), height, width))
    return items


def decode_one(blob, *, decoder: str):
    """JPEG bytes -> HxWx3 uint8 pixels, nothing else (no resize, no crop, no colour conversion)."""
    if decoder == "turbo":
        import numpy as np
        from ffcv.libffcv import imdecode
        data, height, width = blob
        out = np.empty((height, width, 3), np.uint8)
        return out if imdecode(data, out, height, width, height, width, 0, 0, 1, 1, False, False) == 0 else None
    if decoder == "cv2":
        import cv2
        import numpy as np
        return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
    import io

    import numpy as np
    from PIL import Image
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


def decodable(blobs: list[bytes], *, decoder: str) -> tuple[list, int]:
    """(the blobs `decoder` can decode, prepared for decode_one; how many it could not). Each is tried
    once, untimed: a damaged image is counted and left out of the timing instead of failing it."""
    kept, failed = [], 0
    for b in blobs:
        try:
            item = prepare_blobs([b], decoder=decoder)[0]
            ok = decode_one(item, decoder=decoder) is not None
        except Exception:  # noqa: BLE001  PIL/cv2/turbo each fail their own way on a damaged file
            ok = False
        if ok:
            kept.append(item)
        else:
            failed += 1
    return kept, failed


def _single_thread_decoder(decoder: str) -> None:
    if decoder == "cv2":
        import cv2
        cv2.setNumThreads(1)


_WORKER: dict = {}  # per worker process only: the blobs it was handed at start-up


def _pool_init(blobs: list[bytes], decoder: str) -> None:
    _single_thread_decoder(decoder)
    _WORKER["blobs"], _WORKER["decoder"] = blobs, decoder


def _pool_decode(bounds: tuple[int, int]) -> int:
    start, stop = bounds
    blobs, decoder = _WORKER["blobs"], _WORKER["decoder"]
    for b in blobs[start:stop]:
        decode_one(b, decoder=decoder)
    return stop - start


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def bench_decode(*, blobs: list[bytes], decoder: str, workers: int, warmup: int, repeats: int) -> list[dict]:
    """Images/s decoding every blob once per timed block: in this process, then with a process pool."""
    if decoder not in DECODERS:
        raise UsageError(f"--decoder: expected one of {sorted(DECODERS)}, got {decoder!r}")
    _single_thread_decoder(decoder)
    blobs, failed = decodable(blobs, decoder=decoder)
    if not blobs:
        raise RunError(f"{decoder} could not decode any of the {failed} images")

    def one_pass() -> None:
        for b in blobs:
            decode_one(b, decoder=decoder)

    sync = lambda: None  # noqa: E731  host-only work
    single = measure(one_pass, warmup=warmup, iters=1, repeats=repeats, sync=sync)
    results = [{"mode": "1 process", "processes": 1, "images": len(blobs), "undecodable": failed,
                "images_per_s": rates(single, items=len(blobs)), "seconds": single}]
    chunks = _chunks(len(blobs), workers * 4)
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_pool_init,
                             initargs=(blobs, decoder)) as pool:
        def pool_pass() -> None:
            done = sum(pool.map(_pool_decode, chunks))
            assert done == len(blobs)

        pooled = measure(pool_pass, warmup=max(1, warmup), iters=1, repeats=repeats, sync=sync)
    results.append({"mode": f"{workers} processes", "processes": workers, "images": len(blobs),
                    "images_per_s": rates(pooled, items=len(blobs)), "seconds": pooled})
    return results


def jpeg_stats(blobs: list[bytes]) -> dict:
    """Mean bytes and bits per pixel of the JPEGs (how much detail a decoder must undo; ImageNet at max
    side 256, q90 is ~17 kB, ~2.8 bits per pixel), from their headers. Files whose header does not parse
    count in the bytes only."""
    import io

    from PIL import Image
    pixels, sized = 0, 0
    for b in blobs:
        try:
            with Image.open(io.BytesIO(b)) as im:
                pixels += im.size[0] * im.size[1]
            sized += len(b)
        except Exception:  # noqa: BLE001  a damaged header: the timing leaves it out as well
            continue
    return {"mean_jpeg_bytes": sum(map(len, blobs)) / len(blobs),
            "bits_per_pixel": 8 * sized / pixels if pixels else None}


def run_decode(*, data: Path, split: str, images: int, source: str, decoder: str, workers: int | None,
               warmup: int, repeats: int) -> dict:
    workers = check_workers(workers, option="--workers")
    blobs, where = jpeg_blobs(data, split=split, limit=images, source=source)
    results = bench_decode(blobs=blobs, decoder=decoder, workers=workers, warmup=warmup, repeats=repeats)
    settings = {"data": str(data), "split": split, "images": len(blobs), "source": where, "decoder": decoder,
                "decoder_detail": DECODERS[decoder], "workers": workers, "warmup": warmup, "repeats": repeats,
                **jpeg_stats(blobs), "clock": "time.perf_counter",
                "undecodable": results[0]["undecodable"]}
    return make_record(command="decode", settings=settings, results=results,
                       summary={"ceiling_images_per_s": results[-1]["images_per_s"]["median"],
                                "per_core_images_per_s": results[0]["images_per_s"]["median"]},
                       notes=["decode only: JPEG bytes already in memory, no crop/resize/normalise"])



# ------------------------------------------------------------------ decode + crop + resize, no loader

@functools.lru_cache(maxsize=None)
def _decode_resize_kernel():
    """The numba kernel of decode_resize_rates, compiled once per process and kept (a dispatcher that is
    collected while its compiled code is in use prints numba's "Exception ignored ... KeyError")."""
    import numba
    from ffcv.fields.rgb_image import get_random_crop
    from ffcv.libffcv import imdecode, resize_crop

    dec, rsz, crop = (numba.njit(f, nogil=True) for f in (imdecode, resize_crop, get_random_crop))

    @numba.njit(parallel=True, nogil=True)
    def run(flat, offsets, dims, idx, tmp, out, scale, ratio):
        for j in numba.prange(len(idx)):
            i = idx[j]
            h, w = dims[i, 0], dims[i, 1]
            dec(flat[offsets[i]:offsets[i + 1]], tmp[j], h, w, h, w, 0, 0, 1, 1, False, False)
            pic = tmp[j][:h * w * 3].reshape(h, w, 3)
            y, x, ch, cw = crop(h, w, scale, ratio)
            rsz(pic, y, y + ch, x, x + cw, out[j])
    return run


def decode_resize_rates(items: list, *, batch: int, workers: int, resolution: int, batches: int, warmup: int,
                        repeats: int) -> tuple[list[float], int]:
    """(seconds per block of `batches` batches, the batch used) of what a CPU loader that decodes whole
    images must at least do per train sample: FFCV's full decode (TurboJPEG, fast DCT) + random crop + resize to resolution x
    resolution (OpenCV INTER_AREA) in numba threads, into reused uint8 buffers; no flip, no normalisation,
    no loader machinery. fastrefine's FFCV decoder does less (it decodes at the size the crop needs) and
    can pass it. `items`: (bytes as uint8 array, height, width), as prepare_blobs(decoder="turbo") gives."""
    import numba
    import numpy as np

    dims = np.array([(h, w) for _, h, w in items], np.uint32)
    offsets = np.concatenate([[0], np.cumsum([len(data) for data, _, _ in items])]).astype(np.int64)
    flat = np.concatenate([data for data, _, _ in items])
    scale, ratio = np.array((0.08, 1.0)), np.array((3 / 4, 4 / 3))
    run = _decode_resize_kernel()

    before = numba.get_num_threads()
    numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
    try:
        batch = min(batch, len(items))
        tmp = np.empty((batch, int(dims[:, 0].max()) * int(dims[:, 1].max()) * 3), np.uint8)
        out = np.empty((batch, resolution, resolution, 3), np.uint8)
        starts = list(range(0, len(items) - batch + 1, batch))
        at = itertools.count()

        def one_batch() -> None:
            s = starts[next(at) % len(starts)]
            run(flat, offsets, dims, np.arange(s, s + batch), tmp, out, scale, ratio)
        one_batch()  # numba compiles here, untimed
        return measure(one_batch, warmup=warmup, iters=batches, repeats=repeats, sync=lambda: None), batch
    finally:
        numba.set_num_threads(before)


def run_decode_resize(*, data: Path, split: str, images: int, resolution: int, batch_size: int, workers: int,
                      batches: int, warmup: int, repeats: int) -> dict:
    """decode_resize_rates on up to `images` JPEGs of the split (read as `bench decode` reads them)."""
    if fastest_decoder() != "turbo":
        raise UsageError("--decode-resize: needs FFCV (its TurboJPEG decode and resize), which does not import here")
    blobs, where = jpeg_blobs(data, split=split, limit=images, source="auto")
    items, failed = decodable(blobs, decoder="turbo")
    if not items:
        raise RunError(f"--decode-resize: turbo could not decode any of the {failed} images ({where})")
    seconds, batch = decode_resize_rates(items, batch=batch_size, workers=workers, resolution=resolution,
                                         batches=batches, warmup=warmup, repeats=repeats)
    return {"images": len(items), "undecodable": failed, "source": where, "batch": batch, "threads": workers,
            "resolution": resolution, "images_per_s": rates(seconds, items=batches * batch), "seconds": seconds}
