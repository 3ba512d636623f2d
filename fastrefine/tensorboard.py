"""run.tensorboard: the records of metrics.jsonl, mirrored as TensorBoard scalars under ROUND/tensorboard/.

The same dicts MetricsLog writes are turned into scalars, so the two never disagree. x axis: batches
counted from the round's start (a step record at batch i of epoch e is at e x steps_per_epoch + i + 1, an
epoch record at the round's batch count after it: the same axis while epochs have steps_per_epoch batches). TensorBoard is an optional extra
(`pip install 'fastrefine[tensorboard]'`); without it `run.tensorboard = true` is a one-line error
before any round trains.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

INSTALL = "pip install 'fastrefine[tensorboard]' (or pip install tensorboard)"

# (record kind, key) -> tag
STEP_TAGS = {"loss": "train/loss_step", "lr": "train/lr", "img_s": "speed/images_per_s_step"}
EPOCH_TAGS = {"train_loss": "train/loss", "train_top1": "train/top1", "val_loss": "val/loss", "val_top1": "val/top1",
              "val_top5": "val/top5", "ema_val_top1": "val/ema_top1", "ema_val_loss": "val/ema_loss",
              "img_s": "speed/images_per_s", "resolution": "train/resolution"}
REFINERY_TAG = "val/refinery_top1"


def summary_writer_class():
    """torch's SummaryWriter, or a UsageError saying how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(f"run.tensorboard = true needs the tensorboard package, which is not installed: {INSTALL}, "
                         f"or set run.tensorboard = false") from None
    return SummaryWriter


def require() -> None:
    """Fail early (before any round trains) when run.tensorboard is on and tensorboard is missing."""
    summary_writer_class()


class TensorBoardMirror:
    """Call it with each metrics.jsonl record. `purge_step` (a resumed round's step count) drops the
    events of the discarded partial epoch, as metrics.jsonl is cut back to the checkpoint's epochs."""

    def __init__(self, folder: Path, *, steps_per_epoch: int, purge_step: int | None = None, writer=None):
        self.steps_per_epoch = steps_per_epoch
        self.writer = writer if writer is not None else summary_writer_class()(str(folder), purge_step=purge_step)
        self.refinery_top1: float | None = None

    def __call__(self, record: dict) -> None:
        kind, add = record.get("kind"), self.writer.add_scalar
        if kind == "refinery":
            self.refinery_top1 = record["val_top1"]
            add(REFINERY_TAG, record["val_top1"], 0)
        elif kind == "step":
            x = record["epoch"] * self.steps_per_epoch + record["step"] + 1
            for key, tag in STEP_TAGS.items():
                if key in record:
                    add(tag, record[key], x)
        elif kind == "epoch":
            x = record["step"]
            for key, tag in EPOCH_TAGS.items():
                if key in record:
                    add(tag, record[key], x)
            add("train/epoch", record["epoch"] + 1, x)
            if self.refinery_top1 is not None and "val_top1" in record:  # a line beside the student's val top-1
                add(REFINERY_TAG, self.refinery_top1, x)

    def close(self) -> None:
        self.writer.close()
