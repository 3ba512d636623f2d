"""What `fastrefine convert` survives (issue 12): concurrent converts, a full disk, damaged output files,
symlink loops, empty class folders, an OUT inside SRC; and the .beton written from the shards' own JPEG
bytes (issue 14), decoded by FFCV's stock decoders to the very pixels of the shards' JPEGs. CPU only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastrefine.convert import convert_dataset
from fastrefine.errors import UsageError
from fastrefine.fashion_mnist import load_fashion_mnist
from fastrefine.manifest import MANIFEST_NAME, check_recorded_file, file_digest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("bag", "boot", "sneaker")
PER_CLASS = 6
SIDE, MAX_SIDE = 48, 32


@pytest.fixture(scope="module")
def pictures() -> dict[str, np.ndarray]:
    images, labels = load_fashion_mnist("val", FMNIST)
    return {name: images[labels == k][:20] for name, k in zip(CLASSES, (8, 9, 7))}


def make_src(root: Path, pictures: dict, *, per_class: int = PER_CLASS) -> Path:
    for split, count in (("train", per_class), ("val", 2)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pic = pictures[name][i + (10 if split == "val" else 0)]
                Image.fromarray(pic, mode="L").resize((SIDE, SIDE), Image.Resampling.BICUBIC).convert("RGB") \
                    .save(root / split / name / f"{name}_{i}.JPEG", quality=92)
    return root


def convert(src: Path, out: Path, **kw) -> dict:
    args = dict(layout="folder", max_side=MAX_SIDE, workers=1, progress=False, shard_size=4)
    args.update(kw)
    return convert_dataset(src=src, out=out, **args)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------- concurrent converts

def test_second_convert_into_the_same_out_is_refused_naming_the_holder(tmp_path, pictures):
    src, out = make_src(tmp_path / "src", pictures), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fastrefine.convert.lock import out_lock
        with out_lock(Path({str(out)!r})):
            print("locked", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"another convert is writing into it \(PID {holder.pid} on ") as e:
            convert(src, out, formats=("dali",))
        assert e.value.exit_code == 2
        assert not (out / MANIFEST_NAME).exists() and not (out / "dali").exists()
    finally:
        holder.communicate("done\n", timeout=30)
    manifest = convert(src, out, formats=("dali",))          # the holder is gone: the lock is free
    assert manifest["splits"]["train"]["count"] == len(CLASSES) * PER_CLASS


# -------------------------------------------------------------------------- recorded sizes and checksums

def test_every_output_file_is_recorded_and_damage_is_caught(tmp_path, pictures):
    src, out = make_src(tmp_path / "src", pictures), tmp_path / "out"
    manifest = convert(src, out, ffcv_mode="jpg")
    files = manifest["files"]
    dali = manifest["splits"]["train"]["dali"]
    val_dali = manifest["splits"]["val"]["dali"]
    assert set(files) == {"train.beton", "val.beton", *dali["shards"], *dali["index"], dali["sizes"],
                          *val_dali["shards"], *val_dali["index"], val_dali["sizes"]}
    for rel, want in files.items():
        assert file_digest(out / rel) == want
        check_recorded_file(out, out / rel)                       # intact: no error
    check_recorded_file(out, out / MANIFEST_NAME)                 # not recorded: nothing to check

    beton = out / "train.beton"
    whole = beton.read_bytes()
    beton.write_bytes(whole[:-1])                                 # truncated by one byte
    with pytest.raises(UsageError, match=r"train\.beton: \d+ bytes, but the conversion wrote"):
        check_recorded_file(out, beton)
    damaged = bytearray(whole)
    damaged[-100:] = bytes(b ^ 0xFF for b in damaged[-100:])     # the end of the allocation table
    beton.write_bytes(bytes(damaged))
    with pytest.raises(UsageError, match=r"train\.beton: its content differs"):
        check_recorded_file(out, beton)
    beton.write_bytes(whole)
    check_recorded_file(out, beton)

    tar = out / dali["shards"][0]
    data = bytearray(tar.read_bytes())
    data[600:700] = b"x" * 100                                    # inside the first JPEG
    tar.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"train-00000\.tar: its content differs"):
        check_recorded_file(out, tar)
    tar.unlink()
    with pytest.raises(UsageError, match=r"train-00000\.tar: missing"):
        check_recorded_file(out, tar)

    # a conversion made before files were recorded: nothing to compare against
    old = json.loads((out / MANIFEST_NAME).read_text())
    del old["files"]
    (out / MANIFEST_NAME).write_text(json.dumps(old))
    check_recorded_file(out, beton.with_name("val.beton"))


def test_sampled_checksum_on_a_large_file(tmp_path):
    """Above 256 KiB only the ends and 32 strided blocks are read: what that catches, and what it misses."""
    path = tmp_path / "big.beton"
    size = 4 << 20
    base = np.arange(size, dtype=np.uint32).astype(np.uint8).tobytes()
    path.write_bytes(base)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"files": {"big.beton": file_digest(path)}}))

    def damaged(offset: int, length: int) -> None:
        data = bytearray(base)
        data[offset:offset + length] = bytes(b ^ 0xFF for b in data[offset:offset + length])
        path.write_bytes(bytes(data))

    for offset, length in ((10, 1), (size - 3, 1), (size // 2, size // 32)):
        damaged(offset, length)
        with pytest.raises(UsageError, match="big.beton: its content differs"):
            check_recorded_file(tmp_path, path)
    damaged(64 * 1024 + 1, 1)        # one byte just past the head, before the first strided block: missed
    check_recorded_file(tmp_path, path)


# ---------------------------------------------------------------------------------------- disk full

_DISK_FULL = textwrap.dedent("""
    import errno, sys, time
    from pathlib import Path
    import fastrefine.atomic as atomic
    from fastrefine.convert import convert_dataset
    from fastrefine.errors import RunError

    src, out, budget, target, progress = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
    left = [budget]

    class Full:
        '''A file on a disk with `left` bytes free: a write past that raises ENOSPC.'''
        def __init__(self, fh): self.fh = fh
        def write(self, data):
            n = len(memoryview(data).cast("B"))
            if n > left[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            left[0] -= n
            return self.fh.write(data)
        def __getattr__(self, name): return getattr(self.fh, name)
        def __enter__(self): return self
        def __exit__(self, *exc): return self.fh.__exit__(*exc)

    def full_open(path, *args, **kw):
        fh = open(path, *args, **kw)
        return Full(fh) if target in Path(path).name else fh

    atomic.open = full_open          # every atomic write of the converter goes through it
    start = time.monotonic()
    try:
        convert_dataset(src=src, out=out, layout="folder", max_side=32, workers=2, shard_size=4,
                        progress=progress)
    except RunError as e:
        print(f"RUNERROR {time.monotonic() - start:.1f} {e}", flush=True)
        sys.exit(3)
    print("NO ERROR", flush=True)
""")


@pytest.mark.parametrize("target,budget,progress", [(".tar", 50_000, False), (".beton", 1 << 20, True)])
def test_disk_full_with_two_workers_fails_fast_naming_the_file(tmp_path, pictures, target, budget, progress):
    src, out = make_src(tmp_path / "src", pictures), tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _DISK_FULL, str(src), str(out), str(budget), target,
                           "1" if progress else "0"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 3, done.stdout + done.stderr
    line = done.stdout.strip().splitlines()[-1]
    _, seconds, message = line.split(" ", 2)
    assert float(seconds) < 60, line
    assert "no space left on device" in message and target in message, message
    assert str(out) in message
    leftovers = [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []                                       # no temporary keeps the space
    kept = {k: v for k, v in mtimes(out).items() if k.endswith((".tar", ".idx", ".json")) and "/" in k}
    if target == ".tar":
        assert kept, "shards finished before the disk filled must be kept"
    else:
        shards = -(-len(CLASSES) * PER_CLASS // 4) + -(-len(CLASSES) * 2 // 4)     # train + val, 4 a shard
        assert len([k for k in kept if k.endswith(".tar")]) == shards
    manifest = convert(src, out)                                 # disk freed: the rerun resumes
    after = mtimes(out)
    assert all(after[k] == v for k, v in kept.items()), "a finished shard was redone"
    assert manifest["splits"]["train"]["count"] == len(CLASSES) * PER_CLASS
    for rel in manifest["files"]:
        check_recorded_file(out, out / rel)


# ------------------------------------------------------------------------------------ odd sources

def test_symlink_loops_are_skipped_and_listed(tmp_path, pictures):
    src = make_src(tmp_path / "src", pictures)
    os.symlink("loop.JPEG", src / "train" / CLASSES[0] / "loop.JPEG")      # a file that points at itself
    os.symlink("zz_loop", src / "train" / "zz_loop")                        # a "class folder" likewise
    manifest = convert(src, tmp_path / "out", formats=("dali",))
    skipped = {s["path"]: s for s in manifest["skipped"]}
    for rel in (f"train/{CLASSES[0]}/loop.JPEG", "train/zz_loop"):
        assert skipped[rel]["kind"] == "unreadable", skipped
        assert "symbolic links" in skipped[rel]["reason"]
    assert [c["wnid"] for c in manifest["classes"]] == sorted(CLASSES)
    assert manifest["splits"]["train"]["count"] == len(CLASSES) * PER_CLASS


def test_empty_class_folder_is_refused(tmp_path, pictures):
    src = make_src(tmp_path / "src", pictures)
    (src / "train" / "coat").mkdir()
    (src / "train" / "dress").mkdir()
    (src / "train" / "dress" / "notes.txt").write_text("no pictures here\n")
    with pytest.raises(UsageError, match=r"train: class folder\(s\) with no image files: coat, dress;") as e:
        convert(src, tmp_path / "out", formats=("dali",))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", [".", "converted", "train/converted"])
def test_out_inside_src_is_refused(tmp_path, pictures, inside):
    src = make_src(tmp_path / "src", pictures)
    with pytest.raises(UsageError, match="is inside the source folder"):
        convert(src, src / inside, formats=("dali",))
    assert sorted(p.name for p in (src / "train").iterdir()) == sorted(CLASSES)


# --------------------------------------------------------------------- the .beton from the shards' bytes

def test_beton_holds_the_shards_jpegs_and_decodes_to_their_pixels(tmp_path, pictures, capfd):
    """proportion mode: jpg records are the shard's bytes; raw records are those bytes decoded by FFCV's
    own call; FFCV's stock loader and decoders read both, and every decoded image equals the shard's
    JPEG decoded by FFCV, byte for byte."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    from fastrefine.convert.ffcv_writer import MODE_JPG, MODE_RAW, decode_like_ffcv

    src, out = make_src(tmp_path / "src", pictures, per_class=10), tmp_path / "out"
    manifest = convert(src, out, ffcv_mode="proportion", progress=True)
    assert "it/s" not in capfd.readouterr().err                  # no tqdm bar of FFCV's
    for split in ("train", "val"):
        members = []
        for rel in manifest["splits"][split]["dali"]["file_lists"]:
            record = json.loads((out / rel).read_text())
            tar = (out / rel).with_suffix(".tar").read_bytes()
            members += [(m, tar[m["offset"]:m["offset"] + m["bytes"]]) for m in record["members"]]
        reader = Reader(str(out / f"{split}.beton"))
        image, label = reader.metadata["f0"], reader.metadata["f1"]
        assert label.tolist() == [m["label"] for m, _ in members]
        modes = image["mode"].tolist()
        if split == "train":
            assert set(modes) == {MODE_JPG, MODE_RAW}
        raw_file = (out / f"{split}.beton").read_bytes()
        sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
        for (m, jpeg), meta in zip(members, image):
            stored = raw_file[int(meta["data_ptr"]):int(meta["data_ptr"]) + sizes[int(meta["data_ptr"])]]
            pixels = decode_like_ffcv(jpeg, height=m["height"], width=m["width"])
            assert stored == (jpeg if meta["mode"] == MODE_JPG else pixels.tobytes())
        if split == "val":                                       # all 32x32: the simple decoder applies
            loader = Loader(str(out / "val.beton"), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                            drop_last=False,
                            pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
            decoded = np.concatenate([np.asarray(x) for x, _ in loader])
            want = np.stack([decode_like_ffcv(j, height=m["height"], width=m["width"]) for m, j in members])
            assert decoded.shape == want.shape and np.array_equal(decoded, want)
    loader = Loader(str(out / "train.beton"), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": [RandomResizedCropRGBImageDecoder((24, 24))], "label": [IntDecoder()]})
    crops = np.concatenate([np.asarray(x) for x, _ in loader])
    assert crops.shape == (len(CLASSES) * 10, 24, 24, 3) and 20 < crops.mean() < 235


def test_rewritten_beton_is_the_same_file(tmp_path, pictures):
    """proportion's jpg/raw draw is seeded: --force writes byte-identical files (their checksums agree)."""
    src, out = make_src(tmp_path / "src", pictures), tmp_path / "out"
    first = convert(src, out, formats=("ffcv",))
    before = mtimes(out)
    again = convert(src, out, formats=("ffcv",), force=True)
    assert mtimes(out)["train.beton"] != before["train.beton"]
    assert again["files"] == first["files"]
