"""Gradient accumulation (optim.accumulate): the epoch loop updates every N batches; the update equals one
at an N times larger batch; under DDP the batches before an update skip the all-reduce."""

import contextlib

import pytest
import torch
from torch import nn

from fastrefine.engine import build_accumulate_step, build_step, train_epoch
from fastrefine.optim import make_optimizer
from fastrefine.precision import resolve_precision
from fastrefine.recipe import global_batch, lr_scale, recipe_from_dict
from fastrefine.schedule import round_schedule
from fastrefine.refinery import NoRefinery, make_loss, no_jitter


def _no_bn_net():
    # no BatchNorm: with BN each batch of B is normalised by its own statistics, so N batches of B and one
    # batch of N x B give different gradients (and running statistics updated N times instead of once)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


def _steps(model, accumulate):
    opt = make_optimizer(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, decay_norm_and_bias=False)
    p = resolve_precision("fp32", torch.device("cpu"))
    kw = dict(student=model, refinery=NoRefinery(), loss_fn=make_loss(refined=False), jitter=no_jitter,
              optimizer=opt, scaler=p.scaler(), autocast=p.autocast, clip=lambda m: None, accumulate=accumulate)
    return opt, build_step(**kw), build_accumulate_step(**kw)


def _run(batches, accumulate, model=None):
    model = model or _no_bn_net()
    opt, step, acc = _steps(model, accumulate)
    updates = []
    res = train_epoch(batches, step=step, optimizer=opt, lr_fn=lambda e: 0.1, epoch=0, steps_per_epoch=len(batches),
                      log_every=1000, accumulate=accumulate, accumulate_step=acc, on_update=lambda: updates.append(1))
    return model, res, len(updates)


def test_two_batches_of_b_update_as_one_batch_of_2b():
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 16, 3, 8, 8, generator=g), torch.randint(0, 5, (8, 16), generator=g)
    small = [(xs[i], ys[i]) for i in range(8)]                                    # 8 batches of 16, N = 2
    large = [(torch.cat([xs[i], xs[i + 1]]), torch.cat([ys[i], ys[i + 1]])) for i in range(0, 8, 2)]  # 4 of 32
    a, res_a, updates_a = _run(small, accumulate=2)
    b, res_b, updates_b = _run(large, accumulate=1)
    assert updates_a == updates_b == 4
    assert res_a.images == res_b.images == 128
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6), name
    # and the weights did move (the comparison is not between two untouched models)
    assert not torch.allclose(next(_no_bn_net().parameters()), next(a.parameters()))
    # without accumulation the same 8 small batches give 8 different updates
    c, _, updates_c = _run(small, accumulate=1)
    assert updates_c == 8 and not torch.allclose(next(a.parameters()), next(c.parameters()))


class _FakeDDP(nn.Module):
    """Stands in for DistributedDataParallel: counts the backward passes run under no_sync."""

    def __init__(self, module):
        super().__init__()
        self.module, self.skipped, self.inside = module, 0, False

    def forward(self, x):
        self.skipped += self.inside
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


@pytest.mark.parametrize("n_batches,accumulate,updates", [(6, 3, 2), (5, 2, 3), (4, 1, 4)])
def test_intermediate_batches_skip_the_all_reduce_and_the_epoch_ends_on_an_update(n_batches, accumulate, updates):
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n_batches)]
    ddp = _FakeDDP(_no_bn_net())
    _, _, n = _run(batches, accumulate=accumulate, model=ddp)
    assert n == updates
    assert ddp.skipped == n_batches - updates
    assert all(p.grad is None for p in ddp.parameters())  # nothing carried past the epoch's last update


def test_lr_and_global_batch_count_accumulated_batches(tmp_path):
    raw = {"data": {"path": str(tmp_path)}, "model": {"name": "tiny_cnn"}, "loader": {"batch_size": 64},
           "optim": {"lr": 0.1, "reference_batch": 256, "accumulate": 4}, "rounds": [{"name": "a", "epochs": 1}]}
    r = recipe_from_dict(raw)
    assert global_batch(r, world_size=2) == 64 * 2 * 4
    assert lr_scale(r, world_size=2) == pytest.approx(2.0)
    assert round_schedule(r, 0, world_size=2).peak == pytest.approx(0.2)
    raw["optim"]["accumulate"] = 0
    with pytest.raises(Exception, match="optim.accumulate"):
        recipe_from_dict(raw)


def test_a_run_records_the_effective_global_batch(tmp_path, demo_tree):
    import json

    from fastrefine.chain import run_recipe
    from fastrefine.recipe import load_recipe
    from helpers import write_recipe
    p = write_recipe(tmp_path, demo_tree, name="acc", run={"max_steps_per_epoch": 5, "max_val_batches": 1},
                     tables="accumulate = 2", rounds='[[rounds]]\nname = "r0"\nepochs = 1\n')
    run_recipe(load_recipe(p))
    info = json.loads((tmp_path / "runs/acc/r0/run.json").read_text())
    assert (info["global_batch"], info["batch_size"], info["accumulate"]) == (64, 32, 2)
    assert info["lr"] == pytest.approx(0.1 * 64 / 256)
