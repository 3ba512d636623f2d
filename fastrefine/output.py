"""Where a command's `--json PATH` report goes: a file, written atomically, or a stream such as
/dev/stdout or a FIFO, written straight (a temporary renamed over /dev/stdout would replace the device
link itself)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any


def write_json_report(path: Path, obj: Any) -> None:
    """`obj` as indented JSON at `path`: atomically (temporary + rename) unless `path` names something
    other than a regular file or a new file (a character device, a FIFO, a socket), which is written as
    a stream."""
    from .atomic import write_json
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is None or stat.S_ISREG(mode):
        write_json(path, obj)
        return
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2) + "\n")
