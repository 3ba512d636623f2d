"""Webdataset tar shards with DALI's index, and the small JSON record that proves a shard complete.

A shard `{split}-{k:05d}` is three files, each written under a `.partial` name and renamed when whole:

* `.tar`  plain ustar archive; per sample `{key}.jpg` (JPEG bytes) then `{key}.cls` (label, ASCII digits);
* `.idx`  DALI's webdataset index (the format of DALI's `wds2idx` tool, version "v1.2"):
          first line `v1.2 <samples>`, then one line per sample listing, per component,
          `<ext> <data offset> <size> <member name>`;
* `.json` the record, written last: fingerprint of the shard's inputs and settings, file sizes, and
          the file list (key, label, size, source path, byte offset of the JPEG inside the tar) plus
          the files of this shard that were skipped and why.

A shard counts as done only when its record exists, its fingerprint matches and the tar and index
have the sizes it records; anything else is redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .scan import Candidate

INDEX_VERSION = "v1.2"
PARTIAL = ".partial"
RECORD_VERSION = 1


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
                          "items": [(k, c.path, c.label) for k, c in items]})
        plans.append(ShardPlan(split=split, number=number, items=items, fingerprint=fp))
    return plans


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes one shard; `finish()` renames tar and index into place and writes the record last."""

    def __init__(self, *, plan: ShardPlan, folder: Path):
        self.plan = plan
        self.tar_path = folder / f"{plan.stem}.tar"
        self.idx_path = folder / f"{plan.stem}.idx"
        self.record_path = folder / f"{plan.stem}.json"
        for path in (self.record_path, self.tar_path, self.idx_path):   # a stale record must go first
            path.unlink(missing_ok=True)
        self._tmp = self.tar_path.with_name(self.tar_path.name + PARTIAL)
        self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.USTAR_FORMAT)
        self._index_lines: list[str] = []
        self.members: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.notes: dict[str, int] = {}

    def add(self, *, key: str, source: str, label: int, jpeg: bytes, width: int, height: int,
            notes: tuple[str, ...] = ()) -> None:
        jpg = self._add_member(name=f"{key}.jpg", data=jpeg)
        cls = self._add_member(name=f"{key}.cls", data=str(label).encode("ascii"))
        self._index_lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in (jpg, cls)))
        self.members.append({"key": key, "label": label, "width": width, "height": height,
                             "offset": jpg[1], "bytes": jpg[2], "source": source})
        for note in notes:
            self.notes[note] = self.notes.get(note, 0) + 1

    def skip(self, *, source: str, kind: str, reason: str) -> None:
        self.skipped.append({"path": source, "reason": reason, "kind": kind})

    def _add_member(self, *, name: str, data: bytes) -> tuple[str, int, int, str]:
        info = tarfile.TarInfo(name=name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(data))
        # the data ends where the archive now ends, less the padding to a whole 512-byte block
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return name.split(".", 1)[1], self._tar.offset - padded, len(data), name

    def finish(self) -> dict[str, Any]:
        self._tar.close()
        tar_bytes = idx_bytes = 0
        if self.members:
            os.replace(self._tmp, self.tar_path)
            atomic_write_text(self.idx_path, f"{INDEX_VERSION} {len(self.members)}\n"
                              + "".join(line + "\n" for line in self._index_lines))
            tar_bytes, idx_bytes = self.tar_path.stat().st_size, self.idx_path.stat().st_size
        else:                                   # every file of this shard was bad: no tar, no index
            self._tmp.unlink()
        record = {"version": RECORD_VERSION, "fingerprint": self.plan.fingerprint, "count": len(self.members),
                  "tar_bytes": tar_bytes, "idx_bytes": idx_bytes, "members": self.members,
                  "skipped": self.skipped, "notes": self.notes}
        atomic_write_text(self.record_path, json.dumps(record, separators=(",", ":")))
        return record

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)


def load_complete_record(*, plan: ShardPlan, folder: Path) -> dict[str, Any] | None:
    """The shard's record if the shard on disk is whole and made from these inputs; else None."""
    record_path = folder / f"{plan.stem}.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != plan.fingerprint or record.get("version") != RECORD_VERSION:
        return None
    if record["count"] == 0:
        return record
    for suffix, key in ((".tar", "tar_bytes"), (".idx", "idx_bytes")):
        path = folder / f"{plan.stem}{suffix}"
        if not path.is_file() or path.stat().st_size != record[key]:
            return None
    return record


def remove_stale(*, folder: Path, split: str, keep: int) -> None:
    """Delete this split's `.partial` leftovers and shards numbered `keep` or higher (ours by name only)."""
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
        if name.endswith(PARTIAL) or int(stem[0]) >= keep:
            os.unlink(entry.path)
