"""What the DALI and torch loaders read, in which order, with which crop: shared by both backends.

* `SampleTable`: every image of a split as (file, byte offset, size, label). On a converted dataset
  the files are the converter's webdataset tars and the offsets come from DALI's index file beside
  each tar (`{shard}.idx`: `jpg <offset> <size> <name> cls <offset> <size> <name>` per sample); the
  label is the `.cls` member, ASCII digits, decoded by `ascii_labels`. With no manifest: an ImageFolder
  tree, one file per image, labels from the sorted class folder names. The original source folder of a
  converted dataset is never read (it holds files the converter skipped).
* `rank_order`: one permutation of all N samples per (seed, epoch) for training; rank r takes
  positions r, r+W, ... cut to N // W (disjoint ranks, equal lengths, a new share every epoch, as the
  FFCV loader's RankStrideOrder). Val: rank r reads r, r+W, ... in order (every image once overall).
* `SampleTable.image_sizes(indices)`: each image's (height, width), as the converter recorded it (a
  converted dataset's `sizes` file), else read from the image's header (`image_size`). The crop boxes
  themselves come from `crop_sampler` (one sampler for every backend).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastrefine.errors import RunError, UsageError
from fastrefine import manifest as _manifest
from fastrefine.manifest import MANIFEST_NAME, read_manifest

from .base import LoaderOptions

MAX_LABEL_DIGITS = 18  # int64 holds any 18-digit number
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def ascii_labels(raw: torch.Tensor) -> torch.Tensor:
    """(B, L) uint8 rows of ASCII digits, zero-padded on the right -> (B,) int64.

    Bytes outside '0'..'9' (padding, a trailing newline) are ignored. Runs where `raw` is, no sync.
    """
    raw = raw.to(torch.int64)
    is_digit = (raw >= 48) & (raw <= 57)
    digits = torch.where(is_digit, raw - 48, torch.zeros_like(raw))
    # place value of digit i = 10 ** (number of digits after it in the row)
    after = is_digit.flip(1).cumsum(1).flip(1) - is_digit.long()
    return (digits * torch.pow(10, after)).sum(1)


@dataclass
class SampleTable:
    """Every image of one split: `files[file_id[i]]` holds image i at `offsets[i]`, `sizes[i]` bytes
    (size -1: the whole file). Tars are memory-mapped lazily, once per process."""

    kind: str                      # "shards" | "folder"
    files: tuple[str, ...]
    file_id: np.ndarray            # int32
    offsets: np.ndarray            # int64
    sizes: np.ndarray              # int64
    labels: np.ndarray             # int64
    heights: np.ndarray | None = None  # int64 per image as the converter recorded it; None: unknown
    widths: np.ndarray | None = None
    _maps: dict = field(default_factory=dict, repr=False)
    _pid: int = field(default=-1, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):        # DataLoader workers started by spawn: maps are reopened there
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, -1
        return state

    def where(self, i: int) -> str:
        """The file (and member offset) image i comes from, for error messages."""
        path = self.files[self.file_id[i]]
        return path if self.kind == "folder" else f"{path} (image at byte {int(self.offsets[i])})"

    def read(self, i: int) -> np.ndarray:
        """Image i's encoded bytes as a uint8 array (a view into the mapped tar; copy it to keep it)."""
        fid = int(self.file_id[i])
        if self.kind == "folder":
            try:
                return np.fromfile(self.files[fid], dtype=np.uint8)
            except OSError as e:
                raise RunError(f"{self.files[fid]}: cannot read ({e.strerror or e})") from None
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        mm = self._maps.get(fid)
        if mm is None:
            with open(self.files[fid], "rb") as fh:
                mm = self._maps[fid] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mm, dtype=np.uint8, count=int(self.sizes[i]), offset=int(self.offsets[i]))

    def image_sizes(self, indices, blobs=None) -> tuple[np.ndarray, np.ndarray]:
        """(heights, widths) int64 of these images, as stored (EXIF orientation not applied): the sizes
        the converter recorded, else each image's header (`blobs[k]`, the bytes of image indices[k],
        when the caller has them already)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if self.heights is not None:
            return self.heights[idx], self.widths[idx]
        heights, widths = np.empty(len(idx), np.int64), np.empty(len(idx), np.int64)
        for k, i in enumerate(idx):
            blob = blobs[k] if blobs is not None else self.read(int(i))
            widths[k], heights[k] = image_size(blob, self.where(int(i)))
        return heights, widths

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:    # a view handed out is still alive; the map goes with it
                pass
        self._maps = {}


def check_recorded_files(data: Path, paths) -> None:
    """`fastrefine.manifest.check_recorded_file(data, path)` for each file: its size and sampled checksum
    against what the converter recorded (raises naming the file)."""
    for p in paths:
        _manifest.check_recorded_file(data, Path(p))


def _parse_index(idx: Path, tar_bytes: int) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """DALI's webdataset index -> (jpg offsets, jpg sizes, cls (offset, size)), checked against the tar."""
    try:
        lines = idx.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{idx}: cannot read the DALI index ({e})") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[1].isdigit():
        raise UsageError(f"{idx}: not a DALI webdataset index (first line {lines[:1]!r})")
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != int(head[1]):
        raise UsageError(f"{idx}: says {head[1]} samples, lists {len(body)}")
    offs, sizes, cls = [], [], []
    for n, line in enumerate(body, 2):
        parts = line.split()
        comps = {parts[k]: (int(parts[k + 1]), int(parts[k + 2])) for k in range(0, len(parts) - 3, 4)}
        if "jpg" not in comps or "cls" not in comps:
            raise UsageError(f"{idx}: line {n} lacks a jpg or cls component")
        for off, size in comps.values():
            if off < 0 or size < 0 or off + size > tar_bytes:
                raise UsageError(f"{idx}: line {n} points past the end of its tar ({tar_bytes} bytes): "
                                 f"the shard is truncated or does not belong to this index")
        offs.append(comps["jpg"][0])
        sizes.append(comps["jpg"][1])
        cls.append(comps["cls"])
    return offs, sizes, cls


