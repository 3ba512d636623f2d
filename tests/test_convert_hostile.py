"""`fastrefine convert` against hostile sources and folders (issue 23, section 4): JPEGs on which libjpeg
warns, a stale temporary of a killed convert, a FIFO named *.jpg, a header claiming 13000x13000, a full
disk at start, a class of undecodable files, a file rewritten between runs, and the lock left behind.
Each test builds the case for real (hand-made JPEG bytes, a real FIFO, a dead process's PID). CPU only."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastrefine.convert import convert_dataset
from fastrefine.convert.core import MARKER
from fastrefine.convert.imaging import MAX_PIXELS
from fastrefine.convert.lock import LOCK_NAME
from fastrefine.errors import RunError, UsageError
from fastrefine.fashion_mnist import load_fashion_mnist
from fastrefine.manifest import MANIFEST_NAME

CLASSES = ("bag", "boot", "sneaker")
PER_CLASS = 4
SIDE, MAX_SIDE = 48, 32


@pytest.fixture(scope="module")
def pictures() -> dict[str, np.ndarray]:
    images, labels = load_fashion_mnist("val")
    return {name: images[labels == k][:20] for name, k in zip(CLASSES, (8, 9, 7))}


def jpeg(pic: np.ndarray, *, side: int = SIDE, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pic, mode="L").resize((side, side), Image.Resampling.BICUBIC).convert("RGB") \
        .save(buf, format="JPEG", quality=92, **save)
    return buf.getvalue()


def make_src(root: Path, pictures: dict) -> Path:
    for split, count in (("train", PER_CLASS), ("val", 1)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                (root / split / name / f"{name}_{i}.JPEG").write_bytes(
                    jpeg(pictures[name][i + (10 if split == "val" else 0)]))
    return root


def convert(src: Path, out: Path, **kw) -> dict:
    args = dict(layout="folder", max_side=MAX_SIDE, workers=1, progress=False, shard_size=4, formats=("dali",))
    args.update(kw)
    return convert_dataset(src=src, out=out, **args)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------- damaged JPEGs (item 4)

def restart_marker_corrupted(pic: np.ndarray) -> bytes:
    """A JPEG with restart markers whose second marker is the wrong one: libjpeg warns ("found marker
    0xd5 instead of RST1"), resynchronises and decodes the rest; PIL keeps such a file."""
    data = jpeg(pic, side=64, restart_marker_blocks=1)
    at = data.index(b"\xff\xd1", data.index(b"\xff\xda"))
    return data[:at] + b"\xff\xd5" + data[at + 2:]


def scan_ending_early(pic: np.ndarray) -> bytes:
    """The entropy-coded data cut in half, the end-of-image marker kept: libjpeg warns ("premature end
    of data segment") and fills the rest; PIL keeps it."""
    data = jpeg(pic, side=64)
    sos = data.index(b"\xff\xda")
    return data[:sos + (len(data) - sos) // 2] + b"\xff\xd9"


def test_jpegs_libjpeg_warns_on_are_listed_with_the_warning_and_strict_skips_them(tmp_path, pictures):
    src = make_src(tmp_path / "src", pictures)
    (src / "train" / "bag" / "rst.JPEG").write_bytes(restart_marker_corrupted(pictures["bag"][15]))
    (src / "train" / "boot" / "early.JPEG").write_bytes(scan_ending_early(pictures["boot"][15]))
    for name in ("rst.JPEG", "early.JPEG"):            # PIL alone accepts both: nothing else would notice
        Image.open(next(src.rglob(name))).load()
    manifest = convert(src, tmp_path / "out")
    warned = {w["path"]: w["warning"] for w in manifest["warned"]}
    assert set(warned) == {"train/bag/rst.JPEG", "train/boot/early.JPEG"}, manifest["warned"]
    assert "instead of RST1" in warned["train/bag/rst.JPEG"]
    assert "premature end of data segment" in warned["train/boot/early.JPEG"]
    assert manifest["splits"]["train"]["warned_count"] == 2 and manifest["strict"] is False
    assert manifest["splits"]["train"]["count"] == len(CLASSES) * PER_CLASS + 2      # kept

    strict = convert(src, tmp_path / "strict", strict=True)
    skipped = {s["path"]: s for s in strict["skipped"]}
    assert strict["warned"] == [] and strict["splits"]["train"]["count"] == len(CLASSES) * PER_CLASS
    for rel in warned:
        assert skipped[rel]["kind"] == "jpeg-warning" and "--strict" in skipped[rel]["reason"]


def test_strict_is_part_of_the_shards_fingerprint(tmp_path, pictures):
    src = make_src(tmp_path / "src", pictures)
    (src / "train" / "bag" / "rst.JPEG").write_bytes(restart_marker_corrupted(pictures["bag"][15]))
    out = tmp_path / "out"
    assert convert(src, out)["splits"]["train"]["warned_count"] == 1
    again = convert(src, out, strict=True)                 # same OUT: the shards are redone, not reused
    assert again["splits"]["train"]["warned_count"] == 0
    assert any(s["kind"] == "jpeg-warning" for s in again["skipped"])


# ----------------------------------------------------- a killed convert's marker temporary (item 5)

@pytest.mark.parametrize("force", [False, True])
def test_a_stale_marker_temporary_of_a_dead_process_does_not_make_out_foreign(tmp_path, pictures, force):
    """What a convert killed while renaming its marker leaves: the lock and `.MARKER.tmp-<dead pid>`."""
    src, out = make_src(tmp_path / "src", pictures), tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead_pid()}) + "\n")
    stale = out / f".{MARKER}.tmp-{dead_pid()}"
    stale.write_text(json.dumps({"source": str(src.resolve())}))
    manifest = convert(src, out, force=force)
    assert manifest["splits"]["train"]["count"] == len(CLASSES) * PER_CLASS
    assert not stale.exists()                               # removed under the lock


