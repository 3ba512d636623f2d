"""Find the images of a source tree: classes, per-split candidate files, and files skipped by name.

Two source layouts, one code path:

* class folders: ``SRC/train/<class>/*`` and ``SRC/val/<class>/*`` (ImageNet or any ImageFolder tree);
* ImageNet's Kaggle validation: a flat ``SRC/val/*.JPEG`` labelled by ``SRC/LOC_val_solution.csv``
  (first token of PredictionString is the wnid). The Kaggle download's own top folder, with the images
  under ``ILSVRC/Data/CLS-LOC/``, is accepted too.

Class indices are the sorted class-folder names of ``train``; val uses the same map. Nothing here
decodes an image: files whose *name* rules them out (hidden, not an image extension, outside a class
folder, not in the CSV), entries that are not regular files (a FIFO, a socket, a device: never opened)
and entries that cannot even be looked at (a symlink loop, a folder without read permission: any
OSError) are skipped here with a reason; every other file is a candidate for decoding, with its size and
modification time (a file rewritten later is decoded again).
A train class folder without a single candidate is an error (it would be a class with no images).
"""

from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
SYNSET_FILE = "LOC_synset_mapping.txt"
VAL_CSV = "LOC_val_solution.csv"
KAGGLE_IMAGE_ROOT = Path("ILSVRC") / "Data" / "CLS-LOC"
LAYOUTS = ("imagenet", "folder")


@dataclass(frozen=True)
class ClassEntry:
    index: int
    wnid: str
    name: str
    description: str = ""


@dataclass(frozen=True)
class Candidate:
    path: str          # relative to the source folder
    label: int
    size: int = 0      # bytes and modification time when scanned: part of the shard's fingerprint, so a
    mtime_ns: int = 0  # file rewritten since (during a convert, too) is decoded again on the next run


@dataclass(frozen=True)
class Skip:
    path: str          # relative to the source folder
    kind: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason, "kind": self.kind}


@dataclass(frozen=True)
class SplitScan:
    name: str
    candidates: list[Candidate]
    skipped: list[Skip]
    folder: str | None = None          # the split's ImageFolder tree relative to the source, if it is one
    val_csv: str | None = None         # the CSV that labelled a flat split


@dataclass(frozen=True)
class SourceScan:
    source: Path
    layout: str
    classes: list[ClassEntry]
    splits: dict[str, SplitScan] = field(default_factory=dict)


