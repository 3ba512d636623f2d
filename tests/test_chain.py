"""The whole trainer on real demo images, on the CPU: chains, skip, exact resume, NaN stop, DDP, darknet19."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrefine import checkpoint as ckpt
from fastrefine.errors import RunError
from fastrefine.precision import resolve_precision
from fastrefine.recipe import load_recipe
from fastrefine.chain import run_recipe
from helpers import Killed, die_after, write_recipe

ROOT = Path(__file__).resolve().parents[1]
ONE_ROUND = """
[[rounds]]
name = "r0"
epochs = 1
"""


TWO_ROUNDS = """
[[rounds]]
name = "r0"
epochs = 2
[[rounds]]
name = "r1"
epochs = 1
"""


def make_recipe(tmp_path: Path, data: Path, *, name="t", extra="", rounds=None) -> Path:
    return write_recipe(tmp_path, data, name=name, rounds=rounds or TWO_ROUNDS, tables=extra)


def final_weights(run_dir: Path, round_name: str) -> dict:
    return ckpt.load(run_dir / round_name / "last.pt")["model"]


def test_chain_records_and_skip(tmp_path, demo_tree):
    recipe = load_recipe(make_recipe(tmp_path, demo_tree))
    rows = run_recipe(recipe)
    run = tmp_path / "runs" / "t"
    assert [r["round"] for r in rows] == ["r0", "r1"]
    for rd in ("r0", "r1"):
        d = run / rd
        for f in ("recipe.toml", "run.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "done.json"):
            assert (d / f).is_file(), f"{rd}/{f} missing"
        info = json.loads((d / "run.json").read_text())
        assert info["backend"] == "torch" and info["git"]
        assert info["precision"] == resolve_precision("auto", torch.device("cpu")).name
    m1 = [json.loads(line) for line in (run / "r1" / "metrics.jsonl").read_text().splitlines()]
    kinds = [m["kind"] for m in m1]
    assert kinds[0] == "refinery" and "epoch" in kinds and "step" in kinds
    assert [m for m in m1 if m["kind"] == "epoch"][-1]["val_top1"] > 0
    # the refinery's val accuracy recorded in round 1 is round 0's final val accuracy (same weights, same data)
    r0_last = [json.loads(x) for x in (run / "r0" / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["kind"] == "epoch"][-1]
    assert r0_last["val_top1"] > 0.15      # 10 classes, 200 val images: chance is 0.10 +/- 0.02
    assert m1[0]["val_top1"] == pytest.approx(r0_last["val_top1"], abs=1e-6)
    assert rows[1]["refinery_val_top1"] == pytest.approx(r0_last["val_top1"], abs=1e-6)
    assert "| r1 |" in (run / "summary.md").read_text()
    # a rerun skips finished rounds and writes nothing new
    before = (run / "r1" / "metrics.jsonl").read_text()
    rows2 = run_recipe(recipe)
    assert [r["val_top1"] for r in rows2] == [r["val_top1"] for r in rows]
    assert (run / "r1" / "metrics.jsonl").read_text() == before


def test_resume_after_kill_matches_uninterrupted(tmp_path, demo_tree, monkeypatch):
    rounds = """
