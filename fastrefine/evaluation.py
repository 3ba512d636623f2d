"""`fastrefine eval`: a model's top-1, top-5, loss and per-class top-1 on a dataset split.

The model is a checkpoint fastrefine wrote (best.pt, last.pt) or "torchvision:NAME" (weights from a
local .pth or the torch hub cache, as a torchvision refinery's: never downloaded). The images come
through `loaders.build` with the options `round.make_loader` gives it for the val split (the run's
backend tables included) and the numbers from `engine.evaluate`, the function `run` records val top-1
with, so a round's checkpoint evaluated with its run's settings gives the round's recorded val top-1.

Settings not given on the command line come from the round beside the checkpoint (its recipe.toml
and run.json: val resolution, crop ratio, val batch size, precision, channels_last, and the backend
when DATA is the run's own data), else from the recipe defaults (224 px, crop ratio 0.875).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .recipe import TORCHVISION_PREFIX, Recipe

log = logging.getLogger("fastrefine")

DEFAULT_RESOLUTION = 224
DEFAULT_CROP_RATIO = 0.875
DEFAULT_BATCH = 256


@dataclass
class RunContext:
    """The round a checkpoint was written by, read from the files beside it (absent: None)."""
    recipe: Recipe | None = None
    info: dict = field(default_factory=dict)   # run.json

    @classmethod
    def beside(cls, checkpoint: Path) -> "RunContext":
        from .atomic import read_json_marker
        rdir = Path(checkpoint).parent
        recipe = None
        if (rdir / "recipe.toml").is_file():
            from .recipe import load_recipe
            try:
                recipe = load_recipe(rdir / "recipe.toml", recorded=True)
            except UsageError as e:  # an older or edited record: the command-line settings still work
                log.warning("%s: not used for defaults (%s)", rdir / "recipe.toml", e)
        return cls(recipe=recipe, info=read_json_marker(rdir / "run.json") or {})


@dataclass
class LoadedModel:
    """A model ready to evaluate or export (on the CPU, eval mode) and where it came from."""
    model: nn.Module
    spec: str                 # as given: a checkpoint path or "torchvision:NAME"
    name: str                 # the registry name (or "torchvision:NAME")
    options: dict
    num_classes: int
    meta: dict                # the checkpoint's meta ({} for torchvision models)
    context: RunContext
    description: str


def is_torchvision(spec: str) -> bool:
    return str(spec).startswith(TORCHVISION_PREFIX)


def load_checkpoint_model(path: Path, *, class_names=None, num_classes: int | None = None,
                          data: str = "the data") -> LoadedModel:
    """A fastrefine checkpoint (weights or state layout) rebuilt as its model, on the CPU in eval mode;
    with `num_classes` (and `class_names`), one trained on other classes is refused."""
    from .checkpoint import load_model
    path = Path(path)
    model, meta = load_model(path, device=torch.device("cpu"), class_names=class_names, num_classes=num_classes,
                             data=data)
    model = model.to(memory_format=torch.contiguous_format).eval()
    desc = (f"{path} ({meta.model_name}" + (", EMA weights" if meta.weights == "ema" else "")
            + f", round {meta.round or '?'}, epoch {meta.epoch}"
            + (f", recorded val top-1 {100 * meta.val_top1:.2f}%" if meta.val_top1 is not None else "")
            + ")")
    return LoadedModel(model=model, spec=str(path), name=meta.model_name, options=dict(meta.model_options),
                       num_classes=meta.num_classes, meta=meta.to_dict(), context=RunContext.beside(path),
                       description=desc)


def load_torchvision_model(spec: str, *, weights: str, class_map: str | None, class_names: list[str],
                           num_classes: int, loader_norm: tuple) -> LoadedModel:
    """torchvision:NAME with its weights (local .pth or the hub cache), its outputs reduced to the dataset's
    classes as a torchvision refinery's are, and its input normalisation adapted to the loader's."""
    from .pretrained import adapt_normalization, load_torchvision_refinery, torchvision_normalization
    name = spec[len(TORCHVISION_PREFIX):]
    if not name:
        raise UsageError(f'{spec!r}: expected "torchvision:NAME", e.g. "torchvision:resnet50"')
    model, desc = load_torchvision_refinery(name, weights=weights, class_map=class_map, class_names=class_names,
                                            num_classes=num_classes)
    model, note = adapt_normalization(model, refinery=torchvision_normalization(name, weights=weights),
                                      loader=loader_norm)
    return LoadedModel(model=model.eval(), spec=spec, name=spec, options={}, num_classes=num_classes, meta={},
                       context=RunContext(), description=f"{desc}; {note}")


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


@dataclass(frozen=True)
class EvalSettings:
    split: str
    resolution: int
    crop_ratio: float
    batch_size: int
    backend: str
    precision: str
    channels_last: bool
    device: str
    why: dict                 # where each setting came from


def resolve_settings(context: RunContext, *, data: Path, split: str, resolution: int | None, crop_ratio: float | None,
                     batch_size: int | None, backend: str | None, precision: str | None, device: str) -> EvalSettings:
    """Each setting: the command line's, else the round's beside the checkpoint, else the default."""
    r, why = context.recipe, {}

    def pick(key: str, given, from_run, default):
        if given is not None:
            why[key] = "command line"
            return given
        if from_run is not None:
            why[key] = "the checkpoint's run"
            return from_run
        why[key] = "default"
        return default

    res = pick("resolution", resolution, r.loader.val_resolution if r else None, DEFAULT_RESOLUTION)
    ratio = pick("crop_ratio", crop_ratio, r.loader.val_crop_ratio if r else None, DEFAULT_CROP_RATIO)
    batch = pick("batch_size", batch_size, r.loader.val_batch_size if r else None, DEFAULT_BATCH)
    prec = pick("precision", precision, r.run.precision if r else None, "auto")
    # the run's backend only on the run's own data: another dataset may not be converted for it
    run_backend = context.info.get("backend") if r is not None and _same_path(r.data.path, data) else None
    # an ImageFolder root (no manifest.json) is read by the torch loader; "auto" would look for .beton files
    default = "auto" if (Path(data) / "manifest.json").is_file() else "torch"
    be = pick("backend", backend, run_backend, default)
    cl = r.run.channels_last if r is not None else True
    return EvalSettings(split=split, resolution=int(res), crop_ratio=float(ratio), batch_size=int(batch), backend=be,
                        precision=prec, channels_last=cl, device=device, why=why)


def evaluate_model(spec: str, data: Path, *, split: str = "val", resolution: int | None = None,
                   crop_ratio: float | None = None, batch_size: int | None = None, backend: str | None = None,
                   precision: str | None = None, device: str = "auto", weights: str = "DEFAULT",
                   class_map: str | None = None, workers: int | None = None, max_batches: int | None = None) -> dict:
    """Evaluate `spec` (a checkpoint path or "torchvision:NAME") on `data`'s `split`: a JSON-ready report."""
    from .bench.protocol import pick_device
    from .chain import data_classes, plan_threads
    from .engine import evaluate
    from .loaders import IMAGENET_MEAN, IMAGENET_STD, build, resolve_backend
    from .precision import resolve_precision

    if split not in ("val", "train"):
        raise UsageError(f"--split: expected val or train, got {split!r}")
    data = Path(data)
    if not data.exists():
        raise UsageError(f"{data}: data folder not found")
    num_classes, names = data_classes(data, where="DATA")
    dev = pick_device(device)
    if is_torchvision(spec):
        loaded = load_torchvision_model(spec, weights=weights, class_map=class_map, class_names=names,
                                        num_classes=num_classes, loader_norm=(IMAGENET_MEAN, IMAGENET_STD))
    else:
        loaded = load_checkpoint_model(Path(spec), class_names=names, num_classes=num_classes, data=str(data))
    s = resolve_settings(loaded.context, data=data, split=split, resolution=resolution, crop_ratio=crop_ratio,
                         batch_size=batch_size, backend=backend, precision=precision, device=str(dev))
    prec = resolve_precision(s.precision, dev)
    be, be_reason = resolve_backend(s.backend, device=dev, data=data)
    threads = plan_threads(workers=workers, device=dev, backend=be)
    if threads.torch_threads is not None:
        torch.set_num_threads(threads.torch_threads)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    model = loaded.model.to(dev, memory_format=fmt)
    # the val split's loader exactly as `run` builds it (round.make_loader), on the train split as well
    # when asked: resize + centre crop, no augmentation, every image once, in file order
    loader = build(data=data, backend=be, split=split, batch_size=s.batch_size, resolution=s.resolution, device=dev,
                   dtype=prec.input_dtype, seed=0, workers=threads.workers, val_crop_ratio=s.crop_ratio,
                   channels_last=s.channels_last, shuffle=False, drop_last=False,
                   backend_options=_backend_options(loaded.context.recipe), **_eval_augmentation(split))
    try:
        res = evaluate(model, loader, autocast=prec.autocast, max_batches=max_batches, num_classes=num_classes)
    finally:
        loader.close()
    labels = _class_labels(data, names)
    per_class = []
    for i, (n, hits) in enumerate(zip(res["class_images"], res["class_top1_hits"])):
        per_class.append({"index": i, "class": names[i] if i < len(names) else str(i),
                          "name": labels[i] if i < len(labels) else str(i), "images": n,
                          "top1": hits / n if n else None})
    run_cut = loaded.context.recipe.run.max_val_batches if loaded.context.recipe is not None else None
    return {"model": loaded.spec, "model_name": loaded.name, "model_options": loaded.options,
            "description": loaded.description, "recorded_val_top1": loaded.meta.get("val_top1"),
            "run_max_val_batches": run_cut,
            "data": str(data), "split": split, "images": res["images"], "top1": res["top1"], "top5": res["top5"],
            "loss": res["loss"], "per_class": per_class,
            "settings": {"resolution": s.resolution, "crop_ratio": s.crop_ratio, "batch_size": s.batch_size,
                         "backend": be, "backend_reason": be_reason, "precision": prec.name,
                         "channels_last": s.channels_last, "device": str(dev), "loader_workers": threads.workers,
                         "torch_threads": torch.get_num_threads(), "max_batches": max_batches, "from": s.why}}


