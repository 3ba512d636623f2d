"""Small helpers shared by the trainer tests: a recipe file on the demo images, and a simulated kill."""

from __future__ import annotations

import json
from pathlib import Path


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
