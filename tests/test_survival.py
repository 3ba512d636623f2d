"""What survives what, on the CPU: damaged markers and logs, killed saves, full disks, bad checkpoints and
recipes, error text that is printed as it is. Each test reproduces one case (docs/survival.md lists them)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastrefine import atomic
from fastrefine import checkpoint as ckpt
from fastrefine.chain import run_recipe
from fastrefine.cli import app, print_error
from fastrefine.errors import RunError, UsageError
from fastrefine.recipe import RecipeError, load_recipe
from fastrefine.runlog import read_metrics
from helpers import write_recipe

runner = CliRunner()


def recipe_text(tmp_path: Path, data: Path, *, name: str, rounds: str, extra: str = "") -> Path:
    return write_recipe(tmp_path, data, name=name, rounds=rounds, seed=1, run={"max_steps_per_epoch": 4},
                        tables=extra)


ONE = '\n[[rounds]]\nname = "r0"\nepochs = 1\n'
TWO = ONE + '\n[[rounds]]\nname = "r1"\nepochs = 1\n'


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_tree) -> Path:
    """A finished two-round run (round r1 refined by r0)."""
    tmp = tmp_path_factory.mktemp("finished")
    run_recipe(load_recipe(recipe_text(tmp, demo_tree, name="done", rounds=TWO)))
    return tmp


def test_damaged_done_marker_counts_as_absent(tmp_path, demo_tree, caplog):
    p = recipe_text(tmp_path, demo_tree, name="marker", rounds=ONE)
    run_recipe(load_recipe(p))
    done = tmp_path / "runs/marker/r0/done.json"
    done.write_text('{"round": "r0", "val_to')  # a write cut short by a kill (a file written in place)
    assert atomic.read_json_marker(done) is None
    res = runner.invoke(app, ["run", str(p), "--dry-run"])
    assert res.exit_code == 0 and "-> resume" in res.output  # last.pt decides, not the damaged marker
    rows = run_recipe(load_recipe(p))  # resumes after the final epoch: evaluates and writes the marker again
    assert rows[0]["round"] == "r0" and json.loads(done.read_text())["val_top1"] == rows[0]["val_top1"]
    assert "damaged" in caplog.text


def test_torn_metrics_line_is_skipped_and_the_run_finishes(tmp_path, demo_tree, caplog):
    p = recipe_text(tmp_path, demo_tree, name="torn", rounds=ONE.replace("epochs = 1", "epochs = 2"))
    r = load_recipe(p, ["rounds[0].epochs=1"])
    run_recipe(r)
    metrics = tmp_path / "runs/torn/r0/metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "step", "epoch": 1, "lo')  # a full disk in the middle of a line
    assert all(isinstance(m, dict) for m in read_metrics(metrics)) and "damaged" in caplog.text
    (tmp_path / "runs/torn/r0/done.json").unlink()
    rows = run_recipe(load_recipe(p), accept_changes=True)  # one more epoch: resumes, cuts the log back, appends, plots
    assert rows[0]["epochs"] == 2 and (tmp_path / "runs/torn/r0/curves.png").is_file()
    lines = metrics.read_text().splitlines()
    assert all(json.loads(x) for x in lines)  # the torn line is gone
    assert [m["epoch"] for m in map(json.loads, lines) if m["kind"] == "epoch"] == [0, 1]


def test_stale_temporaries_of_killed_saves_are_removed(tmp_path, demo_tree):
    p = recipe_text(tmp_path, demo_tree, name="stale", rounds=ONE)
    rdir = tmp_path / "runs/stale/r0"
    rdir.mkdir(parents=True)
    dead = rdir / ".last.pt.tmp-999999999"  # no such process
    dead.write_bytes(b"half a checkpoint")
    run_recipe(load_recipe(p))
    assert not dead.exists() and (rdir / "last.pt").is_file()
    assert not [f for f in rdir.iterdir() if ".tmp-" in f.name]


def test_disk_full_during_a_save_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    ckpt.write(target, {"model": {}, "meta": {}})
    before = target.read_bytes()

    def full(obj, fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunError, match="no space left on device") as e:
        ckpt.write(target, {"model": {}, "meta": {}})
    assert str(target) in str(e.value)
    assert target.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("kind", ["random", "bare_state_dict", "tensor", "pickle"])
def test_foreign_checkpoint_as_refinery_is_bad_input(tmp_path, demo_tree, kind):
    bad = tmp_path / f"{kind}.pt"
    if kind == "random":
        bad.write_bytes(os.urandom(4096))
    elif kind == "bare_state_dict":
        torch.save({"weight": torch.zeros(3)}, bad)
    elif kind == "tensor":
        torch.save(torch.zeros(3), bad)
    else:
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))
        bad.write_bytes(pickle.dumps({"model": Evil(), "meta": {}}))
    p = recipe_text(tmp_path, demo_tree, name="bad", rounds=ONE.replace('epochs = 1', f'epochs = 1\nrefinery = "{bad}"'))
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error:") and str(bad) in line and "weights_only" not in line and "\x1b[" not in line


def test_errors_print_as_plain_text(capsys):
    msg = ("DALI: [/opt/dali/reader.cc:42] Assert failed, shard dir[bold]x/a.tar; expected , got [1.0, 0.5]"
           "\nsecond line")
    print_error(msg)
    err = capsys.readouterr().err
    assert "[/opt/dali/reader.cc:42]" in err and "dir[bold]x" in err and "[1.0, 0.5]" in err
    assert err.count("\n") == 1 and "second line" in err


def test_recipe_problems_are_refused_before_anything_trains(tmp_path, demo_tree):
    unknown = recipe_text(tmp_path, demo_tree, name="u", rounds=TWO.replace('name = "r1"', 'name = "r1"\nmodel = "resnet5"'))
    res = runner.invoke(app, ["run", str(unknown), "--dry-run"])
    assert res.exit_code == 2 and "rounds[1].model" in res.output and "resnet50" in res.output
    missing = recipe_text(tmp_path, demo_tree, name="m",
                          rounds=TWO.replace('name = "r1"', 'name = "r1"\nrefinery = "nowhere/last.pt"'))
    res = runner.invoke(app, ["run", str(missing)])
    assert res.exit_code == 2 and "rounds[1].refinery" in res.output
    assert not (tmp_path / "runs/m/r0").exists()  # round 0 never started
    own = recipe_text(tmp_path, demo_tree, name="own", rounds=ONE.replace('epochs = 1', 'epochs = 1\nrefinery = "r0"'))
    res = runner.invoke(app, ["run", str(own), "--dry-run"])
    assert res.exit_code == 2 and "own refinery" in res.output
    for bad in ("loader.batch_size=1e20", "loader.batch_size=100000000000000000000", "run.seed=9223372036854775808"):
        with pytest.raises(RecipeError):
            load_recipe(unknown, [bad])
    latin = tmp_path / "latin.toml"
    latin.write_bytes("name = 'caf\xe9'".encode("latin-1"))
    res = runner.invoke(app, ["run", str(latin)])
    assert res.exit_code == 2 and "not UTF-8" in res.output


def test_rng_state_restores_from_any_map_location(finished):
    state = torch.load(finished / "runs/done/r0/last.pt", map_location="meta", weights_only=True)
    with pytest.raises(Exception):  # what a CUDA/meta-mapped ByteTensor does to torch directly
        torch.set_rng_state(state["rng"][0]["torch"])
    real = ckpt.load(finished / "runs/done/r0/last.pt")["rng"][0]
    ckpt.set_rng_state(real)
    a = torch.rand(3)
    ckpt.set_rng_state({k: (v.to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in real.items()})
    assert torch.equal(a, torch.rand(3))
    assert ckpt.rank_rng_state(state["rng"], 1) is None  # a one-process run saved rank 0's only


def test_weights_only_checkpoint_cannot_be_resumed(finished, tmp_path):
    last = tmp_path / "last.pt"
    last.write_bytes((finished / "runs/done/r0/best.pt").read_bytes())
    with pytest.raises(UsageError, match="weights-only"):
        ckpt.load_state(last, class_names=[], num_classes=10)


def test_best_is_written_atomically_in_the_weights_layout(finished):
    best = ckpt.load(finished / "runs/done/r1/best.pt")
    assert set(best) == {"format", "version", "model", "meta"} and best["version"] == ckpt.VERSION


# ------------------------------------------------------------------------------- checkpoint format

def _rewritten(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint `src` with some entries of its stored dict changed (meta as a plain dict)."""
    state = ckpt.load(src, raw_meta=True)
    for key, value in changes.items():
        if key.startswith("meta_"):
            state["meta"] = {**state["meta"], key[5:]: value}
        else:
            state[key] = value
    ckpt.write(dst, state)
    return dst