[[rounds]]
name = "r0"
epochs = 3
"""
    straight = load_recipe(make_recipe(tmp_path, demo_tree, name="straight", rounds=rounds))
    run_recipe(straight)
    killed = load_recipe(make_recipe(tmp_path, demo_tree, name="killed", rounds=rounds))
    steps_per_epoch = 400 // 32  # demo_tree: 10 classes x 40 train images
    with monkeypatch.context() as m:
        die_after(m, steps_per_epoch + 4)  # dies in the middle of epoch 2
        with pytest.raises(Killed):
            run_recipe(killed)
    assert ckpt.load(tmp_path / "runs/killed/r0/last.pt")["epoch"] == 1
    run_recipe(killed)  # resumes automatically
    # the resumed log reads as if the run had never stopped: no records of the discarded partial epoch
    log_a = [json.loads(x) for x in (tmp_path / "runs/straight/r0/metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "runs/killed/r0/metrics.jsonl").read_text().splitlines()]
    assert [(m["kind"], m.get("epoch"), m.get("step")) for m in log_a] == \
        [(m["kind"], m.get("epoch"), m.get("step")) for m in log_b]
    a = final_weights(tmp_path / "runs/straight", "r0")
    b = final_weights(tmp_path / "runs/killed", "r0")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, demo_tree):
    p = make_recipe(tmp_path, demo_tree, name="nan", rounds=ONE_ROUND)
    run_recipe(load_recipe(p))
    good = ckpt.load(tmp_path / "runs/nan/r0/last.pt")
    (tmp_path / "runs/nan/r0/done.json").unlink()  # ask for one more epoch of the same round
    with pytest.raises(RunError, match="loss became"):
        run_recipe(load_recipe(p, ["rounds[0].epochs=2", "optim.lr=1e30", "schedule.kind='constant'",
                                   "run.log_every=1"]), accept_changes=True)
    after = ckpt.load(tmp_path / "runs/nan/r0/last.pt")
    assert after["epoch"] == 1
    assert all(torch.equal(good["model"][k], after["model"][k]) for k in good["model"])


def test_restart_keeps_the_old_folder(tmp_path, demo_tree):
    p = make_recipe(tmp_path, demo_tree, name="again", rounds=ONE_ROUND)
    r = load_recipe(p, ["run.max_steps_per_epoch=2", "run.max_val_batches=1"])
    run_recipe(r)
    run_recipe(r, restart=True)
    old = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith("again.old-")]
    assert len(old) == 1 and (old[0] / "r0" / "last.pt").is_file()
    assert (tmp_path / "runs/again/r0/done.json").is_file()


def test_darknet19_recipe_smoke(tmp_path, demo_tree):
    r = load_recipe(ROOT / "recipes/darknet19.toml", [
        f"data.path={demo_tree}", f"run.out={tmp_path}/runs", "run.compile=false", "run.progress=false",
        "loader.backend=torch", "loader.resolution=32", "loader.val_resolution=32", "loader.batch_size=8",
        "loader.progressive.start=32", "loader.progressive.end=32",
        "loader.workers=0", "run.max_steps_per_epoch=2", "run.max_val_batches=1",
        "rounds[0].epochs=1", "rounds[1].epochs=1"])
    rows = run_recipe(r)
    assert [x["model"] for x in rows] == ["darknet19", "darknet19"]
    assert rows[1]["refinery"].startswith("labels")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, demo_tree):
    rounds = """
