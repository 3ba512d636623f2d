"""The chain: a recipe's rounds in order, each refined by an earlier one; skip, resume, restart.

runs/<run.name>/recipe.toml, summary.md, and one folder per round (see round.py).

A round with a readable done.json is skipped on rerun; a round with last.pt resumes after its last
finished epoch (RNG states, optimizer, scaler, loader epoch restored), so a resumed CPU run with a fixed
seed ends with the same weights as one that was never stopped. Everything a recipe names (models,
refinery checkpoints, torchvision refineries, earlier rounds) is checked before the first round trains.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch
from rich.console import Console

from . import atomic
from . import checkpoint as ckpt
from .distributed import Dist, init_distributed, shutdown
from .environment import usable_cores
from .errors import UsageError
from .interrupt import Position
from .precision import resolve_precision
from .recipe import Recipe, global_batch, recipe_to_dict, round_index, round_seed, to_toml
from .schedule import round_schedule
from .round import RoundEnv, ThreadPlan, refinery_source, run_round

log = logging.getLogger("fastrefine")


def run_dir_of(recipe: Recipe) -> Path:
    from .runfolder import check_run_name
    check_run_name(recipe.run.name)
    return Path(recipe.run.out) / recipe.run.name


def dataset_classes(recipe: Recipe) -> tuple[int, list[str]]:
    """(number of classes, class names in label order: wnids for converted ImageNet) of the recipe's data."""
    return data_classes(Path(recipe.data.path), num_classes=recipe.data.num_classes, where="data.path")


def data_classes(path: Path, *, num_classes: int | None = None, where: str = "data") -> tuple[int, list[str]]:
    """(number of classes, class names in label order) of a converted folder or an ImageFolder root
    (train/<class>/, or val/<class>/ when there is no train/)."""
    path = Path(path)
    names: list[str] = []
    if (path / "manifest.json").is_file():
        from .manifest import read_manifest
        names = [c.wnid for c in read_manifest(path).classes]
    else:
        split = next((path / s for s in ("train", "val") if (path / s).is_dir()), None)
        if split is not None:
            names = sorted(d.name for d in split.iterdir() if d.is_dir())
    if num_classes is not None:
        return num_classes, names
    if names:
        return len(names), names
    raise UsageError(f"{where} = {str(path)!r}: no manifest.json and no train/<class>/ folders "
                     f"(convert it with `fastrefine convert` or point at an ImageFolder root)")