def _backend_options(recipe: Recipe | None) -> dict:
    """The run's [loader.ffcv] / [loader.dali] / [loader.torch] tables (decoders and the like), as
    round.make_loader passes them; none without a run beside the checkpoint."""
    if recipe is None:
        return {}
    from .loaders.options import as_kwargs
    lc = recipe.loader
    return {"ffcv": as_kwargs(lc.ffcv), "dali": as_kwargs(lc.dali), "torch": as_kwargs(lc.torch)}


def _class_labels(data: Path, names: list[str]) -> list[str]:
    """Readable class names: the manifest's names (ImageNet's words for wnids) where it has them."""
    if (data / "manifest.json").is_file():
        from .manifest import read_manifest
        return [c.name for c in read_manifest(data).classes]
    return list(names)


def _eval_augmentation(split: str) -> dict:
    """The train split evaluated like val (resize, centre crop, no flip): loaders give the train split
    random crops and flips unless told otherwise."""
    return {} if split == "val" else {"augment": False}


def render(report: dict, console) -> None:
    """The report as plain lines (one a class)."""
    s = report["settings"]
    console.print(f"{report['description']}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"{report['data']} {report['split']}: {report['images']:,} images at {s['resolution']} px "
                  f"(crop ratio {s['crop_ratio']:g}), batch {s['batch_size']}, {s['backend']} loader, "
                  f"{s['precision']}, {s['device']}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%  loss {report['loss']:.4f}",
                  highlight=False, markup=False, soft_wrap=True)
    rec = report.get("recorded_val_top1")
    if rec is not None and report["split"] == "val":
        cut = report.get("run_max_val_batches")
        note = (f" (the run's val was cut to {cut} batches by run.max_val_batches; --max-batches {cut} evaluates "
                f"the same images)" if cut and cut != s["max_batches"] else "")
        console.print(f"recorded val top-1 in the checkpoint: {100 * rec:.2f}%{note}", highlight=False, markup=False,
                      soft_wrap=True)
    shown = [c["class"] if c["name"] == c["class"] else f"{c['class']} {c['name']}" for c in report["per_class"]]
    width = max([len(t) for t in shown] + [5])
    console.print("per-class top-1:", highlight=False, markup=False, soft_wrap=True)
    for c, text in zip(report["per_class"], shown):
        acc = "   n/a" if c["top1"] is None else f"{100 * c['top1']:6.2f}%"
        console.print(f"  {text:<{width}}  {acc}  ({c['images']} images)", highlight=False, markup=False, soft_wrap=True)
