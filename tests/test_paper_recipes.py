"""The paper's ImageNet recipes: each resolves (`fastrefine run R --dry-run`) and each runs a few steps.

The smoke runs swap ImageNet for the Fashion-MNIST demo tree at 64 px, cut every epoch to 2 steps of
8 images, run one epoch per round, and point the "ResNet-50 refinery" rounds at the checkpoint of
the resnet50 smoke run. Big chains are cut to their first rounds (the later ones are the same code).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastrefine.cli import app
from fastrefine.recipe import load_recipe
import math

from fastrefine import checkpoint as ckpt
from fastrefine.chain import run_recipe

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["alexnet", "alexnet_resnet50", "mobilenet", "mobilenet_025", "vgg19", "resnet50"]
DARKNET = ["darknet19", "darknet19_paper"]   # the rapid chain (the mission's command) and the paper's regime
ALL = PAPER + [f"{n}_fast" for n in PAPER] + DARKNET
# rounds run in the smoke test: the first two of a chain; vgg19 (140 M parameters, 1.7 GB of
# checkpoints a round) only its refined round
SMOKE_ROUNDS = {"alexnet": 2, "alexnet_fast": 2}
ONLY = {"vgg19": "by-resnet50", "vgg19_fast": "by-resnet50"}
runner = CliRunner()


def _path(name: str) -> Path:
    return ROOT / "recipes" / f"{name}.toml"


@pytest.fixture(scope="module")
def standin_checkpoint(tmp_path_factory) -> Path:
    """A small real checkpoint (weights layout) that the dry runs point the ResNet-50 refineries at."""
    from fastrefine.models import create_model
    path = tmp_path_factory.mktemp("standin") / "refinery.pt"
    model = create_model("tiny_cnn", num_classes=1000)
    ckpt.save_weights(path, model=model, meta=ckpt.Meta.of("tiny_cnn", num_classes=1000, round="standin", epoch=1))
    return path


@pytest.mark.parametrize("name", ALL)
def test_recipe_resolves_with_dry_run(name, standin_checkpoint):
    # a refinery checkpoint that does not exist is refused up front (exit 2, naming the key) ...
    sets = [f"rounds[{k}].refinery={json.dumps(str(standin_checkpoint))}"
            for k, rd in enumerate(load_recipe(_path(name)).rounds) if rd.refinery.endswith(".pt")]
    if sets:
        res = runner.invoke(app, ["run", str(_path(name)), "--dry-run"])
        assert res.exit_code == 2 and "refinery" in res.output and "not found" in res.output, res.output
    # ... and the recipe resolves once it exists
    args = ["run", str(_path(name)), "--dry-run"] + [a for s in sets for a in ("--set", s)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert 'path = "data/imagenet-fast"' in res.output and "rounds:" in res.output
    text = _path(name).read_text()
    assert "NOT RUN HERE" in text and "Reported" in text  # the header says what the paper reported


def test_headers_state_the_papers_figures():
    figures = {"alexnet": "59.3", "alexnet_resnet50": "67.2", "mobilenet": "73.39", "mobilenet_025": "55.59",
               "vgg19": "75.46", "resnet50": "76.5", "darknet19_paper": "74.47"}
    for name, fig in figures.items():
        assert fig in _path(name).read_text(), name


def test_darknet19_is_the_rapid_chain_its_header_describes():
    text = _path("darknet19").read_text()
    assert "ACCURACY NOT MEASURED" in text and "--estimate" in text and "rn50_32_epochs.yaml" in text
    assert "darknet19_paper.toml" in text
    r = load_recipe(_path("darknet19"))
    assert [rd.epochs for rd in r.rounds] == [32, 32] and r.rounds[1].refinery == r.rounds[0].name  # "previous"
    p = r.loader.progressive
    assert (p.start, p.end, p.from_epoch, p.to_epoch) == (160, 192, 23, 27) and r.loader.val_resolution == 256
    assert r.loader.batch_size * 8 == 1024 and r.optim.lr_scaling == "linear"
    from fastrefine.schedule import round_schedule
    assert round_schedule(r, 0, world_size=8).peak == pytest.approx(0.4)     # 0.1 per 256, at a global batch of 1,024
    assert r.schedule.kind == "triangular" and r.schedule.peak_epoch == 2   # linear ramp, warm-up included
    assert [rd.label_smoothing for rd in r.rounds] == [0.1, 0.0]            # label smoothing on labels only
    paper = load_recipe(_path("darknet19_paper"))
    assert [rd.epochs for rd in paper.rounds] == [90, 90] and paper.schedule.kind == "step"


def _overrides(recipe_name: str, demo: Path, out: Path, refinery: Path | None) -> list[str]:
    r = load_recipe(_path(recipe_name))
    sets = [f"data.path={demo}", "run.device=cpu", "loader.backend=torch", "loader.workers=0", "loader.batch_size=8",
            "loader.resolution=64", "loader.val_resolution=64", "loader.val_crop_ratio=1.0",
            "loader.progressive.start=64", "loader.progressive.end=64",
            "run.max_steps_per_epoch=2", "run.max_val_batches=1", "run.compile=false", "run.progress=false",
            f"run.out={out}", "run.log_every=1"]
    for k, rd in enumerate(r.rounds):
        sets.append(f"rounds[{k}].epochs=1")
        if rd.refinery.endswith(".pt"):
            assert refinery is not None
            sets.append(f"rounds[{k}].refinery={json.dumps(str(refinery))}")
    return sets


def _smoke(name: str, demo: Path, out: Path, refinery: Path | None = None) -> list[dict]:
    recipe = load_recipe(_path(name), _overrides(name, demo, out, refinery))
    if name in SMOKE_ROUNDS:
        recipe = dataclasses.replace(recipe, rounds=recipe.rounds[:SMOKE_ROUNDS[name]])
    rows = run_recipe(recipe, only=ONLY.get(name))
    for row in rows:
        assert row["val_top1"] is not None and 0.0 <= row["val_top1"] <= 1.0
    for row in rows:
        metrics = [json.loads(line) for line in
                   (out / recipe.run.name / row["round"] / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if m["kind"] == "step"]
        assert len(steps) == 2 and all(math.isfinite(m["loss"]) for m in steps)  # two finite steps
    return rows


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("paper")


@pytest.fixture(scope="module")
def resnet50_refinery(demo_tree, smoke_out) -> Iterator[Path]:
    """The resnet50 smoke run; its round 'labels' stands in for the ImageNet ResNet-50 refinery."""
    rows = _smoke("resnet50", demo_tree, smoke_out)
    assert [r["round"] for r in rows] == ["labels", "refined"]
    assert rows[1]["refinery"].startswith("labels")
    yield smoke_out / "resnet50" / "labels" / "last.pt"
    shutil.rmtree(smoke_out / "resnet50", ignore_errors=True)


def test_resnet50_smoke(resnet50_refinery):
    assert resnet50_refinery.is_file()


@pytest.mark.parametrize("name", [n for n in ALL if n != "resnet50"])
def test_recipe_smoke(name, demo_tree, smoke_out, resnet50_refinery):
    try:
        rows = _smoke(name, demo_tree, smoke_out, resnet50_refinery)
    finally:  # checkpoints of ImageNet-size models: hundreds of MB each, not kept once checked
        shutil.rmtree(smoke_out / name, ignore_errors=True)
    recipe = load_recipe(_path(name))
    expected = [r.name for r in recipe.rounds][:SMOKE_ROUNDS.get(name, len(recipe.rounds))]
    if name in ONLY:
        expected = [ONLY[name]]
    assert [r["round"] for r in rows] == expected
    for row, rd in zip(rows, [r for r in recipe.rounds if r.name in expected]):
        if rd.refinery.endswith(".pt"):
            assert "resnet50" in row["refinery"]    # the stand-in ResNet-50 refined this round
