"""Small helpers shared by the tests: a recipe file on the demo images, a simulated kill, and a conversion
in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def write_recipe(tmp_path: Path, data: Path, *, name: str, rounds: str, device: str = "cpu", seed: int = 3,
                 workers: int = 0, run: dict | None = None, tables: str = "") -> Path:
    """TMP_PATH/NAME.toml: tiny_cnn on `data` at 32 px with the torch loader, run folder TMP_PATH/runs.
    `run` adds or replaces [run] keys; `tables` is more TOML after the [optim] table; `rounds` the
    [[rounds]] tables."""
    settings = {"name": name, "out": f"{tmp_path}/runs", "device": device, "seed": seed, "log_every": 2,
                "progress": False, **(run or {})}
    run_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    p = tmp_path / f"{name}.toml"
    p.write_text(f"""
[run]
{run_lines}
[data]
path = "{data}"
[loader]
backend = "torch"
batch_size = 32
resolution = 32
workers = {workers}
val_crop_ratio = 1.0
[model]
name = "tiny_cnn"
[optim]
lr = 0.1
{tables}
{rounds}
""")
    return p


class Killed(RuntimeError):
    """Stands in for a kill -9 in the middle of an epoch (raised from inside the step)."""


def die_after(monkeypatch, steps: int) -> None:
    """Make the trainer's step raise Killed after `steps` steps, as if the process died there."""
    import fastrefine.engine as engine
    real, count = engine.train_step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        if count[0] > steps:
            raise Killed(f"killed after {steps} steps")
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "train_step", step)


def convert_in_child(src: Path, out: Path, *, timeout: int = 180, **options) -> None:
    """`convert_dataset(src, out, layout="folder", **options)` in a child process (its pool spawns) with a
    time limit, so that a converter that hangs fails the test instead of freezing the suite; a failure
    fails the test with the child's stderr."""
    code = (f"from fastrefine.convert import convert_dataset\n"
            f"convert_dataset(src={str(src)!r}, out={str(out)!r}, layout='folder', **{options!r})\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"convert_dataset of {src} did not finish within {timeout} s")
    if done.returncode != 0:
        pytest.fail(f"convert_dataset failed:\n{done.stderr[-3000:]}")
