"""One convert at a time per OUT: an exclusive `fcntl.flock` on `OUT/.fastrefine-convert.lock`, held for
the whole conversion and released by the kernel when the process ends, however it ends.

The file holds the holder's PID, host and command line (for the message a second convert prints). The
holder deletes it when it is done (or fails), still holding the lock; a process that locked the file just before it
was deleted sees that the path no longer names the file it locked and tries again, so two processes never
hold locks on two different files of the same name. A convert that is killed leaves the file; the next
one locks it as usual.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import RunError, UsageError

LOCK_NAME = ".fastrefine-convert.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return (f"PID {info.get('pid')} on {info.get('host')} since {info.get('since')}: "
                f"{info.get('command')}")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return "another process (its details are unreadable)"


@contextmanager
def out_lock(out: Path, *, name: str = LOCK_NAME, taken: str = "another convert is writing into it",
             advice: str = "wait for it to finish or choose another OUT") -> Iterator[Path]:
    """Hold the exclusive lock on `out` (which must exist); UsageError naming the holder if taken, RunError
    naming the file when it cannot be created or written (a full disk, no permission). `name`, `taken` and
    `advice` let `fastrefine run` lock a run folder the same way (fastrefine/runfolder.py)."""
    path = Path(out) / name
    fd = _locked_fd(path, out=out, taken=taken, advice=advice)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        except OSError as e:
            raise RunError(f"{path}: cannot write the lock file ({e.strerror or e})") from None
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)    # still locked: nobody can hold this file while it goes
        except OSError:
            pass
        os.close(fd)        # closing the only descriptor releases the flock


def _locked_fd(path: Path, *, out: Path, taken: str, advice: str, tries: int = 20) -> int:
    """A descriptor holding the flock on the file that `path` names now (not on one deleted meanwhile)."""
    for _ in range(tries):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"{path}: cannot create the lock file ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UsageError(f"{out}: {taken} ({holder}); {advice}") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)        # the holder deleted it after we opened it: lock the new one
    raise RunError(f"{path}: the lock file kept being replaced ({tries} tries); is another convert "
                   f"starting and stopping in a loop?")
