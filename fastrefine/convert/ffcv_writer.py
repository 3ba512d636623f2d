"""Write one split's `.beton` straight from the cleaned JPEG bytes in the shards: no second JPEG generation.

FFCV's own `DatasetWriter` wants pixels: fed from our shards, it would decode every cleaned JPEG and
encode it again (twice the work, and a second generation of JPEG loss). This writer lays the records out
exactly as FFCV 1.0.2's `DatasetWriter` with `{"image": RGBImageField(), "label": IntField()}` does, so
that FFCV's `Reader`, `Loader` and stock decoders (`SimpleRGBImageDecoder`,
`RandomResizedCropRGBImageDecoder`, `CenterCropRGBImageDecoder`) read it unchanged:

    header (ffcv.types.HeaderType: version 2, 2 fields, page size, sample count, allocation table offset)
    field descriptors (FieldDescType): type 2 "image" (RGBImageField), type 1 "label" (IntField)
    metadata, one row per sample: image (mode u1: 0 jpg / 1 raw, width u2, height u2, data_ptr u8),
                                  label (i8)
    data pages from the first page boundary on: each record wholly inside one page; pages written whole
    allocation table (sample_id, ptr, size) per image record, at the end

A `jpg` record is the cleaned JPEG's bytes as they are in the shard; a `raw` record is that JPEG decoded
by `ffcv.libffcv.imdecode`, the very call FFCV's decoders make for a `jpg` record, so both kinds decode to
the same pixels, byte for byte, and so does the shard's JPEG decoded by FFCV. Raw records are decoded by
a few threads (the C call releases the GIL); everything else is a copy. One process writes the file,
through `fastrefine.atomic.atomic_write` (a temporary renamed into place when whole): there are no
writer processes to wait for, and a full disk is a RunError naming the file.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..atomic import atomic_write
from ..errors import RunError

_MIN_PAGE = 1 << 23       # 8 MiB, FFCV's DatasetWriter default
MODE_JPG, MODE_RAW = 0, 1   # ffcv.fields.rgb_image.IMAGE_MODES
PROPORTION_SEED = 0


class CleanSamples:
    """Where each cleaned JPEG of a split lies: shard tar, byte offset and size, label, width, height."""

    def __init__(self, *, tar_paths: list[Path], records: list[dict[str, Any]]):
        self.tar_paths = [Path(p) for p in tar_paths]
        cols: dict[str, list[int]] = {k: [] for k in ("shard", "offset", "size", "label", "width", "height")}
        for number, record in enumerate(records):
            for m in record["members"]:
                cols["shard"].append(number)
                cols["offset"].append(m["offset"])
                cols["size"].append(m["bytes"])
                cols["label"].append(m["label"])
                cols["width"].append(m["width"])
                cols["height"].append(m["height"])
        self.shard = np.asarray(cols["shard"], dtype=np.int32)
        self.offset = np.asarray(cols["offset"], dtype=np.int64)
        self.size = np.asarray(cols["size"], dtype=np.int64)
        self.label = np.asarray(cols["label"], dtype=np.int64)
        self.width = np.asarray(cols["width"], dtype=np.int64)
        self.height = np.asarray(cols["height"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.label)

    def jpegs(self) -> Iterator[bytes]:
        """Every cleaned JPEG in order, read by offset (one open file at a time)."""
        fd, current = -1, -1
        try:
            for i in range(len(self)):
                shard = int(self.shard[i])
                if shard != current:
                    if fd >= 0:
                        os.close(fd)
                    fd, current = os.open(self.tar_paths[shard], os.O_RDONLY), shard
                data = os.pread(fd, int(self.size[i]), int(self.offset[i]))
                if len(data) != int(self.size[i]) or data[:2] != b"\xff\xd8":
                    raise RunError(f"{self.tar_paths[shard]}: sample {i} at byte {int(self.offset[i])} is not "
                                   f"the JPEG its shard record promised; delete the shard's .json and rerun")
                yield data
        finally:
            if fd >= 0:
                os.close(fd)


def page_size_for(max_side: int) -> int:
    """A power-of-two page that holds at least two raw images of `max_side` squared."""
    need = 2 * max_side * max_side * 3
    page = _MIN_PAGE
    while page < need:
        page <<= 1
    return page


def record_modes(*, count: int, write_mode: str) -> np.ndarray:
    """Per sample: MODE_JPG or MODE_RAW. `proportion` draws half and half with a fixed seed, so a
    rewritten file is the same file."""
    if write_mode == "jpg":
        return np.full(count, MODE_JPG, dtype=np.uint8)
    if write_mode in ("raw", "smart"):          # FFCV's smart without a threshold writes raw
        return np.full(count, MODE_RAW, dtype=np.uint8)
    if write_mode == "proportion":
        draws = np.random.default_rng(PROPORTION_SEED).random(count)
        return np.where(draws < 0.5, MODE_JPG, MODE_RAW).astype(np.uint8)
    raise ValueError(f"write_mode {write_mode!r}")


def decode_like_ffcv(jpeg: bytes, *, height: int, width: int) -> np.ndarray:
    """`jpeg` decoded to uint8 HxWx3 by FFCV's own TurboJPEG call, with the arguments its decoders pass."""
    from ffcv.libffcv import imdecode

    src = np.frombuffer(jpeg, dtype=np.uint8)
    dst = np.empty((height, width, 3), dtype=np.uint8)
    if imdecode(src, dst, height, width, height, width, 0, 0, 1, 1, False, False) != 0:
        raise RunError(f"FFCV's JPEG decoder rejected a cleaned JPEG of {width}x{height}")
    return dst


