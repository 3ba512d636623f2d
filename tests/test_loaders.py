"""The three loader backends on one small converted dataset of real Fashion-MNIST photos.

One module-scoped dataset (4 classes of unequal size, 64 px RGB JPEGs) is converted once with
`convert_dataset`; every val epoch is read once per backend and shared by the tests that compare them,
because FFCV pays ~10 s of numba compile for its first batch in a process.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np

import pytest
import torch
from PIL import Image

from fastrefine.fashion_mnist import load_fashion_mnist
from fastrefine.errors import UsageError
from fastrefine.loaders import build
from fastrefine.manifest import read_manifest

from helpers import convert_in_child

TRAIN_COUNTS = (40, 24, 32, 16)  # 112 = 7 batches of 16: a train epoch holds every image
VAL_COUNTS = (12, 7, 9, 5)      # 33: odd, so 2 ranks get 17 + 16 and the last batches are partial
RES = 32
CPU = torch.device("cpu")
BACKENDS = ("torch", "dali", "ffcv")


def write_tree(root: Path) -> None:
    """An ImageFolder tree of real Fashion-MNIST images, 28 px upscaled to 64 px RGB JPEG."""
    for split, counts, source in (("train", TRAIN_COUNTS, "train"), ("val", VAL_COUNTS, "val")):
        images, labels = load_fashion_mnist(source)
        for cls, n in enumerate(counts):
            folder = root / split / f"class{cls}"
            folder.mkdir(parents=True)
            for i in np.flatnonzero(labels == cls)[:n]:
                im = Image.fromarray(images[i]).resize((64, 64), Image.BICUBIC).convert("RGB")
                im.save(folder / f"{i:05d}.jpg", quality=90)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tree converted by `convert_dataset` (FFCV + DALI), in a child process with a time limit so
    that a converter that hangs fails this module instead of freezing it."""
    root = tmp_path_factory.mktemp("loaders")
    write_tree(root / "src")
    convert_in_child(root / "src", root / "conv", formats=("ffcv", "dali"), max_side=64, quality=90, workers=2,
                     shard_size=40, progress=False)
    return root / "conv"


def loader(data: Path, backend: str, **kw):
    opts = dict(split="val", batch_size=8, resolution=RES, device=CPU, workers=2)
    return build(data=data, backend=backend, **{**opts, **kw})


def epoch(ld) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.float().clone(), y.clone()) for x, y in ld])
    return torch.cat(xs), torch.cat(ys)


def fingerprints(images: torch.Tensor) -> list[tuple]:
    """Per-image identity that survives reordering: rounded sums over the four quadrants."""
    h = images.shape[-1] // 2
    quads = [images[..., :h, :h], images[..., :h, h:], images[..., h:, :h], images[..., h:, h:]]
    sums = torch.stack([q.double().sum((1, 2, 3)) for q in quads], 1)
    return sorted(tuple(round(v, 2) for v in row) for row in sums.tolist())


