"""`fastrefine eval` and `fastrefine export` on a real round trained on the Fashion-MNIST demo images (CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastrefine import checkpoint as ckpt
from fastrefine.chain import run_recipe
from fastrefine.cli import app
from fastrefine.recipe import load_recipe
from helpers import write_recipe

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

ROUND = """
[[rounds]]
name = "r0"
epochs = 2
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_tree) -> Path:
    """A finished round (tiny_cnn, 2 epochs of 400 demo images at 32 px, precision auto: bf16 on CPUs
    with native bf16) and its run folder; returns the round folder."""
    tmp = tmp_path_factory.mktemp("evalrun")
    recipe = load_recipe(write_recipe(tmp, demo_tree, name="ev", rounds=ROUND,
                                      run={"precision": "auto"}), ["loader.val_batch_size=48"])
    run_recipe(recipe)
    return tmp / "runs" / "ev" / "r0"


def _eval(*args: str) -> dict:
    """`fastrefine eval ARGS --json F` (F beside the checkpoint, in the test's folder): the JSON report."""
    out = Path(args[0]).parent / "eval.json"
    res = runner.invoke(app, ["eval", *args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_eval_reproduces_the_recorded_val_top1(trained, demo_tree):
    done = json.loads((trained / "done.json").read_text())
    last = _eval(str(trained / "last.pt"), str(demo_tree))
    assert last["images"] == 200 and last["split"] == "val"
    assert last["top1"] == pytest.approx(done["val_top1"], abs=1e-12)      # the same loader and evaluate()
    assert last["top5"] == pytest.approx(done["val_top5"], abs=1e-12)
    assert last["loss"] == pytest.approx(done["val_loss"], rel=1e-5)
    assert last["settings"]["batch_size"] == 48 and last["settings"]["from"]["batch_size"] == "the checkpoint's run"
    best = _eval(str(trained / "best.pt"), str(demo_tree))
    assert best["top1"] == pytest.approx(ckpt.load(trained / "best.pt")["meta"].val_top1, abs=1e-12)
    # per-class: every class's 20 val images, and the hits add up to top-1
    per = last["per_class"]
    assert [c["images"] for c in per] == [20] * 10
    assert sum(c["top1"] * c["images"] for c in per) / 200 == pytest.approx(last["top1"])
    assert [c["class"] for c in per] == sorted(p.name for p in (demo_tree / "val").iterdir())


def test_eval_settings_from_the_command_line_change_the_result_and_train_split_is_unaugmented(trained, demo_tree):
    other = _eval(str(trained / "last.pt"), str(demo_tree), "--resolution", "48", "--batch-size", "7",
                  "--precision", "fp32")
    assert other["settings"]["resolution"] == 48 and other["settings"]["batch_size"] == 7
    assert other["settings"]["from"]["resolution"] == "command line" and other["images"] == 200
    cut = _eval(str(trained / "last.pt"), str(demo_tree), "--max-batches", "2")   # as run.max_val_batches = 2
    assert cut["images"] == 96 and sum(c["images"] for c in cut["per_class"]) == 96
    train = [_eval(str(trained / "last.pt"), str(demo_tree), "--split", "train", "--precision", "fp32")
             for _ in range(2)]
    assert train[0]["images"] == 400                         # every image once, none dropped
    assert train[0]["top1"] == train[1]["top1"]              # no random crops or flips: the same each time


def test_eval_torchvision_model_from_a_local_state_dict(tmp_path, demo_tree, monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))   # an empty hub cache: nothing to find there
    torch.manual_seed(0)
    weights = tmp_path / "resnet18-10.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    out = tmp_path / "tv.json"
    res = runner.invoke(app, ["eval", "torchvision:resnet18", str(demo_tree), "--weights", str(weights),
                              "--resolution", "32", "--precision", "fp32", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["images"] == 200 and rep["settings"]["backend"] == "torch" and 0 <= rep["top1"] <= 1
    assert "resnet18" in rep["description"] and rep["recorded_val_top1"] is None
    # a weights name that is not in the hub cache: one line, exit 2, nothing downloaded
    res = runner.invoke(app, ["eval", "torchvision:resnet18", str(demo_tree), "--resolution", "32"])
    assert res.exit_code == 2 and "never downloads" in res.output, res.output
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.pth"))


def test_eval_refuses_a_dataset_with_other_classes(trained, tmp_path, demo_tree):
    three = tmp_path / "three"
    for split in ("train", "val"):
        for cls in sorted((demo_tree / split).iterdir())[:3]:
            shutil.copytree(cls, three / split / cls.name)
    res = runner.invoke(app, ["eval", str(trained / "last.pt"), str(three)])
    assert res.exit_code == 2 and "10 classes" in res.output and "has 3" in res.output, res.output
    res = runner.invoke(app, ["eval", str(trained / "last.pt"), str(demo_tree), "--split", "test"])
    assert res.exit_code == 2 and "--split" in res.output


# ------------------------------------------------------------------------------------------- export

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fastrefine" or name.startswith("fastrefine."):
                raise ImportError("fastrefine is not importable in this process")
            return None
    sys.meta_path.insert(0, Blocker())
    try:
        import fastrefine
    except ImportError:
        pass
    else:
        raise SystemExit("fastrefine was importable")
    import torch
""")


def _real_images(trained: Path, demo_tree: Path, tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """16 val images as the run's loader hands them (fp32), saved for the child; and the checkpoint
    model's logits on them."""
    from fastrefine.evaluation import load_checkpoint_model
    from fastrefine.loaders import build
    loader = build(data=demo_tree, backend="torch", split="val", batch_size=16, resolution=32,
                   device=torch.device("cpu"), workers=0, val_crop_ratio=1.0, shuffle=True, seed=1)
    images, _ = next(iter(loader))
    loader.close()
    images = images.contiguous()
    path = tmp_path / "images.pt"
    torch.save(images, path)
    with torch.no_grad():
        logits = load_checkpoint_model(trained / "last.pt").model(images)
    return path, logits


def _child(code: str, tmp_path: Path) -> torch.Tensor:
    out = tmp_path / "child_logits.pt"
    script = BLOCKER + textwrap.dedent(code) + f"\ntorch.save(logits.detach(), {str(out)!r})\n"
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def test_export_pt2_runs_without_fastrefine(trained, demo_tree, tmp_path):
    images, expected = _real_images(trained, demo_tree, tmp_path)
    art = tmp_path / "student.pt2"
    res = runner.invoke(app, ["export", str(trained / "last.pt"), str(art)])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "student.pt2.json").read_text())
    assert info["format"] == "pt2" and info["model_name"] == "tiny_cnn" and info["num_classes"] == 10
    assert info["input"]["resolution"] == 32 and info["input"]["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert info["classes"] == sorted(p.name for p in (demo_tree / "train").iterdir())
    got = _child(f"""
        extra = {{"fastrefine.json": ""}}
        program = torch.export.load({str(art)!r}, extra_files=extra)
        import json
        assert json.loads(extra["fastrefine.json"])["model_name"] == "tiny_cnn"
        logits = program.module()(torch.load({str(images)!r}))
    """, tmp_path)
    assert got.shape == (16, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_export_state_dict_rebuilds_from_the_architecture_files_alone(trained, demo_tree, tmp_path):
    images, _ = _real_images(trained, demo_tree, tmp_path)
    art = tmp_path / "student.pt"
    res = runner.invoke(app, ["export", str(trained / "best.pt"), str(art), "--format", "state_dict"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "student.pt.json").read_text())
    rebuild = info["rebuild"]
    assert "fastrefine/models/small.py" in rebuild["needs"] and "common.py" in rebuild["needs"]
    # what the JSON says: the two architecture files, copied into a package of one's own, and torch
    pkg = tmp_path / "arch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("small.py", "common.py"):
        shutil.copy(ROOT / "fastrefine" / "models" / name, pkg / name)
    got = _child(f"""
        sys.path.insert(0, {str(tmp_path)!r})
        from arch.small import tiny_cnn
        model = tiny_cnn(num_classes={info['num_classes']}, **{info['model_options']!r})
        model.load_state_dict(torch.load({str(art)!r}, weights_only=True))
        with torch.no_grad():
            logits = model.eval()(torch.load({str(images)!r}))
    """, tmp_path)
    from fastrefine.evaluation import load_checkpoint_model
    with torch.no_grad():
        ref = load_checkpoint_model(trained / "best.pt").model(torch.load(images))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_export_torchvision_architecture_rebuilds_with_torchvision(tmp_path):
    from fastrefine.export import rebuild_recipe
    r = rebuild_recipe("resnet18", {}, 10)
    assert r["code"].startswith("torchvision.models.resnet18(weights=None, num_classes=10)")
    assert rebuild_recipe("vgg19", {"dropout": 0.5}, 5)["code"].startswith("torchvision.models.vgg19_bn(")
    assert "darknet.py" in rebuild_recipe("darknet19", {}, 1000)["needs"]


def test_export_onnx_without_onnx_is_one_line(trained, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    # as on a machine without them, whether or not this one has them
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("onnx", "onnxscript") else real(name, *a, **k))
    res = runner.invoke(app, ["export", str(trained / "last.pt"), str(tmp_path / "m.onnx"), "--format", "onnx"])
    assert res.exit_code == 2 and "needs the onnx and onnxscript packages" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_export_pt2_of_darknet19_runs_without_fastrefine(tmp_path):
    """fastrefine's own architecture of the mission (its code is in fastrefine/models/darknet.py): the .pt2
    carries the graph, so a process without fastrefine runs it. Random weights, BatchNorm statistics
    made non-trivial; slow: torch.export traces 19 convolutions (tens of seconds on 2 busy cores)."""
    from fastrefine.evaluation import load_checkpoint_model
    from fastrefine.models import create_model
    torch.manual_seed(0)
    model = create_model("darknet19", num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "darknet19.pt"
    ckpt.save_weights(path, model=model, meta=ckpt.Meta.of("darknet19", num_classes=10, round="r", epoch=1))
    res = runner.invoke(app, ["export", str(path), str(tmp_path / "d.pt2"), "--resolution", "64"])
    assert res.exit_code == 0, res.output
    images = torch.randn(3, 3, 64, 64)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = load_checkpoint_model(path).model(images)
    got = _child(f"""
        logits = torch.export.load({str(tmp_path / 'd.pt2')!r}).module()(torch.load({str(tmp_path / 'images.pt')!r}))
    """, tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
