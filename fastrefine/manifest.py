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
                   "ext": ["jpg", "cls"]},                     # image, label (ASCII digits)
          "folder": "train"                       # optional: an ImageFolder tree, relative to SOURCE
        },
        "val": {...}
      },
      "skipped": [{"path": "...", "reason": "..."}]
    }

Paths inside a split are relative to the manifest's folder (for "ffcv"/"dali") or to `source`
(for "folder"). Readers must ignore keys they do not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


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
