"""Files written atomically, JSON markers read tolerantly, and the temporaries a killed writer leaves.

A write goes to a temporary beside the target (`.NAME.tmp-PID`), is flushed and fsynced, then renamed
over the target, so a reader sees the old file or the new one, never half of one. A kill leaves at worst
a stale temporary, which `clean_stale_temporaries` removes once its process is gone.

This module imports neither torch nor numpy: the converter writes through it too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

from .errors import RunError

log = logging.getLogger("fastrefine")

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def temporary_of(name: str) -> str | None:
    """The file name that a temporary named `name` (atomic_write's `.NAME.tmp-PID`) was written for, or
    None when `name` is not such a temporary."""
    m = _TMP.match(name)
    return m.group("name") if m else None


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

    A damaged marker (a file cut short by a kill or a full disk, written by something other than
    `write_json`) counts as absent, with a warning naming it: whatever it marked is then decided by the
    files beside it."""
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
