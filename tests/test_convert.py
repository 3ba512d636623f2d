"""`fastrefine convert` on small real trees built from Fashion-MNIST, dirty files included."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastrefine.convert import convert_dataset
from fastrefine.convert.lock import LOCK_NAME
from fastrefine.fashion_mnist import load_fashion_mnist
from fastrefine.errors import UsageError
from fastrefine.manifest import read_manifest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684")     # four classes, folder names
FMNIST_LABEL = {"n01440764": 0, "n02102040": 1, "n02979186": 7, "n03000684": 9}   # tshirt, trouser, sneaker, boot
NAMES = {"n01440764": "tench, Tinca tinca", "n02102040": "English springer, English springer spaniel",
         "n02979186": "cassette player", "n03000684": "chain saw, chainsaw"}
PER_CLASS = 8
VAL_PER_CLASS = 3
SIDE = 48          # source JPEGs are Fashion-MNIST upscaled from 28 to 48 px
MAX_SIDE = 32      # converted images are shrunk to this

# The dirty files put into train/<first class>/ and what each should become.
GOOD_ODDITIES = {"png_inside.JPEG": "png-content", "cmyk.JPEG": "cmyk", "gray.jpeg": "grayscale",
                 "upper.JPG": None, "rotated.JPEG": "exif-rotated"}
BAD_FILES = {"truncated.JPEG": "truncated", "empty.JPEG": "empty", "fake.JPEG": "unreadable",
             "notes.txt": "not-image-extension", ".hidden.JPEG": "hidden"}


# ----------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def fmnist() -> dict[int, np.ndarray]:
    images, labels = load_fashion_mnist("val", FMNIST)
    return {k: images[labels == k][:40] for k in set(FMNIST_LABEL.values())}


def _rgb(img28: np.ndarray, side: int = SIDE) -> Image.Image:
    return Image.fromarray(img28, mode="L").resize((side, side), Image.Resampling.BICUBIC).convert("RGB")


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _rotated_source() -> Image.Image:
    """64x40 stored image: left half black, right half white, EXIF orientation 6 (display rotated 90 CW)."""
    arr = np.zeros((40, 64, 3), dtype=np.uint8)
    arr[:, 32:] = 255
    return Image.fromarray(arr)


def _write_dirty(folder: Path, sample: np.ndarray) -> None:
    img = _rgb(sample)
    img.save(folder / "png_inside.JPEG", format="PNG")
    img.convert("CMYK").save(folder / "cmyk.JPEG", format="JPEG", quality=95)
    img.convert("L").save(folder / "gray.jpeg", format="JPEG", quality=95)
    img.save(folder / "upper.JPG", format="JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    _rotated_source().save(folder / "rotated.JPEG", format="JPEG", quality=95, exif=exif.tobytes())
    whole = _jpeg_bytes(img)
    (folder / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "fake.JPEG").write_bytes(b"this is not a picture\n" * 20)
    (folder / "notes.txt").write_text("annotator notes\n")
    (folder / ".hidden.JPEG").write_bytes(whole)


def make_tree(root: Path, fmnist: dict, *, val: str = "folders", dirty: bool = True, names: bool = True,
              wnids: tuple[str, ...] = WNIDS) -> Path:
    """SRC/train/<wnid>/*.JPEG (+ dirty files), val as class folders or Kaggle flat + CSV."""
    for wnid in wnids:
        pics = fmnist[FMNIST_LABEL[wnid]]
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(PER_CLASS):
            _rgb(pics[i]).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=95)
    if dirty:
        _write_dirty(root / "train" / wnids[0], fmnist[FMNIST_LABEL[wnids[0]]][30])
    if names:
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {NAMES[w]}\n" for w in wnids))
    if val == "folders":
        for wnid in wnids:
            (root / "val" / wnid).mkdir(parents=True)
            for i in range(VAL_PER_CLASS):
                _rgb(fmnist[FMNIST_LABEL[wnid]][20 + i]).save(root / "val" / wnid / f"v{i}.JPEG", quality=95)
    else:
        _make_kaggle_val(root, fmnist, wnids)
    return root


def _make_kaggle_val(root: Path, fmnist: dict, wnids: tuple[str, ...]) -> None:
    (root / "val").mkdir(parents=True)
    rows, n = [], 0
    for wnid in wnids:
        for i in range(VAL_PER_CLASS):
            n += 1
            image_id = f"ILSVRC2012_val_{n:08d}"
            _rgb(fmnist[FMNIST_LABEL[wnid]][20 + i]).save(root / "val" / f"{image_id}.JPEG", quality=95)
            rows.append((image_id, f"{wnid} 1 2 30 40 {wnid} 5 5 20 20"))
    rows.append(("ILSVRC2012_val_00009999", f"{wnids[0]} 1 2 3 4"))             # listed, no file
    _rgb(fmnist[FMNIST_LABEL[wnids[0]]][35]).save(root / "val" / "stray.JPEG")   # file, not listed
    with open(root / "LOC_val_solution.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)


def convert(src: Path, out: Path, **kw) -> dict:
    args = dict(layout="imagenet", max_side=MAX_SIDE, quality=90, workers=1, progress=False, shard_size=5)
    args.update(kw)
    return convert_dataset(src=src, out=out, **args)


def read_dali(tars: list[Path], idxs: list[Path]) -> list[tuple[np.ndarray, int]]:
    """Every sample of the shards, in order, decoded by DALI on the CPU: (HxWx3 image, label)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(p) for p in tars], index_paths=[str(p) for p in idxs],
                                         ext=["jpg", "cls"], missing_component_behavior="error",
                                         pad_last_batch=False, name="wds")
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    total = p.reader_meta("wds")["epoch_size"]
    out: list[tuple[np.ndarray, int]] = []
    while len(out) < total:
        images, labels = p.run()
        for i in range(len(images)):
            if len(out) < total:
                out.append((np.array(images.at(i)), int(bytes(np.array(labels.at(i))).decode("ascii"))))
    return out


def records(out: Path, manifest: dict, split: str) -> list[dict]:
    """The shard file lists, concatenated in shard order: one dict per written sample."""
    members = []
    for rel in manifest["splits"][split]["dali"]["file_lists"]:
        members.extend(json.loads((out / rel).read_text())["members"])
    return members


def snapshot(folder: Path) -> dict[str, int]:
    """mtime of every file under `folder` except the lock file (each run rewrites who holds it)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


# ------------------------------------------------------------------ one dirty conversion, many checks

@pytest.fixture(scope="module")
def converted(tmp_path_factory, fmnist):
    src = make_tree(tmp_path_factory.mktemp("src"), fmnist)
    out = tmp_path_factory.mktemp("out") / "ds"
    manifest = convert(src, out, workers=2)          # a real 2-process pool, both formats
    return src, out, manifest


def test_counts_classes_and_names(converted):
    src, out, manifest = converted
    assert [c["wnid"] for c in manifest["classes"]] == sorted(WNIDS)
    assert [c["index"] for c in manifest["classes"]] == [0, 1, 2, 3]
    assert manifest["classes"][0]["name"] == "tench"
    assert manifest["classes"][1]["name"] == "English springer"
    assert manifest["classes"][3]["description"] == "chain saw, chainsaw"
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["count"] == 4 * PER_CLASS + len(GOOD_ODDITIES)
    assert train["label_counts"] == [PER_CLASS + len(GOOD_ODDITIES), PER_CLASS, PER_CLASS, PER_CLASS]
    assert val["count"] == 4 * VAL_PER_CLASS and val["label_counts"] == [VAL_PER_CLASS] * 4
    assert manifest["formats"] == ["ffcv", "dali"]
    loaded = read_manifest(out)          # the loaders' reader accepts it
    assert loaded.num_classes == 4 and loaded.count("train") == train["count"]
    assert loaded.ffcv_file("val") == out / "val.beton"
    tars, idxs = loaded.dali_shards("train")
    assert len(tars) == len(idxs) == 8          # 40 decodable-looking candidates, 5 per shard
    assert all(t.is_file() for t in tars) and all(i.is_file() for i in idxs)
    assert loaded.folder("val") == src / "val"


def test_bad_files_skipped_with_reasons(converted):
    _, _, manifest = converted
    skipped = {Path(s["path"]).name: s for s in manifest["skipped"]}
    assert set(skipped) == set(BAD_FILES)
    for name, kind in BAD_FILES.items():
        assert skipped[name]["kind"] == kind, (name, skipped[name])
        assert skipped[name]["reason"]
        assert skipped[name]["path"] == f"train/{WNIDS[0]}/{name}"
    train = manifest["splits"]["train"]
    assert train["skipped_count"] == len(BAD_FILES)
    assert train["skipped_kinds"] == {k: 1 for k in BAD_FILES.values()}
    assert train["repaired"] == {"cmyk": 1, "exif-rotated": 1, "grayscale": 1, "png-content": 1}


def test_dali_reads_shards_with_labels_and_sizes(converted):
    src, out, manifest = converted
    members = records(out, manifest, "train")
    tars, idxs = read_manifest(out).dali_shards("train")
    samples = read_dali(tars, idxs)
    assert len(samples) == len(members) == manifest["splits"]["train"]["count"]
    wnid_of = {c["index"]: c["wnid"] for c in manifest["classes"]}
    for (image, label), m in zip(samples, members):
        assert label == m["label"]
        assert Path(m["source"]).parts[1] == wnid_of[label]         # train/<wnid>/file
        assert image.shape == (m["height"], m["width"], 3)
        assert max(image.shape[:2]) <= MAX_SIDE
    # train is shuffled: the first shard is not one class
    assert len({m["label"] for m in members[:5]}) > 1
    val = read_dali(*read_manifest(out).dali_shards("val"))
    assert [lbl for _, lbl in val] == [i for i in range(4) for _ in range(VAL_PER_CLASS)]


def test_exif_orientation_applied(converted):
    _, out, manifest = converted
    members = records(out, manifest, "train")
    pos = next(i for i, m in enumerate(members) if m["source"].endswith("rotated.JPEG"))
    m = members[pos]
    assert (m["width"], m["height"]) == (20, 32)          # stored 64x40 landscape -> portrait, shrunk to 32
    image, _ = read_dali(*read_manifest(out).dali_shards("train"))[pos]
    top, bottom = image[:12].mean(), image[-12:].mean()
    assert top < 40 and bottom > 215                       # stored left (black) is now on top


def test_index_matches_dalis_own_wds2idx(converted, tmp_path):
    _, out, manifest = converted
    tool = shutil.which("wds2idx") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "wds2idx")
    for tar_rel, idx_rel in zip(manifest["splits"]["train"]["dali"]["shards"],
                                manifest["splits"]["train"]["dali"]["index"]):
        theirs = tmp_path / "theirs.idx"
        subprocess.run([tool, str(out / tar_rel), str(theirs)], check=True, capture_output=True)
        assert (out / idx_rel).read_text() == theirs.read_text()


def test_ffcv_files_hold_labels_and_sizes(converted):
    from ffcv.reader import Reader

    _, out, manifest = converted
    for split in ("train", "val"):
        reader = Reader(str(out / f"{split}.beton"))
        members = records(out, manifest, split)
        assert int(reader.num_samples) == len(members) == manifest["splits"][split]["count"]
        assert reader.field_names == ["image", "label"]
        image, label = (reader.metadata[f"f{i}"] for i in range(2))      # FFCV names metadata columns f0, f1
        assert label.tolist() == [m["label"] for m in members]
        assert image["width"].tolist() == [m["width"] for m in members]
        assert image["height"].tolist() == [m["height"] for m in members]
        assert int(np.maximum(image["width"], image["height"]).max()) <= MAX_SIDE


def test_second_run_is_a_noop(converted, capsys):
    src, out, manifest = converted
    before = snapshot(out)
    again = convert(src, out, workers=2)
    assert snapshot(out) == before
    assert again == manifest
    assert "nothing to do" in capsys.readouterr().out


def test_ffcv_loader_decodes_the_right_pixels(converted, fmnist):
    """The one FFCV Loader test (numba compiles its pipeline: ~10 s)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    _, out, manifest = converted
    loader = Loader(str(out / "val.beton"), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [CenterCropRGBImageDecoder((MAX_SIDE, MAX_SIDE), ratio=1.0)],
                                                "label": [IntDecoder()]})
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(np.asarray(batch_images))
        labels.extend(np.asarray(batch_labels).reshape(-1).tolist())
    images = np.concatenate(images)
    assert labels == [i for i in range(4) for _ in range(VAL_PER_CLASS)]
    for n, wnid in enumerate(sorted(WNIDS)):
        for i in range(VAL_PER_CLASS):
            want = np.asarray(_rgb(fmnist[FMNIST_LABEL[wnid]][20 + i]).resize((MAX_SIDE, MAX_SIDE)), dtype=float)
            got = images[n * VAL_PER_CLASS + i].astype(float)
            assert np.abs(got - want).mean() < 12, (wnid, i)


# --------------------------------------------------------------------------------- layouts, errors

def test_kaggle_flat_val_with_csv(tmp_path, fmnist):
    src = make_tree(tmp_path / "src", fmnist, val="csv", dirty=False)
    manifest = convert(src, tmp_path / "out", formats=("dali",))
    val = manifest["splits"]["val"]
    assert val["count"] == 4 * VAL_PER_CLASS and val["label_counts"] == [VAL_PER_CLASS] * 4
    assert "folder" not in val
    assert val["skipped_kinds"] == {"missing": 1, "not-in-csv": 1}
    members = records(tmp_path / "out", manifest, "val")
    samples = read_dali(*read_manifest(tmp_path / "out").dali_shards("val"))
    assert [lbl for _, lbl in samples] == [m["label"] for m in members] == [i for i in range(4) for _ in range(3)]
    assert not (tmp_path / "out" / "train.beton").exists()


def test_folder_layout_uses_folder_names(tmp_path, fmnist):
    src = make_tree(tmp_path / "src", fmnist, dirty=False, names=False, wnids=WNIDS[:2])
    manifest = convert(src, tmp_path / "out", layout="folder", formats=("dali",), splits=("val",))
    assert [(c["wnid"], c["name"]) for c in manifest["classes"]] == [(w, w) for w in WNIDS[:2]]
    assert manifest["dataset"] == "folder" and list(manifest["splits"]) == ["val"]


@pytest.mark.parametrize("val", ["folders", "csv"])
def test_val_class_missing_from_train_is_an_error(tmp_path, fmnist, val):
    src = make_tree(tmp_path / "src", fmnist, val=val, dirty=False)
    shutil.rmtree(src / "train" / WNIDS[2])
    with pytest.raises(UsageError, match=WNIDS[2]):
        convert(src, tmp_path / "out", formats=("dali",))
    assert not (tmp_path / "out").exists()


def test_missing_or_empty_source_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match="no class folders"):
        convert(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "train" / "n01").mkdir()
    (tmp_path / "empty" / "val" / "n01").mkdir(parents=True)
    with pytest.raises(UsageError, match="no image files"):
        convert(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_holding_another_dataset_is_left_alone(tmp_path, fmnist):
    first = make_tree(tmp_path / "a", fmnist, dirty=False, wnids=WNIDS[:2])
    second = make_tree(tmp_path / "b", fmnist, dirty=False, wnids=WNIDS[:2])
    out = tmp_path / "out"
    convert(first, out, formats=("dali",), splits=("val",))
    before = snapshot(out)
    with pytest.raises(UsageError, match="holds a conversion of"):
        convert(second, out, formats=("dali",), splits=("val",))
    assert snapshot(out) == before
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "thesis.tex").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        convert(second, tmp_path / "stuff", formats=("dali",))


def test_killed_shards_are_redone_and_only_they(tmp_path, fmnist):
    src = make_tree(tmp_path / "src", fmnist, dirty=False)
    out = tmp_path / "out"
    manifest = convert(src, out, formats=("dali",), splits=("train",), shard_size=4)
    dali = out / "dali"
    assert len(manifest["splits"]["train"]["dali"]["shards"]) == 8
    # shard 2 "killed" before its record was written; shard 5's tar cut short; the temporary of a dead writer
    (dali / "train-00002.json").unlink()
    data = (dali / "train-00005.tar").read_bytes()
    (dali / "train-00005.tar").write_bytes(data[:1000])
    (dali / ".train-00006.tar.tmp-999999999").write_bytes(b"half")
    before = snapshot(out)
    again = convert(src, out, formats=("dali",), splits=("train",), shard_size=4)
    after = snapshot(out)
    changed = {k for k in after if before.get(k) != after[k]}
    assert {"dali/train-00002.tar", "dali/train-00002.json", "dali/train-00005.tar"} <= changed
    assert not any(k.startswith(("dali/train-00000", "dali/train-00007")) for k in changed)
    assert "dali/.train-00006.tar.tmp-999999999" not in after
    assert again["splits"] == manifest["splits"]
    samples = read_dali(*read_manifest(out).dali_shards("train"))
    assert len(samples) == 4 * PER_CLASS


def test_ffcv_only_resumes_per_split_file_and_force_redoes(tmp_path, fmnist):
    src = make_tree(tmp_path / "src", fmnist, dirty=False, wnids=WNIDS[:2])
    out = tmp_path / "out"
    manifest = convert(src, out, formats=("ffcv",), ffcv_mode="jpg")
    assert not (out / ".work").exists() and not (out / "dali").exists()
    assert "dali" not in manifest["splits"]["train"]
    (out / "val.beton").unlink()
    (out / ".val.beton.tmp-999999999").write_bytes(b"killed")
    before = snapshot(out)
    convert(src, out, formats=("ffcv",), ffcv_mode="jpg")
    after = snapshot(out)
    assert after["train.beton"] == before["train.beton"]
    assert "val.beton" in after and ".val.beton.tmp-999999999" not in after
    convert(src, out, formats=("ffcv",), ffcv_mode="jpg", force=True)
    assert snapshot(out)["train.beton"] != after["train.beton"]


def test_shard_not_matching_its_record_is_an_error_naming_it(tmp_path, fmnist):
    """The .beton is written from the shards' bytes: a record pointing at garbage is a RunError naming the tar."""
    from fastrefine.convert.ffcv_writer import CleanSamples, write_beton
    from fastrefine.convert.imaging import Cleaned
    from fastrefine.convert.scan import Candidate
    from fastrefine.convert.shards import plan_shards, write_shard
    from fastrefine.errors import RunError

    plan = plan_shards(split="train", candidates=[Candidate("a.JPEG", 0), Candidate("b.JPEG", 1)],
                       shard_size=10, settings={})[0]
    jpeg = _jpeg_bytes(_rgb(fmnist[0][0]))
    record = write_shard(plan=plan, folder=tmp_path, on_item=lambda _: None,
                         cleaned=iter([Cleaned(data=jpeg, width=SIDE, height=SIDE)] * 2))
    record["members"][1]["offset"] += 3          # the second sample now points into garbage
    samples = CleanSamples(tar_paths=[tmp_path / "train-00000.tar"], records=[record])
    with pytest.raises(RunError, match="train-00000.tar: sample 1"):
        write_beton(path=tmp_path / "x.beton", samples=samples, write_mode="jpg", max_side=64, threads=1)
    assert not (tmp_path / "x.beton").exists()
    assert not [p for p in tmp_path.iterdir() if "x.beton" in p.name]     # no temporary left behind


def test_folder_layout_takes_names_from_synset_mapping(tmp_path, demo_tree):
    """The demo export is an ImageFolder tree with LOC_synset_mapping.txt: names come from it."""
    from fastrefine.fashion_mnist import CLASS_NAMES
    manifest = convert_dataset(src=demo_tree, out=tmp_path / "out", layout="folder", formats=("dali",),
                               splits=("val",), progress=False)
    assert [c["name"] for c in manifest["classes"]] == CLASS_NAMES