@pytest.fixture(scope="module")
def val_epochs(data) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One full val epoch per backend (plus FFCV normalising in torch instead of its own pipeline)."""
    out = {b: epoch(loader(data, b)) for b in BACKENDS}
    out["ffcv-torch"] = epoch(_ffcv_torch(data))
    return out


def _ffcv_torch(data: Path):
    from fastrefine.loaders.base import LoaderOptions
    from fastrefine.loaders.ffcv import FfcvLoader
    opts = LoaderOptions(split="val", batch_size=8, resolution=RES, device=CPU, workers=2)
    return FfcvLoader(data, opts, normalizer="torch")


# -- the contract every backend keeps --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epoch_shapes_dtype_layout_and_label_frequencies(data, backend):
    ld = loader(data, backend, split="train", batch_size=16, dtype=torch.bfloat16, seed=3)
    assert ld.backend == backend and ld.normalize_on in ("device", "host")
    assert len(ld) == 7 and ld.num_samples == 112
    labels = []
    for x, y in ld:
        assert x.shape == (16, 3, RES, RES) and x.dtype == torch.bfloat16 and x.device == CPU
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        assert y.dtype == torch.int64 and y.shape == (16,)
        assert -3.0 < float(x.float().min()) and float(x.float().max()) < 3.0  # normalised, not 0..255
        labels.append(y)
    counts = collections.Counter(torch.cat(labels).tolist())
    assert [counts[c] for c in range(4)] == list(TRAIN_COUNTS)
    assert read_manifest(data).split("train")["label_counts"] == list(TRAIN_COUNTS)


def test_val_label_multiset_is_the_same_on_every_backend(val_epochs):
    for name, (images, labels) in val_epochs.items():
        assert images.shape == (sum(VAL_COUNTS), 3, RES, RES), name
        counts = collections.Counter(labels.tolist())
        assert [counts[c] for c in range(4)] == list(VAL_COUNTS), name


def test_val_pixel_statistics_agree_across_backends(val_epochs):
    """Decoders differ: torch reads the source JPEGs with PIL (antialiased bilinear resize to 37 px,
    crop 32: a 55.4 px window of the 64 px image), DALI the re-encoded copies (antialiased linear,
    same geometry), FFCV crops int(0.875 * 64) = 56 px and resizes with OpenCV INTER_AREA. Measured
    against torch, in normalised units: DALI +0.003 mean, FFCV -0.023 mean (about 1.3 grey levels),
    std within 0.4%. Tolerance: 0.05 on the mean (3 grey levels), 2% on the std. A 0..1 vs 0..255 mix-up,
    a missing or swapped mean/std (0.3 apart per channel) moves them far more."""
    ref_images, _ = val_epochs["torch"]
    for name, (images, _) in val_epochs.items():
        for c in range(3):
            ref, got = ref_images[:, c], images[:, c]
            assert abs(float(got.mean() - ref.mean())) < 0.05, (name, c)
            assert abs(float(got.std() / ref.std()) - 1) < 0.02, (name, c)
    ffcv, in_torch = val_epochs["ffcv"][0], val_epochs["ffcv-torch"][0]
    assert float((ffcv - in_torch).abs().max()) < 1e-4  # same pixels, normalised in FFCV or in torch


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_cover_val_exactly_once(data, val_epochs, backend):
    parts = [loader(data, backend, rank=r, world_size=2, batch_size=8) for r in (0, 1)]
    assert sorted(p.num_samples for p in parts) == [16, 17]
    assert [len(p) for p in parts] == [-(-p.num_samples // 8) for p in parts]
    images = torch.cat([epoch(p)[0] for p in parts])
    assert images.shape[0] == sum(VAL_COUNTS)
    assert fingerprints(images) == fingerprints(val_epochs[backend][0])


# -- epochs and progressive resizing (the two fast backends) ----------------------------------------

@pytest.fixture(scope="module")
def train_loaders(data):
    """DALI on one rank; FFCV as rank 0 of 2, which also runs FFCV with RankStrideOrder end to end."""
    return {"dali": loader(data, "dali", split="train", batch_size=16, seed=7),
            "ffcv": loader(data, "ffcv", split="train", batch_size=16, seed=7, rank=0, world_size=2)}


def _train_labels(ld, epoch_: int) -> list[int]:
    ld.set_epoch(epoch_)
    return torch.cat([y for _, y in ld]).tolist()


@pytest.mark.parametrize("backend", ("dali", "ffcv"))
def test_set_epoch_reshuffles_deterministically(train_loaders, backend):
    ld = train_loaders[backend]
    first, second, again = _train_labels(ld, 0), _train_labels(ld, 1), _train_labels(ld, 0)
    assert first == again
    assert first != second
    assert len(first) == len(second) == len(ld) * 16 == {1: 112, 2: 48}[ld.opts.world_size]
    if ld.opts.world_size == 1:
        assert sorted(first) == sorted(second)  # drop_last drops nothing here: 112 = 7 x 16


@pytest.mark.parametrize("backend", ("dali", "ffcv"))
def test_set_resolution_changes_the_output_size(train_loaders, backend):
    ld = train_loaders[backend]
    ld.set_resolution(48)
    x, y = next(iter(ld))
    assert x.shape == (16, 3, 48, 48) and x.is_contiguous(memory_format=torch.channels_last)
    ld.set_resolution(RES)
    x, _ = next(iter(ld))
    assert x.shape == (16, 3, RES, RES)


def test_dali_train_ranks_run_equal_full_batches(data):
    parts = [loader(data, "dali", split="train", rank=r, world_size=3, batch_size=8, seed=1) for r in range(3)]
    assert [len(p) for p in parts] == [112 // 3 // 8] * 3  # 112 // 3 = 37 a rank -> 4 full batches each
    assert [sum(len(y) for _, y in p) for p in parts] == [32] * 3


def test_ffcv_train_rank_order_is_disjoint_equal_and_reshuffled():
    from fastrefine.loaders.ffcv import RankStrideOrder
    indices = np.arange(112, dtype="uint64")
    orders = {e: [RankStrideOrder(seed=5, rank=r, world_size=3).sample_order(indices, e) for r in range(3)]
              for e in (0, 1)}
    for parts in orders.values():
        assert [len(p) for p in parts] == [37] * 3
        assert len(set(np.concatenate(parts).tolist())) == 111  # no sample on two ranks
    assert not np.array_equal(orders[0][0], orders[1][0])
    again = RankStrideOrder(seed=5, rank=0, world_size=3).sample_order(indices, 0)
    assert np.array_equal(orders[0][0], again)


# -- one crop sampler ----------------------------------------------------------------------------

def test_the_three_backends_draw_the_same_train_boxes_and_flips(data, monkeypatch):
    """Seed 7, epoch 2, every train sample: the boxes and flips the torch loader (device decode, sizes
    from the decoded images) and the DALI feed (sizes recorded by the converter) hand out, and those
    FFCV's decoder computes (its numba `random_box` / `flip_draw` on the .beton's own sizes and sample
    numbers, the functions its kernels call) are one and the same."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    pytest.importorskip("ffcv", reason="ffcv is not installed")
    import fastrefine.loaders.torch as torch_backend
    from fastrefine.loaders.crop_sampler import STREAM_CROP, jitted
    from fastrefine.loaders.ffcv import beton_path
    from fastrefine.loaders.samples import epoch_batches
    from ffcv.reader import Reader

    kw = dict(split="train", batch_size=16, seed=7, workers=0)
    drawn = {}
    real = torch_backend.train_crops

    def spy(opts, *, epoch, indices, heights, widths):
        boxes, flips = real(opts, epoch=epoch, indices=indices, heights=heights, widths=widths)
        for i, b, f in zip(indices, boxes, flips):
            drawn[int(i)] = (tuple(int(v) for v in b), bool(f))
        return boxes, flips

    monkeypatch.setattr(torch_backend, "train_crops", spy)
    tl = build(data=data, backend="torch", backend_options={"torch": {"decode": "device"}}, resolution=RES,
               device=CPU, **kw)
    tl.set_epoch(2)
    for _ in tl:
        pass
    assert len(drawn) == 112

    dl = build(data=data, backend="dali", resolution=RES, device=CPU, **kw)
    dl.feed.start(epoch_batches(dl.total, dl.opts, 2), 2)
    dali = {}
    while dl.feed.batches:
        idx = dl.feed.batches[0]
        _, _, anchors, shapes, mirror = dl.feed()
        for i, (left, top), (w, h), m in zip(idx, anchors, shapes, mirror):
            dali[int(i)] = ((int(top), int(left), int(h), int(w)), bool(m))
    dl.close()
    assert dali == drawn

    meta = Reader(str(beton_path(data, "train"))).metadata
    meta = {"image": meta["f0"], "label": meta["f1"]}                # the fields in their written order
    table = dl.table
    assert np.array_equal(meta["label"], table.labels)          # the same sample numbers on both files
    assert np.array_equal(meta["image"]["height"], table.heights) and np.array_equal(meta["image"]["width"], table.widths)
    k = jitted()
    lo, hi = float(np.log(3 / 4)), float(np.log(4 / 3))
    for i, (box, flip) in drawn.items():
        key = k.sample_key(np.int64(7), np.int64(2), np.uint64(i), np.uint64(STREAM_CROP))
        got = k.random_box(np.uint64(key), np.int64(meta["image"]["height"][i]), np.int64(meta["image"]["width"][i]),
                           0.08, 1.0, lo, hi)
        assert tuple(int(v) for v in got) == box, i
        assert bool(k.flip_draw(np.int64(7), np.int64(2), np.uint64(i), 0.5)) == flip, i


