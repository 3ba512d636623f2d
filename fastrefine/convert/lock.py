"""One convert at a time per OUT: an exclusive `fcntl.flock` on `OUT/.fastrefine-convert.lock`, held for
the whole conversion and released by the kernel when the process ends, however it ends.

The file holds the holder's PID, host and command line (for the message a second convert prints); it is
never deleted, since deleting a lock file lets two processes lock two different files of the same name.
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

from ..errors import UsageError

LOCK_NAME = ".fastrefine-convert.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return (f"PID {info.get('pid')} on {info.get('host')} since {info.get('since')}: "
                f"{info.get('command')}")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return "another process (its details are unreadable)"


@contextmanager
def out_lock(out: Path) -> Iterator[Path]:
    """Hold the exclusive lock on `out` (which must exist); UsageError naming the holder if taken."""
    path = Path(out) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{out}: another convert is writing into it ({_holder(fd)}); wait for it "
                             f"to finish or choose another OUT") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield path
    finally:
        os.close(fd)        # closing the only descriptor releases the flock
