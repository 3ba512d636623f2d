import inspect

import pytest
import torch
from torch import nn

from fastrefine.engine import train_epoch, train_step
from fastrefine.optim import make_optimizer, param_groups
from fastrefine.precision import resolve_precision
from fastrefine.errors import RunError
from fastrefine.recipe import ScheduleConfig
from fastrefine.refinery import NoRefinery, Refinery, make_loss, no_jitter
from fastrefine.schedule import lr_at, resolution_at


def test_precision_chosen_once(monkeypatch):
    import fastrefine.precision as precision
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"  # emulated bf16 is slower
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    p = resolve_precision("auto", torch.device("cpu"))
    assert p.name == "bf16" and not p.scaler().is_enabled()
    with p.autocast():
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.bfloat16
    f32 = resolve_precision("fp32", torch.device("cpu"))
    with f32.autocast():
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.float32
    with pytest.raises(RunError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_weight_decay_groups_by_module_type():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4 * 6 * 6),
                        nn.Linear(4 * 6 * 6, 2))
    decay, no_decay = param_groups(net, weight_decay=0.1, decay_norm_and_bias=False)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(net[0].weight), id(net[4].weight)}
    assert ids(no_decay["params"]) == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].weight),
                                       id(net[3].bias), id(net[4].bias)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    (everything,) = param_groups(net, weight_decay=0.1, decay_norm_and_bias=True)
    assert len(everything["params"]) == len(list(net.parameters()))
    opt = make_optimizer(net, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5, decay_norm_and_bias=False)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_schedules():
    step = ScheduleConfig(kind="step", steps=[[0, 140, 0.01], [140, 170, 0.001], [170, 200, 0.0001]])
    assert [lr_at(e, cfg=step, base_lr=9, total_epochs=200) for e in (0, 139.9, 140, 169, 170, 250)] == \
        [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]
    cos = ScheduleConfig(kind="cosine", final_lr_ratio=0.1)
    assert lr_at(0, cfg=cos, base_lr=1.0, total_epochs=10) == pytest.approx(1.0)
    assert lr_at(5, cfg=cos, base_lr=1.0, total_epochs=10) == pytest.approx(0.55)
    assert lr_at(10, cfg=cos, base_lr=1.0, total_epochs=10) == pytest.approx(0.1)
    tri = ScheduleConfig(kind="triangular", peak_epoch=2)
    assert [lr_at(e, cfg=tri, base_lr=1.0, total_epochs=10) for e in (0, 1, 2, 6, 10)] == \
        pytest.approx([0, 0.5, 1.0, 0.5, 0.0])
    warm = ScheduleConfig(kind="constant", warmup_epochs=2)
    assert lr_at(0.5, cfg=warm, base_lr=0.4, total_epochs=10) == pytest.approx(0.1)
    assert lr_at(3, cfg=warm, base_lr=0.4, total_epochs=10) == pytest.approx(0.4)


def test_progressive_resolution():
    kw = dict(start=160, end=192, from_epoch=2, to_epoch=6, multiple=32)
    assert [resolution_at(e, **kw) for e in (0, 2, 4, 6, 9)] == [160, 160, 192, 192, 192]
    kw = dict(start=128, end=256, from_epoch=0, to_epoch=4, multiple=32)
    assert [resolution_at(e, **kw) for e in range(5)] == [128, 160, 192, 224, 256]


def test_step_is_short_and_branch_free():
    src = inspect.getsource(train_step)
    body = src.split('"""')[-1]
    assert len(src.splitlines()) < 40
    assert " if " not in body and "backend" not in body and "amp" not in body


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def _step_kwargs(student, refinery, refined):
    opt = make_optimizer(student, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0, decay_norm_and_bias=False)
    p = resolve_precision("bf16", torch.device("cpu"))
    return dict(student=student, refinery=refinery, loss_fn=make_loss(refined=refined), jitter=no_jitter,
                optimizer=opt, scaler=p.scaler(), autocast=p.autocast, clip=lambda m: None)


def test_train_step_matches_refinery_on_the_same_batch():
    torch.manual_seed(0)
    teacher = _tiny()
    refinery = Refinery(teacher)
    student = _tiny()
    torch.nn.init.normal_(student[-1].weight)
    kw = _step_kwargs(student, refinery, refined=True)
    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (16,))
    losses = [train_step(x, y, **kw)[0].item() for _ in range(30)]
    assert losses[-1] < losses[0] * 0.7  # the student moves towards the refinery's softmax on x
    teacher_w = [p.clone() for p in teacher.parameters()]
    train_step(x, y, **kw)
    assert all(torch.equal(a, b) for a, b in zip(teacher_w, teacher.parameters()))  # refinery untouched