def scan_source(*, src: Path, layout: str, splits: tuple[str, ...],
                limit_per_class: int | None = None) -> SourceScan:
    """Scan `src` (nothing is written). UsageError for a missing tree, no classes, or no images."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise UsageError(f"{src}: source folder does not exist")
    image_root = _image_root(src=src, layout=layout)
    train_dir = image_root / "train"
    if not train_dir.is_dir():
        raise UsageError(f"{train_dir}: no train/ folder (the class map is built from train's class folders)")
    class_names, _ = _class_folders(split_dir=train_dir, src=src)
    if not class_names:
        raise UsageError(f"{train_dir}: no class folders")
    classes = _class_entries(src=src, wnids=class_names)
    by_wnid = {c.wnid: c.index for c in classes}
    scans = {}
    for split in splits:
        scan = _scan_split(src=src, image_root=image_root, split=split, by_wnid=by_wnid, layout=layout)
        if split == "train":
            _refuse_empty_classes(scan=scan, classes=classes, split_dir=image_root / split)
        scan = _limit(scan=scan, limit_per_class=limit_per_class)
        if not scan.candidates:
            raise UsageError(f"{image_root / split}: no image files found (skipped {len(scan.skipped)})")
        scans[split] = scan
    return SourceScan(source=src, layout=layout, classes=classes, splits=scans)


def _image_root(*, src: Path, layout: str) -> Path:
    if layout == "imagenet" and not (src / "train").is_dir() and (src / KAGGLE_IMAGE_ROOT / "train").is_dir():
        return src / KAGGLE_IMAGE_ROOT
    return src


def _rel(path: Path | str, src: Path) -> str:
    return os.path.relpath(path, src)


def _sorted_entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _split_entries(split_dir: Path) -> list[os.DirEntry]:
    try:
        return _sorted_entries(split_dir)
    except OSError as e:
        raise UsageError(f"{split_dir}: cannot be read ({e.strerror or e})") from None


def _is_dir(entry: os.DirEntry) -> bool | OSError:
    """entry.is_dir(), or the OSError that asking raised (a symlink loop, no permission)."""
    try:
        return entry.is_dir()
    except OSError as e:
        return e


def _unreadable(rel: str, error: OSError) -> Skip:
    return Skip(rel, "unreadable", f"cannot be read: {error.strerror or error}")


def _refuse_empty_classes(*, scan: SplitScan, classes: list[ClassEntry], split_dir: Path) -> None:
    """Every train class folder must hold at least one candidate image; else it is a silent extra class."""
    having = {c.label for c in scan.candidates}
    empty = [c.wnid for c in classes if c.index not in having]
    if empty:
        raise UsageError(f"{split_dir}: class folder(s) with no image files: {', '.join(empty[:10])}"
                         + (f" (+{len(empty) - 10} more)" if len(empty) > 10 else "")
                         + "; remove them or add images (each would be a class with no examples)")


def _class_folders(*, split_dir: Path, src: Path) -> tuple[list[str], list[Skip]]:
    """Non-hidden sub-folders of `split_dir`, and the other entries there as skips."""
    names, skipped = [], []
    for entry in _split_entries(split_dir):
        is_dir = _is_dir(entry)
        if isinstance(is_dir, OSError):
            skipped.append(_unreadable(_rel(entry.path, src), is_dir))
        elif entry.name.startswith("."):
            what = "folder" if is_dir else "file"
            skipped.append(Skip(_rel(entry.path, src), "hidden", f"hidden {what}"))
        elif is_dir:
            names.append(entry.name)
        else:
            skipped.append(Skip(_rel(entry.path, src), "outside-class-folder",
                                "file directly in the split folder, not in a class folder"))
    return names, skipped


def _class_entries(*, src: Path, wnids: list[str]) -> list[ClassEntry]:
    # any layout: an ImageFolder tree may carry the ImageNet-style names file too (the demo export does)
    described = read_synset_names(src)
    entries = []
    for index, wnid in enumerate(sorted(wnids)):
        text = described.get(wnid, "")
        name = text.split(",")[0].strip() or wnid
        entries.append(ClassEntry(index=index, wnid=wnid, name=name, description=text))
    return entries


def read_synset_names(src: Path) -> dict[str, str]:
    """{wnid: 'name, name2'} from SRC/LOC_synset_mapping.txt ({} when absent); a malformed line is an error."""
    path = src / SYNSET_FILE
    if not path.is_file():
        return {}
    names = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        wnid, _, text = line.partition(" ")
        if not text:
            raise UsageError(f"{path}:{lineno}: expected 'wnid name, name2', got {line!r}")
        names[wnid] = text.strip()
    return names


def _scan_split(*, src: Path, image_root: Path, split: str, by_wnid: dict[str, int], layout: str) -> SplitScan:
    split_dir = image_root / split
    if not split_dir.is_dir():
        raise UsageError(f"{split_dir}: split folder {split!r} does not exist")
    folders, loose = _class_folders(split_dir=split_dir, src=src)
    if folders:
        return _scan_class_folders(src=src, split_dir=split_dir, split=split, folders=folders,
                                   loose=loose, by_wnid=by_wnid)
    csv_path = src / VAL_CSV
    if layout == "imagenet" and csv_path.is_file():
        return _scan_flat_csv(src=src, split_dir=split_dir, split=split, csv_path=csv_path, by_wnid=by_wnid)
    hint = f" and no {VAL_CSV} beside it" if layout == "imagenet" else ""
    raise UsageError(f"{split_dir}: no class folders{hint}")


def _scan_class_folders(*, src: Path, split_dir: Path, split: str, folders: list[str], loose: list[Skip],
                        by_wnid: dict[str, int]) -> SplitScan:
    unknown = [name for name in folders if name not in by_wnid]
    if unknown:
        raise UsageError(f"{split_dir}: class folder(s) not in train: {', '.join(unknown[:10])}"
                         + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    candidates, skipped = [], list(loose)
    for name in folders:
        try:
            entries = _sorted_entries(split_dir / name)
        except OSError as e:
            skipped.append(_unreadable(_rel(split_dir / name, src), e))
            continue
        for entry in entries:
            rel = _rel(entry.path, src)
            looked = _look(entry=entry, rel=rel)
            if isinstance(looked, Skip):
                skipped.append(looked)
            else:
                candidates.append(Candidate(rel, by_wnid[name], looked.st_size, looked.st_mtime_ns))
    return SplitScan(name=split, candidates=candidates, skipped=skipped, folder=_rel(split_dir, src))


def _look(*, entry: os.DirEntry, rel: str) -> Skip | os.stat_result:
    """Why `entry` is skipped, or its stat (of the file a link points at) when it is a candidate. Only a
    regular file is a candidate: a FIFO, socket or device named *.jpg is listed and never opened (opening
    a FIFO waits for a writer for ever)."""
    is_dir = _is_dir(entry)
    if isinstance(is_dir, OSError):
        return _unreadable(rel, is_dir)
    if entry.name.startswith("."):
        return Skip(rel, "hidden", "hidden file" if not is_dir else "hidden folder")
    if is_dir:
        return Skip(rel, "nested-folder", "folder inside a class folder (not searched)")
    suffix = os.path.splitext(entry.name)[1].lower()
    if suffix not in IMAGE_EXTENSIONS:
        return Skip(rel, "not-image-extension", f"not an image file name (extension {suffix or 'none'!r})")
    try:
        st = entry.stat()
    except OSError as e:
        return _unreadable(rel, e)
    if not stat.S_ISREG(st.st_mode):
        return Skip(rel, "not-regular-file", f"not a regular file ({_file_type(st.st_mode)}); never opened")
    return st


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def _read_val_csv(*, csv_path: Path, by_wnid: dict[str, int]) -> dict[str, int]:
    """ImageId -> label from the Kaggle CSV; a wnid that train lacks is an error naming it."""
    labels: dict[str, int] = {}
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing_cols = {"ImageId", "PredictionString"} - set(reader.fieldnames or ())
        if missing_cols:
            raise UsageError(f"{csv_path}: missing column(s) {sorted(missing_cols)} "
                             f"(expected ImageId,PredictionString)")
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise UsageError(f"{csv_path}: row {row['ImageId']!r} has an empty PredictionString")
            wnid = tokens[0]
            if wnid not in by_wnid:
                raise UsageError(f"{csv_path}: class {wnid!r} (image {row['ImageId']}) is not a class "
                                 f"folder of train")
            labels[row["ImageId"]] = by_wnid[wnid]
    return labels


def _scan_flat_csv(*, src: Path, split_dir: Path, split: str, csv_path: Path,
                   by_wnid: dict[str, int]) -> SplitScan:
    labels = _read_val_csv(csv_path=csv_path, by_wnid=by_wnid)
    candidates, skipped, seen = [], [], set()
    for entry in _split_entries(split_dir):
        rel = _rel(entry.path, src)
        looked = _look(entry=entry, rel=rel)
        if isinstance(looked, Skip):
            skipped.append(looked)
            continue
        image_id = os.path.splitext(entry.name)[0]
        if image_id not in labels:
            skipped.append(Skip(rel, "not-in-csv", f"not listed in {csv_path.name}"))
            continue
        seen.add(image_id)
        candidates.append(Candidate(rel, labels[image_id], looked.st_size, looked.st_mtime_ns))
    for image_id in sorted(set(labels) - seen):
        skipped.append(Skip(_rel(split_dir / image_id, src), "missing",
                            f"listed in {csv_path.name} but no such image file"))
    return SplitScan(name=split, candidates=candidates, skipped=skipped, val_csv=csv_path.name)


def _limit(*, scan: SplitScan, limit_per_class: int | None) -> SplitScan:
    if limit_per_class is None:
        return scan
    if limit_per_class < 1:
        raise UsageError(f"limit_per_class={limit_per_class}: expected a positive number")
    kept, per_class = [], {}
    for cand in scan.candidates:
        n = per_class.get(cand.label, 0)
        if n < limit_per_class:
            kept.append(cand)
            per_class[cand.label] = n + 1
    return SplitScan(name=scan.name, candidates=kept, skipped=scan.skipped, folder=scan.folder,
                     val_csv=scan.val_csv)
