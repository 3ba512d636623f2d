"""The CLI as a person uses it: --help everywhere, exit codes 0/1/2, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastrefine.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["run"], ["convert"], ["convert", "imagenet"], ["convert", "folder"],
                                  ["bench"], ["doctor"]])
def test_help_everywhere(args):
    res = runner.invoke(app, args + ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_dry_run_prints_resolved_recipe():
    res = runner.invoke(app, ["run", str(ROOT / "recipes/quickstart.toml"), "--dry-run", "--set", "optim.lr=0.4"])
    assert res.exit_code == 0, res.output
    assert "lr = 0.4" in res.output and "[[rounds]]" in res.output and "refinery refinery" in res.output
    # the plan shows each round's lr resolved for this many processes: 0.4 is for 256 images, a step has 128
    assert "lr 0.2," in res.output and "seed 1 (from labels)" in res.output


def test_misspelt_key_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "recipes/quickstart.toml").read_text().replace("batch_size", "batch_szie"))
    res = subprocess.run([sys.executable, "-m", "fastrefine", "run", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "loader.batch_szie: unknown key" in res.stderr and str(bad) in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_override_exits_2():
    res = runner.invoke(app, ["run", str(ROOT / "recipes/quickstart.toml"), "--dry-run", "--set", "optim.lr=-1"])
    assert res.exit_code == 2


def test_missing_recipe_and_bad_usage_exit_2(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "recipe file not found" in res.output
    res = runner.invoke(app, ["run"])  # missing argument: typer's own usage error
    assert res.exit_code == 2


def test_bad_input_exits_2_and_runtime_failure_exits_1(tmp_path, demo_tree):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[run]
device = "cpu"
out = "{tmp_path}/runs"
[data]
path = "{demo_tree}"
[loader]
backend = "torch"
batch_size = 64
[model]
name = "tiny_cnn"
[[rounds]]
name = "r0"
epochs = 1
refinery = "{tmp_path}/missing.pt"
""")
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 2 and "missing.pt" in res.output  # a missing file is a usage error
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    recipe.write_text(recipe.read_text().replace("missing.pt", "broken.pt"))
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 2 and "broken.pt: not a readable fastrefine checkpoint" in res.output  # bad input
    recipe.write_text(recipe.read_text().replace(f'refinery = "{tmp_path}/broken.pt"', ""))
    res = runner.invoke(app, ["run", str(recipe), "--set", "optim.lr=1e30", "--set", "run.log_every=1",
                              "--set", "schedule.kind='constant'", "--set", "run.max_steps_per_epoch=2"])
    assert res.exit_code == 1 and "loss became" in res.output  # a failure while running


def test_doctor_reports_backends():
    res = subprocess.run([sys.executable, "-m", "fastrefine", "doctor", "--json", "/dev/stdout"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import json
    report = json.loads(res.stdout[res.stdout.index("\n{") + 1:])
    assert report["backends"]["torch"]["works"]
    # this project's machines install DALI and FFCV; doctor must find both working (CPU mode here)
    assert report["backends"]["dali"]["works"], report["backends"]["dali"]
    assert report["backends"]["ffcv"]["works"], report["backends"]["ffcv"]
    if not report["cuda_available"]:
        assert "CPU-only" in report["backends"]["dali"]["detail"]


def test_json_reports_go_atomically_to_files_and_straight_to_streams(tmp_path):
    """`--json PATH`: a file is replaced whole (temporary + rename); a FIFO (like /dev/stdout) is written
    as a stream, never renamed over."""
    import json
    import os
    import threading

    from fastrefine.output import write_json_report
    target = tmp_path / "report.json"
    target.write_text("old")
    write_json_report(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]          # no temporary left
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(text=fifo.read_text()))
    reader.start()
    write_json_report(fifo, {"b": 2})
    reader.join(timeout=30)
    assert json.loads(got["text"]) == {"b": 2} and fifo.is_fifo()
