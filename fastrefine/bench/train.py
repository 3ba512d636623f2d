"""`fastrefine bench train`: loader + step end to end from a recipe, and each alone, in one process."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import RunError, UsageError

from .protocol import MIN_REPEATS, cycle, first_call, make_record, make_sync, measure, rates, spread
from .step import _memory_format, make_bench_step


def _refinery_arch(recipe, index: int, device: torch.device):
    """The round's refinery as a module: the real checkpoint if given as a path, else its architecture
    (an earlier round's model), randomly initialised -- speed does not depend on the weights."""
    from ..models import create_model
    from ..recipe import round_refinery
    from ..rounds import load_model_from_checkpoint
    spec = round_refinery(recipe, index)
    if spec == "none":
        return None, "none"
    names = [r.name for r in recipe.rounds]
    if spec in names:
        name, opts = recipe.round_model(recipe.rounds[names.index(spec)])
        return create_model(name, num_classes=_num_classes(recipe), **opts), f"{name} (round {spec}, random weights)"
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"round {recipe.rounds[index].name!r}: refinery {spec!r} is neither a round nor a file")
    model, meta = load_model_from_checkpoint(path, device=device)
    return model, f"{meta['model_name']} ({path})"


def _num_classes(recipe) -> int:
    from ..rounds import dataset_num_classes
    return recipe.data.num_classes or dataset_num_classes(Path(recipe.data.path))


def _recipe_loader(recipe, *, device: torch.device, dtype: torch.dtype):
    """The recipe's train loader exactly as `fastrefine run` builds it for its first epoch."""
    from ..rounds import make_loaders, train_resolution
    train, _, _, _ = make_loaders(recipe, device=device, dtype=dtype, seed=recipe.run.seed,
                                  train_res=train_resolution(recipe, 0), with_val=False)
    return train


def timed_loop(*, it: Iterator, step: Callable, steps: int, sync: Callable[[], None]) -> dict:
    """K end-to-end steps; time waiting in next(it) apart from the whole (synchronised before each read)."""
    wait = 0.0
    images = 0
    t_start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        sync()
        t1 = time.perf_counter()
        step(x, y)
        sync()
        wait += t1 - t0
        images += int(y.shape[0])
    total = time.perf_counter() - t_start
    return {"seconds": total, "wait_s": wait, "images": images}


def run_train(*, recipe_path: Path, overrides: list[str], round_name: str | None, steps: int, warmup: int,
              repeats: int) -> dict:
    from ..distributed import init_distributed
    from ..engine import resolve_precision
    from ..models import create_model
    from ..recipe import load_recipe
    recipe = load_recipe(recipe_path, overrides)
    if not recipe.rounds:
        raise UsageError(f"{recipe_path}: the recipe has no [[rounds]]")
    names = [r.name for r in recipe.rounds]
    if round_name is not None and round_name not in names:
        raise UsageError(f"--round {round_name!r}: the recipe's rounds are {names}")
    index = names.index(round_name) if round_name else len(names) - 1
    if repeats < MIN_REPEATS:
        raise UsageError(f"--repeats must be at least {MIN_REPEATS}, got {repeats}")
    _, dev = init_distributed(recipe.run.device)
    prec = resolve_precision(recipe.run.precision, dev)
    num_classes = _num_classes(recipe)
    fmt = _memory_format(recipe.run.channels_last)
    model_name, opts = recipe.round_model(recipe.rounds[index])
    torch.manual_seed(recipe.run.seed)
    student = create_model(model_name, num_classes=num_classes, **opts).to(dev, memory_format=fmt)
    ref_model, ref_desc = _refinery_arch(recipe, index, dev)
    if ref_model is not None:
        ref_model = ref_model.to(dev, memory_format=fmt)
    step = make_bench_step(student=student, refinery=ref_model, precision=prec, compile=recipe.run.compile)
    del ref_model  # the step's Refinery holds its own (BN-folded) copy
    sync = make_sync(dev)
    t0 = time.perf_counter()
    loader = _recipe_loader(recipe, device=dev, dtype=prec.input_dtype)
    it = cycle(loader)
    x0, y0 = (t.clone() for t in next(it))  # kept while the loader runs on: FFCV recycles its own buffers
    sync()
    startup = time.perf_counter() - t0
    first = first_call(lambda: step(x0, y0), sync=sync)
    for _ in range(warmup):
        step(*next(it))
    sync()
    loops = [timed_loop(it=it, step=step, steps=steps, sync=sync) for _ in range(repeats)]
    e2e = {"case": "end to end (loader + step)", "images_per_s": spread([lp["images"] / lp["seconds"] for lp in loops]),
           "data_wait_fraction": spread([lp["wait_s"] / lp["seconds"] for lp in loops]), "loops": loops}
    batch = int(y0.shape[0])
    loader_s = measure(lambda: next(it), warmup=1, iters=steps, repeats=repeats, sync=sync)
    step_s = measure(lambda: step(x0, y0), warmup=1, iters=steps, repeats=repeats, sync=sync,
                     events=dev.type == "cuda")
    alone_loader = {"case": "loader alone", "images_per_s": rates(loader_s, items=steps * batch), "seconds": loader_s}
    alone_step = {"case": "step alone (one real batch reused)", "images_per_s": rates(step_s, items=steps * batch),
                  "seconds": step_s}
    results = [e2e, alone_loader, alone_step]
    summary = _train_summary(e2e, alone_loader, alone_step)
    settings = {"recipe": str(recipe_path), "overrides": list(overrides), "round": names[index],
                "model": model_name, "model_options": opts, "refinery": ref_desc, "backend": loader.backend,
                "normalize_on": getattr(loader, "normalize_on", "?"), "batch_size": batch,
                "resolution": int(x0.shape[-1]), "dtype": str(x0.dtype).replace("torch.", ""),
                "precision": prec.name, "device": str(dev), "compile": recipe.run.compile, "steps": steps,
                "warmup": warmup, "repeats": repeats, "startup_s": startup, "first_step_s": first,
                "clock": "time.perf_counter with a device sync before each reading",
                "threads": torch.get_num_threads()}
    notes = ["data_wait_fraction = time inside next(iter) / whole loop time (device synced before each reading)",
             "input-bound when data_wait_fraction > 0.1 or the loader alone is slower than the step alone"]
    return make_record(command="train", settings=settings, results=results, summary=summary, notes=notes)


def _train_summary(e2e: dict, loader: dict, step: dict) -> dict:
    lo, st = loader["images_per_s"]["median"], step["images_per_s"]["median"]
    wait = e2e["data_wait_fraction"]["median"]
    bound = min(lo, st)
    return {"end_to_end_images_per_s": e2e["images_per_s"]["median"], "loader_alone_images_per_s": lo,
            "step_alone_images_per_s": st, "min_alone_images_per_s": bound,
            "end_to_end_over_min_alone": e2e["images_per_s"]["median"] / bound,
            "data_wait_fraction": wait, "input_bound": bool(wait > 0.1 or lo < st),
            "slower_alone": "loader" if lo < st else "step"}

