"""`fastrefine run RECIPE --estimate`: how long the chain will take, before it runs.

Timed (the default): every round is built as `run` builds it (`round.build_round`: the same loaders,
thread split, precision, refinery, loss and step; a refinery round that has not run yet gets random
weights, which cost the same). At each train resolution the round's schedule uses, `engine.train_epoch`
runs `warmup` steps and then `steps` timed steps (loader, refinery and student together, as in a run);
the val loader and `engine.evaluate` are timed the same way for the student and, in a refined round,
for the refinery's one evaluation before training. Seconds per step x steps per epoch x epochs, plus
the val passes, gives each round and the chain.

Projected (`--throughput IMG_PER_S`): nothing is built or timed; a step takes global batch /
throughput seconds at every resolution, and the val passes are left out (said so in the output).

Nothing is written: no run folder, no checkpoint, no record.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UsageError
from .recipe import Recipe


@dataclass
class ResolutionTiming:
    resolution: int
    epochs: int
    seconds_per_step: float
    how: str
    epoch_start: float = 0.0      # seconds each epoch pays before its first step (the loader's start)

    def epoch_seconds(self, steps_per_epoch: int) -> float:
        return self.epoch_start + self.seconds_per_step * steps_per_epoch


@dataclass
class RoundEstimate:
    name: str
    model: str
    refinery: str
    epochs: int
    steps_per_epoch: int
    timings: list[ResolutionTiming]
    val_passes: int
    val_seconds_per_pass: float | None     # None: not estimated (--throughput)
    refinery_val_seconds: float | None
    train_seconds: float = 0.0
    val_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.val_seconds


def split_images(data: Path, split: str) -> int:
    """Images in `split` as the loaders count them: the manifest's count, or the ImageFolder's files."""
    data = Path(data)
    if (data / "manifest.json").is_file():
        from .manifest import read_manifest
        return read_manifest(data).count(split)
    if not data.is_dir():
        raise UsageError(f"data.path = {str(data)!r}: not found; the estimate needs the dataset's image counts")
    from .loaders.samples import sample_table
    return len(sample_table(data, split))


def resolution_epochs(recipe: Recipe, epochs: int) -> dict[int, int]:
    """{train resolution: epochs at it} over a round's epochs (progressive resizing), in order of first use."""
    from .round import train_resolution
    return dict(Counter(train_resolution(recipe, e) for e in range(epochs)))


def eval_passes(recipe: Recipe, epochs: int) -> int:
    """How many times `run` evaluates the student in a round of `epochs` epochs (every eval_every, and the last)."""
    every = recipe.run.eval_every
    return len({e for e in range(epochs) if (e + 1) % every == 0 or e + 1 == epochs})


def _time_train(parts, *, resolution: int, steps: int, warmup: int, epoch: int, accumulate: int = 1,
                sync=lambda: None) -> tuple[float, float]:
    """(seconds per step in the steady state, seconds an epoch takes to start) of engine.train_epoch at
    `resolution`. One epoch runs `warmup` + `steps` steps and the last `steps` are timed, step by step
    (the step callback's clock, after `sync`: on CUDA the host would otherwise run ahead of the device);
    a second epoch of two steps gives the start-up each epoch pays (the
    loader's first batch, beyond one step), which the first epoch's one-time costs would inflate."""
    from .engine import train_epoch
    loader = parts.train_loader
    loader.set_resolution(resolution)

    def run(n: int, e: int) -> list[float]:
        loader.set_epoch(e)
        stamps = [time.perf_counter()]
        # as run_round calls it: accumulation and the EMA's update after each optimizer step included
        train_epoch(loader, step=parts.step, optimizer=parts.optimizer, lr_fn=lambda _: parts.lr, epoch=e,
                    steps_per_epoch=max(1, len(loader)), max_steps=n, log_every=None,
                    on_step=lambda _n: (sync(), stamps.append(time.perf_counter())),
                    accumulate=accumulate, accumulate_step=parts.accumulate_step,
                    on_update=parts.ema.update if parts.ema is not None else lambda: None)
        return stamps

    stamps = run(warmup + steps, epoch)
    # stamps[k]: after step k (stamps[0]: before the epoch); without warm-up the first step is not timed,
    # since it includes the loader's start
    first = max(warmup, 1) if steps > 1 or warmup else 0
    per_step = (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)
    again = run(2, epoch + 1)
    startup = max(0.0, (again[1] - again[0]) - per_step)
    return per_step, startup


