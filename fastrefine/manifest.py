"""The converted-dataset manifest: the one contract between `fastrefine convert` and `fastrefine.loaders`.

A converted dataset folder OUT holds `OUT/manifest.json`:

    {
      "version": 1,
      "dataset": "imagenet" | "folder",
      "source": "/abs/path/to/SRC",
      "created": "2026-11-29T06:00:00+00:00",
      "max_side": 256, "quality": 90,
      "formats": ["ffcv", "dali"],
      "classes": [{"index": 0, "wnid": "n01440764", "name": "tench"}, ...],
      "splits": {
        "train": {
          "count": 1281167,                       # images written (skipped ones excluded)
          "label_counts": [1300, ...],            # images written per class index
          "ffcv": {"file": "train.beton"},        # path relative to OUT
          "dali": {"format": "webdataset",
                   "shards": ["dali/train-00000.tar", ...],    # relative to OUT
                   "index": ["dali/train-00000.idx", ...],     # DALI's wds index, same order
                   "ext": ["jpg", "cls"],                      # image, label (ASCII digits)
                   "sizes": "dali/train.sizes.npy"},           # int32 (count, 2): height, width per
                                                               # image, in shard order (optional: read
                                                               # from the JPEG headers when absent)
          "folder": "train"                       # optional: an ImageFolder tree, relative to SOURCE
        },
        "val": {...}
      },
      "skipped": [{"path": "...", "reason": "..."}],
      "files": {"train.beton": {"bytes": 123456789, "digest": "sampled-blake2b-v1:0f3a..."},
                "dali/train-00000.tar": {...}, "dali/train-00000.idx": {...}, ...}
    }

Paths inside a split are relative to the manifest's folder (for "ffcv"/"dali") or to `source`
(for "folder"). Readers must ignore keys they do not know.

`files` (absent in conversions made before it existed) records every output file's size and a
*sampled* checksum (`file_digest`): a BLAKE2b-128 of the size, the first and last 64 KiB and 32 blocks
of 4 KiB spaced evenly between them, so at most 256 KiB are read per file, however large. A loader
calls `check_recorded_file(data_dir, path)` before it opens a file. It catches any change of size
(truncation, a partial copy, an append, a different file put there), any change within the first or
last 64 KiB (a `.beton`'s header, field table and start of its metadata, its allocation table; a tar's
first members and its end-of-archive blocks) and any rewrite that overlaps one of the sampled blocks
(certainly any rewrite of size/32 bytes or more). It does not catch a small same-size
change that falls between sampled blocks (a few flipped bytes inside one JPEG).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FILES_KEY = "files"

DIGEST_SCHEME = "sampled-blake2b-v1"
_EDGE = 64 * 1024          # bytes hashed at each end of a file
_BLOCK = 4 * 1024          # bytes per strided block in between
_BLOCKS = 32               # strided blocks


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Manifest:
    root: Path
    raw: dict[str, Any] = field(repr=False)

    @property
    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(int(c["index"]), str(c["wnid"]), str(c.get("name", c["wnid"])))
                for c in self.raw["classes"]]

    @property
    def num_classes(self) -> int:
        return len(self.raw["classes"])

    @property
    def formats(self) -> list[str]:
        return list(self.raw.get("formats", []))

    def split(self, name: str) -> dict[str, Any]:
        try:
            return self.raw["splits"][name]
        except KeyError:
            raise UsageError(f"{self.root / MANIFEST_NAME}: no split {name!r} "
                             f"(has {sorted(self.raw.get('splits', {}))})") from None

    def count(self, split: str) -> int:
        return int(self.split(split)["count"])

    def ffcv_file(self, split: str) -> Path:
        entry = self.split(split).get("ffcv")
        if not entry:
            raise UsageError(f"{self.root / MANIFEST_NAME}: split {split!r} has no FFCV file; "
                             f"convert with --format ffcv or both")
        return self.root / entry["file"]

    def dali_shards(self, split: str) -> tuple[list[Path], list[Path]]:
        entry = self.split(split).get("dali")
        if not entry:
            raise UsageError(f"{self.root / MANIFEST_NAME}: split {split!r} has no DALI shards; "
                             f"convert with --format dali or both")
        return ([self.root / p for p in entry["shards"]], [self.root / p for p in entry["index"]])

    def folder(self, split: str) -> Path | None:
        rel = self.split(split).get("folder")
        if rel is None:
            return None
        return Path(self.raw["source"]) / rel


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise UsageError(f"{path}: no manifest (convert the dataset with `fastrefine convert` first)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    for key in ("classes", "splits"):
        if key not in raw:
            raise UsageError(f"{path}: missing key {key!r}")
    if raw.get("version", MANIFEST_VERSION) > MANIFEST_VERSION:
        raise UsageError(f"{path}: manifest version {raw['version']} is newer than this fastrefine "
                         f"understands ({MANIFEST_VERSION})")
    return Manifest(root=root, raw=raw)


# ------------------------------------------------------------------------------ recorded output files

def _sampled_ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts of a `size`-byte file that `file_digest` hashes."""
    if size <= 2 * _EDGE + _BLOCKS * _BLOCK:
        return [(0, size)]
    ranges = [(0, _EDGE)]
    inner_start, inner = _EDGE, size - 2 * _EDGE
    stride = inner / _BLOCKS
    for i in range(_BLOCKS):
        start = inner_start + int(i * stride + (stride - _BLOCK) / 2)
        ranges.append((start, _BLOCK))
    ranges.append((size - _EDGE, _EDGE))
    return ranges