def test_checkpoints_record_the_class_names(finished, demo_tree):
    names = tuple(sorted(d.name for d in (demo_tree / "train").iterdir() if d.is_dir()))
    for f in ("r0/last.pt", "r0/best.pt", "r1/last.pt"):
        meta = ckpt.load(finished / "runs/done" / f)["meta"]
        assert meta.class_names == names and meta.num_classes == len(names)


def test_refinery_trained_on_other_classes_is_refused(tmp_path, demo_tree):
    """A class folder renamed (same count, a new sorted order) after the refinery round trained: the
    refined round is refused, naming the refinery file and the first class that differs."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo_tree, data)
    p = write_recipe(tmp_path, data, name="perm", rounds=ONE, seed=1, run={"max_steps_per_epoch": 2})
    run_recipe(load_recipe(p))
    first = sorted(d.name for d in (data / "train").iterdir())[0]
    for split in ("train", "val"):
        (data / split / first).rename(data / split / "zz-renamed")
    p2 = write_recipe(tmp_path, data, name="perm", rounds=TWO, seed=1, run={"max_steps_per_epoch": 2})
    res = runner.invoke(app, ["run", str(p2)])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    last = tmp_path / "runs/perm/r0/last.pt"
    assert str(last) in line and f"class 0 is {first!r} in the checkpoint" in line and str(data) in line
    assert not (tmp_path / "runs/perm/r1/last.pt").exists()


def test_resume_with_other_classes_is_refused(tmp_path, demo_tree, finished):
    p = recipe_text(tmp_path, demo_tree, name="other", rounds=ONE.replace("epochs = 1", "epochs = 2"))
    names = ckpt.load(finished / "runs/done/r0/last.pt")["meta"].class_names
    swapped = [names[1], names[0], *names[2:]]
    last = _rewritten(finished / "runs/done/r0/last.pt", tmp_path / "runs/other/r0/last.pt",
                      meta_class_names=swapped)
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert str(last) in line and f"class 0 is {names[1]!r} in the checkpoint, {names[0]!r} in the data" in line
    assert ckpt.load(last)["epoch"] == 1  # left as it was


@pytest.mark.parametrize("change", [{"meta": {"model_name": "tiny_cnn"}}, {"meta": ["not", "a", "dict"]},
                                    {"meta_num_classes": "ten"}, {"meta_model_options": None},
                                    {"meta_class_names": ["a", "b"]}, {"meta_model_name": "nonesuch"},
                                    {"version": 99}, {"format": None}])
def test_bad_meta_or_format_is_bad_input_naming_the_file(tmp_path, demo_tree, finished, change):
    bad = _rewritten(finished / "runs/done/r0/best.pt", tmp_path / "bad.pt", **change)
    p = recipe_text(tmp_path, demo_tree, name="badmeta", rounds=ONE.replace('epochs = 1', f'epochs = 1\nrefinery = "{bad}"'))
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error:") and str(bad) in line and "Traceback" not in res.output


def test_checkpoint_without_format_version_is_refused_in_one_line(tmp_path, finished):
    state = torch.load(finished / "runs/done/r0/best.pt", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({"model": state["model"], "meta": state["meta"]}, old)  # the layout without format and version
    with pytest.raises(UsageError, match=f"{old}: a checkpoint without fastrefine's format version"):
        ckpt.load(old)


def test_load_model_rebuilds_what_was_saved(tmp_path):
    from fastrefine.models import create_model
    model = create_model("tiny_cnn", num_classes=3)
    path = tmp_path / "w.pt"
    ckpt.save_weights(path, model=model, meta=ckpt.Meta.of("tiny_cnn", num_classes=3, class_names=["a", "b", "c"]))
    again, meta = ckpt.load_model(path, class_names=["a", "b", "c"], num_classes=3)
    assert meta.class_names == ("a", "b", "c")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(UsageError, match="class 1 is 'b' in the checkpoint, 'c' in the data"):
        ckpt.load_model(path, class_names=["a", "c", "b"], num_classes=3)
    with pytest.raises(UsageError, match="has 3 classes, the data has 4"):
        ckpt.load_model(path, class_names=[], num_classes=4)


# ------------------------------------------------------------------------------ background saves

_KILLED_SAVE = """
import sys, time
from pathlib import Path
import fastrefine.checkpoint as ckpt
from fastrefine.atomic import atomic_write
from fastrefine.chain import run_recipe
from fastrefine.recipe import load_recipe