def test_the_converter_records_image_sizes_and_older_conversions_read_headers(data, tmp_path):
    """`dali.sizes` in the manifest: one (height, width) per image in shard order, equal to each JPEG's
    header; a conversion without it (an older one) gets the same sizes from the headers."""
    import json
    import shutil

    from fastrefine.loaders.samples import sample_table
    entry = read_manifest(data).split("train")["dali"]
    assert entry["sizes"] == "dali/train.sizes.npy" and entry["sizes"] in read_manifest(data).raw["files"]
    table = sample_table(data, "train")
    assert table.heights is not None and len(table.heights) == len(table)
    old = tmp_path / "old"
    shutil.copytree(data, old)
    raw = json.loads((old / "manifest.json").read_text())
    for split in raw["splits"].values():
        split["dali"].pop("sizes")
    (old / "manifest.json").write_text(json.dumps(raw))
    (old / "dali" / "train.sizes.npy").unlink()
    legacy = sample_table(old, "train")
    assert legacy.heights is None
    everything = np.arange(len(table))
    for got, want in zip(legacy.image_sizes(everything), table.image_sizes(everything)):
        assert np.array_equal(got, want)


# -- DALI specifics ------------------------------------------------------------------------------

def test_dali_reads_a_plain_imagefolder_tree(data):
    tree = data.parent / "src"
    images, labels = epoch(loader(tree, "dali"))
    assert images.shape == (sum(VAL_COUNTS), 3, RES, RES)
    counts = collections.Counter(labels.tolist())
    assert [counts[c] for c in range(4)] == list(VAL_COUNTS)


