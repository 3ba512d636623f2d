"""Webdataset tar shards with DALI's index, and the small JSON record that proves a shard complete.

A shard `{split}-{k:05d}` is three files, each written atomically (`fastrefine.atomic.atomic_write`:
a temporary beside it, renamed when whole):

* `.tar`  plain ustar archive; per sample `{key}.jpg` (JPEG bytes) then `{key}.cls` (label, ASCII digits);
* `.idx`  DALI's webdataset index (the format of DALI's `wds2idx` tool, version "v1.2"):
          first line `v1.2 <samples>`, then one line per sample listing, per component,
          `<ext> <data offset> <size> <member name>`;
* `.json` the record, written last: fingerprint of the shard's inputs and settings, size and sampled
          checksum of the tar and the index (`fastrefine.manifest.file_digest`), and the file list (key,
          label, size, source path, byte offset of the JPEG inside the tar) plus the files of this shard
          that were skipped and why.

Per split, `{split}.sizes.npy` (`write_sizes`) holds every written image's (height, width) as int32
rows in shard order, the order of the indexes: the loaders draw crop boxes from it without reading
any JPEG header.

A shard counts as done only when its record exists, its fingerprint matches and the tar and index
have the sizes and sampled checksums it records; anything else is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..atomic import atomic_write, write_text
from ..manifest import file_digest
from .imaging import Cleaned
from .scan import Candidate

INDEX_VERSION = "v1.2"
RECORD_VERSION = 2


@dataclass(frozen=True)
class ShardPlan:
    split: str
    number: int
    items: tuple[tuple[str, Candidate], ...]      # (key, candidate) in the order they go into the tar
    fingerprint: str

    @property
    def stem(self) -> str:
        return f"{self.split}-{self.number:05d}"


def fingerprint(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan_shards(*, split: str, candidates: list[Candidate], shard_size: int, settings: dict[str, Any],
                ) -> list[ShardPlan]:
    """Cut the (already ordered) candidates into shards; a key is the sample's position in the split."""
    width = max(8, len(str(len(candidates))))
    keyed = [(f"{pos:0{width}d}", cand) for pos, cand in enumerate(candidates)]
    plans = []
    for number, start in enumerate(range(0, len(keyed), shard_size)):
        items = tuple(keyed[start:start + shard_size])
        fp = fingerprint({"settings": settings, "split": split, "number": number,
                          "items": [(k, c.path, c.label, c.size, c.mtime_ns) for k, c in items]})
        plans.append(ShardPlan(split=split, number=number, items=items, fingerprint=fp))
    return plans


def write_shard(*, plan: ShardPlan, folder: Path, cleaned: Iterator[Cleaned],
                on_item: Callable[[Cleaned], None]) -> dict[str, Any]:
    """Write shard `plan` into `folder` from `cleaned` (one result per item of the plan, in order) and
    return its record. A shard whose every file was bad has a record and no tar or index."""
    tar_path, idx_path, record_path = (folder / f"{plan.stem}{ext}" for ext in (".tar", ".idx", ".json"))
    for path in (record_path, tar_path, idx_path):          # a stale record must go first
        path.unlink(missing_ok=True)
    members: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    notes: dict[str, int] = {}
    index_lines: list[str] = []

    def fill(fh) -> None:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, cand in plan.items:
                result = next(cleaned)
                if result.ok:
                    jpg = _add_member(tar, name=f"{key}.jpg", data=result.data)
                    cls = _add_member(tar, name=f"{key}.cls", data=str(cand.label).encode("ascii"))
                    index_lines.append(" ".join(f"{e} {o} {n} {m}" for e, o, n, m in (jpg, cls)))
                    members.append({"key": key, "label": cand.label, "width": result.width,
                                    "height": result.height, "offset": jpg[1], "bytes": jpg[2],
                                    "source": cand.path, **({"warning": result.warning} if result.warning else {})})
                    for note in result.notes:
                        notes[note] = notes.get(note, 0) + 1
                else:
                    skipped.append({"path": cand.path, "reason": result.reason, "kind": result.kind})
                on_item(result)

    atomic_write(tar_path, fill)
    record: dict[str, Any] = {"version": RECORD_VERSION, "fingerprint": plan.fingerprint,
                              "count": len(members), "tar": None, "idx": None}
    if members:
        write_text(idx_path, f"{INDEX_VERSION} {len(members)}\n" + "".join(line + "\n" for line in index_lines))
        record["tar"], record["idx"] = file_digest(tar_path), file_digest(idx_path)
    else:
        tar_path.unlink()
    record.update(members=members, skipped=skipped, notes=notes)
    write_text(record_path, json.dumps(record, separators=(",", ":")))
    return record


def write_sizes(path: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the (height, width) of every member of these shard records, in order, as an int32 (N, 2)
    .npy file (atomically; left untouched when it already holds exactly that); return its `file_digest`."""
    import numpy as np

    hw = np.asarray([(m["height"], m["width"]) for r in records for m in r["members"]], dtype=np.int32).reshape(-1, 2)
    try:
        same = np.array_equal(np.load(path, allow_pickle=False), hw)
    except (OSError, ValueError):
        same = False
    if not same:
        atomic_write(path, lambda fh: np.save(fh, hw, allow_pickle=False))
    return file_digest(path)


def _add_member(tar: tarfile.TarFile, *, name: str, data: bytes) -> tuple[str, int, int, str]:
    info = tarfile.TarInfo(name=name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, _Bytes(data))
    # the data ends where the archive now ends, less the padding to a whole 512-byte block
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return name.split(".", 1)[1], tar.offset - padded, len(data), name


class _Bytes:
    """The one method tarfile reads member data with, without copying `data` into a BytesIO."""

    def __init__(self, data: bytes):
        self._view, self._pos = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._pos + size
        chunk = self._view[self._pos:end]
        self._pos += len(chunk)
        return chunk


def load_complete_record(*, plan: ShardPlan, folder: Path) -> dict[str, Any] | None:
    """The shard's record if the shard on disk is whole and made from these inputs; else None."""
    record_path = folder / f"{plan.stem}.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != plan.fingerprint \
            or record.get("version") != RECORD_VERSION:
        return None
    if record["count"] == 0:
        return record
    for suffix, key in ((".tar", "tar"), (".idx", "idx")):
        path = folder / f"{plan.stem}{suffix}"
        try:
            if path.stat().st_size != record[key]["bytes"] or file_digest(path) != record[key]:
                return None
        except OSError:
            return None
    return record


def remove_stale(*, folder: Path, split: str, keep: int) -> None:
    """Delete this split's shards numbered `keep` or higher (ours by name only)."""
    if not folder.is_dir():
        return
    prefix = f"{split}-"
    for entry in os.scandir(folder):
        name = entry.name
        if not name.startswith(prefix):
            continue
        stem = name[len(prefix):].split(".", 1)
        if len(stem) != 2 or not stem[0].isdigit() or len(stem[0]) != 5:
            continue
        if int(stem[0]) >= keep:
            os.unlink(entry.path)
