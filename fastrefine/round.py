"""One round: `build_round` assembles its parts, `run_round` trains them.

`build_round` is the one way a round is put together: `fastrefine run`, `fastrefine bench step/train`
and the tools all call it, so what a benchmark times is what a run trains (DESIGN.md convention 13).

runs/<run.name>/<round>/  recipe.toml, run.json, metrics.jsonl, last.pt, best.pt, curves.png, done.json,
                          and with run.ema ema.pt, with run.tensorboard tensorboard/
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from torch import nn

from . import atomic
from . import checkpoint as ckpt
from .distributed import Dist
from .engine import build_accumulate_step, build_step, evaluate, train_epoch
from .ema import WeightEma
from .errors import RunError, UsageError
from .interrupt import Position, deferred
from .optim import make_clipper, make_optimizer
from .precision import Precision
from .preempt import Preempted, StopSignals, StopVote
from .recipe import (TORCHVISION_PREFIX, Recipe, global_batch, recipe_to_dict, round_index, round_seed,
                     to_toml)
from .refinery import AdversarialJitter, NoRefinery, Refinery, make_loss, no_jitter
from .saver import Saver
from .schedule import LrSchedule, resolution_at, round_schedule

log = logging.getLogger("fastrefine")


@dataclass(frozen=True)
class ThreadPlan:
    """How this process splits its CPU cores: loader workers and torch's intra-op threads."""
    workers: int
    torch_threads: int | None   # None: torch is left as it is (a GPU run, or OMP_NUM_THREADS set)
    why: str


@dataclass
class RoundEnv:
    """What the chain decides once per process and every round shares."""
    recipe: Recipe
    dist: Dist
    device: torch.device
    precision: Precision
    run_dir: Path | None           # None: no run folder (the step benchmark); refinery rounds have no checkpoint
    num_classes: int
    class_names: list[str]
    threads: ThreadPlan
    console: Console = field(default_factory=Console)
    backend: str = "auto"          # the recipe's loader.backend resolved once for the process (chain.make_env)
    backend_reason: str = ""
    stop: StopSignals = field(default_factory=StopSignals)   # SIGTERM/SIGUSR1 requests (preempt.py)
    position: Position = field(default_factory=Position)  # where training is, for the line Ctrl-C prints
    recipe_changes: dict = field(default_factory=dict)  # round index -> {key: [old, new]} accepted on resume


@dataclass
class RoundParts:
    """Everything one round trains with; `student` is the plain module, `model` what the step runs."""
    index: int
    name: str
    seed: int
    lr_fn: LrSchedule            # fractional epoch -> lr, batch scaling included
    model_name: str
    model_options: dict
    student: nn.Module
    model: nn.Module
    refinery: nn.Module
    refinery_desc: str
    refined: bool
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: Callable               # batch -> backward and optimizer update
    accumulate_step: Callable    # batch -> backward only (the optim.accumulate - 1 batches before an update)
    train_loader: object
    make_val_loader: Callable[..., object]
    backend: str
    backend_reason: str
    ema: WeightEma | None = None   # run.ema: the average of the student's weights
    _val: object = None

    @property
    def lr(self) -> float:
        """The round's peak learning rate (scaled for the global batch)."""
        return self.lr_fn.peak

    @property
    def val_loader(self):
        if self._val is None:
            self._val = self.make_val_loader()
        return self._val

    def close(self) -> None:
        for loader in (self.train_loader, self._val):
            if loader is not None and hasattr(loader, "close"):
                loader.close()


# ------------------------------------------------------------------------------------- the pieces

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_resolution(recipe: Recipe, epoch: int) -> int:
    p = recipe.loader.progressive
    if p is None:
        return recipe.loader.resolution
    return resolution_at(epoch, start=p.start, end=p.end, from_epoch=p.from_epoch, to_epoch=p.to_epoch,
                         multiple=p.multiple)


def epoch_steps(recipe: Recipe, batches: int) -> int:
    """Steps in one epoch of a round whose train loader has `batches` batches: all of them, or
    run.max_steps_per_epoch when that is set and fewer."""
    cap = recipe.run.max_steps_per_epoch
    return max(1, batches) if cap is None else min(max(1, batches), cap)


