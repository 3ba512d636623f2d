"""Everything fastrefine writes to disk and reads back: atomic files, JSON records and markers, checkpoints.

Writes are atomic: a temporary file beside the target (`.NAME.tmp-PID`), flushed and fsynced, then
renamed over the target, so a reader sees the old file or the new one, never half of one. A kill leaves
at worst a stale temporary, which `clean_stale_temporaries` removes once its process is gone.

Checkpoints are read with `weights_only=True` (a checkpoint never runs code). Two layouts:
- state (`last.pt`): model, optimizer, scaler, epoch, step, best_top1, per-rank RNG states, meta;
- weights (`best.pt`, `ema.pt`, and what a later round loads as its refinery): model and meta only.
last.pt also holds `ema` (the EMA weights' state dict) when run.ema is on.
`meta` says how to rebuild the model: model_name, model_options, num_classes, round, epoch, val_top1.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

from .errors import RunError, UsageError

# torch and numpy are imported inside the functions that need them: the converter uses the atomic
# writers and markers here and should not pay for importing torch.

log = logging.getLogger("fastrefine")

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


# ----------------------------------------------------------------------------------- atomic files

def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool = True) -> None:
    """Write `path` atomically: `write(fh)` fills a temporary beside it, which replaces `path` once
    flushed to disk. On any error the temporary is removed and the old `path` is left as it was; a
    full disk is reported as such, naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as e:
        # torch.save reports a full disk as RuntimeError("[enforce fail at inline_container.cc] ...
        # unexpected pos"), the OSError(ENOSPC) of the failed write only in its context: look down the chain
        if _no_space(e):
            raise RunError(f"{path}: no space left on device while writing it (the previous version, if "
                           f"any, is kept)") from None
        raise
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def _no_space(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json_marker(path: Path) -> dict | None:
    """A JSON marker (`done.json`, a record): its content, or None when it is absent or cannot be read.

    A damaged marker (a kill or a full disk while it was written by an older version) counts as absent,
    with a warning naming it: whatever it marked is then decided by the files beside it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.warning("%s: cannot be read (%s); treated as absent", path, e)
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        log.warning("%s: damaged (%s); treated as absent", path, e)
        return None
    if not isinstance(value, dict):
        log.warning("%s: not a JSON object; treated as absent", path)
        return None
    return value


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` files in `folder` whose process is gone (a save that was killed)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    if removed:
        log.info("removed %d stale temporary file(s) of killed saves in %s", len(removed), folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------ checkpoints

def save_atomic(obj: Any, path: Path) -> None:
    import torch
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load(path: Path, map_location: "str | torch.device" = "cpu") -> dict:
    """Read a fastrefine checkpoint. A missing, truncated or foreign file is bad input (exit 2) with one
    line naming the file and what it is not."""
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
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("meta"), dict):
        what = type(state).__name__
        raise UsageError(f"{path}: not a fastrefine checkpoint (a {what} without 'model' and 'meta'; "
                         f"a bare state dict or tensor is not enough)")
    return state


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


def weights(model: "torch.nn.Module", meta: dict) -> dict:
    """The weights layout: what best.pt holds and a refinery needs."""
    return {"model": model.state_dict(), "meta": meta}


def save_weights(path: Path, *, model: "torch.nn.Module", meta: dict) -> None:
    save_atomic(weights(model, meta), path)


def save_state(path: Path, *, model, optimizer, scaler, epoch: int, step: int, best_top1: float, meta: dict,
               rng: list[dict], ema: dict | None = None, extra: dict | None = None) -> None:
    """The resume layout (last.pt). `rng` holds one RNG state per rank (see gather_rng_states); `ema`, when
    run.ema is on, the state dict of the student's weight average (ema.WeightEma). A save inside an epoch
    adds (`extra`) `epoch_step`, the steps done into epoch `epoch` + 1, and `partial`, each rank's running
    loss/accuracy sums of them."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": epoch, "step": step, "best_top1": best_top1, "rng": rng, "meta": meta, **(extra or {})}
    if ema is not None:
        state["ema"] = ema
    save_atomic(state, path)


def copy_as_weights(src: Path, dst: Path) -> None:
    """best.pt from last.pt when no epoch was evaluated as better: the weights layout, written atomically."""
    state = load(src)
    save_atomic({"model": state["model"], "meta": state["meta"]}, dst)


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


def rank_rng_state(saved: Any, rank: int) -> dict | None:
    """The state of `rank` from a checkpoint's `rng` entry (a list, one per rank; a single dict in
    checkpoints of older versions, which held rank 0's only: other ranks then get None)."""
    if isinstance(saved, dict):
        return saved if rank == 0 else None
    if isinstance(saved, (list, tuple)) and rank < len(saved):
        return saved[rank]
    return None


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
