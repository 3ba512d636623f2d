"""A round's checkpoint files and its "best": `Saver` (timm's CheckpointSaver is the model).

After every epoch `save` writes last.pt (the state layout), ema.pt with run.ema (the weight average in
the weights layout) and, when the epoch's val top-1 beats the best so far, best.pt (the weights layout);
`finish` makes sure best.pt exists at the end of the round.

Rank 0 writes in a background thread, so that no rank waits for the disk: the state is copied to the
CPU (new tensors: training may change the live ones at once), then a thread writes the files through
`checkpoint.write` (temporary + fsync + rename: a kill at any moment leaves the old file or the new one).
The thread is joined before the next save, by `finish`, and by `close` (the end of the round, whatever
ends it); an error of the write (a full disk) is raised there, in the training thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from . import checkpoint as ckpt
from .distributed import Dist, gather_per_rank

log = logging.getLogger("fastrefine")


def gather_rng_states(dist: Dist) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: every rank calls it)."""
    return gather_per_rank(dist, ckpt.rng_state())


class Saver:
    """Owns `folder`/last.pt, `folder`/best.pt and the best val top-1 of the round (None: no epoch
    evaluated yet). Every rank calls `save` (the RNG states are gathered from all); rank 0 writes."""

    def __init__(self, folder: Path, *, dist: Dist, best_top1: float | None = None) -> None:
        self.folder = Path(folder)
        self.dist = dist
        self.best_top1 = best_top1
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    def save(self, *, model, optimizer, scaler, meta: ckpt.Meta, epoch: int, step: int,
             val_top1: float | None, ema=None, epoch_step: int = 0, partial=None) -> bool:
        """Checkpoint `epoch` finished epochs and `step` optimizer steps; True when `val_top1` is a new
        best (best.pt is written too). `ema`: the round's ema.WeightEma (run.ema). A save inside an
        epoch gives `epoch_step` (steps done into epoch `epoch` + 1) and this rank's running sums
        (`partial`, engine.Partial), gathered from every rank. Returns once the state is copied."""
        improved = val_top1 is not None and (self.best_top1 is None or val_top1 > self.best_top1)
        if improved:
            self.best_top1 = val_top1
        rng = gather_rng_states(self.dist)  # every rank takes part; rank 0 writes
        partials = None
        if epoch_step:
            sums = partial.sums.detach().cpu() if partial is not None and partial.sums is not None else None
            partials = gather_per_rank(self.dist, {"sums": sums, "seen": partial.seen if partial else 0})
        if self.dist.is_main:
            self.join()
            state = ckpt.cpu_copy(ckpt.state_layout(model=model, optimizer=optimizer, scaler=scaler, epoch=epoch,
                                                    step=step, best_top1=self.best_top1, meta=meta, rng=rng,
                                                    ema=ema.state_dict() if ema is not None else None,
                                                    epoch_step=epoch_step, partial=partials))
            average = None
            if ema is not None:
                average = ckpt.cpu_copy(ckpt.weights_layout(
                    ema.module.state_dict(), dataclasses.replace(meta, weights="ema", val_top1=None)))
            self._thread = threading.Thread(target=self._write, args=(state, improved, average),
                                            name=f"fastrefine-save-{self.folder.name}")
            self._thread.start()
        return improved

    def _write(self, state: dict, improved: bool, average: dict | None) -> None:
        try:
            if improved:
                ckpt.write(self.best, ckpt.as_weights(state))
            if average is not None:
                ckpt.write(self.folder / "ema.pt", average)
            ckpt.write(self.last, state)
        except BaseException as e:  # noqa: BLE001  handed to the training thread by join()
            self._error = e

    def join(self) -> None:
        """Wait for the write in flight, if any; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def flush(self) -> None:
        """Every rank waits until rank 0's write in flight is on disk (a collective): before a stop, so
        that no rank exits (and no launcher kills rank 0) while the state is being written."""
        self.join()
        self.dist.barrier()

    def finish(self) -> None:
        """The round's end (rank 0): the last write done; best.pt from last.pt when no evaluated epoch
        wrote one (the weights layout)."""
        self.join()
        if self.dist.is_main and not self.best.exists():
            ckpt.copy_as_weights(self.last, self.best)

    def close(self) -> None:
        """Join the write in flight without raising (the round is already ending with another error):
        its error is logged."""
        try:
            self.join()
        except Exception as e:  # noqa: BLE001
            log.error("%s: the checkpoint write in flight failed too: %s", self.folder, e)

    def __enter__(self) -> "Saver":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.join()
        else:
            self.close()