def make_loader(recipe: Recipe, *, split: str, device: torch.device, dtype: torch.dtype, seed: int,
                resolution: int, workers: int, rank: int = 0, world_size: int = 1, shuffle: bool | None = None,
                backend: str | None = None, refinery_view: str = "crop"):
    """One loader as the recipe describes it (its backend options included); `backend`, when given, is
    the recipe's loader.backend already resolved. refinery_view = "image" (train, refined rounds): the
    loader also hands out each whole image (`Views`)."""
    from .loaders import build
    from .loaders.options import as_kwargs
    lc = recipe.loader
    backend = backend or lc.backend
    if refinery_view != "crop" and backend != "torch":
        raise UsageError(f"refinery.view = {refinery_view!r} needs the torch loader; loader.backend resolved to "
                         f"{backend!r} (set loader.backend = 'torch')")
    view = {} if refinery_view == "crop" else {"refinery_view": refinery_view}
    batch = lc.batch_size if split == "train" else lc.val_batch_size
    return build(data=recipe.data.path, backend=backend, split=split, batch_size=batch, resolution=resolution,
                 device=device, dtype=dtype, rank=rank, world_size=world_size, seed=seed, workers=workers,
                 scale=lc.scale, ratio=lc.ratio, val_crop_ratio=lc.val_crop_ratio, flip=lc.flip,
                 channels_last=recipe.run.channels_last, shuffle=shuffle, **view,
                 backend_options={"ffcv": as_kwargs(lc.ffcv), "dali": as_kwargs(lc.dali), "torch": as_kwargs(lc.torch)})


@dataclass(frozen=True)
class RefinerySource:
    kind: str            # "none" | "round" | "checkpoint" | "torchvision"
    spec: str            # the round's refinery as resolved at load
    path: Path | None    # the checkpoint file (a round's: None without a run folder; a checkpoint path's)


def refinery_source(recipe: Recipe, index: int, *, run_dir: Path | None) -> RefinerySource:
    """Where round `index`'s refinery comes from. Relative checkpoint paths are tried from the working
    directory, then from the recipe's folder."""
    spec = recipe.rounds[index].refinery
    if spec == "none":
        return RefinerySource("none", spec, None)
    if spec.startswith(TORCHVISION_PREFIX):
        return RefinerySource("torchvision", spec, None)
    if spec in [r.name for r in recipe.rounds]:
        return RefinerySource("round", spec, None if run_dir is None else run_dir / spec / f"{recipe.refinery.use}.pt")
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists() and recipe.source:
        alt = Path(recipe.source).parent / path
        path = alt if alt.exists() else path
    return RefinerySource("checkpoint", spec, path)


def refinery_module(env: RoundEnv, index: int, *, untrained_ok: bool = False,
                    normalization=None) -> tuple[nn.Module | None, str]:
    """(the refinery's network on the device, a description), or (None, "none (labels)").

    `normalization`: how the round's loader normalises its images (`loader.normalization`); a torchvision
    refinery is wrapped to see the normalisation its weights expect. None: the loaders' default.

    `untrained_ok` (benchmarks only): a refinery round that has not run yet is built with random weights,
    since speed does not depend on the weights."""
    r = env.recipe
    src = refinery_source(r, index, run_dir=env.run_dir)
    if src.kind == "none":
        return None, "none (labels)"
    if src.kind == "torchvision":
        from .pretrained import adapt_normalization, load_torchvision_refinery, torchvision_normalization
        name = src.spec[len(TORCHVISION_PREFIX):]
        model, desc = load_torchvision_refinery(name, weights=r.refinery.weights, class_map=r.refinery.class_map,
                                                class_names=env.class_names, num_classes=env.num_classes)
        # resolved once, here: the refinery sees inputs normalised as its weights expect
        norm = normalization if normalization is not None else _default_normalization(env)
        model, note = adapt_normalization(model, refinery=torchvision_normalization(name, weights=r.refinery.weights),
                                          loader=(norm.mean, norm.std))
        log.info("refinery %s: %s", src.spec, note)
        return model.to(env.device, memory_format=torch.channels_last), desc
    if src.path is None or not src.path.is_file():
        if src.kind == "round" and untrained_ok:
            from .models import create_model
            src_round = r.rounds[round_index(r, src.spec)]
            name, opts = src_round.model, src_round.model_options
            model = create_model(name, num_classes=env.num_classes, **opts)
            return model.to(env.device, memory_format=torch.channels_last), f"{src.spec} ({name}, random weights)"
        if src.kind == "round":
            raise RunError(f"refinery round {src.spec!r} has no {r.refinery.use}.pt yet ({src.path or 'no run folder'}); "
                           f"run that round first")
        raise UsageError(f"rounds[{index}].refinery: checkpoint {src.spec!r} not found")
    model, meta = ckpt.load_model(src.path, device=env.device, class_names=env.class_names,
                                  num_classes=env.num_classes, data=r.data.path)
    ema = ", EMA weights" if meta.weights == "ema" else ""
    return model, f"{src.spec} ({meta.model_name}{ema})"


