"""Signals that ask a run to stop, in one place: SIGTERM and SIGUSR1 (what schedulers send before a kill).

`StopSignals` turns each into a request that the training loop reads between steps: the current step
finishes, every rank agrees on the step where they all stop (`StopVote`), a mid-epoch `last.pt` is
written, and the process exits with `PREEMPTED_EXIT` (143 = 128 + SIGTERM, what a shell and Slurm report
for a job ended by SIGTERM; SIGUSR1 ends the same way, so a job script tells "preempted, resumable" from a
failure by that one code). Rerunning the same command resumes from that very step.

Other code that needs to react to these signals extends this module rather than installing handlers
of its own.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from .errors import FastRefineError

log = logging.getLogger("fastrefine")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 143


class Preempted(FastRefineError):
    """The run stopped on a signal after writing a checkpoint it can resume from exactly."""
    exit_code = PREEMPTED_EXIT


class StopSignals:
    """Records the first stop signal received; `requested` is its name, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handler(self, signum, frame) -> None:  # only sets a flag: the loop acts on it between steps
        if self.signum is None:
            self.signum = signum

    @contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """Handle the stop signals while the block runs (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class StopVote:
    """Every rank's stop request, summed, so that all ranks stop after the same step.

    `poll()` runs after each optimizer update and costs nothing on the host: each call starts an
    asynchronous all-reduce of this rank's flag on a CPU (gloo) group and reads the one started by the
    previous call, which finished while the step ran. All ranks call it equally often, so they all see
    the same sum at the same call and stop after the same step (one step after the signal at most).
    `settle()` (epoch boundaries) waits for an all-reduce: the same answer on every rank."""

    def __init__(self, signals: StopSignals, group=None, *, enabled: bool = False) -> None:
        self.signals, self.group, self.enabled = signals, group, enabled
        self._pending = None
        self._flag = None

    def _local(self) -> torch.Tensor:
        return torch.tensor([1 if self.signals.signum is not None else 0], dtype=torch.int32)

    def _drain(self) -> bool:
        """Wait for the vote in flight, if any: True when some rank had asked to stop by then."""
        if self._pending is None:
            return False
        self._pending.wait()
        self._pending = None
        return bool(self._flag.item())  # a CPU tensor: no device sync

    def poll(self) -> bool:
        if not self.enabled:
            return self.signals.signum is not None
        import torch.distributed as dist
        agreed = self._drain()
        self._flag = self._local()
        self._pending = dist.all_reduce(self._flag, group=self.group, async_op=True)
        return agreed

    def settle(self) -> bool:
        """Drain the pending poll and agree, blocking: True when any rank asked to stop."""
        if not self.enabled:
            return self.signals.signum is not None
        import torch.distributed as dist
        earlier = self._drain()
        flag = self._local()
        dist.all_reduce(flag, group=self.group)
        return earlier or bool(flag.item())


WORKER_STOP_GRACE_S = 60   # how long a loader worker outlives a stop signal at most


def _stop_after_grace(signum, frame) -> None:
    signal.alarm(WORKER_STOP_GRACE_S)   # SIGALRM's default action ends the worker then, at the latest


def ignore_stop_signals(*_) -> None:
    """A loader worker's start (DataLoader worker_init_fn): SIGTERM and SIGUSR1 sent to the whole process
    group (a scheduler, a shell's kill of the job) leave the workers running, so the main process can
    finish its step and save; the main process then shuts them down (loader.close). A worker ends
    WORKER_STOP_GRACE_S after the first stop signal all the same, so one whose main process never shuts
    it down (multiprocessing's exit handler terminates and then joins its children) cannot hang that exit."""
    for s in STOP_SIGNALS:
        signal.signal(s, _stop_after_grace)