def test_ascii_label_bytes_decode_to_int64():
    from fastrefine.loaders.dali import ascii_labels
    raw = torch.tensor([[55, 0, 0, 0], [49, 50, 0, 0], [57, 57, 57, 10], [48, 0, 0, 0]], dtype=torch.uint8)
    assert ascii_labels(raw).tolist() == [7, 12, 999, 0]


def test_dali_refuses_a_folder_without_data(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(UsageError, match="ImageFolder"):
        loader(tmp_path, "dali")


def test_ffcv_refuses_host_normalisation_on_cuda(data):
    from fastrefine.loaders.base import LoaderOptions
    from fastrefine.loaders.ffcv import FfcvLoader
    opts = LoaderOptions(split="val", batch_size=8, resolution=RES, device=torch.device("cuda"))
    with pytest.raises(UsageError, match="cupy"):
        FfcvLoader(data, opts, normalizer="ffcv")


def test_ffcv_writes_each_dtype_as_fp32_rounded(data):
    """NormalizeCast computes (x - mean) / std in fp32 and writes bf16 (round to nearest even, as its
    16 bits) or fp16 (a lookup table) directly: the result is the fp32 result rounded, bit for bit."""
    from fastrefine.loaders.base import LoaderOptions
    from fastrefine.loaders.ffcv import FfcvLoader
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        opts = LoaderOptions(split="val", batch_size=8, resolution=RES, device=CPU, dtype=dt, workers=2)
        ld = FfcvLoader(data, opts, normalizer="ffcv")
        batches = [x.clone() for x, _ in ld]
        assert all(x.dtype == dt and x.is_contiguous(memory_format=torch.channels_last) for x in batches)
        out[dt] = torch.cat(batches)
    ref = out[torch.float32]
    assert torch.equal(out[torch.bfloat16], ref.to(torch.bfloat16))
    assert torch.equal(out[torch.float16], ref.to(torch.float16))
    assert float(ref.std()) > 0.3  # real pixels, not a constant


def test_ffcv_batch_is_valid_until_the_next_one_and_copy_keeps_them_all(data):
    from fastrefine.loaders.base import LoaderOptions
    from fastrefine.loaders.ffcv import FfcvLoader
    opts = LoaderOptions(split="train", batch_size=8, resolution=RES, device=CPU, seed=5, workers=2)
    # FFCV recycles a batch's buffer once the next batch is drawn (`batches_ahead + 2` slots: the batch in
    # hand, those queued, the one being filled), so what is promised is: the batch in hand does not change
    # while FFCV fills every batch ahead of it. The pause lets its thread run ahead as far as it can.
    for x, _ in FfcvLoader(data, opts, normalizer="ffcv"):
        snap = x.clone()
        time.sleep(0.05)
        assert torch.equal(x, snap)
    kept = [(x, x.clone()) for x, _ in FfcvLoader(data, opts, normalizer="ffcv", copy=True)]
    assert len(kept) == 14 and all(torch.equal(a, b) for a, b in kept)  # copies survive the epoch

# -- GPU (tools/gpu_check.sh) ------------------------------------------------------------------

def _missing(*backends: str) -> str | None:
    """Why a test of these backends cannot run here (a library not installed), or None."""
    from fastrefine.loaders import backend_available
    missing = [why for why in (backend_available(b)[1] for b in backends) if why]
    return "needs DALI and FFCV (the fixtures read every backend): " + "; ".join(missing) if missing else None


@pytest.mark.gpu
@pytest.mark.skipif(_missing("dali", "ffcv") is not None, reason=str(_missing("dali", "ffcv")))
@pytest.mark.parametrize("backend", ("dali", "ffcv"))
def test_gpu_val_epoch_matches_cpu(data, val_epochs, backend):
    ld = loader(data, backend, device=torch.device("cuda"), dtype=torch.float16)
    xs, ys = [], []
    for x, y in ld:
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float16 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        xs.append(x.float().cpu())
        ys.append(y.cpu())
    images, labels = torch.cat(xs), torch.cat(ys)
    assert sorted(labels.tolist()) == sorted(val_epochs[backend][1].tolist())
    # nvJPEG and libjpeg-turbo may round differently: compare epoch statistics, not pixels
    ref = val_epochs[backend][0]
    assert abs(float(images.mean() - ref.mean())) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(_missing("dali", "ffcv") is not None, reason=str(_missing("dali", "ffcv")))
def test_gpu_dali_train_mixed_decode(data):
    ld = loader(data, "dali", split="train", batch_size=16, device=torch.device("cuda"), dtype=torch.bfloat16)
    x, y = next(iter(ld))
    assert x.is_cuda and x.dtype == torch.bfloat16 and x.shape == (16, 3, RES, RES)
    assert x.is_contiguous(memory_format=torch.channels_last) and y.is_cuda