def test_unrelated_files_still_make_out_foreign(tmp_path, pictures):
    src, out = make_src(tmp_path / "src", pictures), tmp_path / "out"
    out.mkdir()
    (out / f".notes.txt.tmp-{dead_pid()}").write_text("someone else's")
    with pytest.raises(UsageError, match="not empty and holds no fastrefine conversion"):
        convert(src, out)


# --------------------------------------------------------------------- not a regular file (item 6)

def test_a_fifo_named_jpg_is_skipped_and_listed_never_opened(tmp_path, pictures):
    src = make_src(tmp_path / "src", pictures)
    os.mkfifo(src / "train" / "bag" / "pipe.jpg")
    out = tmp_path / "out"
    code = ("from fastrefine.convert import convert_dataset\n"
            f"convert_dataset(src={str(src)!r}, out={str(out)!r}, layout='folder', formats=('dali',), "
            f"max_side={MAX_SIDE}, workers=1, progress=False)\n")
    try:   # in a child with a time limit: opening the FIFO would wait for a writer for ever
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("convert hung on a FIFO named pipe.jpg")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    skipped = {s["path"]: s for s in manifest["skipped"]}
    assert skipped["train/bag/pipe.jpg"]["kind"] == "not-regular-file"
    assert "FIFO" in skipped["train/bag/pipe.jpg"]["reason"]
    assert manifest["splits"]["train"]["count"] == len(CLASSES) * PER_CLASS


def test_a_file_replaced_by_a_fifo_after_the_scan_is_not_opened(tmp_path):
    from fastrefine.convert.imaging import clean_image
    os.mkfifo(tmp_path / "late.jpg")
    out = clean_image(str(tmp_path / "late.jpg"), MAX_SIDE, 90)      # returns at once, nothing read
    assert not out.ok and out.kind == "not-regular-file"


# ------------------------------------------------------------------- absurd pixel counts (item 8)

def claims_size(data: bytes, width: int, height: int) -> bytes:
    """`data` with its frame header (SOF0, or SOF2 when progressive) claiming another size: a small file
    that says it is huge."""
    sof = min(i for i in (data.find(b"\xff\xc0"), data.find(b"\xff\xc2")) if i >= 0)
    return data[:sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[sof + 9:]


def test_a_header_claiming_13000x13000_is_refused_before_any_decode(tmp_path, pictures):
    src = make_src(tmp_path / "src", pictures)
    huge = claims_size(jpeg(pictures["bag"][15], progressive=True), 13000, 13000)
    assert len(huge) < 20_000 and 13000 * 13000 > MAX_PIXELS
    (src / "train" / "bag" / "huge.JPEG").write_bytes(huge)
    manifest = convert(src, tmp_path / "out")
    skipped = {s["path"]: s for s in manifest["skipped"]}
    assert skipped["train/bag/huge.JPEG"]["kind"] == "too-large"
    assert "13000x13000" in skipped["train/bag/huge.JPEG"]["reason"]


# ---------------------------------------------------------------------------------------- minors

def test_a_full_disk_at_start_gives_one_line_naming_the_file(tmp_path, pictures, monkeypatch):
    """The lock's first write fails as a full disk makes it fail (os.pwrite raising ENOSPC)."""
    from fastrefine.convert import lock
    src, out = make_src(tmp_path / "src", pictures), tmp_path / "out"

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(lock.os, "pwrite", full)
    with pytest.raises(RunError) as e:
        convert(src, out)
    assert str(e.value) == f"{out / LOCK_NAME}: cannot write the lock file (No space left on device)"


def test_a_class_whose_every_file_is_undecodable_is_refused(tmp_path, pictures):
    src = make_src(tmp_path / "src", pictures)
    (src / "train" / "coat").mkdir()
    for i in range(3):
        (src / "train" / "coat" / f"coat_{i}.JPEG").write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(UsageError, match=r"class folder\(s\) with no decodable image: coat; "
                                         r"train/coat/coat_0.JPEG: ") as e:
        convert(src, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_a_file_rewritten_after_it_was_read_is_decoded_again(tmp_path, pictures):
    """A file read while it was being written (cut short: skipped as truncated), then completed: the
    rerun decodes it again instead of saying "nothing to do"."""
    src, out = make_src(tmp_path / "src", pictures), tmp_path / "out"
    path = src / "train" / "boot" / "late.JPEG"
    whole = jpeg(pictures["boot"][16])
    path.write_bytes(whole[:len(whole) // 2])
    first = convert(src, out)
    assert {s["path"]: s["kind"] for s in first["skipped"]}["train/boot/late.JPEG"] == "truncated"
    path.write_bytes(whole)
    second = convert(src, out)
    assert second["splits"]["train"]["count"] == first["splits"]["train"]["count"] + 1
    assert all(s["path"] != "train/boot/late.JPEG" for s in second["skipped"])


def test_convert_leaves_no_lock_file(tmp_path, pictures):
    out = tmp_path / "out"
    convert(make_src(tmp_path / "src", pictures), out)
    assert not (out / LOCK_NAME).exists()