def _time_val(model, loader, *, autocast, batches: int, set_eval: bool = True) -> tuple[float, float]:
    """(seconds per val batch, seconds a val pass takes to start) of engine.evaluate: a pass of one batch
    and a pass of 1 + `batches` batches, the difference being `batches` batches."""
    from .engine import evaluate

    def run(n: int) -> float:
        t0 = time.perf_counter()
        evaluate(model, loader, autocast=autocast, max_batches=n, set_eval=set_eval)
        return time.perf_counter() - t0

    run(1)  # warm-up
    one, more = run(1), run(1 + batches)
    per_batch = max(0.0, more - one) / batches
    return per_batch, max(0.0, one - per_batch)


def estimate_recipe(recipe: Recipe, *, only: str | None = None, throughput: float | None = None,
                    processes: int | None = None, steps: int = 5, warmup: int = 2, val_batches: int = 3) -> dict:
    """Per round and for the chain: seconds per step, minutes per epoch and in all; and the assumptions."""
    from .chain import _selected, check_plan, make_env, run_dir_of
    from .distributed import Dist
    from .bench.protocol import make_sync, pick_device
    from .round import build_round, epoch_steps
    if steps < 1 or warmup < 0:
        raise UsageError(f"--estimate-steps must be >= 1 and --estimate-warmup >= 0, got {steps} and {warmup}")
    if throughput is not None and throughput <= 0:
        raise UsageError(f"--throughput: expected images/s > 0, got {throughput}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        raise UsageError("--estimate times one process: start it without torchrun, with --processes N for the "
                         "number of processes the run will have")
    procs = processes or int(os.environ.get("WORLD_SIZE", "1"))
    selected = _selected(recipe, only)
    check_plan(recipe, selected=selected, run_dir=run_dir_of(recipe))
    lc, data = recipe.loader, Path(recipe.data.path)
    n_train, n_val = split_images(data, "train"), split_images(data, "val")
    val_batch = lc.val_batch_size
    per_proc = n_train // procs
    full_steps = per_proc // lc.batch_size
    if full_steps < 1:
        raise UsageError(f"loader.batch_size = {lc.batch_size}: larger than each process's share of the "
                         f"{n_train} train images ({procs} processes)")
    steps_per_epoch = epoch_steps(recipe, full_steps)
    val_per_pass = math.ceil(math.ceil(n_val / procs) / val_batch)
    if recipe.run.max_val_batches is not None:  # the same cut run_round's evaluations take
        val_per_pass = min(val_per_pass, recipe.run.max_val_batches)

    env = None
    if throughput is None:
        device = pick_device(recipe.run.device)
        env = make_env(recipe, Dist(), device)
    rounds: list[RoundEstimate] = []
    for i in selected:
        rd = recipe.rounds[i]
        name, opts = rd.model, rd.model_options
        res_epochs = resolution_epochs(recipe, rd.epochs)
        passes = eval_passes(recipe, rd.epochs)
        timings, val_s, ref_val_s, notes = [], None, None, []
        refinery_desc = "?"
        if env is None:
            s_step = lc.batch_size * procs / throughput
            how = f"{lc.batch_size * procs} images / {throughput:g} img/s" + (
                ", the same at every resolution" if len(res_epochs) > 1 else "")
            timings = [ResolutionTiming(r, n, s_step, how) for r, n in res_epochs.items()]
            refinery_desc = rd.refinery
        else:
            parts = build_round(env, i, untrained_refinery_ok=True)
            refinery_desc = parts.refinery_desc
            try:
                for k, (r, n) in enumerate(res_epochs.items()):
                    s, start = _time_train(parts, resolution=r, steps=steps, warmup=warmup, epoch=2 * k,
                                           accumulate=recipe.optim.accumulate, sync=make_sync(env.device))
                    timings.append(ResolutionTiming(r, n, s, f"timed over {steps} steps after {warmup} warm-up",
                                                    epoch_start=start))
                vb = max(1, min(val_batches, val_per_pass - 1))
                per, start = _time_val(parts.student, parts.val_loader, autocast=env.precision.autocast, batches=vb)
                val_s = start + per * val_per_pass
                if parts.ema is not None:  # run evaluates the EMA weights beside the raw ones: twice the passes
                    val_s *= 2
                    notes.append("val passes count the raw and the EMA weights")
                if parts.refined:
                    batch_mode = recipe.refinery.bn == "batch"
                    per, start = _time_val(parts.refinery.model, parts.val_loader, autocast=env.precision.autocast,
                                           batches=vb, set_eval=not batch_mode)
                    ref_val_s = start + per * val_per_pass
            finally:
                parts.close()
        est = RoundEstimate(name=rd.name, model=name + (f" {opts}" if opts else ""), refinery=refinery_desc,
                            epochs=rd.epochs, steps_per_epoch=steps_per_epoch, timings=timings, val_passes=passes,
                            val_seconds_per_pass=val_s, refinery_val_seconds=ref_val_s, notes=notes)
        est.train_seconds = sum(t.epoch_seconds(steps_per_epoch) * t.epochs for t in timings)
        est.val_seconds = (val_s or 0.0) * passes + (ref_val_s or 0.0)
        rounds.append(est)

    from .environment import cpu_model, usable_cores
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    where = (f"{gpus[0]}" if gpus and env is not None and env.device.type == "cuda"
             else f"{cpu_model()}, {usable_cores()} usable cores")
    assumed = {
        "processes": procs, "global_batch": lc.batch_size * procs, "batch_per_process": lc.batch_size,
        "accumulate": getattr(recipe.optim, "accumulate", 1),
        "train_images": n_train, "val_images": n_val,
        "images_per_epoch": steps_per_epoch * lc.batch_size * procs,
        "steps_per_epoch": steps_per_epoch,
        "steps_per_epoch_why": ("run.max_steps_per_epoch" if steps_per_epoch < full_steps
                                else f"{n_train} images / {procs} process(es) / batch {lc.batch_size}, last partial batch dropped"),
        "val_batches_per_pass": val_per_pass, "val_batch": val_batch, "val_resolution": recipe.loader.val_resolution,
        "mode": "projected" if env is None else "timed",
        "timed_on": None if env is None else where,
        "throughput_img_s": throughput,
        "precision": None if env is None else env.precision.name,
        "backend": None if env is None else env.backend,
        "thread_plan": None if env is None else env.threads.why,
    }
    return {"recipe": recipe.source, "rounds": rounds, "assumed": assumed,
            "seconds": sum(r.seconds for r in rounds)}


