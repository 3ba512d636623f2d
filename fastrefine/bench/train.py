"""`fastrefine bench train`: the trainer's own epoch loop end to end, and loader and step alone.

End to end is `engine.train_epoch` itself over the round that `fastrefine run` would build
(`round.build_round`: the same loader, thread split, refinery, loss, jitter, clipping and lr), each
repeat a fresh epoch cut to `--steps` steps. With `--baseline`, the plain torchvision way runs in the
same process on the same images with the same model pair, repeats alternating with fastrefine's:
ImageFolder + PIL + RandomResizedCrop/flip/ToTensor/Normalize in a DataLoader, the refinery's forward
in the same step, in fp32 as the original Label Refinery code ran and with channels_last + autocast to
the precision fastrefine picks on this hardware (bf16 on GPUs and on CPUs with native bf16; fp32 on a CPU
without it, where emulated bf16 is several times slower), as a user would write it today.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ..errors import UsageError
from .baseline import baseline_batches, baseline_dataloader, baseline_step
from .protocol import MIN_REPEATS, time_block, cycle, make_record, make_sync, measure, rates, spread


def _epoch_case(parts, *, epoch: int, steps: int) -> dict:
    """One fresh (partial) epoch of engine.train_epoch: what `fastrefine run` does, with its own timing."""
    from ..engine import train_epoch
    loader = parts.train_loader
    loader.set_epoch(epoch)
    res = train_epoch(loader, step=parts.step, optimizer=parts.optimizer, lr_fn=lambda e: parts.lr, epoch=epoch,
                      steps_per_epoch=max(1, len(loader)), max_steps=steps, log_every=None)
    return {"images": res.images, "seconds": res.seconds, "threads": res.torch_threads}


def _baseline_case(it, step, *, steps: int, sync) -> dict:
    t0 = time.perf_counter()
    images = 0
    for _ in range(steps):
        x, y = next(it)
        step(x, y)
        images += int(y.shape[0])
    sync()
    return {"images": images, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}


def run_train(*, recipe_path: Path, overrides: list[str], round_name: str | None, steps: int, warmup: int,
              repeats: int, baseline: bool = False, baseline_folder: Path | None = None,
              baseline_bf16: bool = False) -> dict:
    if repeats < MIN_REPEATS:
        raise UsageError(f"--repeats must be at least {MIN_REPEATS}, got {repeats}")
    recipe, env, index, parts, startup = _set_up(recipe_path, overrides, round_name)
    first = _epoch_case(parts, epoch=0, steps=max(1, warmup))  # start-up, compile and warm-up, timed apart
    base = (_baselines(recipe, env, parts, index, folder=baseline_folder, warmup=warmup, extra_bf16=baseline_bf16)
            if baseline else {})
    timed = _timed_repeats(parts, base, device=env.device, steps=steps, repeats=repeats)
    record = _train_record(recipe, env, parts, base, timed, first=first, startup=startup, recipe_path=recipe_path,
                           overrides=overrides, steps=steps, warmup=warmup, repeats=repeats)
    parts.close()
    return record


def _set_up(recipe_path: Path, overrides: list[str], round_name: str | None):
    """(recipe, env, round index, the round's parts, seconds build_round took): the round `fastrefine run`
    would build, its refinery with random weights where its round has not run."""
    from ..chain import make_env
    from ..distributed import init_distributed
    from ..recipe import load_recipe, round_index
    from ..round import build_round
    recipe = load_recipe(recipe_path, overrides)
    index = round_index(recipe, round_name) if round_name else len(recipe.rounds) - 1
    dist_info, dev = init_distributed(recipe.run.device)
    env = make_env(recipe, dist_info, dev)
    t0 = time.perf_counter()
    parts = build_round(env, index, untrained_refinery_ok=True)
    return recipe, env, index, parts, time.perf_counter() - t0


def _baselines(recipe, env, parts, index: int, *, folder: Path | None, warmup: int, extra_bf16: bool) -> dict:
    """{label: {"it", "step", "loops"}}: the plain torchvision loops, each warmed up, on the same images
    with the same model pair."""
    from ..models import create_model
    from ..round import refinery_module
    from .decode import _image_folder
    dev = env.device
    folder = Path(folder) if folder else _image_folder(Path(recipe.data.path), "train")
    torch.manual_seed(parts.seed)
    # the same refinery network the round loads (random weights where its round has not run), unfolded;
    # each loop gets its own copy (baseline_step moves it to its own memory format in place)
    ref, _ = refinery_module(env, index, untrained_ok=True)
    base = {}
    # the modern loop uses the precision fastrefine chose here: bf16 where the hardware has it (a
    # CPU without native bf16 emulates it several times slower than fp32: nobody would pick it)
    loops = [("fp32", False, None), (f"channels_last + {env.precision.name}", True, env.precision.dtype)]
    if extra_bf16 and env.precision.name != "bf16":
        loops.append(("channels_last + bf16", True, torch.bfloat16))    # as asked, however slow here
    for label, modern, amp_dtype in loops:
        torch.manual_seed(parts.seed)
        s = create_model(parts.model_name, num_classes=env.num_classes, **parts.model_options)
        it = baseline_batches(baseline_dataloader(folder=folder, resolution=recipe.loader.resolution,
                                                  batch_size=recipe.loader.batch_size,
                                                  workers=env.threads.workers, device=dev))
        step = baseline_step(student=s, refinery=copy.deepcopy(ref), lr=parts.lr, device=dev, modern=modern,
                             amp_dtype=amp_dtype)
        for _ in range(max(1, warmup)):
            step(*next(it))
        base[label] = {"it": it, "step": step, "loops": []}
    return base


def _timed_repeats(parts, base: dict, *, device: torch.device, steps: int, repeats: int) -> dict:
    """The timed part: `repeats` rounds of end to end, each baseline and the step alone on one held real
    batch, then the loader alone. Returns the held batch, the loops and the times (baseline loops are
    appended to `base`)."""
    loader = parts.train_loader
    sync = make_sync(device)
    it = cycle(loader)
    x0, y0 = (t.clone() for t in next(it))  # one real batch, kept: FFCV recycles its own buffers
    it.close()
    events = device.type == "cuda"
    parts.step(x0, y0)                       # the step alone's warm-up
    step_s, loops = [], []
    for rep in range(repeats):
        # alternating: end to end, each baseline, then the step alone on the held batch, so that drift in
        # a shared machine's load hits every case alike and the ratio end to end / step alone compares
        # blocks taken minutes, not a whole run, apart
        loops.append(_epoch_case(parts, epoch=1 + rep, steps=steps))
        for case in base.values():
            case["loops"].append(_baseline_case(case["it"], case["step"], steps=steps, sync=sync))
        step_s.append(time_block(lambda: parts.step(x0, y0), iters=steps, sync=sync, events=events))
    it = cycle(loader)
    loader_s = measure(lambda: next(it), warmup=1, iters=steps, repeats=repeats, sync=sync)
    it.close()
    return {"x0": x0, "loops": loops, "step_s": step_s, "loader_s": loader_s}


def _train_record(recipe, env, parts, base: dict, timed: dict, *, first: dict, startup: float, recipe_path: Path,
                  overrides: list[str], steps: int, warmup: int, repeats: int) -> dict:
    """The bench record: the cases' images/s, the summary, the settings and how it was timed."""
    loader, batch, x0, loops = parts.train_loader, recipe.loader.batch_size, timed["x0"], timed["loops"]
    e2e = {"case": "fastrefine end to end (engine.train_epoch)",
           "images_per_s": spread([lp["images"] / lp["seconds"] for lp in loops]), "loops": loops}
    results = [e2e]
    for label, case in base.items():
        results.append({"case": f"torchvision baseline, {label}",
                        "images_per_s": spread([lp["images"] / lp["seconds"] for lp in case["loops"]]),
                        "loops": case["loops"]})
    loader_s, step_s = timed["loader_s"], timed["step_s"]
    results += [{"case": "loader alone", "images_per_s": rates(loader_s, items=steps * batch), "seconds": loader_s},
                {"case": "step alone (one real batch reused)", "images_per_s": rates(step_s, items=steps * batch),
                 "seconds": step_s}]
    summary = _train_summary(results)
    settings = {"recipe": str(recipe_path), "overrides": list(overrides), "round": parts.name,
                "model": parts.model_name, "model_options": parts.model_options, "refinery": parts.refinery_desc,
                "backend": parts.backend, "batch_size": batch, "resolution": int(x0.shape[-1]),
                "dtype": str(x0.dtype).replace("torch.", ""), "precision": env.precision.name, "device": str(env.device),
                "compile": recipe.run.compile, "steps": steps, "warmup": warmup, "repeats": repeats,
                "startup_s": startup, "first_epoch_s": first["seconds"], "thread_plan": env.threads.why,
                "loader_workers": getattr(loader, "workers", env.threads.workers),
                "torch_threads_in_epoch": loops[0]["threads"],
                "clock": "engine.train_epoch's own perf_counter (one sync per epoch, as in a run)"}
    notes = ["end to end = images / seconds of engine.train_epoch over --steps steps, a fresh epoch per repeat",
             "baselines: the same model pair and images, torchvision ImageFolder + PIL in a DataLoader with the "
             "same worker count; repeats alternate with fastrefine's",
             "step alone: the round's step on one held real batch, a block of --steps steps after each end-to-end "
             "repeat and its baselines; loader alone: timed after the repeats"]
    return make_record(command="train", settings=settings, results=results, summary=summary, notes=notes)


def _train_summary(results: list[dict]) -> dict:
    by = {r["case"]: r["images_per_s"]["median"] for r in results}
    e2e = by["fastrefine end to end (engine.train_epoch)"]
    lo, st = by["loader alone"], by["step alone (one real batch reused)"]
    out = {"end_to_end_images_per_s": e2e, "loader_alone_images_per_s": lo, "step_alone_images_per_s": st,
           "end_to_end_over_step_alone": e2e / st, "end_to_end_over_min_alone": e2e / min(lo, st),
           "slower_alone": "loader" if lo < st else "step"}
    for case, rate in by.items():
        if case == "torchvision baseline, fp32":
            out["over_baseline_fp32"] = e2e / rate
        elif case == "torchvision baseline, channels_last + bf16" and "over_baseline_modern" in out:
            out["over_baseline_bf16"] = e2e / rate       # the extra --baseline-bf16 loop
        elif case.startswith("torchvision baseline, channels_last"):
            out["over_baseline_modern"] = e2e / rate
            out["modern_baseline"] = case.split(", ", 1)[1]
    return out
