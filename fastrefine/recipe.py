"""Recipes: a TOML file -> frozen dataclasses, one per section, loaded strictly.

An unknown or misspelt key, a wrong type or a value out of range is a RecipeError (exit 2) naming the
file and the dotted key. `--set a.b=value` overrides use the same dotted keys and the same checks.

Two kinds of dataclass: the TOML schema (`RecipeSpec`, `RoundSpec`, `LoaderSpec` and the section
configs), where a key left out of the file is None ("not set: inherit"), and what a loaded recipe holds
(`Recipe`, `RoundConfig`, `LoaderConfig`), where inheritance is resolved, once, at load (`_resolve`):
every round's model, model_options, lr and refinery ("none", an earlier round's name, a checkpoint path
or "torchvision:NAME"; never "previous"), and the loader's val_batch_size and val_resolution are typed and
held as real values. A Recipe has no [model] section: each round names its model.

No key holds an in-band "off" or "unset" value: `data.path` is required, `refinery.class_map` and
`optim.grad_clip` are left out for none / no clipping (a clip norm of 0 is an error, not "off"). A
`refinery.adversarial.fraction` of 0 is a real share (no image of the batch is jittered), not a switch.
The None that remain in a Recipe mean "absent"; each is resolved in one place and its result passed
on: run.max_steps_per_epoch (round.epoch_steps), run.max_val_batches (round.run_round's evaluations;
estimate projects the same cut), run.ema and refinery.resolution (round.build_round),
run.checkpoint_every_steps (round.run_round), loader.progressive (round.train_resolution; here, the
final train resolution val_resolution defaults to), rounds[i].seed_from (round_seed), data.num_classes
and loader.workers (chain.make_env, once at start, from the data and the machine: RoundEnv.num_classes
and RoundEnv.threads).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UsageError
from .loaders.base import DEFAULT_RATIO, DEFAULT_SCALE
from .loaders.options import DaliOptions, FfcvOptions, TorchOptions


class RecipeError(UsageError):
    """A recipe that does not load: the message names the file and the dotted key."""


def _field(default: Any, *, lo: float | None = None, hi: float | None = None, doc: str = "",
           lo_open: bool = False, hi_open: bool = False, hint: str = "") -> Any:
    """A recipe field: its default, its allowed range and a line of documentation. A default of None
    means "not set" (TOML has no null, so only a key left out is None). `hint`: added to an out-of-range
    error."""
    meta = {"lo": lo, "hi": hi, "doc": doc, "lo_open": lo_open, "hi_open": hi_open, "hint": hint}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class RunConfig:
    name: str = _field("run", doc="run folder name under `out`")
    out: str = _field("runs", doc="where run folders go")
    seed: int = _field(0, lo=0, hi=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = _field("auto")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _field(
        "auto", doc="auto: on the CPU bf16 where it is native (AVX-512 BF16, AMX), else fp32; on CUDA bf16 "
        "where supported, else fp16")
    compile: bool = _field(False, doc="torch.compile the student and, on its own, the refinery")
    cudnn_benchmark: bool = _field(True, doc="CUDA: let cuDNN pick the fastest kernels for each input shape")
    channels_last: bool = _field(True)
    log_every: int = _field(50, lo=1, doc="steps between reads of the on-device metrics")
    eval_every: int = _field(1, lo=1, doc="epochs between evaluations (the last epoch is always evaluated)")
    max_steps_per_epoch: int | None = _field(None, lo=1, doc="not set: the whole epoch; set: epochs cut short (smoke tests)")
    max_val_batches: int | None = _field(None, lo=1, doc="not set: the whole val split")
    progress: bool = _field(True, doc="progress bars on a terminal; one plain line per epoch (and per log_every "
                            "steps) when the output is a file or a pipe")
    tensorboard: bool = _field(False, doc="also write the metrics.jsonl records as TensorBoard event files under "
                               "the round's folder (needs the tensorboard extra)")
    ema: float | None = _field(None, lo=0.0, hi=1.0, lo_open=True, hi_open=True, doc="not set: off; set: keep an exponential "
                               "moving average of the student's weights with this decay per update (e.g. 0.999), "
                               "evaluate it each epoch beside the raw weights, save it (ema.pt)")
    checkpoint_every_steps: int | None = _field(None, lo=1, doc="not set: last.pt at the end of each epoch "
                                                "(and on SIGTERM/SIGUSR1); set: also every N steps inside an epoch")


@dataclass(frozen=True)
class DataConfig:
    path: str = _field(REQUIRED, doc="converted dataset folder (manifest.json), or an ImageFolder root with train/ and val/")
    num_classes: int | None = _field(None, lo=1, hi=1_000_000, doc="not set: from the manifest or the class folders")


@dataclass(frozen=True)
class ProgressiveConfig:
    start: int = _field(160, lo=8, doc="train resolution at and before from_epoch")
    end: int = _field(192, lo=8, doc="train resolution at and after to_epoch")
    from_epoch: int = _field(0, lo=0)
    to_epoch: int = _field(0, lo=0)
    multiple: int = _field(32, lo=1, doc="resolutions are rounded to a multiple of this")


@dataclass(frozen=True)
class LoaderSpec:
    """[loader] as the TOML says it."""
    backend: Literal["auto", "torch", "dali", "ffcv"] = _field("auto")
    batch_size: int = _field(256, lo=1, hi=65536, doc="per process")
    val_batch_size: int | None = _field(None, lo=1, hi=65536, doc="not set: same as batch_size")
    workers: int | None = _field(None, lo=0, hi=1024, doc="loader threads; not set: all cores with a GPU, "
                                 "on the CPU split between loader and step (see README)")
    resolution: int = _field(224, lo=8, hi=4096, doc="train crop size (when progressive is not set)")
    val_resolution: int | None = _field(None, lo=8, hi=4096, doc="not set: same as the final train resolution")
    val_crop_ratio: float = _field(0.875, lo=0.0, hi=1.0, lo_open=True)
    scale: tuple[float, float] = _field(DEFAULT_SCALE, lo=0.0, hi=1.0, doc="RandomResizedCrop area range")
    ratio: tuple[float, float] = _field(DEFAULT_RATIO, lo=0.0, lo_open=True, doc="RandomResizedCrop aspect range")
    flip: bool = _field(True, doc="random horizontal flip in training (false for digits, text)")
    progressive: ProgressiveConfig | None = _field(None, doc="progressive resizing; off when absent")
    ffcv: FfcvOptions = _field(FfcvOptions(), doc="FFCV backend options")
    dali: DaliOptions = _field(DaliOptions(), doc="DALI backend options")
    torch: TorchOptions = _field(TorchOptions(), doc="torch backend options")


@dataclass(frozen=True, kw_only=True)
class LoaderConfig(LoaderSpec):
    """[loader] as a loaded Recipe holds it: val_batch_size and val_resolution resolved."""
    val_batch_size: int
    val_resolution: int


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = _field(None, doc="a name from `fastrefine.models.list_models()`, the model of every round "
                              "that names none; not set: each round names its own")
    options: dict = _field({}, doc="keyword options for the model builder, e.g. {width = 0.25}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _field(0.1, lo=0.0, lo_open=True, doc="peak learning rate for a global batch of `reference_batch` "
                       "images; scaled linearly with the global batch (batch_size x processes)")
    reference_batch: int = _field(256, lo=1, hi=2**20, doc="the global batch `lr` is given for")
    lr_scaling: Literal["linear", "none"] = _field("linear", doc="linear: lr x global batch / reference_batch "
                                                  "(Goyal et al. 2017); none: lr as given")
    momentum: float = _field(0.9, lo=0.0, hi=1.0)
    nesterov: bool = _field(True)
    weight_decay: float = _field(5e-5, lo=0.0)
    decay_norm_and_bias: bool = _field(False, doc="false: norm layers and biases get no weight decay")
    grad_clip: float | None = _field(None, lo=0.0, lo_open=True, hint="leave the key out for no clipping",
                                     doc="clip the gradients' global norm to this; not set: no clipping")
    accumulate: int = _field(1, lo=1, hi=1024, doc="batches per optimizer step (gradient accumulation); the "
                             "global batch is batch_size x processes x accumulate")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: Literal["step", "cosine", "triangular", "constant"] = _field("cosine")
    steps: list = _field([], doc="kind=step: [[start_epoch, end_epoch, lr], ...] (the paper's regime)")
    warmup_epochs: float = _field(0.0, lo=0.0, doc="linear warm-up from 0 (per iteration)")
    peak_epoch: float = _field(2.0, lo=0.0, doc="kind=triangular: epoch of the peak")
    final_lr_ratio: float = _field(0.0, lo=0.0, hi=1.0, doc="cosine/triangular: final lr as a fraction of lr")


@dataclass(frozen=True)
class AdversarialConfig:
    """Adversarial jittering. `fraction` is a share like any other, not a switch: round(fraction x batch)
    images of each batch are jittered, so 0 (the default) jitters none, and so does a share too small to
    round to one image."""
    fraction: float = _field(0.0, lo=0.0, hi=1.0, doc="share of each batch replaced by jittered images (0: none)")
    epsilon: float = _field(1.0, lo=0.0, doc="signed-gradient step, in 0..255 pixel units")


@dataclass(frozen=True)
class RefineryConfig:
    loss: Literal["soft_ce", "kl"] = _field("soft_ce", doc="both batchmean; they differ by the refinery's entropy")
    gt_weight: float = _field(0.0, lo=0.0, hi=1.0, doc="weight of the ground-truth cross-entropy term")
    temperature: float = _field(1.0, lo=0.0, lo_open=True, doc="divides the refinery's logits only: softer targets "
                                "(not Hinton distillation: the student's logits are not divided, no T^2 factor)")
    bn: Literal["eval", "batch"] = _field("eval", doc="eval: running BN stats; batch: batch stats (the official code)")
    fold_bn: bool = _field(True, doc="bn = eval only: fold each BatchNorm into the conv before it (same function, faster)")
    use: Literal["best", "last", "ema"] = _field("last", doc="which checkpoint of a round refines the next; ema: "
                                                 "its EMA weights (run.ema set)")
    weights: str = _field("DEFAULT", doc='refinery = "torchvision:NAME" only: a torchvision weights name '
                          '(e.g. "IMAGENET1K_V2", "DEFAULT") from the torch hub cache, or a .pth state dict')
    class_map: str | None = _field(None, doc="torchvision refineries: a JSON file mapping this dataset's class names "
                                   "to the refinery's class indices (needed when the classes are not ImageNet's "
                                   "1,000 wnids); not set: none")
    resolution: int | None = _field(None, lo=8, hi=4096, doc="the refinery sees the same crop resized to this on the "
                                    "device; not set: the crop as it is")
    view: Literal["crop", "image"] = _field("crop", doc='crop: the refinery labels the very crop the student sees '
                                            '(the paper); image: the whole uncropped image, resized to the crop\'s '
                                            'size (torch loader only)')
    adversarial: AdversarialConfig = _field(AdversarialConfig())


@dataclass(frozen=True)
class RoundSpec:
    """[[rounds]] as the TOML says it."""
    name: str = _field(REQUIRED)
    epochs: int = _field(REQUIRED, lo=1, hi=100_000)
    refinery: str | None = _field(None, doc='"none", "previous", an earlier round\'s name, a checkpoint path, or '
                                  '"torchvision:NAME"; not set: "none" for the first round, "previous" after')
    model: str | None = _field(None, doc="not set: [model].name")
    model_options: dict | None = _field(None, doc="not set: [model].options")
    lr: float | None = _field(None, lo=0.0, doc="not set: [optim].lr")
    label_smoothing: float = _field(0.0, lo=0.0, hi=0.99, doc="rounds trained on labels (refinery none) only")
    seed_from: str | None = _field(None, doc="an earlier round's name: start from the same initial weights and draw "
                                   "the same crops as that round (paired comparisons); not set: this round's own seed")


@dataclass(frozen=True, kw_only=True)
class RoundConfig(RoundSpec):
    """A round as a loaded Recipe holds it: what it inherits resolved."""
    refinery: str        # "none", an earlier round's name, a checkpoint path or "torchvision:NAME"
    model: str
    model_options: dict
    lr: float


@dataclass(frozen=True, kw_only=True)
class RecipeSpec:
    """A recipe file as the TOML says it."""
    run: RunConfig = _field(RunConfig())
    data: DataConfig = _field(REQUIRED)
    loader: LoaderSpec = _field(LoaderSpec())
    model: ModelConfig = _field(ModelConfig())
    optim: OptimConfig = _field(OptimConfig())
    schedule: ScheduleConfig = _field(ScheduleConfig())
    refinery: RefineryConfig = _field(RefineryConfig())
    rounds: list[RoundSpec] = _field([])


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: the sections of RecipeSpec with inheritance resolved (no [model]: each round
    names its model). `source`: the file it came from."""
    run: RunConfig
    data: DataConfig
    loader: LoaderConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    refinery: RefineryConfig
    rounds: list[RoundConfig]
    source: str = ""


