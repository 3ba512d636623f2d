"""run.tensorboard: the metrics.jsonl records mirrored as TensorBoard scalars; a one-line error without it."""

import importlib.util
import json
import subprocess
import sys

import pytest

from fastrefine.tensorboard import INSTALL, REFINERY_TAG, TensorBoardMirror
from helpers import write_recipe

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_records_become_scalars_on_one_axis(tmp_path):
    w = FakeWriter()
    m = TensorBoardMirror(tmp_path, steps_per_epoch=10, writer=w)
    m({"kind": "refinery", "val_top1": 0.8})
    m({"kind": "step", "epoch": 1, "step": 4, "lr": 0.1, "loss": 2.5, "img_s": 100.0})
    m({"kind": "epoch", "epoch": 1, "step": 20, "train_loss": 2.0, "train_top1": 0.5, "val_top1": 0.6,
       "val_loss": 1.5, "val_top5": 0.9, "img_s": 90.0, "lr": 0.05, "ema_val_top1": 0.61, "resolution": 32})
    got = {(tag, step): value for tag, value, step in w.scalars}
    assert got[(REFINERY_TAG, 0)] == 0.8
    assert got[("train/loss_step", 15)] == 2.5 and got[("train/lr", 15)] == 0.1
    assert got[("speed/images_per_s_step", 15)] == 100.0
    assert got[("train/loss", 20)] == 2.0 and got[("train/top1", 20)] == 0.5
    assert got[("val/top1", 20)] == 0.6 and got[("val/ema_top1", 20)] == 0.61
    assert got[("speed/images_per_s", 20)] == 90.0 and got[("train/epoch", 20)] == 2
    assert got[(REFINERY_TAG, 20)] == 0.8          # beside the student's val top-1
    m.close()
    assert w.closed


def test_metrics_log_hands_every_record_to_its_mirrors(tmp_path):
    from fastrefine.runlog import MetricsLog, read_metrics
    seen = []
    with MetricsLog(tmp_path / "m.jsonl", mirrors=[seen.append], round="r0") as log:
        log.write({"kind": "epoch", "epoch": 0, "step": 3})
    assert seen == read_metrics(tmp_path / "m.jsonl")


# Runs `python -m fastrefine` in a process where importing tensorboard fails, installed or not.
WITHOUT_TENSORBOARD = ("import runpy, sys; sys.modules['tensorboard'] = None; "
                       "runpy.run_module('fastrefine', run_name='__main__', alter_sys=True)")


def test_missing_tensorboard_is_one_line_exit_2(tmp_path, demo_tree):
    p = write_recipe(tmp_path, demo_tree, name="tb", run={"tensorboard": True},
                     rounds='[[rounds]]\nname = "r0"\nepochs = 1\n')
    res = subprocess.run([sys.executable, "-c", WITHOUT_TENSORBOARD, "run", str(p)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: run.tensorboard = true needs the tensorboard package, which is not installed: {INSTALL}, "
                     f"or set run.tensorboard = false"]
    assert not (tmp_path / "runs/tb/r0").exists()  # nothing trained


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (the optional extra "
                    "fastrefine[tensorboard]); the mapping is tested with a fake writer above")
def test_a_run_writes_event_files_with_the_metrics(tmp_path, demo_tree):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastrefine.chain import run_recipe
    from fastrefine.recipe import load_recipe
    p = write_recipe(tmp_path, demo_tree, name="tb", run={"tensorboard": True, "max_steps_per_epoch": 4,
                                                           "max_val_batches": 2},
                     rounds='[[rounds]]\nname = "r0"\nepochs = 2\n')
    run_recipe(load_recipe(p))
    rdir = tmp_path / "runs/tb/r0"
    acc = EventAccumulator(str(rdir / "tensorboard"))
    acc.Reload()
    epochs = [json.loads(x) for x in (rdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in epochs if m["kind"] == "epoch"]
    val = [(e.step, e.value) for e in acc.Scalars("val/top1")]
    assert val == [(m["step"], pytest.approx(m["val_top1"])) for m in epochs]


def test_a_run_mirrors_its_records_and_closes_the_writer(tmp_path, demo_tree, monkeypatch):
    """The wiring in a real run, with torch's SummaryWriter replaced by a recorder (tensorboard itself is
    an optional extra)."""
    import fastrefine.tensorboard as tb
    from fastrefine.chain import run_recipe
    from fastrefine.recipe import load_recipe
    writers = []

    class Recorder(FakeWriter):
        def __init__(self, folder, purge_step=None):
            super().__init__()
            self.folder, self.purge_step = folder, purge_step
            writers.append(self)

    monkeypatch.setattr(tb, "summary_writer_class", lambda: Recorder)
    p = write_recipe(tmp_path, demo_tree, name="tb", run={"tensorboard": True, "max_steps_per_epoch": 4,
                                                           "max_val_batches": 2},
                     rounds='[[rounds]]\nname = "r0"\nepochs = 2\n')
    run_recipe(load_recipe(p))
    rdir = tmp_path / "runs/tb/r0"
    (w,) = writers
    assert w.folder == str(rdir / "tensorboard") and w.purge_step is None and w.closed
    records = [json.loads(x) for x in (rdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in records if m["kind"] == "epoch"]
    assert [(s, v) for t, v, s in w.scalars if t == "val/top1"] == [(m["step"], m["val_top1"]) for m in epochs]
    steps = [m for m in records if m["kind"] == "step"]
    assert [v for t, v, s in w.scalars if t == "train/loss_step"] == [m["loss"] for m in steps] and steps