def _payloads(*, samples: CleanSamples, modes: np.ndarray, threads: int) -> Iterator[bytes | np.ndarray]:
    """Each record's payload in order: JPEG bytes, or the decoded pixels for raw records (decoded ahead
    by `threads` threads, at most `8 * threads` in flight)."""
    if not (modes == MODE_RAW).any():
        yield from samples.jpegs()
        return
    window: deque = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="beton-decode") as pool:
        for i, jpeg in enumerate(samples.jpegs()):
            if modes[i] == MODE_RAW:
                window.append(pool.submit(decode_like_ffcv, jpeg, height=int(samples.height[i]),
                                          width=int(samples.width[i])))
            else:
                window.append(jpeg)
            if len(window) >= 8 * threads:
                head = window.popleft()
                yield head if isinstance(head, bytes) else head.result()
        while window:
            head = window.popleft()
            yield head if isinstance(head, bytes) else head.result()


def write_beton(*, path: Path, samples: CleanSamples, write_mode: str, max_side: int, threads: int,
                advance: Callable[[], None] = lambda: None) -> None:
    """Write `path` (atomically) holding every sample of `samples`, image records per `write_mode`."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                            get_metadata_type)

    count, page_size = len(samples), page_size_for(max_side)
    fields = {"image": RGBImageField(), "label": IntField()}
    type_ids = {cls: tid for tid, cls in TYPE_ID_HANDLER.items()}
    descriptors = np.zeros(len(fields), dtype=FieldDescType)
    for i, (name, field) in enumerate(fields.items()):
        descriptors[i]["type_id"] = type_ids[type(field)]
        encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")
        descriptors[i]["name"][:len(encoded)] = encoded
        descriptors[i]["arguments"][:] = field.to_binary()[0]
    metadata = np.zeros(count, dtype=get_metadata_type(list(fields.values())))
    image_meta, label_meta = metadata["f0"], metadata["f1"]
    modes = record_modes(count=count, write_mode=write_mode)
    image_meta["mode"] = modes
    image_meta["width"] = samples.width
    image_meta["height"] = samples.height
    label_meta[:] = samples.label
    ptrs = np.zeros(count, dtype=np.uint64)
    sizes = np.zeros(count, dtype=np.uint64)
    metadata_start = HeaderType.itemsize + descriptors.nbytes
    data_start = -(-(metadata_start + metadata.nbytes) // page_size) * page_size

    def fill(fh) -> None:
        header = np.zeros(1, dtype=HeaderType)[0]
        header["version"], header["num_fields"] = CURRENT_VERSION, len(fields)
        header["page_size"], header["num_samples"] = page_size, count
        fh.write(header.tobytes())
        fh.write(descriptors.tobytes())
        fh.seek(data_start)                          # metadata is written at the end, when it is known
        view, blank = memoryview(bytearray(page_size)), bytes(page_size)
        page_number, used = 0, 0
        for i, payload in enumerate(_payloads(samples=samples, modes=modes, threads=threads)):
            data = payload if isinstance(payload, bytes) else payload.reshape(-1).data
            size = len(data)
            if size > page_size:
                raise RunError(f"{path}: sample {i} needs {size} bytes, more than a page ({page_size})")
            if used + size > page_size:              # the record must lie inside one page
                fh.write(view)
                view[:] = blank
                page_number, used = page_number + 1, 0
            view[used:used + size] = data
            ptrs[i], sizes[i] = data_start + page_number * page_size + used, size
            used += size
            advance()
        if count:
            fh.write(view)                           # FFCV writes every page whole, the last one too
        image_meta["data_ptr"] = ptrs
        alloc = np.zeros(count, dtype=ALLOC_TABLE_TYPE)
        alloc["sample_id"], alloc["ptr"], alloc["size"] = np.arange(count, dtype=np.uint64), ptrs, sizes
        header["alloc_table_ptr"] = fh.tell()
        fh.write(alloc.tobytes())
        fh.seek(0)
        fh.write(header.tobytes())
        fh.seek(metadata_start)
        fh.write(metadata.tobytes())

    atomic_write(path, fill)