def _inherited_model(spec: RecipeSpec, r: RoundSpec) -> tuple[str | None, dict]:
    name = r.model if r.model is not None else spec.model.name
    opts = spec.model.options if r.model_options is None else r.model_options
    return name, dict(opts)


def _inherited_refinery(index: int, r: RoundSpec) -> str:
    """The round's refinery as written, or its default: "none" for the first round, "previous" after."""
    if r.refinery is not None:
        return r.refinery
    return "none" if index == 0 else "previous"


# ---------------------------------------------------------------- strict conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin in (list, tuple) or tp in (list, tuple):
        return "an array"
    if origin is dict or tp is dict:
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _check_range(value: float, meta: dict, where: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where}: expected a finite number, got {value}")
    hint = f" ({meta['hint']})" if meta.get("hint") else ""
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise RecipeError(f"{where}: expected a value {'>' if meta.get('lo_open') else '>='} {lo}, got {value}{hint}")
    if hi is not None and (value >= hi if meta.get("hi_open") else value > hi):
        raise RecipeError(f"{where}: expected a value {'<' if meta.get('hi_open') else '<='} {hi}, got {value}{hint}")


def _convert(tp: Any, value: Any, where: str, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, meta)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        if abs(value) >= 2**53:
            raise RecipeError(f"{where}: expected an integer below 2**53, got {value}")
        _check_range(value, meta, where)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int) and abs(value) >= 2**53:
            raise RecipeError(f"{where}: expected a number below 2**53, got {value}")
        _check_range(float(value), meta, where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{where}: expected an array of {len(args)} numbers, got {value!r}")
        out = tuple(_convert(a, v, f"{where}[{i}]", meta) for i, (a, v) in enumerate(zip(args, value)))
        if all(isinstance(v, (int, float)) for v in out) and list(out) != sorted(out):
            raise RecipeError(f"{where}: expected [low, high], got {list(value)}")
        return out
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected an array, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]", {}) for i, v in enumerate(value)]
    if tp is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected an array, got {value!r}")
        return list(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported recipe type {tp!r}")  # a bug in this module, not in the recipe


def _build(cls: type, raw: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in known:
            moved = _MOVED.get((cls.__name__, key))
            if moved:
                raise RecipeError(f"{prefix}{key}: {moved}")
            close = _close_match(key, known)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise RecipeError(f"{prefix}{key}: unknown key{hint}; {where or 'a recipe'} takes "
                              f"{', '.join(sorted(known))}")
    kwargs = {}
    for name, f in known.items():
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], prefix + name, dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):  # a required table: name the key it lacks
                kwargs[name] = _build(hints[name], {}, prefix + name)
                continue
            doc = f.metadata.get("doc")
            raise RecipeError(f"{prefix}{name}: missing (required)" + (f": {doc}" if doc else ""))
    return cls(**kwargs)


