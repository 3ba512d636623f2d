"""The run folder at the start of `fastrefine run`: one run at a time per folder, a name that stays inside
`run.out`, a folder every rank sees, no temporaries left by killed writers.

- Lock: rank 0 holds an exclusive `flock` on `run.out/.NAME.fastrefine-run.lock` for the whole run (the
  convert lock's code, convert/lock.py); a second identical run exits 2 naming the holder. The lock sits
  beside the folder, not in it, so `--restart` (which renames the folder) keeps it.
- Shared folder: under torchrun every rank reads the previous round's checkpoint from the run folder
  that rank 0 writes, so every rank must see the same folder. Rank 0 writes a random token into it;
  after a barrier every rank reads it back; a rank that reads nothing or another token (a node-local
  disk) stops the run on every rank with one line naming `run.out`.
- Every rank learns of a problem found by any rank (an all-gather of one line), so none waits at a
  barrier for a rank that has given up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from pathlib import Path

from . import atomic
from .distributed import Dist, gather_per_rank
from .errors import FastRefineError, RunError, UsageError

log = logging.getLogger("fastrefine")

TOKEN_NAME = ".fastrefine-ranks"


def check_run_name(name: str) -> None:
    """run.name is one folder name inside run.out: not empty, no path separator, not `.` or `..`."""
    if not name.strip() or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise UsageError(f"run.name = {name!r}: expected one folder name (not empty, no '/' or '\\', "
                         f"not '.' or '..')")


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.fastrefine-run.lock"


def agree(dist: Dist, problem: FastRefineError | None) -> None:
    """Raise on every rank the first problem any rank found (rank order)."""
    mine = None if problem is None else (type(problem).__name__, str(problem))
    if dist.enabled:
        found = [p for p in gather_per_rank(dist, mine) if p is not None]
    else:
        found = [mine] if mine is not None else []
    if found:
        kind, line = found[0]
        raise (UsageError if kind == "UsageError" else RunError)(line)


@contextlib.contextmanager
def claim(run_dir: Path, *, dist: Dist, out: str, restart: bool, prepare):
    """Lock the run folder (rank 0), let rank 0 `prepare()` it (archive on --restart, create, write the
    recipe), check that every rank sees it; yield with the lock held."""
    with contextlib.ExitStack() as stack:
        problem = None
        token = None
        if dist.is_main:
            try:
                try:
                    run_dir.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise UsageError(f"run.out = {out!r}: cannot create {run_dir.parent} "
                                     f"({e.strerror or e})") from None
                from .convert.lock import out_lock
                stack.enter_context(out_lock(run_dir.parent, name=lock_path(run_dir).name,
                                             taken=f"run folder {run_dir.name!r} is in use by another run",
                                             advice="wait for it to finish, or set another run.name"))
                prepare()
                atomic.clean_stale_temporaries(run_dir)
                token = f"{secrets.token_hex(16)} {socket.gethostname()} {os.getpid()}"
                atomic.write_text(run_dir / TOKEN_NAME, token + "\n")
            except FastRefineError as e:
                problem = e
            except OSError as e:  # an unwritable or full run.out: one line naming it
                problem = UsageError(f"run.out = {out!r}: cannot write the run folder {run_dir} "
                                     f"({e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''})")
        agree(dist, problem)
        if dist.enabled:
            token = gather_per_rank(dist, token)[0]
            dist.barrier()
            try:
                seen = (run_dir / TOKEN_NAME).read_text(encoding="utf-8").strip()
            except OSError:
                seen = None
            problem = None
            if seen != token:
                what = "does not exist" if seen is None else "holds another run's token"
                problem = UsageError(
                    f"run.out = {out!r}: rank {dist.rank} on {socket.gethostname()} does not see the run folder "
                    f"rank 0 writes ({run_dir / TOKEN_NAME} {what} there); every node needs the same run.out on "
                    f"a shared filesystem (README, multi-node)")
            agree(dist, problem)
        yield