def table_from_shards(data: Path, split: str) -> SampleTable:
    manifest = read_manifest(data)
    shards, index = manifest.dali_shards(split)
    for p in (*shards, *index):
        if not p.is_file():
            raise UsageError(f"{data / MANIFEST_NAME}: split {split!r} lists {p}, which does not exist")
    check_recorded_files(data, (*shards, *index))
    file_id, offsets, sizes, raw_labels = [], [], [], []
    for k, (tar, idx) in enumerate(zip(shards, index)):
        tar_bytes = tar.stat().st_size
        offs, szs, cls = _parse_index(idx, tar_bytes)
        with open(tar, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for off, size in cls:
                raw = mm[off:off + size].strip()
                if not raw.isdigit() or len(raw) > MAX_LABEL_DIGITS:
                    raise UsageError(f"{tar}: the .cls member at byte {off} holds {raw[:20]!r}, expected "
                                     f"the class index as ASCII digits")
                raw_labels.append(raw)
        file_id += [k] * len(offs)
        offsets += offs
        sizes += szs
    if not raw_labels:
        raise UsageError(f"{data / MANIFEST_NAME}: split {split!r} has no images in its shards")
    # the labels are ASCII digits: pad the rows and decode them all at once
    matrix = np.zeros((len(raw_labels), max(map(len, raw_labels))), dtype=np.uint8)
    for row, raw in enumerate(raw_labels):
        matrix[row, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    labels = ascii_labels(torch.from_numpy(matrix)).numpy()
    count = manifest.count(split)
    if len(labels) != count:
        raise RunError(f"{data / MANIFEST_NAME}: split {split!r} says {count} images, its shards' "
                       f"indexes list {len(labels)}")
    want = manifest.split(split).get("label_counts")
    if want is not None:
        got = np.bincount(labels, minlength=len(want)).tolist()
        if got != list(want):
            raise RunError(f"{data / MANIFEST_NAME}: split {split!r}: the shards' labels count {got[:8]}... "
                           f"per class, the manifest {list(want)[:8]}...")
    heights, widths = recorded_sizes(manifest, split, count)
    return SampleTable("shards", tuple(map(str, shards)), np.asarray(file_id, np.int32),
                       np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), labels.astype(np.int64),
                       heights=heights, widths=widths)


def recorded_sizes(manifest, split: str, count: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The (heights, widths) the converter recorded for the split's shards, in shard order (the
    manifest's `dali.sizes` file: int32 (count, 2) rows of height, width), or (None, None) for a
    conversion that recorded none (sizes are then read from each image's header)."""
    rel = (manifest.split(split).get("dali") or {}).get("sizes")
    if not rel:
        return None, None
    path = manifest.root / rel
    where = manifest.root / MANIFEST_NAME
    if not path.is_file():
        raise UsageError(f"{where}: split {split!r} lists {path}, which does not exist")
    check_recorded_files(manifest.root, (path,))
    try:
        hw = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read the image sizes ({e})") from None
    if hw.ndim != 2 or hw.shape != (count, 2) or (count and int(hw.min()) < 1):
        raise UsageError(f"{path}: expected {count} rows of (height, width) >= 1, found shape {hw.shape}")
    return hw[:, 0].astype(np.int64), hw[:, 1].astype(np.int64)


def table_from_folder(root: Path) -> SampleTable:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UsageError(f"{root}: neither a converted dataset ({MANIFEST_NAME}) nor an ImageFolder "
                         f"tree (no class folders in {root})")
    files, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, names in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in sorted(names):
                if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                    files.append(os.path.join(dirpath, name))
                    labels.append(label)
    if not files:
        raise UsageError(f"{root}: no images found in its class folders")
    n = len(files)
    return SampleTable("folder", tuple(files), np.arange(n, dtype=np.int32), np.zeros(n, np.int64),
                       np.full(n, -1, np.int64), np.asarray(labels, np.int64))


def table_from_source(data: Path, split: str) -> SampleTable:
    """A dataset converted to FFCV only (no shards): the source tree, less every file the converter
    skipped (the manifest's list), labelled by the manifest's class order; refused unless what is left
    is exactly what the converter counted."""
    manifest = read_manifest(data)
    where = data / MANIFEST_NAME
    source = Path(manifest.raw.get("source", ""))
    folder = manifest.folder(split) or source / split
    if not folder.is_dir():
        raise UsageError(f"{where}: split {split!r} has no DALI shards and its source tree {folder} is not "
                         f"a folder; convert with --format dali or both")
    skipped = {os.path.normpath(source / s["path"]) for s in manifest.raw.get("skipped", []) if "path" in s}
    index = {c.wnid: c.index for c in manifest.classes}
    table = table_from_folder(folder)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise UsageError(f"{folder}: class folders {unknown[:5]} are not in {where}")
    def was_skipped(path: str) -> bool:   # the file, or a folder above it (a nested folder is listed once)
        path = Path(os.path.normpath(path))
        return any(str(p) in skipped for p in (path, *path.parents[:-1]) if len(p.parts) > len(folder.parts) - 1)

    keep = [i for i, f in enumerate(table.files) if not was_skipped(f)]
    labels = np.asarray([index[classes[table.labels[i]]] for i in keep], np.int64)
    want = manifest.split(split).get("label_counts")
    got = np.bincount(labels, minlength=len(want or [])).tolist()
    if len(keep) != manifest.count(split) or (want is not None and got != list(want)):
        raise UsageError(f"{where}: split {split!r} has no DALI shards and its source tree {folder} no longer "
                         f"matches what was converted ({len(keep)} images left after the skipped list, "
                         f"{manifest.count(split)} converted); convert with --format dali or both")
    files = tuple(table.files[i] for i in keep)
    n = len(files)
    return SampleTable("folder", files, np.arange(n, dtype=np.int32), np.zeros(n, np.int64),
                       np.full(n, -1, np.int64), labels)


def sample_table(data: Path, split: str) -> SampleTable:
    """The converted shards of `split` when `data` has a manifest (a dataset converted to FFCV only:
    its source tree less the files the converter skipped), else the ImageFolder tree
    `data/split/<class>/...` (or `data/<class>/...`)."""
    data = Path(data)
    if (data / MANIFEST_NAME).is_file():
        if read_manifest(data).split(split).get("dali"):
            return table_from_shards(data, split)
        return table_from_source(data, split)
    if not (data / split).is_dir() and any((data / s).is_dir() for s in ("train", "val") if s != split):
        raise UsageError(f"{data}: no {split}/ folder beside {', '.join(s + '/' for s in ('train', 'val') if s != split)}"
                         f" (an ImageFolder root needs train/<class>/ and val/<class>/)")
    root = data / split if (data / split).is_dir() else data
    return table_from_folder(root)


# -- order -------------------------------------------------------------------------------------

def rank_order(n: int, opts: LoaderOptions, epoch: int) -> np.ndarray:
    """The sample indices this rank reads this epoch, in order (before drop_last is applied)."""
    if not opts.shuffle and not opts.drop_last:
        return np.arange(opts.rank, n, opts.world_size, dtype=np.int64)
    perm = (np.random.default_rng([opts.seed, epoch]).permutation(n) if opts.shuffle
            else np.arange(n, dtype=np.int64))
    return perm[opts.rank::opts.world_size][: n // opts.world_size]


def epoch_batches(n: int, opts: LoaderOptions, epoch: int) -> list[np.ndarray]:
    """This rank's batches of sample indices: full batches only with drop_last, else a short last one."""
    mine = rank_order(n, opts, epoch)
    b = opts.batch_size
    if opts.drop_last:
        mine = mine[: len(mine) // b * b]
    return [mine[i:i + b] for i in range(0, len(mine), b)]


def samples_per_rank(n: int, opts: LoaderOptions) -> int:
    if not opts.shuffle and not opts.drop_last:
        return len(range(opts.rank, n, opts.world_size))
    per_rank = n // opts.world_size
    return per_rank // opts.batch_size * opts.batch_size if opts.drop_last else per_rank


# -- image sizes -------------------------------------------------------------------------------

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(buf) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (as stored: EXIF orientation is not applied), or
    None when `buf` is not a JPEG whose header can be read."""
    b = memoryview(buf).cast("B")
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i = 2
    while i + 9 < n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker in _SOF:
            return (b[i + 7] << 8) | b[i + 8], (b[i + 5] << 8) | b[i + 6]
        i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


def image_size(buf, where: str) -> tuple[int, int]:
    """(width, height) of an encoded image: the JPEG header, else PIL reads the header of the others."""
    size = jpeg_size(buf)
    if size is not None and size[0] > 0 and size[1] > 0:
        return size
    import io
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(memoryview(buf).tobytes())) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        why = str(e).split(" <_io.")[0]      # PIL names our in-memory buffer, not the file
        raise RunError(f"{where}: not an image that can be read ({why})") from None