_MOVED = {("OptimConfig", "label_smoothing"): "moved to each round: [[rounds]] label_smoothing (it applies only to "
                                           "rounds trained on labels)"}


def _close_match(key: str, known: dict) -> str | None:
    hits = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return hits[0] if hits else None


# ---------------------------------------------------------------- overrides

_INDEX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[(\d+)\]$")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """'optim.lr=0.4' -> (['optim', 'lr'], 0.4). Values are TOML; a bare word is a string."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=0.4")
    key, raw = text.split("=", 1)
    path: list[str | int] = []
    for part in key.strip().split("."):
        m = _INDEX.match(part)
        if m:
            path += [m.group(1), int(m.group(2))]
        elif part.isdigit():
            path.append(int(part))
        elif part:
            path.append(part)
        else:
            raise RecipeError(f"--set {text!r}: empty key part")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_override(raw: dict, path: list[str | int], value: Any, text: str) -> None:
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"--set {text}: {_dotted(path[:i + 1])} does not exist")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {text}: {_dotted(path[:i])} is not a table")
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {text}: {_dotted(path)} does not exist")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise RecipeError(f"--set {text}: {_dotted(path[:-1])} is not a table")
        node[last] = value


def _dotted(path: list[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


# ---------------------------------------------------------------- loading


def recipe_from_dict(raw: dict, *, source: str = "<dict>") -> Recipe:
    try:
        spec = _build(RecipeSpec, raw, "")
        _validate(spec)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return _resolve(spec, source=source)


def _fields_of(obj: Any) -> dict:
    """A dataclass's fields, one level deep (the nested dataclasses stay as they are)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _resolve(spec: RecipeSpec, *, source: str) -> Recipe:
    """What a left-out key inherits, filled in once (see the module's docstring). `spec` is validated."""
    rounds = []
    for i, rd in enumerate(spec.rounds):
        name, opts = _inherited_model(spec, rd)
        assert name is not None  # _validate: every round has a model
        ref = _inherited_refinery(i, rd)
        rounds.append(RoundConfig(**(_fields_of(rd) | dict(
            model=name, model_options=opts, lr=rd.lr if rd.lr is not None else spec.optim.lr,
            refinery=spec.rounds[i - 1].name if ref == "previous" else ref))))
    lc = spec.loader
    final_train = lc.progressive.end if lc.progressive is not None else lc.resolution
    loader = LoaderConfig(**(_fields_of(lc) | dict(
        val_batch_size=lc.val_batch_size if lc.val_batch_size is not None else lc.batch_size,
        val_resolution=lc.val_resolution if lc.val_resolution is not None else final_train)))
    return Recipe(run=spec.run, data=spec.data, loader=loader, optim=spec.optim, schedule=spec.schedule,
                  refinery=spec.refinery, rounds=rounds, source=source)


# How a run folder's recipe.toml written before these keys lost their in-band values recorded them
# unset: read as the key left out, so such a round still resumes and still gives defaults to `eval`.
_RECORDED_UNSET = {("optim", "grad_clip"): 0.0, ("refinery", "class_map"): "", ("model", "name"): ""}


def _drop_recorded_unset(raw: dict) -> None:
    for (table, key), unset in _RECORDED_UNSET.items():
        section = raw.get(table)
        if isinstance(section, dict) and key in section and section[key] == unset \
                and type(section[key]) is type(unset):
            del section[key]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, recorded: bool = False) -> Recipe:
    """Load a recipe file, with `--set` overrides. `recorded`: the file is a run folder's recipe.toml
    (a 0 or "" that an older version wrote for an unset key reads as the key left out)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is not TOML
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}): a recipe is a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    if recorded:
        _drop_recorded_unset(raw)
    for text in overrides:
        keypath, value = parse_override(text)
        try:
            apply_override(raw, keypath, value, text)
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None
    return recipe_from_dict(raw, source=str(path))


def _validate(r: RecipeSpec) -> None:
    """Checks that span keys: what a single field's type and range cannot say."""
    if not r.data.path.strip():
        raise RecipeError(f"data.path: expected a converted dataset folder or an ImageFolder root, got {r.data.path!r}")
    if r.model.name is not None and not r.model.name:
        raise RecipeError("model.name: expected a model name, got ''; leave the key out when each round names its model")
    if r.refinery.class_map is not None and not r.refinery.class_map.strip():
        raise RecipeError(f"refinery.class_map: expected a JSON file, got {r.refinery.class_map!r}; leave the key "
                          f"out for none")
    if not r.rounds:
        raise RecipeError("rounds: expected at least one [[rounds]] table")
    names: list[str] = []
    for i, rd in enumerate(r.rounds):
        where = f"rounds[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", rd.name):
            raise RecipeError(f"{where}.name: expected letters, digits, '_', '-', '.', got {rd.name!r}")
        if rd.name in names:
            raise RecipeError(f"{where}.name: {rd.name!r} is used by an earlier round")
        model_name, _ = _inherited_model(r, rd)
        if model_name is None:
            raise RecipeError(f"{where}.model: no model: set [model].name or this round's model")
        known_models = _model_names()
        if model_name not in known_models:
            close = difflib.get_close_matches(model_name, known_models, n=1)
            raise RecipeError(f"{where if rd.model is not None else 'model'}.{'model' if rd.model is not None else 'name'}: "
                              f"unknown model {model_name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; known: {', '.join(known_models)}")
        ref = _inherited_refinery(i, rd)
        if ref == "previous" and i == 0:
            raise RecipeError(f'{where}.refinery: the first round has no previous round; expected "none", '
                              f'or a checkpoint path')
        if ref == rd.name:
            raise RecipeError(f"{where}.refinery: a round cannot be its own refinery ({ref!r})")
        if (ref not in ("none", "previous") and ref not in names and not ref.endswith((".pt", ".pth"))
                and not ref.startswith(TORCHVISION_PREFIX)):
            raise RecipeError(f'{where}.refinery: expected one of "none", "previous", an earlier round '
                              f'({", ".join(repr(n) for n in names) or "none yet"}), a checkpoint path '
                              f'(.pt/.pth) or "torchvision:NAME", got {ref!r}')
        if ref.startswith(TORCHVISION_PREFIX) and not ref[len(TORCHVISION_PREFIX):]:
            raise RecipeError(f'{where}.refinery: expected "torchvision:NAME" (e.g. "torchvision:resnet50"), got {ref!r}')
        if ref != "none" and rd.label_smoothing:
            raise RecipeError(f"{where}.label_smoothing: applies to rounds trained on labels only; this round is "
                              f"refined by {ref!r}")
        if rd.seed_from is not None and rd.seed_from not in names:
            raise RecipeError(f'{where}.seed_from: expected an earlier round ({", ".join(repr(n) for n in names) or "none yet"}), '
                              f'got {rd.seed_from!r}')
        names.append(rd.name)
    s = r.schedule
    if s.kind == "step":
        if not s.steps:
            raise RecipeError("schedule.steps: kind = 'step' needs [[start_epoch, end_epoch, lr], ...]")
        for j, st in enumerate(s.steps):
            if (not isinstance(st, list) or len(st) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in st)
                    or st[0] >= st[1] or st[2] < 0):
                raise RecipeError(f"schedule.steps[{j}]: expected [start_epoch, end_epoch, lr] with "
                                  f"start < end and lr >= 0, got {st!r}")
    if r.refinery.use == "ema" and r.run.ema is None and len(r.rounds) > 1:
        raise RecipeError('refinery.use: "ema" needs run.ema (the EMA decay, e.g. 0.999); run.ema is not set')
    if r.refinery.view == "image" and r.refinery.adversarial.fraction > 0:
        raise RecipeError("refinery.view: 'image' does not combine with refinery.adversarial (the jittered crop "
                          "has no whole image); set refinery.adversarial.fraction = 0")
    if r.refinery.view == "image" and r.loader.backend in ("dali", "ffcv"):
        raise RecipeError(f"refinery.view: 'image' needs loader.backend = 'torch' (the {r.loader.backend} loader "
                          f"does not hand out the whole image)")
    p = r.loader.progressive
    if p is not None and p.to_epoch < p.from_epoch:
        raise RecipeError(f"loader.progressive.to_epoch: expected >= from_epoch ({p.from_epoch}), got {p.to_epoch}")