[[rounds]]
name = "r0"
epochs = 1
[[rounds]]
name = "r1"
epochs = 1
"""
    p = make_recipe(tmp_path, demo_tree, name="ddp", rounds=rounds)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fastrefine", "--quiet", "run", str(p)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    epochs = [json.loads(x) for x in (run / "r1" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "epoch"]
    assert len(epochs) == 1  # rank 0 alone writes records
    info = json.loads((run / "r1" / "run.json").read_text())
    assert info["world_size"] == 2
    # train: each rank takes an equal share and drops its partial batch; val: every image exactly once
    assert epochs[0]["train_images"] == 2 * (400 // 2 // 32 * 32)
    assert epochs[0]["val_images"] == 200
    done = json.loads((run / "r1" / "done.json").read_text())
    assert done["val_top1"] > 0.15  # 10 classes: chance is 0.10
    val = [json.loads(x) for x in (run / "r1" / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["kind"] == "refinery"][0]
    assert val["val_top1"] == pytest.approx(done["refinery_val_top1"])
    # every rank saved its own RNG state (distinct streams), and a resume restores each rank's
    rng = ckpt.load(run / "r1" / "last.pt")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_student_and_refinery(tmp_path, demo_tree):
    """torch.compile of the student and, on its own, of the refinery (slow cold on the CPU: one test)."""
    p = make_recipe(tmp_path, demo_tree, name="compiled")
    r = load_recipe(p, ["run.compile=true", "run.max_steps_per_epoch=3", "rounds[0].epochs=1"])
    rows = run_recipe(r)
    assert len(rows) == 2 and all(0 <= row["val_top1"] <= 1 for row in rows)
    # static shapes, eager evaluation: no compile for the val batches (200 val images in batches of 32,
    # the last one short) nor for the refinery's own evaluation, which compiled the refinery at the val
    # batch, then the short batch, then a dynamic-shape graph (3 frames before any training step); the
    # record says how many frames each round compiled and what it cost (torch 2.14 on the CPU measured
    # 2 and 1 frames: Dynamo's counts vary with its cache, hence the bound)
    done = [json.loads((tmp_path / f"runs/compiled/{n}/done.json").read_text()) for n in ("r0", "r1")]
    assert all(1 <= d["compiles"]["frames"] <= 2 for d in done[:1]) and done[1]["compiles"]["frames"] <= 2, \
        [d["compiles"] for d in done]
    assert done[0]["compiles"]["frame_compile_s"] > 0 and done[0]["compiles"]["graphs"] >= 1
    # the checkpoint holds plain (uncompiled) parameter names, loadable without compile
    state = ckpt.load(tmp_path / "runs/compiled/r1/last.pt")["model"]
    assert not any(k.startswith("_orig_mod") for k in state)


def test_compare_runs_tool(tmp_path, demo_tree):
    p = make_recipe(tmp_path, demo_tree, name="cmp", rounds=ONE_ROUND)
    run_recipe(load_recipe(p, ["run.max_steps_per_epoch=2", "run.max_val_batches=1"]))
    res = subprocess.run([sys.executable, str(ROOT / "tools/compare_runs.py"), str(tmp_path / "runs/cmp"),
                          "--markdown", "--plot", str(tmp_path / "cmp.png")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "| cmp/r0 | tiny_cnn |" in res.stdout and (tmp_path / "cmp.png").stat().st_size > 1000
    res = subprocess.run([sys.executable, str(ROOT / "tools/compare_runs.py"), str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not a folder" in res.stderr


@pytest.mark.slow
def test_batch_mode_refinery_is_evaluated_on_shuffled_val_batches(tmp_path, demo_tree):
    """BN batch statistics on class-sorted val batches (each nearly one class) say little about the refinery:
    its own val accuracy is measured on shuffled batches, and logged as such."""
    from fastrefine.engine import evaluate
    from fastrefine.loaders import build
    from fastrefine.refinery import Refinery
    from fastrefine.checkpoint import load_model
    rounds = '\n[[rounds]]\nname = "r0"\nepochs = 5\n[[rounds]]\nname = "r1"\nepochs = 1\n'
    p = make_recipe(tmp_path, demo_tree, name="bnbatch", rounds=rounds, extra='[refinery]\nbn = "batch"')
    run_recipe(load_recipe(p))
    logged = [json.loads(x) for x in (tmp_path / "runs/bnbatch/r1/metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "refinery"][0]
    assert logged["shuffled_val"] is True
    model, _ = load_model(tmp_path / "runs/bnbatch/r0/last.pt", device=torch.device("cpu"))
    ref = Refinery(model, bn="batch")
    kw = dict(data=demo_tree, backend="torch", split="val", batch_size=32, resolution=32, device=torch.device("cpu"),
              workers=0, val_crop_ratio=1.0, seed=3)
    fp32 = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    sorted_top1 = evaluate(ref.model, build(**kw), autocast=fp32, set_eval=False)["top1"]
    shuffled_top1 = evaluate(ref.model, build(**kw, shuffle=True), autocast=fp32, set_eval=False)["top1"]
    assert shuffled_top1 > sorted_top1 + 0.05  # what the sorted order would have logged is far lower
    assert logged["val_top1"] == pytest.approx(shuffled_top1, abs=0.03)  # the run's precision may be bf16, fp32 here


def test_a_torchvision_refinery_from_a_state_dict_refines_a_round(tmp_path, demo_tree):
    """refinery = "torchvision:NAME" with weights from a local .pth (never a download), the crop resized for
    the refinery on the device (refinery.resolution), in one round."""
    import torchvision
    torch.manual_seed(0)
    weights = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", num_classes=10).state_dict(), weights)
    rounds = '\n[[rounds]]\nname = "by-tv"\nepochs = 1\nrefinery = "torchvision:mobilenet_v3_small"\n'
    p = make_recipe(tmp_path, demo_tree, name="tv", rounds=rounds,
                    extra=f'[refinery]\nweights = "{weights}"\nresolution = 64')
    rows = run_recipe(load_recipe(p, ["run.max_steps_per_epoch=2", "run.max_val_batches=1"]))
    assert rows[0]["refinery"].startswith("torchvision:mobilenet_v3_small") or "mobilenet_v3_small" in rows[0]["refinery"]
    assert rows[0]["refinery_val_top1"] is not None and 0 <= rows[0]["refinery_val_top1"] <= 1
