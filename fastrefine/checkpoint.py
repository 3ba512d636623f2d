"""The checkpoint format, in one place: what a checkpoint holds, writing it, reading and checking it,
and rebuilding its model.

A checkpoint is a `torch.save`d dict, read with `weights_only=True` (a checkpoint never runs code),
written atomically (fastrefine.atomic). Two layouts of format VERSION:
- weights (`best.pt`, `ema.pt`, and what a later round loads as its refinery):
  {"format": "fastrefine", "version": 1, "model": state_dict, "meta": meta};
- state (`last.pt`, what a round resumes from): the weights layout plus "optimizer", "scaler",
  "epoch", "step", "best_top1" (None before any evaluation), "rng" (one RNG state per rank, in rank
  order) and, with run.ema, "ema" (the state dict of the student's weight average, ema.WeightEma);
  a save inside an epoch adds "epoch_step" and "partial" (each rank's running sums of those steps).
`meta` (a `Meta`, stored as a plain dict) says how to rebuild the model and what it was trained on:
model_name, model_options, num_classes, class_names (label order; empty when the data named none),
round, epoch, val_top1 (None when the epoch was not evaluated), weights ("student", or "ema" for the
weight average in ema.pt).

A file without the format's name and version is refused with one line naming it: there is one reader,
for format 1.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write
from .errors import UsageError

if TYPE_CHECKING:
    import torch

# torch and numpy are imported inside the functions that need them: `fastrefine run --dry-run` and the
# CLI's start-up should not pay for importing torch to name this module.

log = logging.getLogger("fastrefine")

FORMAT = "fastrefine"
VERSION = 1
STATE_KEYS = ("optimizer", "scaler", "epoch", "step", "best_top1", "rng")


@dataclass(frozen=True)
class Meta:
    """What a checkpoint says about its model: enough to rebuild it and to check it fits the data."""
    model_name: str
    model_options: dict
    num_classes: int
    class_names: tuple[str, ...]   # label order; () when the data named no classes (only the count is known)
    round: str
    epoch: int                     # epochs finished when it was written
    val_top1: float | None         # None: that epoch was not evaluated
    weights: str = "student"       # "student", or "ema": the student's weight average (run.ema)

    @classmethod
    def of(cls, model_name: str, *, num_classes: int, model_options: dict | None = None,
           class_names=(), round: str = "", epoch: int = 0, val_top1: float | None = None) -> "Meta":
        """A Meta with the fields a round fills in defaulted (a checkpoint made outside a run: tests, tools)."""
        return cls(model_name=model_name, model_options=dict(model_options or {}), num_classes=num_classes,
                   class_names=tuple(class_names), round=round, epoch=epoch, val_top1=val_top1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["class_names"] = list(self.class_names)
        return out

    @classmethod
    def from_dict(cls, raw: Any, *, path: Path) -> "Meta":
        """Validate a checkpoint's meta; a bad one is bad input (exit 2) naming the file and the key."""
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: bad checkpoint meta (a {type(raw).__name__}, expected a dict)")
        checks = {"model_name": lambda v: isinstance(v, str) and v != "",
                  "model_options": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                  "num_classes": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                  "class_names": lambda v: isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v),
                  "round": lambda v: isinstance(v, str),
                  "epoch": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  "val_top1": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
                  "weights": lambda v: v in ("student", "ema")}
        for key, ok in checks.items():
            if key not in raw:
                raise UsageError(f"{path}: bad checkpoint meta: no {key!r}")
            if not ok(raw[key]):
                raise UsageError(f"{path}: bad checkpoint meta: {key} = {_short(raw[key])}")
        names = tuple(raw["class_names"])
        if names and len(names) != raw["num_classes"]:
            raise UsageError(f"{path}: bad checkpoint meta: {len(names)} class names for num_classes = "
                             f"{raw['num_classes']}")
        return cls(model_name=raw["model_name"], model_options=dict(raw["model_options"]),
                   num_classes=raw["num_classes"], class_names=names, round=raw["round"], epoch=raw["epoch"],
                   val_top1=None if raw["val_top1"] is None else float(raw["val_top1"]), weights=raw["weights"])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------ layouts