# ------------------------------------------------------------------------------------------ build

def build_round(env: RoundEnv, index: int, *, start_epoch: int = 0, untrained_refinery_ok: bool = False,
                loaders: bool = True) -> RoundParts:
    """Student, refinery, loss, jitter, optimizer, step and loaders of round `index`, seeded from the
    round's seed (its own, or `seed_from`'s: same initial weights and crop stream).

    `loaders=False` (the step benchmark, on synthetic tensors) builds no loader; the refinery and the
    jitter then use the loaders' default normalisation (LoaderOptions' mean and std)."""
    from .models import create_model
    r, rd = env.recipe, env.recipe.rounds[index]
    seed = round_seed(r, index)
    model_name, model_opts = rd.model, dict(rd.model_options)
    fmt = torch.channels_last if r.run.channels_last else torch.contiguous_format
    torch.manual_seed(seed)  # the same initial weights on every rank and in a seed_from round
    student = create_model(model_name, num_classes=env.num_classes, **model_opts).to(env.device, memory_format=fmt)
    seed_everything(seed + env.dist.rank)

    refined = refinery_source(r, index, run_dir=env.run_dir).kind != "none"
    loader_args = dict(device=env.device, dtype=env.precision.input_dtype, seed=seed, workers=env.threads.workers,
                       rank=env.dist.rank, world_size=env.dist.world_size, backend=env.backend)
    if loaders:
        train_loader = make_loader(r, split="train", resolution=train_resolution(r, start_epoch),
                                   refinery_view=r.refinery.view if refined else "crop", **loader_args)
        backend, reason = env.backend, env.backend_reason
    else:
        train_loader, backend, reason = None, "none", "no loader (synthetic input)"
    # the refinery and the jitter take the normalisation from the loader that feeds them
    norm = train_loader.normalization if train_loader is not None else _default_normalization(env)
    ref_model, refinery_desc = refinery_module(env, index, untrained_ok=untrained_refinery_ok, normalization=norm)
    if refined:
        refinery = Refinery(ref_model, bn=r.refinery.bn, temperature=r.refinery.temperature,
                            fold_bn=r.refinery.fold_bn, resolution=r.refinery.resolution)
        del ref_model  # with fold_bn the Refinery holds a folded copy: drop the unfolded weights
    else:
        refinery = NoRefinery()

    lr_fn = round_schedule(r, index, world_size=env.dist.world_size)
    optimizer = make_optimizer(student, lr=lr_fn.peak, momentum=r.optim.momentum, nesterov=r.optim.nesterov,
                               weight_decay=r.optim.weight_decay, decay_norm_and_bias=r.optim.decay_norm_and_bias)
    scaler = env.precision.scaler()
    ema = WeightEma(student, decay=r.run.ema) if r.run.ema is not None else None


    def make_val_loader(shuffle: bool | None = None):
        return make_loader(r, split="val", resolution=r.loader.val_resolution, shuffle=shuffle, **loader_args)

    model = student
    if r.run.compile:
        # static shapes: one graph per train resolution (progressive resizing recompiles once per size,
        # never falls back to a dynamic-shape graph); training batches are whole (drop_last), and every
        # evaluation runs the eager modules (engine.evaluate on parts.student, uncompiled(refinery.model)),
        # so the val resolution and the short last val batch compile nothing
        model = torch.compile(student, dynamic=False)
        if refined:
            refinery.model = torch.compile(refinery.model, dynamic=False)  # on its own, outside DDP
    if env.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    adv = r.refinery.adversarial
    jitter = no_jitter
    if refined and adv.fraction > 0:  # a share of 0 jitters no image: the jitter would hand the batch back as it is
        jitter = AdversarialJitter(student=student, refinery=refinery, fraction=adv.fraction, epsilon=adv.epsilon,
                                   mean=norm.mean, std=norm.std, autocast=env.precision.autocast)
    loss_fn = make_loss(refined=refined, kind=r.refinery.loss, gt_weight=r.refinery.gt_weight,
                        label_smoothing=rd.label_smoothing)
    step_args = dict(student=model, refinery=refinery, loss_fn=loss_fn, jitter=jitter, optimizer=optimizer, scaler=scaler,
                     autocast=env.precision.autocast, clip=make_clipper(r.optim.grad_clip, scaler, optimizer),
                     accumulate=r.optim.accumulate)
    step, accumulate_step = build_step(**step_args), build_accumulate_step(**step_args)
    return RoundParts(index=index, name=rd.name, seed=seed, lr_fn=lr_fn, model_name=model_name, model_options=model_opts,
                      student=student, model=model, refinery=refinery, refinery_desc=refinery_desc, refined=refined,
                      optimizer=optimizer, scaler=scaler, step=step, accumulate_step=accumulate_step, train_loader=train_loader,
                      make_val_loader=make_val_loader, backend=backend, backend_reason=reason, ema=ema)