def test_train_epoch_reports_and_stops_on_nan():
    student = _tiny()
    kw = _step_kwargs(student, NoRefinery(), refined=False)
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(4)]
    step = lambda x, y: train_step(x, y, **kw)  # noqa: E731
    logs = []
    res = train_epoch(batches, step=step, optimizer=kw["optimizer"], lr_fn=lambda e: 0.05, epoch=0,
                      steps_per_epoch=4, log_every=2, on_log=logs.append)
    assert res.images == 32 and res.steps == 4 and 0 <= res.top1 <= 1 and len(logs) == 2
    quiet = []  # log_every None: no read inside the epoch, only the epoch's totals
    res = train_epoch(batches, step=step, optimizer=kw["optimizer"], lr_fn=lambda e: 0.05, epoch=1,
                      steps_per_epoch=4, log_every=None, on_log=quiet.append)
    assert res.steps == 4 and res.images == 32 and quiet == []
    bad = [(torch.full((8, 3, 8, 8), float("nan")), torch.randint(0, 4, (8,)))] * 2
    with pytest.raises(RunError, match="loss became nan"):
        train_epoch(bad, step=step, optimizer=kw["optimizer"], lr_fn=lambda e: 0.05, epoch=0,
                    steps_per_epoch=2, log_every=1)


def test_plan_threads_splits_cpu_cores(monkeypatch):
    from fastrefine.chain import plan_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    plan = lambda **kw: (lambda p: (p.workers, p.torch_threads))(plan_threads(**kw))  # noqa: E731
    assert plan(workers=None, device=cpu) == (4, 4)
    assert plan(workers=None, device=cpu, local_world_size=2) == (2, 2)
    assert plan(workers=None, device=cpu, backend="ffcv") == (1, 8)   # the step gets the cores
    assert plan(workers=None, device=cpu, backend="dali", local_world_size=2) == (1, 4)
    assert plan(workers=0, device=cpu) == (0, 8)
    assert plan(workers=8, device=cpu) == (8, 1)
    assert plan(workers=None, device=gpu, local_world_size=4) == (2, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert plan(workers=None, device=cpu) == (4, None)


def _factory_calls_with_device(fn) -> list[str]:
    """Names of tensor factory calls given a device while `fn` runs: on CUDA each one is a blocking
    host-to-device copy (torch.tensor) or at least a launch the host waits to enqueue."""
    from torch.overrides import TorchFunctionMode

    factories = {torch.tensor, torch.as_tensor, torch.full, torch.zeros, torch.ones, torch.empty, torch.scalar_tensor}
    seen: list[str] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories and kwargs.get("device") is not None:
                seen.append(func.__name__)
            return func(*args, **kwargs)

    with Record():
        fn()
    return seen


def test_train_epoch_and_evaluate_build_no_device_tensor_per_step():
    """Issue: a `torch.tensor(n, device=...)` per step made the host wait for the GPU every step."""
    from fastrefine.engine import evaluate
    student = _tiny()
    kw = _step_kwargs(student, NoRefinery(), refined=False)
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(6)]
    step = lambda x, y: train_step(x, y, **kw)  # noqa: E731
    calls = _factory_calls_with_device(lambda: train_epoch(
        batches, step=step, optimizer=kw["optimizer"], lr_fn=lambda e: 0.05, epoch=0, steps_per_epoch=6,
        log_every=100))
    assert len(calls) <= 1, calls  # one per epoch (the image count, for the all-reduce), not one per step
    calls = _factory_calls_with_device(lambda: evaluate(student, batches, autocast=lambda: torch.autocast("cpu", enabled=False)))
    assert len(calls) <= 1, calls


def test_train_epoch_closes_an_abandoned_loader_iterator():
    closed = []

    def loader():
        try:
            for _ in range(10):
                yield torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
        finally:
            closed.append(True)

    student = _tiny()
    kw = _step_kwargs(student, NoRefinery(), refined=False)
    res = train_epoch(loader(), step=lambda x, y: train_step(x, y, **kw), optimizer=kw["optimizer"],
                      lr_fn=lambda e: 0.05, epoch=0, steps_per_epoch=10, max_steps=3)
    assert res.steps == 3 and closed == [True]