def plan_threads(*, workers: int | None, device: torch.device, backend: str = "torch",
                 local_world_size: int = 1) -> ThreadPlan:
    """How this process splits its cores between the loader and the step (recorded in run.json).

    GPU: the loader gets this process's share of the cores; torch's threads are left alone.
    CPU, `loader.workers` not set: the rule follows what was measured (docs/benchmarks.md, "thread split"):
    - ffcv / dali decode in compiled threads at thousands of images/s per core, 50-100x what a CPU
      training step takes, so the loader's thread is idle most of the time: the step gets every core
      (torch threads = cores) and the loader one worker per 8 cores (at least 1);
    - torch (PIL decode, ~10x slower per image) keeps the even split: half the cores each, since
      sizing both to all cores made a 2-core machine 15-25x slower (OpenMP's spinning threads against
      busy loader threads, measured).
    An explicit `loader.workers` keeps the even split's torch side (cores - workers); OMP_NUM_THREADS, when
    set, decides torch's threads."""
    cores = max(1, usable_cores() // max(1, local_world_size))
    if device.type == "cuda":
        n = cores if workers is None else workers
        return ThreadPlan(n, None, f"GPU: {n} loader workers, torch threads untouched")
    if workers is None and backend in ("ffcv", "dali"):
        n, threads, rule = max(1, cores // 8), cores, f"{backend} loader: the step gets every core"
    elif workers is None:
        n = max(1, cores // 2)
        threads, rule = max(1, cores - n), "torch loader: cores split evenly"
    else:
        n, threads, rule = workers, max(1, cores - workers), "loader.workers as set, torch takes the rest"
    if "OMP_NUM_THREADS" in os.environ:
        return ThreadPlan(n, None, f"CPU, {cores} cores: {n} loader workers; torch threads from OMP_NUM_THREADS")
    return ThreadPlan(n, threads, f"CPU, {cores} cores: {n} loader workers, {threads} torch threads ({rule})")


# ----------------------------------------------------------------------------------------- checks

def _selected(recipe: Recipe, only: str | None) -> list[int]:
    if only is None:
        return list(range(len(recipe.rounds)))
    try:
        return [round_index(recipe, only)]
    except UsageError as e:
        raise UsageError(f"--round {only!r}: {e}") from None


PROBE_CLASSES = 10  # the class count check_plan builds each student with: its head's size decides nothing there


def check_plan(recipe: Recipe, *, selected: list[int], run_dir: Path, restart: bool = False) -> None:
    """Everything the selected rounds need, checked before any of them trains: refinery checkpoints exist
    and are not the round's own, torchvision refineries name a real model, a refinery round runs first
    (with `restart`, the run folder's checkpoints are about to be moved aside: they count as absent)."""
    from .models import create_model
    for i in selected:
        rd = recipe.rounds[i]
        name, opts = rd.model, rd.model_options
        try:  # every round's student is built here, on the meta device (no memory, no weights)
            with torch.device("meta"):  # before the data is read: any class count shows whether the options build
                create_model(name, num_classes=PROBE_CLASSES, **opts)
        except UsageError as e:
            raise UsageError(f"rounds[{i}] ({rd.name}): {e}") from None
        except (TypeError, ValueError, RuntimeError) as e:
            raise UsageError(f"rounds[{i}] ({rd.name}): model {name!r} cannot be built with options {opts} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        src = refinery_source(recipe, i, run_dir=run_dir)
        where = f"rounds[{i}].refinery"
        if src.kind == "checkpoint":
            if not src.path.is_file():
                raise UsageError(f"{where}: checkpoint {src.spec!r} not found (tried {src.path}"
                                 + (f" and beside {recipe.source}" if recipe.source else "") + ")")
            if src.path.resolve().parent == (run_dir / rd.name).resolve():
                raise UsageError(f"{where}: {src.path} is this round's own checkpoint; a round cannot refine itself")
            ckpt.check_header(src.path, what=f"{where}: checkpoint")
        elif src.kind == "torchvision":
            import torchvision
            name = src.spec.split(":", 1)[1]
            if name not in torchvision.models.list_models():
                raise UsageError(f"{where}: torchvision has no model {name!r}")
            from .pretrained import refinery_weights_file
            weights = refinery_weights_file(name, recipe.refinery.weights)
            ckpt.check_header(weights, what=f"refinery.weights = {recipe.refinery.weights!r}:")
        elif src.kind == "round":
            j = round_index(recipe, src.spec)
            if j not in selected and (restart or not src.path.is_file()):
                raise UsageError(f"{where}: round {src.spec!r} is not run here and has no {src.path.name} yet "
                                 f"({src.path}); run it first or drop --round")
            if src.path.is_file():
                ckpt.check_header(src.path, what=f"{where}: round {src.spec!r}'s")


def describe_plan(recipe: Recipe, *, restart: bool = False, only: str | None = None, world_size: int = 1) -> str:
    run_dir = run_dir_of(recipe)
    lines = [f"run folder: {run_dir}", f"data: {recipe.data.path}",
             f"global batch: {recipe.loader.batch_size} x {world_size} process(es)"
             + (f" x {recipe.optim.accumulate} accumulated" if recipe.optim.accumulate > 1 else "")
             + f" = {global_batch(recipe, world_size=world_size)}; optim.lr {recipe.optim.lr:g} is for "
             f"{recipe.optim.reference_batch} images ({recipe.optim.lr_scaling} scaling)", "rounds:"]
    for i in _selected(recipe, only):
        rd = recipe.rounds[i]
        name, opts = rd.model, rd.model_options
        rdir = run_dir / rd.name
        if restart:
            state = "start (restart)"
        elif atomic.read_json_marker(rdir / "done.json") is not None:
            state = "done, skip"
        elif (rdir / "last.pt").is_file():
            state = "resume"
        else:
            state = "start"
        extra = f" {opts}" if opts else ""
        seed = f", seed {round_seed(recipe, i)}" + (f" (from {rd.seed_from})" if rd.seed_from else "")
        lines.append(f"  {i}. {rd.name}: {name}{extra}, {rd.epochs} epochs, lr {round_schedule(recipe, i, world_size=world_size).peak:.4g}"
                     f"{seed}, refinery {rd.refinery} -> {state}")
    return "\n".join(lines)


# Keys that change how a run is watched or how fast it goes, not what it trains: a resume may change them.
RESUME_FREE = ("run.progress", "run.log_every", "run.tensorboard", "run.checkpoint_every_steps", "run.compile",
               "run.cudnn_benchmark", "run.device", "run.out", "data.path", "loader.workers", "run.eval_every",
               "run.max_val_batches", "loader.val_batch_size")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_changes(recipe: Recipe, index: int, recorded: Path) -> dict:
    """{dotted key: [recorded, now]} for what differs between the recipe a round started with (its
    recipe.toml) and `recipe`, over the keys that change what round `index` trains: every section but
    RESUME_FREE, and of the rounds only its own entry. The record is loaded as a recipe, so both sides
    are resolved alike (a record an older version wrote, with its [model] section or a 0 for an unset
    optim.grad_clip, compares as what it meant)."""
    from .recipe import RecipeError, load_recipe
    try:
        old = recipe_to_dict(load_recipe(recorded, recorded=True))
    except (RecipeError, OSError) as e:
        log.warning("%s: cannot be loaded (%s); recipe changes on resume not checked", recorded, e)
        return {}
    new = recipe_to_dict(recipe)

    def own(d: dict) -> dict:
        rounds = d.get("rounds") or []
        name = recipe.rounds[index].name
        mine = next((x for x in rounds if isinstance(x, dict) and x.get("name") == name), {})
        return _flat({k: v for k, v in d.items() if k != "rounds"}) | {
            f"rounds[{index}].{k}": v for k, v in _flat(mine).items()}

    a, b = own(old), own(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
            if k not in RESUME_FREE and a.get(k) != b.get(k)}


def check_resume_changes(recipe: Recipe, *, selected: list[int], run_dir: Path, accept: bool) -> dict:
    """Refuse (one line naming the keys) a resume whose recipe differs from the one the round started with;
    with `accept` return the changes by round index, for run.json."""
    found = {}
    for i in selected:
        rdir = run_dir / recipe.rounds[i].name
        if not (rdir / "last.pt").is_file() or atomic.read_json_marker(rdir / "done.json") is not None:
            continue
        if not (rdir / "recipe.toml").is_file():
            continue
        changed = recipe_changes(recipe, i, rdir / "recipe.toml")
        if changed and not accept:
            shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(changed.items())[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise UsageError(f"{rdir / 'recipe.toml'}: round {recipe.rounds[i].name!r} would resume with a changed "
                             f"recipe: {shown}{more}; put them back, rerun with --accept-changes (recorded in "
                             f"run.json), or --restart")
        if changed:
            found[i] = changed
    return found


def open_splits(env: RoundEnv) -> None:
    """Open the train and val splits as the rounds will (same backend, this rank's share) and close them:
    a missing or damaged split (a truncated val.beton, a shard that fails its recorded checksum) stops
    the run before the first round trains, not after its first epoch. Every rank learns of any rank's
    problem (runfolder.agree), so none waits at a barrier."""
    from .errors import FastRefineError
    from .round import make_loader, train_resolution
    from .runfolder import agree
    r, problem = env.recipe, None
    try:
        for split, res in (("train", train_resolution(r, 0)), ("val", r.loader.val_resolution)):
            loader = make_loader(r, split=split, device=env.device, dtype=env.precision.input_dtype, seed=r.run.seed,
                                 resolution=res, workers=env.threads.workers, rank=env.dist.rank,
                                 world_size=env.dist.world_size, backend=env.backend)
            if hasattr(loader, "close"):
                loader.close()
    except FastRefineError as e:
        problem = e
    agree(env.dist, problem)


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


# -------------------------------------------------------------------------------------------- run

def make_env(recipe: Recipe, dist_info: Dist, device: torch.device, *, console: Console | None = None,
             position: Position | None = None) -> RoundEnv:
    """The per-process decisions every round shares: precision, classes, the thread split (applied here)."""
    precision = resolve_precision(recipe.run.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = recipe.run.cudnn_benchmark
    from .loaders import resolve_backend
    backend, reason = resolve_backend(recipe.loader.backend, device=device, data=Path(recipe.data.path))
    threads = plan_threads(workers=recipe.loader.workers, device=device, backend=backend,
                           local_world_size=dist_info.local_world_size)
    if threads.torch_threads is not None:
        torch.set_num_threads(threads.torch_threads)
    num_classes, names = dataset_classes(recipe)
    return RoundEnv(recipe=recipe, dist=dist_info, device=device, precision=precision, run_dir=run_dir_of(recipe),
                    num_classes=num_classes, class_names=names, threads=threads, console=console or Console(),
                    backend=backend, backend_reason=reason, position=position or Position())


def run_recipe(recipe: Recipe, *, restart: bool = False, only: str | None = None,
               console: Console | None = None, position: Position | None = None,
               accept_changes: bool = False) -> list[dict]:
    """Run the recipe's rounds in order; returns one summary dict per round run or skipped. `position`
    (interrupt.Position) is kept up to date with the round, epoch and step in progress. `accept_changes`:
    resume rounds whose recipe changed, recording the changes (check_resume_changes)."""
    console = console or Console()
    selected = _selected(recipe, only)
    run_dir = run_dir_of(recipe)
    check_plan(recipe, selected=selected, run_dir=run_dir, restart=restart)
    if recipe.run.tensorboard:
        from .tensorboard import require
        require()  # a missing tensorboard is a one-line error before any round trains
    dist_info, device = init_distributed(recipe.run.device)
    folder = contextlib.ExitStack()
    try:
        env = make_env(recipe, dist_info, device, console=console, position=position)

        def prepare() -> None:  # rank 0, holding the run folder's lock
            if not restart:
                env.recipe_changes = check_resume_changes(recipe, selected=selected, run_dir=run_dir,
                                                          accept=accept_changes)
            if restart and run_dir.exists():
                log.info("--restart: moved the old run folder to %s", _archive(run_dir))
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(run_dir / "recipe.toml", to_toml(recipe_to_dict(recipe)))

        from .runfolder import claim
        folder.enter_context(claim(run_dir, dist=dist_info, out=recipe.run.out, restart=restart, prepare=prepare))
        open_splits(env)
        rows = []
        with env.stop.installed():  # SIGTERM/SIGUSR1: the step finishes, last.pt is written, exit 143
            for i in selected:
                rd = recipe.rounds[i]
                done = atomic.read_json_marker(run_dir / rd.name / "done.json")
                if done is not None:
                    log.info("round %s: already finished (%s), skipping", rd.name, run_dir / rd.name / "done.json")
                    rows.append(done)
                    continue
                rows.append(run_round(env, i))
        if dist_info.is_main:
            from .report import summary_markdown, summary_table, write_chain
            all_rows = [m for m in (atomic.read_json_marker(run_dir / r.name / "done.json") for r in recipe.rounds)
                        if m is not None]
            atomic.write_text(run_dir / "summary.md", summary_markdown(all_rows, title=recipe.run.name))
            write_chain(recipe, run_dir)
            console.print(summary_table(all_rows, title=f"{recipe.run.name}: {run_dir}"))
        return rows
    finally:
        folder.close()      # the run folder's lock, released however the run ends
        shutdown(dist_info)
