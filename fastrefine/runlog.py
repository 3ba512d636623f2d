"""metrics.jsonl: one JSON line per logged step, per epoch and for the refinery's own evaluation.

The log is append-only. A line cut short (a kill or a full disk in the middle of a write) is skipped by
every reader with a warning, never fatal; on resume the log is cut back to the records of the epochs
the checkpoint holds, so a resumed run's log reads as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("fastrefine")


class MetricsLog:
    """Append-only JSON lines; a no-op on ranks other than 0."""

    def __init__(self, path: Path, *, enabled: bool = True, mirrors: list = (), **common):
        self.path, self.enabled, self.common = Path(path), enabled, common
        self.mirrors = list(mirrors)  # callables given each record as written (tensorboard.TensorBoardMirror)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        full = {**self.common, **record, "time": round(time.time(), 3)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(full) + "\n")
        for mirror in self.mirrors:
            mirror(full)

    def close(self) -> None:
        for mirror in self.mirrors:
            close = getattr(mirror, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(path: Path) -> list[tuple[dict | None, str]]:
    """(record or None when the line is damaged, raw line) for every line of the file."""
    raw = Path(path).read_bytes().decode("utf-8", errors="replace")
    out = []
    for line in raw.splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        out.append((rec if isinstance(rec, dict) else None, line))
    return out


def read_metrics(path: Path) -> list[dict]:
    """Every complete record; damaged lines (a torn last line) are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = _parse(path)
    bad = sum(1 for rec, _ in rows if rec is None)
    if bad:
        log.warning("%s: skipped %d damaged line(s) (a write cut short)", path, bad)
    return [rec for rec, _ in rows if rec is not None]


def truncate_to_epoch(path: Path, *, epochs_done: int, steps_into: int = 0) -> int:
    """Keep the records of epochs < epochs_done (and the refinery's own records), and of a checkpoint
    taken inside an epoch the step records of its first `steps_into` steps; drop the rest, torn lines
    included. Returns how many lines were dropped. Written atomically."""
    path = Path(path)
    if not path.is_file():
        return 0
    from .atomic import write_text
    rows = _parse(path)
    keep = [line if line.endswith("\n") else line + "\n" for rec, line in rows
            if rec is not None and (rec.get("kind") == "refinery" or rec.get("epoch", -1) < epochs_done
                                    or (rec.get("epoch") == epochs_done and rec.get("kind") == "step"
                                        and rec.get("step", steps_into) < steps_into))]
    dropped = len(rows) - len(keep)
    if dropped:
        write_text(path, "".join(keep))
        log.info("%s: dropped %d record(s) past epoch %d (the resumed checkpoint's)", path, dropped, epochs_done)
    return dropped
