"""`fastrefine run RECIPE --estimate`: timed on real demo images, projected from a throughput, writes nothing."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fastrefine.cli import app
from fastrefine.estimate import estimate_recipe, render
from fastrefine.recipe import load_recipe
from helpers import write_recipe

runner = CliRunner()

ROUNDS = """
[[rounds]]
name = "labels"
epochs = 2
[[rounds]]
name = "refined"
epochs = 3
"""
PROGRESSIVE = """
[loader.progressive]
start = 32
end = 48
from_epoch = 0
to_epoch = 1
multiple = 16
"""


@pytest.fixture
def recipe_path(tmp_path, demo_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # [loader.progressive] must follow the [loader] table: append it after write_recipe's [optim]
    return write_recipe(tmp_path, demo_tree, name="est", rounds=ROUNDS, tables=PROGRESSIVE, run={"precision": "fp32"})


def test_estimate_times_every_round_and_writes_nothing(recipe_path, tmp_path):
    # what `run --estimate` prints (the CLI's wiring is in test_throughput_projects_without_timing), with
    # fewer timed steps than its default 2 + 5 to keep the test short
    out = "\n".join(render(estimate_recipe(load_recipe(recipe_path), steps=2, warmup=1, val_batches=1)))
    assert "timed on this node" in out and "torch loader" in out
    # 400 train images, batch 32 -> 12 steps an epoch; 200 val images -> 7 batches a pass
    assert "400 train images, 384 per epoch = 12 steps" in out and "7 batches of 32 at 48 px" in out
    for name in ("labels", "refined"):
        assert f"round {name}: tiny_cnn" in out
    # progressive resizing: 32 px at epoch 0, 48 from epoch 1
    assert "(32 px x 1 ep, 48 px x 1 ep)" in out and "(32 px x 1 ep, 48 px x 2 ep)" in out
    per_step = [float(x) for x in re.findall(r"([0-9.]+) s/step", out)]
    assert len(per_step) == 4 and all(0 < s < 30 for s in per_step)
    assert "refinery labels (tiny_cnn, random weights)" in out and "the refinery's own val pass" in out
    assert re.search(r"chain: 2 round\(s\), 5 epochs, [0-9.]+ (min|h)", out)
    assert not (tmp_path / "runs").exists()          # no run folder, no checkpoint, no record


def test_throughput_projects_without_timing(recipe_path, tmp_path):
    est = estimate_recipe(load_recipe(recipe_path), throughput=64.0, processes=2)
    a = est["assumed"]
    # 2 processes: 200 images each, 6 steps of 32; a global step of 64 images at 64 img/s takes 1 s
    assert a["mode"] == "projected" and a["steps_per_epoch"] == 6 and a["global_batch"] == 64
    assert all(t.seconds_per_step == pytest.approx(1.0) for r in est["rounds"] for t in r.timings)
    assert est["seconds"] == pytest.approx(6 * (2 + 3))
    res = runner.invoke(app, ["run", str(recipe_path), "--estimate", "--throughput", "64", "--processes", "2"])
    assert res.exit_code == 0, res.output
    assert "projected from 64 images/s" in res.output and "1.000 s/step" in res.output
    assert "not included: val passes" in res.output
    assert not (tmp_path / "runs").exists()


def test_estimate_refuses_to_run_under_torchrun(recipe_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = runner.invoke(app, ["run", str(recipe_path), "--estimate"])
    assert res.exit_code == 2 and "--processes N" in res.output, res.output


def test_estimate_options_need_estimate(recipe_path):
    res = runner.invoke(app, ["run", str(recipe_path), "--throughput", "100"])
    assert res.exit_code == 2 and "--estimate" in res.output
    res = runner.invoke(app, ["run", str(recipe_path), "--estimate", "--throughput", "0"])
    assert res.exit_code == 2 and "--throughput" in res.output


def test_max_steps_per_epoch_is_what_an_epoch_costs(recipe_path):
    est = estimate_recipe(load_recipe(recipe_path, ["run.max_steps_per_epoch=5", "run.max_val_batches=2"]),
                          throughput=320.0)
    assert est["assumed"]["steps_per_epoch"] == 5 and est["assumed"]["val_batches_per_pass"] == 2
    assert est["seconds"] == pytest.approx(5 * 0.1 * 5)