def uncompiled(module):
    """The eager module behind a torch.compile wrapper (the module itself when it is not compiled)."""
    return getattr(module, "_orig_mod", module)


def compile_counters() -> dict:
    """torch.compile's process-wide counters so far: frames compiled (each compile or recompile of a
    module's forward), graphs, and seconds in Dynamo's whole-frame compile (`_compile.compile_inner`) and
    in Inductor's backward compile (`bw_compiler`, which may run lazily at the first backward). Read from
    torch._dynamo.utils; {} where this torch does not have them."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:
        return {}
    times = {k: list(v) for k, v in compilation_time_metrics.items()}
    backward = [t for k, v in times.items() if k.endswith("bw_compiler") for t in v]
    return {"frames": len(times.get("_compile.compile_inner", [])), "graphs": int(counters["stats"]["unique_graphs"]),
            "frame_compile_s": sum(times.get("_compile.compile_inner", [])), "backward_compile_s": sum(backward)}


def compiles_since(before: dict) -> dict | None:
    """What torch.compile did since `before` (compile_counters()), for the round's record."""
    now = compile_counters()
    if not now or not before:
        return None
    return {"frames": now["frames"] - before["frames"], "graphs": now["graphs"] - before["graphs"],
            "frame_compile_s": round(now["frame_compile_s"] - before["frame_compile_s"], 3),
            "backward_compile_s": round(now["backward_compile_s"] - before["backward_compile_s"], 3)}


def _default_normalization(env: RoundEnv):
    """The normalisation a loader built with default mean and std hands out in this run's input dtype."""
    from .loaders import IMAGENET_MEAN, IMAGENET_STD, Normalization
    return Normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=env.precision.input_dtype)


# ------------------------------------------------------------------------------------------ state

def resume_partial(env: RoundEnv, state: dict):
    """(steps done into the checkpoint's epoch, this rank's running sums of those steps) of a mid-epoch
    last.pt; (0, None) at an epoch boundary."""
    from .engine import Partial
    k = int(state.get("epoch_step", 0) or 0)
    if k == 0:
        return 0, None
    saved = state.get("partial") or []
    if len(saved) != env.dist.world_size:
        raise UsageError(f"{env.run_dir}: last.pt stopped inside epoch {state['epoch'] + 1} with "
                         f"{len(saved)} process(es); resume it with the same number, or delete last.pt")
    mine = saved[env.dist.rank]
    sums = mine["sums"].to(env.device) if mine["sums"] is not None else None
    return k, Partial(sums, int(mine["seen"]))


