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
    done.write_text('{"round": "r0", "val_to')  # a write cut short by a kill (older versions wrote in place)
    assert ckpt.read_json_marker(done) is None
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
    ckpt.save_atomic({"model": {}, "meta": {}}, target)
    before = target.read_bytes()

    def full(obj, fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunError, match="no space left on device") as e:
        ckpt.save_atomic({"model": {}, "meta": {}}, target)
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
    with pytest.raises(UsageError, match="weights-only"):
        from fastrefine.round import read_resume_state
        d = tmp_path / "r"
        d.mkdir()
        (d / "last.pt").write_bytes((finished / "runs/done/r0/best.pt").read_bytes())
        read_resume_state(d)


def test_best_is_written_atomically_in_the_weights_layout(finished):
    best = ckpt.load(finished / "runs/done/r1/best.pt")
    assert set(best) == {"model", "meta"}
