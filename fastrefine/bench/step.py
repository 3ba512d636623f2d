"""`fastrefine bench step`: the training step alone on synthetic device tensors, with and without a refinery."""

from __future__ import annotations


import torch

from .protocol import PeakMemory, check_batch, clock_name, first_call, make_record, make_sync, measure, pick_device, rates, spread


def flops_bound(*, student: str, refinery: str, num_classes: int, resolution: int) -> dict:
    """Refinery overhead bound 1 + F_r / (3 F_s): a student step is ~3 forwards, the refinery's is 1."""
    from ..models import model_info
    fs = model_info(student, num_classes=num_classes, resolution=resolution)["flops"]
    fr = model_info(refinery, num_classes=num_classes, resolution=resolution)["flops"]
    return {"student_flops": fs, "refinery_flops": fr, "bound": 1 + fr / (3 * fs)}

def _memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def bench_recipe(*, student: str, refinery: str | None, resolution: int, batch_size: int, precision: str,
                 device: str, channels_last: bool, compile: bool, refinery_options: dict | None = None):
    """A recipe of one round (student refined by a round of the `refinery` architecture, or on labels)
    for `build_round`: the step benchmark assembles its step exactly as a run does."""
    from ..recipe import recipe_from_dict
    rounds = [{"name": "student", "epochs": 1, "model": student, "refinery": "none"}]
    if refinery is not None:
        rounds = [{"name": "refinery", "epochs": 1, "model": refinery, "refinery": "none"},
                  {"name": "student", "epochs": 1, "model": student, "refinery": "refinery"}]
    return recipe_from_dict({
        "run": {"name": "bench-step", "device": device, "precision": precision, "compile": compile,
                "channels_last": channels_last, "progress": False},
        "data": {"path": "(synthetic)"}, "loader": {"batch_size": batch_size, "resolution": resolution},
        "optim": {"lr_scaling": "none", "lr": 0.01}, "refinery": dict(refinery_options or {}),
        "rounds": rounds}, source="bench step")


def make_bench_step(recipe, *, num_classes: int, device: torch.device, index: int | None = None):
    """The round's parts as `fastrefine run` builds them (build_round), with no loader and the refinery's
    weights random where its round has not run: speed does not depend on the weights."""
    from ..distributed import Dist
    from ..precision import resolve_precision
    from ..round import RoundEnv, ThreadPlan, build_round
    env = RoundEnv(recipe=recipe, dist=Dist(), device=device, precision=resolve_precision(recipe.run.precision, device),
                   run_dir=None, num_classes=num_classes, class_names=[],
                   threads=ThreadPlan(0, None, "bench step: torch threads untouched"))
    index = len(recipe.rounds) - 1 if index is None else index
    return build_round(env, index, untrained_refinery_ok=True, loaders=False), env


def synthetic_batch(*, batch_size: int, resolution: int, num_classes: int, device: torch.device,
                    dtype: torch.dtype, channels_last: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normal images and random labels, already on the device: a shape/speed input, not data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, resolution, resolution, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device, dtype).contiguous(memory_format=_memory_format(channels_last)), y.to(device)


def step_case(*, student: str, refinery: str | None, num_classes: int, resolution: int, batch_size: int,
              device: torch.device, precision, channels_last: bool, compile: bool, warmup: int, iters: int,
              repeats: int, memory: PeakMemory) -> dict:
    memory.reset()
    before = memory.current_mib()
    recipe = bench_recipe(student=student, refinery=refinery, resolution=resolution, batch_size=batch_size,
                          precision=precision.name, device=device.type, channels_last=channels_last, compile=compile)
    from ..round import compile_counters, compiles_since
    compiled_before = compile_counters() if compile else {}
    parts, _ = make_bench_step(recipe, num_classes=num_classes, device=device)
    step = parts.step
    images, labels = synthetic_batch(batch_size=batch_size, resolution=resolution, num_classes=num_classes,
                                     device=device, dtype=precision.input_dtype, channels_last=channels_last)
    sync = make_sync(device)
    first = first_call(lambda: step(images, labels), sync=sync)
    seconds = measure(lambda: step(images, labels), warmup=warmup, iters=iters, repeats=repeats, sync=sync,
                      events=device.type == "cuda")
    per_step = spread([t / iters for t in seconds])
    return {"case": f"{student} + {refinery}" if refinery else f"{student} alone", "student": student,
            "refinery": refinery, "first_call_s": first, "compile": compile,
            "images_per_s": rates(seconds, items=iters * batch_size), "step_s": per_step,
            "peak_memory_mib": memory.peak_mib(), "memory_before_mib": before, "seconds": seconds,
            "compiles": compiles_since(compiled_before) if compile else None}


def _refinery_names(spec: list[str], *, student: str) -> list[str | None]:
    out: list[str | None] = [None]
    for s in spec:
        if s == "none":
            continue
        out.append(student if s == "same" else s)
    return out


def run_step(*, model: str, refineries: list[str], num_classes: int, resolution: int, batch_size: int,
             precision: str, device: str, channels_last: bool, compile: bool, warmup: int, iters: int,
             repeats: int) -> dict:
    from ..precision import resolve_precision
    from ..models import create_model
    check_batch(resolution=resolution, batch_size=batch_size)
    create_model(model, num_classes=num_classes)  # an unknown name fails here, before any timing
    names = _refinery_names(refineries, student=model)
    for n in names[1:]:
        create_model(n, num_classes=num_classes)
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    memory = PeakMemory(dev)
    common = dict(num_classes=num_classes, resolution=resolution, batch_size=batch_size, device=dev,
                  precision=prec, channels_last=channels_last, compile=compile, warmup=warmup, iters=iters,
                  repeats=repeats, memory=memory)
    results = [step_case(student=model, refinery=n, **common) for n in names]
    alone = results[0]["step_s"]["median"]
    for r in results[1:]:
        r["measured_ratio"] = r["step_s"]["median"] / alone
        r.update(flops_bound(student=model, refinery=r["refinery"], num_classes=num_classes,
                             resolution=resolution))
    settings = {"model": model, "refineries": [n for n in names if n], "num_classes": num_classes,
                "resolution": resolution, "batch_size": batch_size, "precision": prec.name,
                "device": str(dev), "channels_last": channels_last, "compile": compile, "warmup": warmup,
                "iters": iters, "repeats": repeats, "clock": clock_name(dev), "memory": memory.method,
                "threads": torch.get_num_threads()}
    notes = ["synthetic input: random normal tensors and random labels already on the device "
             "(a shape/speed benchmark; no data is read)",
             "bound = 1 + F_refinery / (3 F_student), FLOPs from FlopCounterMode via models.model_info; "
             "measured_ratio = median step time with the refinery / without",
             "first_call_s is the first step, timed apart (includes torch.compile when compile is on)"]
    return make_record(command="step", settings=settings, results=results, notes=notes)