def restore(parts: RoundParts, env: RoundEnv, state: dict) -> tuple[int, float | None, int]:
    """Load a last.pt state (mapped to the CPU) into the round's parts: (epoch, best top-1, step)."""
    parts.student.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None:
        if "ema" in state:
            parts.ema.load_state_dict(state["ema"])
        else:  # run.ema turned on for a round that started without it
            log.warning("round %s: last.pt holds no EMA weights; the average starts from the resumed weights",
                        parts.name)
            parts.ema.load_state_dict(parts.student.state_dict())
    rng = ckpt.rank_rng_state(state["rng"], env.dist.rank)
    if rng is not None:
        ckpt.set_rng_state(rng)
    else:  # a rank the saving run did not have (a larger world size): a distinct stream per rank
        log.warning("round %s: no saved RNG state for rank %d; reseeded from (seed, epoch, rank)",
                    parts.name, env.dist.rank)
        seed_everything(parts.seed + 7919 * state["epoch"] + env.dist.rank)
    return state["epoch"], state["best_top1"], state["step"]


# -------------------------------------------------------------------------------------------- run

def run_round(env: RoundEnv, index: int) -> dict:
    """Train round `index` (resuming from its last.pt), evaluate, checkpoint every epoch; its summary.
    The round's loaders are closed however it ends: persistent DataLoader workers ignore SIGTERM (so that
    a preempted step can finish), and a worker nobody shut down would hold the process at exit."""
    built: list[RoundParts] = []
    try:
        return _run_round(env, index, built)
    finally:
        for parts in built:
            parts.close()