def file_digest(path: str | Path) -> dict[str, Any]:
    """`{"bytes": size, "digest": "sampled-blake2b-v1:<hex>"}` of a file (see the module docstring)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        for offset, length in _sampled_ranges(size):
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError(f"{path}: short read at byte {offset} (changed while being read)")
            h.update(data)
    finally:
        os.close(fd)
    return {"bytes": size, "digest": f"{DIGEST_SCHEME}:{h.hexdigest()}"}


_recorded_cache: dict[tuple[str, int, int], dict[str, Any]] = {}


def _recorded_files(data_dir: Path) -> dict[str, Any]:
    """The manifest's `files` map ({} when there is no manifest or it records none), cached per manifest
    version (path, mtime, size), since a loader checks one file after another."""
    path = data_dir / MANIFEST_NAME
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _recorded_cache:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: unreadable manifest ({e})") from None
        files = raw.get(FILES_KEY) if isinstance(raw, dict) else None
        _recorded_cache.clear()
        _recorded_cache[key] = files if isinstance(files, dict) else {}
    return _recorded_cache[key]


def check_recorded_file(data_dir: Path, path: Path) -> None:
    """Raise UsageError naming `path` if its size, or its sampled checksum, differs from what the
    conversion recorded in `data_dir/manifest.json`; do nothing when the manifest records nothing for
    it (a conversion made before sizes were recorded, or a file outside `data_dir`).

    The size is compared first (a stat); the checksum reads at most 256 KiB of the file."""
    data_dir, path = Path(data_dir), Path(path)
    files = _recorded_files(data_dir)
    if not files:
        return
    try:
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(data_dir))
    except ValueError:
        return
    rel = Path(rel).as_posix()
    want = files.get(rel)
    if not isinstance(want, dict):
        return
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UsageError(f"{path}: missing, but {data_dir / MANIFEST_NAME} lists it; convert again") from None
    if "bytes" in want and size != want["bytes"]:
        raise UsageError(f"{path}: {size} bytes, but the conversion wrote {want['bytes']} (truncated, cut "
                         f"short or replaced since); convert again")
    digest = want.get("digest")
    if isinstance(digest, str) and digest.startswith(DIGEST_SCHEME + ":"):
        if file_digest(path)["digest"] != digest:
            raise UsageError(f"{path}: its content differs from what the conversion wrote (sampled "
                             f"checksum mismatch); the file was overwritten since; convert again")
