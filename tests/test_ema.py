"""run.ema: the average of the student's weights, evaluated each epoch, saved, restored on resume, and
usable as the next round's refinery (refinery.use = "ema")."""

import json

import pytest
import torch
from torch import nn

from fastrefine import checkpoint as ckpt
from fastrefine.chain import run_recipe
from fastrefine.ema import WeightEma
from fastrefine.recipe import RecipeError, load_recipe
from helpers import Killed, die_after, write_recipe


def test_average_follows_the_formula_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = WeightEma(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(2, 3, 5, 5))  # BN running stats and num_batches_tracked move
    ema.update()
    now, cur = ema.state_dict(), model.state_dict()
    for k in now:
        if now[k].is_floating_point():
            assert torch.allclose(now[k], 0.75 * before[k] + 0.25 * cur[k]), k
        else:
            assert torch.equal(now[k], cur[k]), k
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())


RUN = {"precision": "fp32", "ema": 0.8, "max_steps_per_epoch": 4, "max_val_batches": 3}


def _recipe(tmp_path, data, name, rounds, **run):
    return write_recipe(tmp_path, data, name=name, run={**RUN, **run}, rounds=rounds,
                        tables='[refinery]\nuse = "ema"\n')


def test_ema_is_evaluated_saved_and_refines_the_next_round(tmp_path, demo_tree):
    rounds = '[[rounds]]\nname = "r0"\nepochs = 2\n[[rounds]]\nname = "r1"\nepochs = 1\n'
    rows = run_recipe(load_recipe(_recipe(tmp_path, demo_tree, "ema", rounds)))
    run = tmp_path / "runs/ema"
    epochs = [json.loads(x) for x in (run / "r0/metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in epochs if m["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= m["ema_val_top1"] <= 1 and "val_top1" in m for m in epochs)
    last, ema = ckpt.load(run / "r0/last.pt"), ckpt.load(run / "r0/ema.pt")
    assert set(ema) == {"format", "version", "model", "meta"} and ema["meta"].weights == "ema"
    for k, v in ema["model"].items():
        assert torch.equal(v, last["ema"][k]), k
    # the average is not the raw weights (it lags them)
    assert any(not torch.equal(v, last["model"][k]) for k, v in ema["model"].items() if v.is_floating_point())
    # round r1's refinery is r0's EMA: its own val top-1 is the EMA's, recorded in r0's last epoch
    ref = [json.loads(x) for x in (run / "r1/metrics.jsonl").read_text().splitlines()][0]
    assert ref["kind"] == "refinery"
    assert ref["val_top1"] == pytest.approx(epochs[-1]["ema_val_top1"], abs=1e-6)
    assert rows[0]["ema_val_top1"] == pytest.approx(epochs[-1]["ema_val_top1"], abs=1e-6)
    assert "EMA val" in (run / "summary.md").read_text()
    assert rows[1]["refinery"] == "r0 (tiny_cnn, EMA weights)"


def test_ema_is_restored_on_resume(tmp_path, demo_tree, monkeypatch):
    rounds = '[[rounds]]\nname = "r0"\nepochs = 2\n'
    run_recipe(load_recipe(_recipe(tmp_path, demo_tree, "straight", rounds)))
    killed = load_recipe(_recipe(tmp_path, demo_tree, "killed", rounds))
    with monkeypatch.context() as m:
        die_after(m, 6)  # in the middle of epoch 2
        with pytest.raises(Killed):
            run_recipe(killed)
    assert ckpt.load(tmp_path / "runs/killed/r0/last.pt")["epoch"] == 1
    run_recipe(killed)
    a = ckpt.load(tmp_path / "runs/straight/r0/last.pt")["ema"]
    b = ckpt.load(tmp_path / "runs/killed/r0/last.pt")["ema"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_use_ema_needs_run_ema(tmp_path, demo_tree):
    p = write_recipe(tmp_path, demo_tree, name="noema", run={}, tables='[refinery]\nuse = "ema"\n',
                     rounds='[[rounds]]\nname = "r0"\nepochs = 1\n[[rounds]]\nname = "r1"\nepochs = 1\n')
    with pytest.raises(RecipeError, match="refinery.use.*run.ema"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="run.ema"):
        load_recipe(p, ["run.ema=1.0"])  # a decay of 1 would never move