def _run_round(env: RoundEnv, index: int, built: list) -> dict:
    r, rd = env.recipe, env.recipe.rounds[index]
    rdir, main = env.run_dir / rd.name, env.dist.is_main
    if main:
        atomic.clean_stale_temporaries(rdir)
    state = ckpt.load_state(rdir / "last.pt", class_names=env.class_names, num_classes=env.num_classes,
                            data=r.data.path)
    start_epoch = state["epoch"] if state else 0
    compiled_before = compile_counters() if r.run.compile else {}
    parts = build_round(env, index, start_epoch=start_epoch)
    built.append(parts)
    best, global_step, start_step, carry = None, 0, 0, None
    if state:
        start_epoch, best, global_step = restore(parts, env, state)
        start_step, carry = resume_partial(env, state)
        if start_step:
            log.info("round %s: resuming epoch %d at step %d", rd.name, start_epoch + 1, start_step)
        else:
            log.info("round %s: resuming after epoch %d", rd.name, start_epoch)
    del state
    env.position.start_round(rd.name, saved_epochs=start_epoch, saved_step=start_step)
    from .runlog import MetricsLog, truncate_to_epoch
    steps_per_epoch = epoch_steps(r, len(parts.train_loader))
    metrics = MetricsLog(rdir / "metrics.jsonl", enabled=main, round=rd.name)
    if main:
        truncate_to_epoch(rdir / "metrics.jsonl", epochs_done=start_epoch, steps_into=start_step)
        _write_run_record(env, parts, rdir, start_epoch, start_step=start_step)
        if r.run.tensorboard:
            metrics.mirrors.append(_tensorboard(rdir, steps_per_epoch=steps_per_epoch, resumed_step=global_step))
    reduce = env.dist.all_reduce_sum()
    ac, max_val = env.precision.autocast, r.run.max_val_batches
    refinery_val = (_evaluate_refinery(env, parts, metrics, reduce, max_batches=max_val)
                    if parts.refined and start_epoch == 0 else None)
    started, last_eval, last_train, last_ema = time.perf_counter(), None, None, None
    vote = StopVote(env.stop, env.dist.control, enabled=env.dist.enabled)
    every = r.run.checkpoint_every_steps
    from .progress import PlainProgress, run_progress
    bar = run_progress(enabled=main and r.run.progress, console=env.console)
    if isinstance(bar, PlainProgress):
        metrics.mirrors.append(bar.step_record)  # a line per log_every steps
    with Saver(rdir, dist=env.dist, best_top1=best) as saver, metrics, bar:
        for epoch in range(start_epoch, rd.epochs):
            res = train_resolution(r, epoch)
            parts.train_loader.set_epoch(epoch)
            parts.train_loader.set_resolution(res)
            task = bar.add_task(f"{rd.name} {epoch + 1}/{rd.epochs} {res}px",
                                total=steps_per_epoch * parts.train_loader.batch_size, info="")
            env.position.start_epoch(epoch, step=start_step)

            def on_step(n: int, task=task) -> None:
                env.position.step += 1
                bar.advance(task, n)

            epoch_base = global_step - start_step   # the round's step count at this epoch's start

            def after_update(next_step: int, partial, epoch=epoch, epoch_base=epoch_base) -> bool:
                """Mid-epoch: stop when every rank agrees a stop was asked; save every N steps."""
                stopping = vote.poll()
                if stopping or (every and (epoch_base + next_step) % every == 0):
                    with deferred():  # the state copied and recorded as saved before a Ctrl-C is taken
                        saver.save(model=parts.student, optimizer=parts.optimizer, scaler=parts.scaler,
                                   ema=parts.ema, meta=_meta(parts, env, epoch=epoch, val_top1=None), epoch=epoch,
                                   step=epoch_base + next_step, val_top1=None, epoch_step=next_step, partial=partial)
                        env.position.saved(epoch, step=next_step)
                if stopping:
                    saver.flush()  # that step on disk before any rank exits
                return stopping

            if start_step:
                bar.advance(task, start_step * parts.train_loader.batch_size)

            result = train_epoch(parts.train_loader, step=parts.step, optimizer=parts.optimizer, epoch=epoch,
                                 lr_fn=parts.lr_fn, steps_per_epoch=steps_per_epoch,
                                 max_steps=steps_per_epoch, log_every=r.run.log_every, on_log=metrics.write,
                                 on_step=on_step, all_reduce=reduce,
                                 accumulate=r.optim.accumulate, accumulate_step=parts.accumulate_step,
                                 on_update=parts.ema.update if parts.ema is not None else lambda: None,
                                 start_step=start_step, carry=carry, after_update=after_update)
            global_step += result.steps
            start_step, carry = 0, None
            if result.stopped_at is not None:
                raise Preempted(_stopped_line(env, rdir, epoch=epoch, step=result.stopped_at, of=steps_per_epoch))
            last_train = result
            record = {"kind": "epoch", "epoch": epoch, "step": global_step, "resolution": res,
                      "train_loss": result.loss, "train_top1": result.top1, "train_images": result.images,
                      "train_seconds": result.seconds, "img_s": result.images / max(result.seconds, 1e-9),
                      "lr": parts.optimizer.param_groups[0]["lr"], "torch_threads": result.torch_threads}
            if (epoch + 1) % r.run.eval_every == 0 or epoch + 1 == rd.epochs:
                last_eval = evaluate(parts.student, parts.val_loader, autocast=ac, max_batches=max_val, all_reduce=reduce)
                record.update(val_loss=last_eval["loss"], val_top1=last_eval["top1"], val_top5=last_eval["top5"],
                              val_images=last_eval["images"], **val_cut(last_eval))
                if parts.ema is not None:
                    last_ema = evaluate(parts.ema.module, parts.val_loader, autocast=ac, max_batches=max_val,
                                        all_reduce=reduce)
                    record.update(ema_val_loss=last_ema["loss"], ema_val_top1=last_ema["top1"],
                                  ema_val_top5=last_ema["top5"])
            metrics.write(record)
            # a Ctrl-C or SIGTERM waits for the state's copy (the writer thread is joined on the way out):
            # the line it prints is then exact
            with deferred():
                saver.save(model=parts.student, optimizer=parts.optimizer, scaler=parts.scaler, ema=parts.ema,
                           meta=_meta(parts, env, epoch=epoch + 1, val_top1=record.get("val_top1")),
                           epoch=epoch + 1, step=global_step, val_top1=record.get("val_top1"))
                env.position.saved(epoch + 1)
            bar.update(task, info=f"loss {result.loss:.3f} train {100 * result.top1:.0f}%"
                       + (f" val {100 * record['val_top1']:.1f}%" if "val_top1" in record else "")
                       + (f" ema {100 * record['ema_val_top1']:.1f}%" if "ema_val_top1" in record else ""))
            if epoch + 1 < rd.epochs and vote.settle():
                saver.flush()
                raise Preempted(_stopped_line(env, rdir, epoch=epoch + 1, step=0, of=steps_per_epoch))
        env.position.epoch = None
        if last_eval is None:  # resumed after the final epoch: evaluate the finished weights for the summary
            last_eval = evaluate(parts.student, parts.val_loader, autocast=ac, max_batches=max_val, all_reduce=reduce)
            if parts.ema is not None:
                last_ema = evaluate(parts.ema.module, parts.val_loader, autocast=ac, max_batches=max_val,
                                    all_reduce=reduce)
        summary = _summary(env, parts, rd, refinery_val, last_train, last_eval, saver.best_top1, started)
        summary["compiles"] = compiles_since(compiled_before) if r.run.compile else None
        if summary["compiles"]:
            log.info("round %s: torch.compile compiled %d frames (%d graphs): %.1f s whole-frame, %.1f s backward",
                     rd.name, summary["compiles"]["frames"], summary["compiles"]["graphs"],
                     summary["compiles"]["frame_compile_s"], summary["compiles"]["backward_compile_s"])
        summary["ema_val_top1"] = last_ema["top1"] if last_ema is not None else None
        if main:
            saver.finish()
            _finish(env, parts, rdir, summary)
    env.dist.barrier()
    return summary