TORCHVISION_PREFIX = "torchvision:"


def _model_names() -> list[str]:
    from .models import list_models
    return sorted(list_models())


def round_index(recipe: Recipe, name: str) -> int:
    """The index of the round called `name` (a UsageError listing the rounds when there is none)."""
    names = [r.name for r in recipe.rounds]
    if name not in names:
        raise UsageError(f"no round {name!r}; the recipe's rounds are {names}")
    return names.index(name)


def round_seed(recipe: Recipe, index: int) -> int:
    """The seed of round `index`: its initial weights and its crop stream. A round with `seed_from`
    takes the seed of that round, so the two start from the same weights and see the same crops."""
    rd = recipe.rounds[index]
    if rd.seed_from is not None:
        return round_seed(recipe, round_index(recipe, rd.seed_from))
    return recipe.run.seed * 1000 + index


def global_batch(recipe: Recipe, *, world_size: int) -> int:
    """Images per optimizer step: batch_size x processes x optim.accumulate."""
    return recipe.loader.batch_size * world_size * recipe.optim.accumulate


def lr_scale(recipe: Recipe, *, world_size: int) -> float:
    """The factor every learning rate of the recipe is multiplied by: global batch / reference_batch
    (Goyal et al. 2017) with lr_scaling = "linear", else 1. The global batch counts accumulated batches."""
    if recipe.optim.lr_scaling == "none":
        return 1.0
    return global_batch(recipe, world_size=world_size) / recipe.optim.reference_batch


# ---------------------------------------------------------------- writing


def recipe_to_dict(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    out.pop("source", None)
    return _drop_none(out)


def _drop_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_drop_none(v) for v in x]
    return x


def to_toml(data: dict) -> str:
    """A small TOML writer for resolved recipes (tables, arrays of tables, scalars, arrays)."""
    lines: list[str] = []
    _emit_table(lines, data, [])
    return "\n".join(lines).strip() + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_fmt(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _fmt(k)


def _emit_table(lines: list[str], table: dict, path: list[str]) -> None:
    # model options stay inline tables: their keys are the builder's, not the recipe's
    subtables = {k: v for k, v in table.items()
                 if isinstance(v, dict) and k not in ("options", "model_options")}
    arrays = {k: v for k, v in table.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    for k, v in table.items():
        if k not in subtables and k not in arrays:
            lines.append(f"{_key(k)} = {_fmt(v)}")
    for k, v in subtables.items():
        lines += ["", f"[{'.'.join(path + [k])}]"]
        _emit_table(lines, v, path + [k])
    for k, v in arrays.items():
        for item in v:
            lines += ["", f"[[{'.'.join(path + [k])}]]"]
            _emit_table(lines, item, path + [k])