def weights_layout(model_state: dict, meta: Meta) -> dict:
    """The weights layout around a model's state dict."""
    return {"format": FORMAT, "version": VERSION, "model": model_state, "meta": meta.to_dict()}


def state_layout(*, model, optimizer, scaler, epoch: int, step: int, best_top1: float | None, meta: Meta,
                 rng: list[dict], ema: dict | None = None, epoch_step: int = 0,
                 partial: list[dict] | None = None) -> dict:
    """The resume layout (last.pt) of the live objects; `rng` holds one RNG state per rank, `ema` the
    weight average's state dict (run.ema). A save inside an epoch adds `epoch_step` (steps done into
    epoch `epoch` + 1) and `partial` (each rank's running loss/accuracy sums of them). The dict refers
    to the live tensors: `cpu_copy` it before training goes on if it is written in the background."""
    state = {**weights_layout(model.state_dict(), meta), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "best_top1": best_top1, "rng": rng}
    if ema is not None:
        state["ema"] = ema
    if epoch_step:
        state.update(epoch_step=epoch_step, partial=partial)
    return state


def as_weights(state: dict) -> dict:
    """The weights layout of a state-layout dict (same tensors, no copy)."""
    return {k: state[k] for k in ("format", "version", "model", "meta")}


def cpu_copy(obj: Any) -> Any:
    """A copy of `obj` whose tensors are new CPU tensors (a CPU tensor is cloned too), so the live ones
    can change while the copy is written."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    return obj


def write(path: Path, layout: dict) -> None:
    """Write a layout (weights or state) atomically."""
    import torch
    atomic_write(path, lambda fh: torch.save(layout, fh))


def save_weights(path: Path, *, model: "torch.nn.Module", meta: Meta) -> None:
    write(path, weights_layout(model.state_dict(), meta))


def copy_as_weights(src: Path, dst: Path) -> None:
    """best.pt from last.pt when no epoch was evaluated as better: the weights layout, written atomically."""
    write(dst, as_weights(load(src, raw_meta=True)))


# ------------------------------------------------------------------------------------------ reading

def load(path: Path, map_location: "str | torch.device" = "cpu", *, raw_meta: bool = False) -> dict:
    """Read and check a fastrefine checkpoint; its `meta` comes back as a `Meta` (a plain dict with
    raw_meta=True, as stored). A missing, truncated, foreign or older-format file, or a bad meta, is bad
    input (exit 2) with one line naming the file and what it is not."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, random bytes, a pickle that wants to run code: say which file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            first = "it holds Python objects other than tensors and plain data, which are never loaded"
        raise UsageError(f"{path}: not a readable fastrefine checkpoint ({_plain(first)[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "meta" not in state:
        what = type(state).__name__
        raise UsageError(f"{path}: not a fastrefine checkpoint (a {what} without 'model' and 'meta'; "
                         f"a bare state dict or tensor is not enough)")
    if state.get("format") != FORMAT or "version" not in state:
        raise UsageError(f"{path}: a checkpoint without fastrefine's format version; this fastrefine reads "
                         f"format {VERSION} only (retrain its round)")
    if state["version"] != VERSION:
        raise UsageError(f"{path}: checkpoint format {_short(state['version'])}; this fastrefine reads "
                         f"format {VERSION}")
    if not isinstance(state["model"], dict):
        raise UsageError(f"{path}: not a fastrefine checkpoint ('model' is a {type(state['model']).__name__}, "
                         f"not a state dict)")
    meta = Meta.from_dict(state["meta"], path=path)
    if not raw_meta:
        state["meta"] = meta
    return state


def load_state(path: Path, *, class_names: list[str] | tuple[str, ...], num_classes: int,
               data: str = "the data") -> dict | None:
    """A round's last.pt to resume from (mapped to the CPU: RNG states must stay CPU tensors), checked
    against the data's classes; None when there is none. A weights-only file is refused."""
    path = Path(path)
    if not path.is_file():
        return None
    state = load(path, map_location="cpu")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise UsageError(f"{path}: a weights-only checkpoint (no {', '.join(missing)}); cannot resume from it")
    if not isinstance(state["rng"], list):
        raise UsageError(f"{path}: bad checkpoint: 'rng' is a {type(state['rng']).__name__}, expected a list "
                         f"(one state per rank)")
    check_classes(state["meta"], path=path, class_names=class_names, num_classes=num_classes, data=data)
    return state


def check_classes(meta: Meta, *, path: Path, class_names, num_classes: int, data: str = "the data") -> None:
    """Refuse a checkpoint whose classes are not the data's (count, and names in label order where both
    name them): its outputs would be read as the wrong classes."""
    if meta.num_classes != num_classes:
        raise UsageError(f"{path}: the checkpoint has {meta.num_classes} classes, {data} has {num_classes}")
    names = tuple(class_names)
    if meta.class_names and names and meta.class_names != names:
        i = next((k for k, (a, b) in enumerate(zip(meta.class_names, names)) if a != b),
                 min(len(meta.class_names), len(names)))
        mine = meta.class_names[i] if i < len(meta.class_names) else "(none)"
        theirs = names[i] if i < len(names) else "(none)"
        raise UsageError(f"{path}: trained on other classes than {data}: class {i} is {mine!r} in the "
                         f"checkpoint, {theirs!r} in the data")


def load_model(path: Path, *, device: "torch.device | str" = "cpu", class_names=None,
               num_classes: int | None = None, data: str = "the data") -> "tuple[torch.nn.Module, Meta]":
    """(model on `device`, channels_last, in train mode as built; its Meta) from a checkpoint of either
    layout. With `num_classes` (and `class_names`) given, a checkpoint trained on other classes is refused."""
    import torch
    from .models import create_model
    path = Path(path)
    state = load(path, map_location="cpu")
    meta: Meta = state["meta"]
    if num_classes is not None:
        check_classes(meta, path=path, class_names=class_names or (), num_classes=num_classes, data=data)
    try:
        model = create_model(meta.model_name, num_classes=meta.num_classes, **meta.model_options)
    except UsageError as e:
        raise UsageError(f"{path}: cannot rebuild its model: {e}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UsageError(f"{path}: its weights do not fit {meta.model_name} ({str(e).splitlines()[0]})") from None
    return model.to(device, memory_format=torch.channels_last), meta


def check_header(path: Path, *, what: str) -> None:
    """A torch file's container, read without loading it: a zip-format file (torch >= 1.6) must end with an
    intact zip directory holding a data.pkl, so a truncated or overwritten file is found at start, not when
    a later round loads it. Files of the older pickle format are only checked for being non-empty."""
    import zipfile
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if not head:
        raise UsageError(f"{what} {path}: empty file")
    if head != b"PK\x03\x04":
        return  # the legacy pickle format: torch.load checks it when it is used
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UsageError(f"{what} {path}: damaged (truncated or overwritten: {e})") from None
    if not any(n.endswith("data.pkl") for n in names):
        raise UsageError(f"{what} {path}: a zip file but not a torch checkpoint (no data.pkl)")


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# --------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA), as CPU tensors and plain data."""
    import numpy as np
    import torch
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu(t):
    import torch
    return t.cpu() if isinstance(t, torch.Tensor) else t


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned. Works whatever device the checkpoint was mapped to: every
    tensor is moved to the CPU first (torch.set_rng_state takes a CPU ByteTensor only)."""
    import numpy as np
    import torch
    torch.set_rng_state(_cpu(state["torch"]).to(torch.uint8))
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, _cpu(keys).numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_cpu(s).to(torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint holds CUDA RNG states of %d devices, this host has %d: not restored",
                        len(cuda), torch.cuda.device_count())


def rank_rng_state(saved: list, rank: int) -> dict | None:
    """The state of `rank` from a checkpoint's `rng` list (one per rank of the run that wrote it); None
    for a rank that run did not have (a larger world size now)."""
    return saved[rank] if rank < len(saved) else None


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