def _tensorboard(rdir: Path, *, steps_per_epoch: int, resumed_step: int):
    """The TensorBoard mirror of metrics.jsonl (rank 0). On resume, events past the checkpoint's last
    epoch are dropped and the refinery's figure is taken from the log (it is not evaluated again)."""
    from .runlog import read_metrics
    from .tensorboard import TensorBoardMirror
    mirror = TensorBoardMirror(rdir / "tensorboard", steps_per_epoch=steps_per_epoch,
                               purge_step=resumed_step + 1 if resumed_step else None)
    logged = [m for m in read_metrics(rdir / "metrics.jsonl") if m.get("kind") == "refinery"]
    if logged:
        mirror.refinery_top1 = logged[-1]["val_top1"]
    return mirror


def _evaluate_refinery(env: RoundEnv, parts: RoundParts, metrics, reduce, *, max_batches: int | None) -> dict:
    """The refinery's own val accuracy. In BN batch mode its statistics come from each batch, so it is
    evaluated on shuffled val batches (class-sorted batches would each be nearly one class)."""
    batch_mode = env.recipe.refinery.bn == "batch"
    loader = parts.make_val_loader(shuffle=True) if batch_mode else parts.val_loader
    try:
        res = evaluate(uncompiled(parts.refinery.model), loader, autocast=env.precision.autocast,
                       max_batches=max_batches, all_reduce=reduce, set_eval=False)
    finally:
        if batch_mode and hasattr(loader, "close"):
            loader.close()
    metrics.write({"kind": "refinery", "val_top1": res["top1"], "val_top5": res["top5"], "val_loss": res["loss"],
                   **val_cut(res),
                   "shuffled_val": batch_mode})
    return res


def _meta(parts: RoundParts, env: RoundEnv, *, epoch: int, val_top1) -> ckpt.Meta:
    return ckpt.Meta(model_name=parts.model_name, model_options=parts.model_options, num_classes=env.num_classes,
                     class_names=tuple(env.class_names), round=parts.name, epoch=epoch, val_top1=val_top1)


def _stopped_line(env: RoundEnv, rdir: Path, *, epoch: int, step: int, of: int) -> str:
    """The one line a stop signal ends the run with (`epoch` counts from 0; step 0: at its start)."""
    why = env.stop.requested or "a stop signal on another rank"
    return (f"stopped by {why} at epoch {epoch + 1} step {step}/{of}; {rdir / 'last.pt'} holds that step: "
            f"rerun the same command to resume from it (exit {Preempted.exit_code})")


