"""The DALI loader in its CPU mode (GPU tests marked): one pipeline per resolution for the run, a new
global order every epoch split across ranks, exact replay of an epoch, dtypes, errors naming the shard,
and DaliOptions reaching the constructor.

Data: real Fashion-MNIST photos (`demo_tree`, 32 px): 4 classes, 30 train and 10 val images each,
converted to DALI shards of 32 images by `convert_dataset` (helpers shared with test_loader_torch.py).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import shutil

import numpy as np
import pytest
import torch

from fastrefine.errors import FastRefineError, RunError
from fastrefine.loaders import build
from fastrefine.loaders.options import DaliOptions

from test_loader_torch import CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, convert, small_tree

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")

CPU = torch.device("cpu")
N_TRAIN = CLASSES * TRAIN_PER_CLASS


@pytest.fixture(scope="module")
def conv(demo_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("daliloader")
    src = small_tree(demo_tree, root / "src")
    convert(src, root / "conv")
    shutil.rmtree(src)
    return root / "conv"


def loader(data, **kw):
    opts = dict(split="train", batch_size=8, resolution=24, device=CPU, workers=2, seed=3)
    return build(data=data, backend="dali", **{**opts, **kw})


class ReadSpy:
    """Records which samples the loader hands DALI (wraps SampleTable.read)."""

    def __init__(self, ld):
        self.read, self.indices = ld.table.read, []
        ld.table.read = self

    def __call__(self, i):
        self.indices.append(int(i))
        return self.read(i)

    def take(self) -> list[int]:
        out, self.indices = self.indices, []
        return out


def run_epoch(ld, e: int, spy: ReadSpy):
    ld.set_epoch(e)
    spy.take()
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in ld])
    return torch.cat(xs), torch.cat(ys), spy.take()


def test_one_pipeline_for_the_run_reset_between_epochs_rebuilt_only_for_a_new_size(conv, monkeypatch):
    ld = loader(conv)
    assert ld.builds == 0                           # lazy: nothing built before the first epoch
    for e in range(3):
        ld.set_epoch(e)
        assert sum(1 for _ in ld) == len(ld) == N_TRAIN // 8
    next(iter(ld))                                  # an abandoned epoch: drained and reset
    x, _ = next(iter(ld))
    assert ld.builds == 1 and x.shape[-1] == 24
    ld.set_resolution(32)
    x, _ = next(iter(ld))
    assert ld.builds == 2 and list(ld._pipes) == [32] and x.shape == (8, 3, 32, 32)
    ld.set_epoch(7)
    assert sum(1 for _ in ld) == len(ld)
    assert ld.builds == 2
    released = []
    monkeypatch.setattr("fastrefine.loaders.dali._release_unused_memory", lambda: released.append(1))
    ld.device_id = 0                                 # as on a GPU: dropping a pipeline releases memory
    ld.close()
    assert ld._pipes == {} and released == [1]


def test_every_epoch_a_new_order_ranks_disjoint_and_rotating(conv):
    ranks = [loader(conv, rank=r, world_size=2) for r in (0, 1)]
    spies = [ReadSpy(ld) for ld in ranks]
    seen = [set(), set()]
    orders = []
    for e in range(3):
        got = [run_epoch(ld, e, spy) for ld, spy in zip(ranks, spies)]
        for r, (x, y, read) in enumerate(got):
            assert len(y) == len(ranks[r]) * 8 == (N_TRAIN // 2) // 8 * 8
            # DALI hands back the samples in the order they were fed (prefetch drains nothing extra)
            assert y.tolist() == ranks[r].table.labels[read].tolist()
            seen[r] |= set(read)
        assert not set(got[0][2]) & set(got[1][2])   # no sample on both ranks in an epoch
        orders.append(got[0][2])
    assert orders[0] != orders[1] != orders[2]
    first_shard = set(range(N_TRAIN // 2))
    assert len(seen[0]) > N_TRAIN // 2 and seen[0] - first_shard   # rank 0 is not stuck on one half


def test_an_epoch_replays_exactly_on_a_fresh_loader(conv):
    a = loader(conv)
    a.set_epoch(0)
    list(a)
    a.set_epoch(1)
    one = [(x.clone(), y.clone()) for x, y in a]
    b = loader(conv)                                # a resumed run starts at epoch 1
    b.set_epoch(1)
    two = [(x.clone(), y.clone()) for x, y in b]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(one, two))
    a.set_epoch(2)
    assert not torch.equal(torch.cat([x for x, _ in one]), torch.cat([x for x, _ in a]))


def test_val_ranks_see_every_image_once(conv):
    parts = [loader(conv, split="val", rank=r, world_size=3) for r in range(3)]
    spies = [ReadSpy(p) for p in parts]
    reads, labels = [], []
    for p, spy in zip(parts, spies):
        x, y, read = run_epoch(p, 0, spy)
        assert len(y) == p.num_samples and x.shape[0] == p.num_samples
        reads += read
        labels += y.tolist()
    n = CLASSES * VAL_PER_CLASS
    assert sorted(reads) == list(range(n))
    assert collections.Counter(labels) == {c: VAL_PER_CLASS for c in range(CLASSES)}


def test_fp16_from_dali_and_bf16_are_the_fp32_result_rounded(conv):
    """crop_mirror_normalize computes in fp32 and writes fp16 itself; bf16 is the fp32 batch cast once."""
    out = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        xs = [x.clone() for x, _ in loader(conv, split="val", dtype=dt, batch_size=16)]
        assert all(x.dtype == dt and x.is_contiguous(memory_format=torch.channels_last) for x in xs)
        out[dt] = torch.cat(xs)
    ref = out[torch.float32]
    assert float(ref.std()) > 0.3
    assert torch.equal(out[torch.bfloat16], ref.to(torch.bfloat16))
    # DALI's own fp32 -> fp16 conversion: within one fp16 step of the rounded fp32 value
    step = torch.finfo(torch.float16).eps * ref.abs().clamp_min(1)
    assert bool(((out[torch.float16].float() - ref).abs() <= step).all())


def test_a_corrupt_image_names_its_shard_in_one_plain_line(conv, tmp_path, monkeypatch):
    """A shard whose JPEG bytes were damaged in place (same size; the sampled checksum of
    `check_recorded_file` is switched off here to reach DALI): DALI's error names the tar and the
    image's offset in one line, for train (image_slice) and val (image) pipelines."""
    import fastrefine.manifest as manifest_module
    monkeypatch.setattr(manifest_module, "check_recorded_file", lambda data, path: None)
    bad = tmp_path / "bad"
    shutil.copytree(conv, bad)
    for split in ("train", "val"):
        ld = loader(bad, split=split, shuffle=False, drop_last=False)
        i = 3
        path, off, size = ld.table.files[ld.table.file_id[i]], int(ld.table.offsets[i]), int(ld.table.sizes[i])
        with open(path, "r+b") as fh:
            fh.seek(off + 200)
            fh.write(b"\x00" * (size - 400))
        ld = loader(bad, split=split, shuffle=False, drop_last=False)
        with pytest.raises(RunError) as err:
            list(ld)
        msg = str(err.value)
        assert msg.startswith(f"{path} (image at byte {off})") and "\n" not in msg
        assert "decoders.image" in msg and "Critical error" not in msg