real, marker = ckpt.write, Path(sys.argv[2])

def write(path, layout):
    if Path(path).name == "last.pt" and layout["epoch"] == 2:  # the second save hangs half-written
        def fill(fh):
            fh.write(b"half a checkpoint")
            fh.flush()
            marker.write_text("writing")
            time.sleep(600)
        atomic_write(path, fill)
    real(path, layout)

ckpt.write = write
run_recipe(load_recipe(sys.argv[1]))
"""


def test_kill_during_a_background_save_keeps_the_old_file_and_the_run_resumes(tmp_path, demo_tree):
    """The save of epoch 2 is written by a background thread that is killed (-9) half-way, while the
    training thread has gone on into epoch 3: last.pt still holds epoch 1, and the rerun resumes from it."""
    import signal
    import subprocess
    import sys
    import time
    p = recipe_text(tmp_path, demo_tree, name="bg", rounds=ONE.replace("epochs = 1", "epochs = 3"))
    marker, rdir = tmp_path / "writing", tmp_path / "runs/bg/r0"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(p), str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            epochs = [m["epoch"] for m in read_metrics(rdir / "metrics.jsonl") if m.get("kind") == "epoch"] \
                if (rdir / "metrics.jsonl").is_file() else []
            if marker.is_file() and 2 in epochs:  # epoch 3 trained while epoch 2's save was being written
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the run never reached epoch 3 during the save: {proc.stderr.read()[-2000:] if proc.poll() is not None else 'timeout'}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [f.name for f in rdir.iterdir() if ".tmp-" in f.name] == [f".last.pt.tmp-{proc.pid}"]
    assert ckpt.load(rdir / "last.pt")["epoch"] == 1  # the old file, whole
    rows = run_recipe(load_recipe(p))
    assert rows[0]["epochs"] == 3 and ckpt.load(rdir / "last.pt")["epoch"] == 3
    assert not [f for f in rdir.iterdir() if ".tmp-" in f.name]
    epochs = [m["epoch"] for m in read_metrics(rdir / "metrics.jsonl") if m.get("kind") == "epoch"]
    assert epochs == [0, 1, 2]


def test_saver_writes_a_copy_and_raises_a_failed_write_in_the_training_thread(tmp_path, monkeypatch):
    from fastrefine.distributed import Dist
    from fastrefine.models import create_model
    from fastrefine.saver import Saver
    model = create_model("tiny_cnn", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    meta = ckpt.Meta.of("tiny_cnn", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Saver(tmp_path, dist=Dist()) as saver:
        assert saver.save(model=model, optimizer=opt, scaler=scaler, meta=meta, epoch=1, step=4, val_top1=0.5)
        with torch.no_grad():  # training goes on at once: the live weights change under the write
            for p in model.parameters():
                p.add_(1.0)
        assert not saver.save(model=model, optimizer=opt, scaler=scaler, meta=meta, epoch=2, step=8, val_top1=0.25)
        saver.join()
        best = ckpt.load(tmp_path / "best.pt")["model"]
        assert all(torch.equal(best[k], before[k]) for k in before)  # epoch 1's weights, not the changed ones
        assert ckpt.load(tmp_path / "last.pt")["best_top1"] == 0.5 and saver.best_top1 == 0.5

        def full(path, layout):
            raise RunError(f"{path}: no space left on device while writing it")
        monkeypatch.setattr(ckpt, "write", full)
        saver.save(model=model, optimizer=opt, scaler=scaler, meta=meta, epoch=3, step=12, val_top1=None)
        with pytest.raises(RunError, match="last.pt: no space left"):
            saver.join()
    assert ckpt.load(tmp_path / "last.pt")["epoch"] == 2