def _write_run_record(env: RoundEnv, parts: RoundParts, rdir: Path, start_epoch: int, start_step: int = 0) -> None:
    """run.json and the round's recipe.toml. Recipe changes accepted on a resume (--accept-changes) are
    appended to the list the previous run.json kept, with the epoch and step from which they apply."""
    from .environment import git_revision, hardware
    r = env.recipe
    rdir.mkdir(parents=True, exist_ok=True)
    before = atomic.read_json_marker(rdir / "run.json") or {}
    changes = list(before.get("recipe_changes") or []) if start_epoch or start_step else []
    if env.recipe_changes.get(parts.index):
        changes.append({"from_epoch": start_epoch + 1, "from_step": start_step,
                        "keys": env.recipe_changes[parts.index]})
    atomic.write_text(rdir / "recipe.toml", to_toml(recipe_to_dict(r)))
    loader = parts.train_loader
    atomic.write_json(rdir / "run.json", {
        "round": parts.name, "index": parts.index, "seed": parts.seed, "model": parts.model_name,
        "model_options": parts.model_options, "refinery": parts.refinery_desc,
        "refinery_bn": r.refinery.bn if parts.refined else None, "lr": parts.lr,
        "global_batch": global_batch(r, world_size=env.dist.world_size), "batch_size": r.loader.batch_size,
        "accumulate": r.optim.accumulate,
        "git": git_revision(), "hardware": hardware(), "backend": parts.backend, "backend_reason": parts.backend_reason,
        "normalization": {"mean": list(loader.normalization.mean), "std": list(loader.normalization.std),
                          "dtype": str(loader.normalization.dtype).replace("torch.", "")},
        "loader_workers": getattr(loader, "workers", env.threads.workers), "torch_threads": torch.get_num_threads(),
        "thread_plan": env.threads.why, "precision": env.precision.name, "world_size": env.dist.world_size,
        "device": str(env.device), "num_classes": env.num_classes,
        "train_images": loader.num_samples * env.dist.world_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_after_epoch": start_epoch,
        "resumed_at_step": start_step, "recipe_changes": changes})
    log.info("round %s: %s, refinery %s, %s loader (%s), %s, lr %.4g, %d epochs", parts.name, parts.model_name,
             parts.refinery_desc, parts.backend, parts.backend_reason, env.precision.name, parts.lr,
             r.rounds[parts.index].epochs)


def _summary(env, parts, rd, refinery_val, last_train, last_eval, best, started) -> dict:
    train_top1 = last_train.top1 if last_train else None
    if refinery_val is None and parts.refined:  # resumed: the refinery's figure is in the log already
        from .runlog import read_metrics
        logged = [m for m in read_metrics(env.run_dir / rd.name / "metrics.jsonl") if m.get("kind") == "refinery"]
        refinery_val = {"top1": logged[-1]["val_top1"]} if logged else None
    return {"round": rd.name, "model": parts.model_name, "refinery": parts.refinery_desc, "epochs": rd.epochs,
            "seed": parts.seed, "refinery_val_top1": refinery_val["top1"] if refinery_val else None,
            "train_top1": train_top1, "val_top1": last_eval["top1"], "val_top5": last_eval["top5"],
            "val_loss": last_eval["loss"], "best_val_top1": last_eval["top1"] if best is None else max(best, last_eval["top1"]),
            "gap": (train_top1 - last_eval["top1"]) if train_top1 is not None else None,
            "minutes": (time.perf_counter() - started) / 60, "backend": parts.backend,
            "val_batches": val_cut(last_eval).get("val_batches")}


def val_cut(result: dict) -> dict:
    """{"val_batches": "64/80"} when run.max_val_batches cut the val pass short (batches done / in a full
    pass), else {}: the record and the summary say that such a val top-1 is not the whole split's."""
    done, total = result.get("batches"), result.get("total_batches")
    return {"val_batches": f"{done}/{total}"} if done and total and done < total else {}


def _finish(env: RoundEnv, parts: RoundParts, rdir: Path, summary: dict) -> None:
    from .report import plot_curves
    plot_curves(rdir / "metrics.jsonl", rdir / "curves.png",
                title=f"{env.recipe.run.name} / {parts.name} ({parts.model_name})")
    atomic.write_json(rdir / "done.json", summary)