def _minutes(seconds: float) -> str:
    m = seconds / 60
    if m >= 120:
        return f"{m / 60:.1f} h"
    return f"{m:.1f} min" if m >= 1 else f"{m:.2f} min"


def render(est: dict) -> list[str]:
    """The estimate as plain lines."""
    a = est["assumed"]
    if a["mode"] == "timed":
        head = (f"estimate for {est['recipe']}: timed on this node ({a['timed_on']}), one process, "
                f"{a['precision']}, {a['backend']} loader; {a['thread_plan']}")
    else:
        head = f"estimate for {est['recipe']}: projected from {a['throughput_img_s']:g} images/s (global), nothing timed"
    lines = [head,
             f"assumed: {a['processes']} process(es), {a['global_batch']} images a step ({a['batch_per_process']} per "
             f"process" + (f"; the optimizer steps every {a['accumulate']} of them" if a["accumulate"] > 1 else "")
             + f"); {a['train_images']:,} train images, {a['images_per_epoch']:,} per epoch = "
             f"{a['steps_per_epoch']} steps ({a['steps_per_epoch_why']}); val {a['val_images']:,} images, "
             f"{a['val_batches_per_pass']} batches of {a['val_batch']} at {a['val_resolution']} px per pass"]
    if a["processes"] > 1 and a["mode"] == "timed":
        lines.append(f"  {a['processes']} processes assumed to step as fast as the one timed here, each on its own "
                     f"device (no gradient all-reduce cost counted)")
    for r in est["rounds"]:
        sched = ", ".join(f"{t.resolution} px x {t.epochs} ep" for t in r.timings)
        lines.append(f"round {r.name}: {r.model}, refinery {r.refinery}, {r.epochs} epochs ({sched})")
        for t in r.timings:
            start = f" + {t.epoch_start:.1f} s epoch start" if t.epoch_start else ""
            lines.append(f"  {t.resolution} px: {t.seconds_per_step:.3f} s/step ({t.how}){start}, "
                         f"{_minutes(t.epoch_seconds(r.steps_per_epoch))}/epoch")
        if r.val_seconds_per_pass is not None:
            extra = (f" + the refinery's own val pass {_minutes(r.refinery_val_seconds)}"
                     if r.refinery_val_seconds is not None else "")
            lines.append(f"  val: {_minutes(r.val_seconds_per_pass)}/pass x {r.val_passes}{extra}"
                         + "".join(f" ({n})" for n in r.notes))
        lines.append(f"  round: {_minutes(r.seconds)} (train {_minutes(r.train_seconds)}, val {_minutes(r.val_seconds)})")
    lines.append(f"chain: {len(est['rounds'])} round(s), {sum(r.epochs for r in est['rounds'])} epochs, "
                 f"{_minutes(est['seconds'])}")
    left_out = "start-up (model build, first batch, torch.compile), checkpoint writes, the curves"
    if a["mode"] == "projected":
        left_out = "val passes, " + left_out
    lines.append(f"not included: {left_out}")
    return lines
