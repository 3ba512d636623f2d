"""What `fastrefine run` says and how it exits when Ctrl-C stops it.

Ctrl-C (SIGINT) ends a run at once with one line on stderr naming where it stopped and where a rerun
resumes from (what last.pt on disk holds: the end of the last finished epoch, or the step of a mid-epoch
checkpoint), and exit 130 (128 + SIGINT). SIGTERM and SIGUSR1 are preempt.py's: the step finishes, a
mid-epoch last.pt is written, exit 143. The round updates a `Position` as it goes; nothing is global.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass


@dataclass
class Position:
    """Where the run is: the round, the epoch in progress (0-based; None outside an epoch), the batches
    done in it, and how many epochs the round's last.pt holds."""
    round: str | None = None
    epoch: int | None = None
    step: int = 0
    saved_epochs: int = 0
    saved_step: int = 0          # a mid-epoch last.pt: the steps of epoch saved_epochs + 1 it holds

    def start_round(self, name: str, *, saved_epochs: int, saved_step: int = 0) -> None:
        self.round, self.epoch, self.step = name, None, 0
        self.saved(saved_epochs, step=saved_step)

    def start_epoch(self, epoch: int, *, step: int = 0) -> None:
        self.epoch, self.step = epoch, step

    def saved(self, epochs: int, *, step: int = 0) -> None:
        """last.pt now holds `epochs` finished epochs (and `step` steps of the next one)."""
        self.saved_epochs, self.saved_step = epochs, step

    def message(self) -> str:
        if self.round is None:
            return "interrupted before any round trained; rerun the same command to start"
        where = (f"at epoch {self.epoch + 1} step {self.step} of round {self.round}" if self.epoch is not None
                 else f"in round {self.round}, outside an epoch")
        if self.saved_step:
            return (f"interrupted {where}; rerun the same command to resume from step {self.saved_step} of epoch "
                    f"{self.saved_epochs + 1}")
        if self.saved_epochs:
            return (f"interrupted {where}; rerun the same command to resume from the end of epoch "
                    f"{self.saved_epochs}")
        return (f"interrupted {where}; no epoch of it finished: rerun the same command to start it again "
                f"(finished rounds are skipped)")


def exit_code(exc: BaseException) -> int:
    """128 + SIGINT, as a shell reports a process ended by Ctrl-C."""
    return 128 + signal.SIGINT


@contextlib.contextmanager
def deferred():
    """Hold SIGINT and SIGTERM while the block runs (a checkpoint being saved and recorded as saved) and
    act on them once it is done: the line then names what last.pt really holds. A held SIGTERM goes to
    the handler that was there before (preempt.StopSignals: a flag the loop reads)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)       # Python's SIGINT handler raises KeyboardInterrupt
        elif handler == signal.SIG_DFL:
            signal.raise_signal(caught[0])


def report(position: Position, exc: BaseException) -> int:
    """Print the one line (rank 0 only, under torchrun) and return the exit code. A further Ctrl-C is
    ignored from here on, so that it cannot print a traceback over the line."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get("RANK", "0") == "0":
        sys.stdout.flush()
        sys.stderr.write(position.message() + "\n")
        sys.stderr.flush()
    return exit_code(exc)
