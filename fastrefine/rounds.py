"""The chain of rounds: train round 0 on labels, each later round on its refinery's softmax.

runs/<run.name>/recipe.toml, summary.md
runs/<run.name>/<round>/  recipe.toml, run.json, metrics.jsonl, last.pt, best.pt, curves.png, done.json

A round with done.json is skipped on rerun; a round with last.pt resumes after its last finished
epoch (RNG states, optimizer, scaler, loader epoch restored), so a resumed CPU run with a fixed seed
ends with the same weights as one that was never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from . import checkpoint as ckpt
from .distributed import Dist, init_distributed, shutdown
from .engine import Precision, build_step, evaluate, make_clipper, make_optimizer, resolve_precision, train_epoch
from .errors import RunError, UsageError
from .recipe import Recipe, RoundConfig, recipe_to_dict, round_refinery, to_toml
from .records import MetricsLog, git_revision, hardware, plot_curves, summary_markdown, summary_table
from .refinery import AdversarialJitter, NoRefinery, Refinery, make_loss, no_jitter
from .schedule import lr_at, resolution_at

log = logging.getLogger("fastrefine")


class SimulatedStop(RuntimeError):
    """Raised by `stop_after_steps` (tests): the process 'dies' mid-epoch without cleaning up."""


@dataclass
class Context:
    recipe: Recipe
    dist: Dist
    device: torch.device
    precision: Precision
    run_dir: Path
    num_classes: int
    console: Console
    steps_left: list  # [int] shared budget for stop_after_steps (0 = unlimited)


# ------------------------------------------------------------------------------------------- helpers

def run_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.run.out) / recipe.run.name


def dataset_num_classes(path: Path) -> int:
    path = Path(path)
    if (path / "manifest.json").is_file():
        from .manifest import read_manifest
        return read_manifest(path).num_classes
    train = path / "train"
    if train.is_dir():
        n = sum(1 for d in train.iterdir() if d.is_dir())
        if n:
            return n
    raise UsageError(f"data.path = {str(path)!r}: no manifest.json and no train/<class>/ folders "
                     f"(convert it with `fastrefine convert` or point at an ImageFolder root)")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def thread_budget(*, workers: int, device: torch.device, local_world_size: int = 1) -> tuple[int, int | None]:
    """(loader workers, torch threads or None to leave torch alone) for this process.

    On the CPU the step and the loader share the cores: with both sized to all cores, OpenMP's
    spinning threads and the loader's threads fight, and a 2-core machine ran 15-25x slower
    (92 img/s instead of 1,360 for small_resnet at 32 px with FFCV, measured). So `workers = -1`
    gives the loader half of this process's cores and torch the rest. With a GPU the loader takes
    them all. An explicit OMP_NUM_THREADS is respected.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    cores = max(1, cores // max(1, local_world_size))
    if device.type == "cuda":
        return (cores if workers < 0 else workers), None
    n = max(1, cores // 2) if workers < 0 else workers
    return n, (None if "OMP_NUM_THREADS" in os.environ else max(1, cores - n))


def refinery_checkpoint(ctx: Context, spec: str) -> Path:
    """Resolve a round's refinery spec (a round name or a path) to a checkpoint file."""
    names = [r.name for r in ctx.recipe.rounds]
    if spec in names:
        path = ctx.run_dir / spec / f"{ctx.recipe.refinery.use}.pt"
        if not path.is_file():
            raise RunError(f"refinery round {spec!r} has no {path.name} yet ({path}); run that round first")
        return path
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists() and ctx.recipe.source:
        alt = Path(ctx.recipe.source).parent / path
        path = alt if alt.exists() else path
    if not path.is_file():
        raise UsageError(f"refinery checkpoint {spec!r} not found")
    return path


def load_model_from_checkpoint(path: Path, *, device: torch.device, num_classes: int | None = None):
    from .models import create_model
    state = ckpt.load(path, map_location="cpu")
    meta = state.get("meta")
    if not meta or "model" not in state:
        raise RunError(f"{path}: not a fastrefine checkpoint (no model/meta)")
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise UsageError(f"{path}: the checkpoint has {meta['num_classes']} classes, the dataset {num_classes}")
    model = create_model(meta["model_name"], num_classes=meta["num_classes"], **meta["model_options"])
    model.load_state_dict(state["model"])
    return model.to(device, memory_format=torch.channels_last), meta


def make_loaders(recipe: Recipe, *, device: torch.device, dtype: torch.dtype, seed: int, train_res: int,
                 rank: int = 0, world_size: int = 1, with_val: bool = True):
    """(train, val or None, backend, why): the recipe's loaders, with the CPU cores split between the
    loader and the step (thread_budget). `fastrefine run` and `fastrefine bench train` both use it."""
    from .loaders import build, resolve_backend
    lc = recipe.loader
    backend, reason = resolve_backend(lc.backend, device=device, data=Path(recipe.data.path))
    workers, threads = thread_budget(workers=lc.workers, device=device,
                                     local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads is not None:
        torch.set_num_threads(threads)
    common = dict(data=recipe.data.path, backend=backend, device=device, dtype=dtype, rank=rank,
                  world_size=world_size, seed=seed, workers=workers, scale=lc.scale, ratio=lc.ratio,
                  val_crop_ratio=lc.val_crop_ratio, channels_last=recipe.run.channels_last)
    train = build(split="train", batch_size=lc.batch_size, resolution=train_res, **common)
    val = None
    if with_val:
        val_res = lc.val_resolution or (lc.progressive.end if lc.progressive else lc.resolution)
        val = build(split="val", batch_size=lc.val_batch_size or lc.batch_size, resolution=val_res, **common)
    return train, val, backend, reason


def train_resolution(recipe: Recipe, epoch: int) -> int:
    p = recipe.loader.progressive
    if p is None:
        return recipe.loader.resolution
    return resolution_at(epoch, start=p.start, end=p.end, from_epoch=p.from_epoch, to_epoch=p.to_epoch,
                         multiple=p.multiple)


# --------------------------------------------------------------------------------------------- round

def run_round(ctx: Context, index: int) -> dict:
    from .models import create_model

    r, rd = ctx.recipe, ctx.recipe.rounds[index]
    rdir = ctx.run_dir / rd.name
    main = ctx.dist.is_main
    seed = r.run.seed * 1000 + index
    _seed_everything(seed + ctx.dist.rank)
    model_name, model_opts = r.round_model(rd)

    student = create_model(model_name, num_classes=ctx.num_classes, **model_opts)
    student = student.to(ctx.device, memory_format=torch.channels_last if r.run.channels_last else torch.contiguous_format)
    base_lr = rd.lr or r.optim.lr
    optimizer = make_optimizer(student, lr=base_lr, momentum=r.optim.momentum, nesterov=r.optim.nesterov,
                               weight_decay=r.optim.weight_decay, decay_norm_and_bias=r.optim.decay_norm_and_bias)
    scaler = ctx.precision.scaler()

    spec = round_refinery(r, index)
    refined = spec != "none"
    refinery_meta = None
    if refined:
        ref_path = refinery_checkpoint(ctx, spec)
        ref_model, refinery_meta = load_model_from_checkpoint(ref_path, device=ctx.device,
                                                              num_classes=ctx.num_classes)
        refinery = Refinery(ref_model, bn=r.refinery.bn, temperature=r.refinery.temperature,
                            fold_bn=r.refinery.fold_bn)
        del ref_model  # with fold_bn the Refinery holds a folded copy: drop the unfolded weights
        refinery_desc = f"{spec} ({refinery_meta['model_name']})"
    else:
        refinery, refinery_desc = NoRefinery(), "none (labels)"

    start_epoch, best, global_step = 0, -1.0, 0
    last = rdir / "last.pt"
    if last.is_file():
        state = ckpt.load(last, map_location=ctx.device)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, global_step = state["epoch"], state["best_top1"], state["step"]
        ckpt.set_rng_state(state["rng"])
        log.info("round %s: resuming after epoch %d from %s", rd.name, start_epoch, last)

    train_loader, val_loader, backend, reason = make_loaders(
        r, device=ctx.device, dtype=ctx.precision.input_dtype, seed=seed, rank=ctx.dist.rank,
        world_size=ctx.dist.world_size, train_res=train_resolution(r, start_epoch))
    raw_student = student
    if r.run.compile:
        student = torch.compile(student)
        if refined:
            refinery.model = torch.compile(refinery.model)  # compiled on its own, outside DDP
    if ctx.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        student = DDP(student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    adv = r.refinery.adversarial
    jitter = no_jitter
    if refined and adv.fraction > 0:
        from .loaders import IMAGENET_MEAN, IMAGENET_STD  # what every loader normalises with
        jitter = AdversarialJitter(student=raw_student, refinery=refinery, fraction=adv.fraction,
                                   epsilon=adv.epsilon, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                   autocast=ctx.precision.autocast)
    loss_fn = make_loss(refined=refined, kind=r.refinery.loss, gt_weight=r.refinery.gt_weight,
                        label_smoothing=r.optim.label_smoothing)
    step = build_step(student=student, refinery=refinery, loss_fn=loss_fn, jitter=jitter, optimizer=optimizer,
                      scaler=scaler, autocast=ctx.precision.autocast,
                      clip=make_clipper(r.optim.grad_clip, scaler, optimizer))

    metrics = MetricsLog(rdir / "metrics.jsonl", enabled=main, round=rd.name)
    if main:
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "recipe.toml").write_text(to_toml(recipe_to_dict(r)))
        (rdir / "run.json").write_text(json.dumps({
            "round": rd.name, "index": index, "model": model_name, "model_options": model_opts,
            "refinery": refinery_desc, "refinery_bn": r.refinery.bn if refined else None,
            "git": git_revision(), "hardware": hardware(), "backend": backend, "backend_reason": reason,
            "precision": ctx.precision.name, "world_size": ctx.dist.world_size, "device": str(ctx.device),
            "num_classes": ctx.num_classes, "train_images": train_loader.num_samples * ctx.dist.world_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_after_epoch": start_epoch}, indent=2))
    log.info("round %s: %s, refinery %s, %s loader (%s), %s, %d epochs", rd.name, model_name, refinery_desc,
             backend, reason, ctx.precision.name, rd.epochs)

    reduce = ctx.dist.all_reduce_sum()
    refinery_val = None
    if refined:
        refinery_val = evaluate(refinery.model, val_loader, autocast=ctx.precision.autocast,
                                max_batches=r.run.max_val_batches, all_reduce=reduce, set_eval=False)
        metrics.write({"kind": "refinery", "val_top1": refinery_val["top1"], "val_top5": refinery_val["top5"],
                       "val_loss": refinery_val["loss"]})

    steps_per_epoch = max(1, len(train_loader))
    if r.run.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, r.run.max_steps_per_epoch)

    def lr_fn(epoch_f: float) -> float:
        return lr_at(epoch_f, cfg=r.schedule, base_lr=base_lr, total_epochs=rd.epochs)

    started = time.perf_counter()
    last_eval: dict | None = None
    last_train = None
    from .progress import progress_bar
    with progress_bar(disable=not (main and r.run.progress), console=ctx.console) as bar:
        for epoch in range(start_epoch, rd.epochs):
            res = train_resolution(r, epoch)
            train_loader.set_epoch(epoch)
            train_loader.set_resolution(res)
            task = bar.add_task(f"{rd.name} {epoch + 1}/{rd.epochs} {res}px",
                                total=steps_per_epoch * train_loader.batch_size, info="")

            def on_step(n: int, task=task) -> None:
                bar.advance(task, n)
                if ctx.steps_left[0]:
                    ctx.steps_left[0] -= 1
                    if ctx.steps_left[0] == 0:
                        raise SimulatedStop("stop_after_steps reached")

            result = train_epoch(train_loader, step=step, optimizer=optimizer, lr_fn=lr_fn, epoch=epoch,
                                 steps_per_epoch=steps_per_epoch, max_steps=r.run.max_steps_per_epoch,
                                 log_every=r.run.log_every, on_log=metrics.write, on_step=on_step,
                                 all_reduce=reduce)
            global_step += result.steps
            last_train = result
            record = {"kind": "epoch", "epoch": epoch, "step": global_step, "resolution": res,
                      "train_loss": result.loss, "train_top1": result.top1, "train_images": result.images,
                      "train_seconds": result.seconds, "img_s": result.images / max(result.seconds, 1e-9),
                      "lr": optimizer.param_groups[0]["lr"]}
            if (epoch + 1) % r.run.eval_every == 0 or epoch + 1 == rd.epochs:
                last_eval = evaluate(raw_student, val_loader, autocast=ctx.precision.autocast,
                                     max_batches=r.run.max_val_batches, all_reduce=reduce)
                record.update(val_loss=last_eval["loss"], val_top1=last_eval["top1"], val_top5=last_eval["top5"],
                              val_images=last_eval["images"])
            metrics.write(record)
            improved = last_eval is not None and "val_top1" in record and record["val_top1"] > best
            if improved:
                best = record["val_top1"]
            meta = {"model_name": model_name, "model_options": model_opts, "num_classes": ctx.num_classes,
                    "round": rd.name, "epoch": epoch + 1, "val_top1": record.get("val_top1")}
            if main:
                if improved:
                    ckpt.save_atomic({"model": raw_student.state_dict(), "meta": meta}, rdir / "best.pt")
                ckpt.save_atomic({"model": raw_student.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": global_step,
                                  "best_top1": best, "rng": ckpt.rng_state(), "meta": meta}, last)
            ctx.dist.barrier()
            bar.update(task, info=f"loss {result.loss:.3f} train {100 * result.top1:.0f}%"
                       + (f" val {100 * record['val_top1']:.1f}%" if "val_top1" in record else ""))

    if last_eval is None:  # resumed after the final epoch: evaluate the finished weights for the summary
        last_eval = evaluate(raw_student, val_loader, autocast=ctx.precision.autocast,
                             max_batches=r.run.max_val_batches, all_reduce=reduce)
    train_top1 = last_train.top1 if last_train else None
    summary = {"round": rd.name, "model": model_name, "refinery": refinery_desc, "epochs": rd.epochs,
               "refinery_val_top1": refinery_val["top1"] if refinery_val else None,
               "train_top1": train_top1, "val_top1": last_eval["top1"], "val_top5": last_eval["top5"],
               "val_loss": last_eval["loss"], "best_val_top1": max(best, last_eval["top1"]),
               "gap": (train_top1 - last_eval["top1"]) if train_top1 is not None else None,
               "minutes": (time.perf_counter() - started) / 60, "backend": backend}
    if main:
        plot_curves(rdir / "metrics.jsonl", rdir / "curves.png", title=f"{r.run.name} / {rd.name} ({model_name})")
        if not (rdir / "best.pt").exists():
            shutil.copyfile(last, rdir / "best.pt")
        (rdir / "done.json").write_text(json.dumps(summary, indent=2))
    ctx.dist.barrier()
    return summary


# --------------------------------------------------------------------------------------------- chain

def _selected(recipe: Recipe, only: str | None) -> list[int]:
    if only is None:
        return list(range(len(recipe.rounds)))
    names = [r.name for r in recipe.rounds]
    if only not in names:
        raise UsageError(f"--round {only!r}: the recipe's rounds are {names}")
    return [names.index(only)]


def describe_plan(recipe: Recipe, *, restart: bool = False, only: str | None = None) -> str:
    run_dir = run_dir_of(recipe)
    lines = [f"run folder: {run_dir}", f"data: {recipe.data.path}", "rounds:"]
    for i in _selected(recipe, only):
        rd = recipe.rounds[i]
        name, opts = recipe.round_model(rd)
        rdir = run_dir / rd.name
        if restart:
            state = "start (restart)"
        elif (rdir / "done.json").is_file():
            state = "done, skip"
        elif (rdir / "last.pt").is_file():
            state = "resume"
        else:
            state = "start"
        extra = f" {opts}" if opts else ""
        lines.append(f"  {i}. {rd.name}: {name}{extra}, {rd.epochs} epochs, refinery {round_refinery(recipe, i)} "
                     f"-> {state}")
    return "\n".join(lines)


def _archive(run_dir: Path) -> Path:
    """--restart keeps what was there: the old folder is renamed, never deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    run_dir.rename(dest)
    return dest


def run_recipe(recipe: Recipe, *, restart: bool = False, only: str | None = None,
               console: Console | None = None, stop_after_steps: int = 0) -> list[dict]:
    """Run the recipe's rounds in order; returns one summary dict per round run or skipped."""
    console = console or Console()
    selected = _selected(recipe, only)
    dist_info, device = init_distributed(recipe.run.device)
    try:
        precision = resolve_precision(recipe.run.precision, device)
        run_dir = run_dir_of(recipe)
        if dist_info.is_main:
            if restart and run_dir.exists():
                moved = _archive(run_dir)
                log.info("--restart: moved the old run folder to %s", moved)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "recipe.toml").write_text(to_toml(recipe_to_dict(recipe)))
        dist_info.barrier()
        ctx = Context(recipe=recipe, dist=dist_info, device=device, precision=precision, run_dir=run_dir,
                      num_classes=recipe.data.num_classes or dataset_num_classes(Path(recipe.data.path)),
                      console=console, steps_left=[stop_after_steps])
        rows = []
        for i in range(len(recipe.rounds)):
            rd: RoundConfig = recipe.rounds[i]
            done = run_dir / rd.name / "done.json"
            if i not in selected:
                continue
            if done.is_file():
                log.info("round %s: already finished (%s), skipping", rd.name, done)
                rows.append(json.loads(done.read_text()))
                continue
            rows.append(run_round(ctx, i))
        if dist_info.is_main:
            all_rows = [json.loads((run_dir / r.name / "done.json").read_text())
                        for r in recipe.rounds if (run_dir / r.name / "done.json").is_file()]
            (run_dir / "summary.md").write_text(summary_markdown(all_rows, title=f"{recipe.run.name}"))
            console.print(summary_table(all_rows, title=f"{recipe.run.name}: {run_dir}"))
        return rows
    finally:
        shutdown(dist_info)
