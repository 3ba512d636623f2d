"""Adversarial jittering (refinery.AdversarialJitter) on real Fashion-MNIST crops.

What is checked: the step stays within epsilon pixel units (0..255 scale, after un-normalising) and
inside the valid pixel range; only `fraction` of the batch changes; the step increases the divergence
KL(refinery || student) it climbs; the same holds under bf16 autocast on the CPU; and a short run
with jittering on (wired through round.py) trains: finite, decreasing loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastrefine.precision import resolve_precision
from fastrefine.loaders import IMAGENET_MEAN, IMAGENET_STD, build
from fastrefine.models import create_model
from fastrefine.recipe import load_recipe
from fastrefine.refinery import AdversarialJitter, Refinery, kl_batchmean
from fastrefine.chain import run_recipe

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised images -> 0..255 pixel units."""
    return (x.float() * STD + MEAN) * 255


@pytest.fixture(scope="module")
def batch(demo_tree) -> tuple[torch.Tensor, torch.Tensor]:
    loader = build(data=demo_tree, backend="torch", split="train", batch_size=32, resolution=32,
                   device=torch.device("cpu"), workers=0, seed=3, scale=(0.2, 1.0))
    images, labels = next(iter(loader))
    return images, labels


def _pair(seed: int = 0):
    """A student and a different refinery; a few label steps each so their outputs are not uniform."""
    torch.manual_seed(seed)
    student = create_model("tiny_cnn", num_classes=10, width=8)
    teacher = create_model("small_resnet", num_classes=10, width=8, blocks=[1, 1])
    return student, teacher


def _warm(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 15) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()


@pytest.fixture(scope="module")
def models(batch):
    images, labels = batch
    student, teacher = _pair()
    _warm(student, images[:16], labels[:16])
    _warm(teacher, images, labels, steps=25)
    return student.eval(), Refinery(teacher)


def _jitter(student, refinery, *, fraction: float, epsilon: float, precision: str = "fp32") -> AdversarialJitter:
    p = resolve_precision(precision, torch.device("cpu"))
    return AdversarialJitter(student=student, refinery=refinery, fraction=fraction, epsilon=epsilon,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD, autocast=p.autocast)


def test_step_is_within_epsilon_pixels_and_valid(batch, models):
    images, _ = batch
    student, refinery = models
    for eps in (1.0, 4.0):
        out = _jitter(student, refinery, fraction=1.0, epsilon=eps)(images)
        diff = (_pixels(out) - _pixels(images)).abs()
        assert diff.max().item() <= eps + 1e-3
        # a signed step: every pixel that is not clamped at 0 or 255 moves by (almost exactly) epsilon
        assert (diff > eps - 1e-3).float().mean().item() > 0.5
        px = _pixels(out)
        assert px.min().item() >= -1e-3 and px.max().item() <= 255 + 1e-3
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fraction,expected", [(0.25, 8), (0.5, 16), (0.0, 0)])
def test_only_fraction_of_the_batch_changes(batch, models, fraction, expected):
    images, _ = batch
    student, refinery = models
    out = _jitter(student, refinery, fraction=fraction, epsilon=2.0)(images)
    changed = (out != images).flatten(1).any(dim=1)
    assert int(changed.sum()) == expected
    assert changed[:expected].all() and not changed[expected:].any()  # the first n of a shuffled batch


def _divergence_rises(student, refinery, images, *, precision: str) -> tuple[float, float]:
    jit = _jitter(student, refinery, fraction=1.0, epsilon=2.0, precision=precision)
    out = jit(images)
    with torch.no_grad():
        target = refinery(images)  # the gradient was taken with the clean crop's refinery softmax held fixed
        before = kl_batchmean(student(images), target).item()
        after = kl_batchmean(student(out), target).item()
        # and against the refinery's softmax of the jittered image itself (what the step trains on)
        after_own = kl_batchmean(student(out), refinery(out)).item()
    assert after > before * 1.05, (before, after)
    assert after_own > before, (before, after_own)
    return before, after


def test_divergence_increases_after_the_step(batch, models):
    images, _ = batch
    student, refinery = models
    _divergence_rises(student, refinery, images, precision="fp32")


def test_works_under_bf16_autocast_on_cpu(batch, models):
    images, _ = batch
    student, refinery = models
    _divergence_rises(student, refinery, images, precision="bf16")
    out = _jitter(student, refinery, fraction=0.5, epsilon=1.0, precision="bf16")(images)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (_pixels(out) - _pixels(images)).abs().max().item() <= 1.0 + 1e-3


def test_student_and_refinery_weights_untouched(batch, models):
    images, _ = batch
    student, refinery = models
    student.zero_grad(set_to_none=True)  # left over from the warm-up steps
    before = [p.detach().clone() for p in [*student.parameters(), *refinery.parameters()]]
    _jitter(student, refinery, fraction=0.5, epsilon=1.0)(images)
    after = [*student.parameters(), *refinery.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in student.parameters())  # input gradient only


def _recipe(tmp_path: Path, demo_tree: Path) -> Path:
    path = tmp_path / "adv.toml"
    path.write_text(f"""
[run]
device = "cpu"
name = "adv"
out = "{tmp_path}/runs"
seed = 1
precision = "bf16"
log_every = 4
progress = false
[data]
path = "{demo_tree}"
[loader]
backend = "torch"
workers = 0
batch_size = 16
resolution = 32
val_crop_ratio = 1.0
scale = [0.25, 1.0]
[model]
name = "tiny_cnn"
options = {{width = 8}}
[optim]
lr = 0.1
[schedule]
kind = "constant"
[refinery.adversarial]
fraction = 0.5
epsilon = 1.0
[[rounds]]
name = "labels"
epochs = 1
[[rounds]]
name = "refined"
epochs = 2
""")
    return path


def test_short_run_with_jittering_trains(tmp_path, demo_tree, monkeypatch):
    import fastrefine.round as rounds_mod

    calls = []

    class Counting(AdversarialJitter):
        def __call__(self, x):
            out = super().__call__(x)
            calls.append(int((out != x).flatten(1).any(dim=1).sum()))
            return out

    monkeypatch.setattr(rounds_mod, "AdversarialJitter", Counting)
    recipe = load_recipe(_recipe(tmp_path, demo_tree))
    rows = run_recipe(recipe)
    assert len(rows) == 2
    # 400 train images / 16 = 25 steps an epoch; jittering runs in the refined round only, 8 of 16 each step
    assert len(calls) == 50 and all(c == 8 for c in calls)
    logs = [json.loads(line) for line in (tmp_path / "runs/adv/refined/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if r["kind"] == "step"]
    assert len(losses) >= 10 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, losses
    epochs = [r for r in logs if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[1]["train_loss"] < epochs[0]["train_loss"]


def test_jitter_leaves_student_bn_statistics_alone(batch, models):
    """The jitter's extra student forward runs BN in train mode but must not move its running stats."""
    student, refinery = models
    student.train()
    images, _ = batch
    bns = [m for m in student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
              for m in bns]
    _jitter(student, refinery, fraction=0.5, epsilon=2.0)(images)
    for m, (mean, var, tracked, momentum) in zip(bns, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, tracked) and m.momentum == momentum


def test_bf16_input_is_jittered_in_fp32_and_returned_in_bf16(batch, models):
    student, refinery = models
    images, _ = batch
    x = images.to(torch.bfloat16)
    out = _jitter(student, refinery, fraction=0.5, epsilon=1.0, precision="bf16")(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    n = round(0.5 * x.shape[0])
    assert not torch.equal(out[:n], x[:n]) and torch.equal(out[n:], x[n:])