def test_a_checksum_mismatch_is_refused_at_start(conv, tmp_path):
    """With `fastrefine.manifest.check_recorded_file` (the manifest records sizes/checksums), a
    shard overwritten after the conversion is refused before any pipeline is built, naming the file."""
    bad = tmp_path / "bad"
    shutil.copytree(conv, bad)
    tar = sorted((bad / "dali").glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[600:700] = b"\x00" * 100
    tar.write_bytes(bytes(data))
    with pytest.raises(FastRefineError) as err:
        loader(bad)
    assert str(tar) in str(err.value)


def test_a_truncated_shard_is_refused_at_start_naming_the_index(conv, tmp_path, monkeypatch):
    import fastrefine.manifest as manifest_module
    monkeypatch.setattr(manifest_module, "check_recorded_file", lambda data, path: None)
    bad = tmp_path / "bad"
    shutil.copytree(conv, bad)
    tar = sorted((bad / "dali").glob("train-*.tar"))[0]
    with open(tar, "r+b") as fh:
        fh.truncate(tar.stat().st_size // 2)
    with pytest.raises(FastRefineError, match="truncated") as err:
        loader(bad)
    assert str(tar.with_suffix(".idx")) in str(err.value)


def test_imagefolder_tree_without_manifest(conv, demo_tree, tmp_path):
    tree = small_tree(demo_tree, tmp_path / "tree")
    x, y, _ = run_epoch(ld := loader(tree, split="val"), 0, ReadSpy(ld))
    assert x.shape == (CLASSES * VAL_PER_CLASS, 3, 24, 24) and ld.table.kind == "folder"
    assert collections.Counter(y.tolist()) == {c: VAL_PER_CLASS for c in range(CLASSES)}
    ld = loader(tree)
    assert sum(len(y) for _, y in ld) == N_TRAIN // 8 * 8


def test_a_file_that_is_no_image_in_a_tree_is_named(demo_tree, tmp_path):
    tree = small_tree(demo_tree, tmp_path / "tree")
    bad = sorted((tree / "train").iterdir())[2] / "zz-bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(RunError) as err:
        list(loader(tree))
    assert str(err.value).startswith(f"{bad}: ") and "\n" not in str(err.value) and "<_io" not in str(err.value)


def test_dali_options_are_the_constructor_options(conv):
    from fastrefine.loaders.dali import DaliLoader, decoder_options
    params = inspect.signature(DaliLoader.__init__).parameters
    fields = dataclasses.fields(DaliOptions)
    for f in fields:
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default
    hints = dict(hw_decoder_load=0.9, preallocate_width_hint=256, preallocate_height_hint=256,
                 device_memory_padding=1 << 20, host_memory_padding=1 << 20)
    # the defaults are NVIDIA's ResNet-50 example's: buffers for the largest ImageNet image
    assert (DaliOptions().device_memory_padding, DaliOptions().host_memory_padding) == (211025920, 140544512)
    assert (DaliOptions().preallocate_width_hint, DaliOptions().preallocate_height_hint) == (5980, 6430)
    assert decoder_options(device_id=None, **hints) == {}          # nvJPEG hints apply to "mixed" only
    assert decoder_options(device_id=0, **hints) == hints
    ld = build(data=conv, backend="dali", split="val", batch_size=8, resolution=24, device=CPU,
               backend_options={"dali": {**hints, "prefetch": 3}, "ffcv": {"order": "random"}})
    assert ld.prefetch == 3 and sum(len(y) for _, y in ld) == CLASSES * VAL_PER_CLASS


def test_label_counts_come_from_the_cls_members(conv):
    ld = loader(conv)
    counts = np.bincount(ld.table.labels).tolist()
    assert counts == [TRAIN_PER_CLASS] * CLASSES


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_mixed_decode_with_nvjpeg_hints_one_pipeline(conv):
    cuda = torch.device("cuda")
    ld = loader(conv, device=cuda, dtype=torch.bfloat16, backend_options={"dali": dict(
        hw_decoder_load=0.5, preallocate_width_hint=64, preallocate_height_hint=64)})
    for e in range(3):
        ld.set_epoch(e)
        for x, y in ld:
            assert x.is_cuda and y.is_cuda and x.dtype == torch.bfloat16 and x.shape == (8, 3, 24, 24)
            assert x.is_contiguous(memory_format=torch.channels_last)
    assert ld.builds == 1
    ld.set_resolution(32)
    assert next(iter(ld))[0].shape[-1] == 32 and ld.builds == 2
    ld.close()


@pytest.mark.gpu
def test_gpu_val_matches_cpu_val(conv):
    cpu = torch.cat([x for x, _ in loader(conv, split="val", batch_size=16)])
    gpu = torch.cat([x.float().cpu() for x, _ in loader(conv, split="val", batch_size=16,
                                                        device=torch.device("cuda"), dtype=torch.float16)])
    assert gpu.shape == cpu.shape and float((gpu - cpu).abs().mean()) < 0.02   # nvJPEG vs libjpeg-turbo
