"""The training step, the epoch loop and evaluation. The loop never branches on backend or precision.

Precision comes resolved (precision.py) as an autocast factory and a GradScaler enabled only for fp16.
Metrics stay on the device; the host reads them every `log_every` steps and once per epoch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RunError
from .optim import set_lr


def _same(images: torch.Tensor) -> torch.Tensor:
    return images


def split_views(images) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(the student's crops, what the refinery sees given the crops after jittering): the crops themselves,
    or, for a `Views` batch (refinery.view = "image"), the whole uncropped images."""
    if isinstance(images, tuple):
        crop, whole = images
        return crop, lambda _crops: whole
    return images, _same


def forward_backward(images: torch.Tensor, labels: torch.Tensor, *, student: nn.Module, refinery: nn.Module,
                     loss_fn: Callable, jitter: Callable, scaler: torch.amp.GradScaler, autocast: Callable,
                     accumulate: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinery and student on one batch, backward of loss / `accumulate` (gradients add up over the
    `accumulate` batches of one update); returns (detached loss, detached student logits). `images` is the
    batch of crops, or `Views(crop, image)` when the refinery sees the whole image (refinery.view)."""
    images, refinery_view = split_views(images)  # refinery_view: the crops as they are, or the whole images
    images = jitter(images)                      # identity unless adversarial jittering is on
    with autocast():
        target = refinery(refinery_view(images))  # refinery softmax on this very batch (None in round 0)
        logits = student(images)
        loss = loss_fn(logits, target, labels)
    scaler.scale(loss / accumulate).backward()
    return loss.detach(), logits.detach()


def train_step(images: torch.Tensor, labels: torch.Tensor, *, student: nn.Module, refinery: nn.Module,
               loss_fn: Callable, jitter: Callable, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, autocast: Callable, clip: Callable,
               accumulate: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One update: the batch's backward (added to the gradients of the `accumulate` - 1 batches before it,
    see accumulate_step), then clip, step, and the gradients cleared for the next update. Returns (detached
    loss, detached student logits). Nothing here syncs with the host."""
    loss, logits = forward_backward(images, labels, student=student, refinery=refinery, loss_fn=loss_fn,
                                    jitter=jitter, scaler=scaler, autocast=autocast, accumulate=accumulate)
    clip(student)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)        # after the step: accumulated gradients start from None
    return loss, logits


def accumulate_step(images: torch.Tensor, labels: torch.Tensor, *, student: nn.Module,
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the `accumulate` - 1 batches before an update: backward only. Under DDP it skips the
    gradient all-reduce (`no_sync`); the update's own batch (train_step) reduces the summed gradients."""
    with _no_sync(student):
        return forward_backward(images, labels, student=student, **kwargs)


def _no_sync(model: nn.Module):
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel's; a plain module has nothing to skip
    return no_sync() if no_sync is not None else contextlib.nullcontext()


@dataclass
class Partial:
    """An epoch's running sums on this rank: [loss * n, correct] on the device, and images seen."""
    sums: torch.Tensor | None
    seen: int


@dataclass
class EpochResult:
    loss: float
    top1: float          # student's train top-1 against the ground-truth labels, on the augmented crops
    images: int
    seconds: float
    steps: int           # steps run by this call
    torch_threads: int   # torch's intra-op threads the steps ran with (read once the loader started the epoch)
    stopped_at: int | None = None     # the epoch stopped before this batch (after_update asked)
    partial: Partial | None = None


def train_epoch(loader: Iterable, *, step: Callable, optimizer, lr_fn: Callable[[float], float], epoch: int,
                steps_per_epoch: int, max_steps: int | None = None, log_every: int | None = 50,
                on_log: Callable[[dict], None] = lambda rec: None, on_step: Callable[[int], None] = lambda n: None,
                all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, accumulate: int = 1,
                accumulate_step: Callable | None = None, on_update: Callable[[], None] = lambda: None,
                start_step: int = 0, carry: "Partial | None" = None,
                after_update: "Callable[[int, Partial], bool] | None" = None) -> EpochResult:
    """Run one epoch of `step`. With `accumulate` = N > 1, N - 1 batches go through `accumulate_step`
    (backward only) and every Nth through `step` (backward, then the update); the epoch's last batch
    always updates, so no gradient carries into the next epoch. `on_update` runs after each update. Loss and hits are summed on the device and read once, at the epoch's end; the step's loss is read every `log_every` steps (None: never inside the epoch, no step records);
    images are counted on the host (a device tensor built per step would be a blocking host-to-device
    copy on CUDA). An epoch cut short (`max_steps`) closes the loader's epoch iterator.

    Mid-epoch checkpoints: `start_step` = k resumes the epoch at its batch k (the loader skips the
    batches before it: `start_at`, or reading and dropping them, which gives the same batches since
    crops depend on (seed, epoch, index) only), with `carry` the sums of the steps before it.
    `after_update(next_step, partial)` runs after each update but the epoch's last; when it returns
    True the epoch stops there and the result has `stopped_at` = next_step and `partial` set."""
    sums = None if carry is None else carry.sums  # [loss * n, correct] on the device
    start = time.perf_counter()
    seen = 0 if carry is None else carry.seen
    last_t, last_n = start, seen
    n_steps = start_step
    threads = torch.get_num_threads()
    batches = _iter_from(loader, start_step)
    try:
        for i, (images, labels) in enumerate(batches, start=start_step):
            if i == start_step:  # a loader may set torch's threads when its epoch starts (FFCV does)
                threads = torch.get_num_threads()
            set_lr(optimizer, lr_fn(epoch + i / steps_per_epoch))
            last = (max_steps and n_steps + 1 >= max_steps) or i + 1 >= steps_per_epoch
            update = accumulate == 1 or (i + 1) % accumulate == 0 or last
            loss, logits = (step if update else accumulate_step)(images, labels)
            if update:
                on_update()
            n = labels.shape[0]
            batch = torch.stack([loss.float() * n, (logits.argmax(1) == labels).sum().float()])
            sums = batch if sums is None else sums + batch
            n_steps += 1
            seen += n
            on_step(n)
            if log_every is not None and n_steps % log_every == 0:
                # .item() here on purpose: one read of the device every log_every steps, not every step
                loss_now = loss.item()
                if not math.isfinite(loss_now):
                    raise RunError(f"loss became {loss_now} at epoch {epoch} step {i}; stopped before writing a "
                                   f"checkpoint (the last good one is kept)")
                now = time.perf_counter()
                on_log({"kind": "step", "epoch": epoch, "step": i, "lr": optimizer.param_groups[0]["lr"],
                        "loss": loss_now, "img_s": (seen - last_n) / max(now - last_t, 1e-9)})
                last_t, last_n = now, seen
            if max_steps and n_steps >= max_steps:
                break  # before the loader is asked for one more batch
            if update and not last and after_update is not None and after_update(i + 1, Partial(sums, seen)):
                return EpochResult(loss=math.nan, top1=math.nan, images=seen, seconds=time.perf_counter() - start,
                                   steps=n_steps - start_step, torch_threads=threads, stopped_at=i + 1,
                                   partial=Partial(sums, seen))
    finally:
        _close(batches)
    if sums is None:
        raise RunError(f"epoch {epoch}: the train loader yielded no full batch (batch size larger than the "
                       f"dataset share of this process?)")
    totals = all_reduce(torch.cat([sums, _host_count(seen, sums.device)]))
    loss_sum, correct, n = totals.tolist()  # one sync per epoch, for the record
    if not math.isfinite(loss_sum):
        raise RunError(f"loss became {loss_sum} during epoch {epoch}; stopped before writing a checkpoint "
                       f"(the last good one is kept)")
    return EpochResult(loss=loss_sum / n, top1=correct / n, images=int(n),
                       seconds=time.perf_counter() - start, steps=n_steps - start_step, torch_threads=threads)


def _iter_from(loader, start_step: int):
    """The loader's epoch iterator from batch `start_step` on."""
    if start_step and hasattr(loader, "start_at"):
        loader.start_at(start_step)
        return iter(loader)
    batches = iter(loader)
    for _ in range(start_step):  # a loader that cannot seek: read and drop (same crops, more decoding)
        next(batches)
    return batches


def _close(batches) -> None:
    """End an epoch's iterator, finished or abandoned: a generator-based loader stops its epoch (threads,
    pinned buffers) in its `finally`."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _length(loader) -> int | None:
    """Batches the loader yields in a full pass (this rank's), or None when it does not say."""
    try:
        return len(loader)
    except TypeError:
        return None


def _host_count(n: int, device: torch.device) -> torch.Tensor:
    """The host's image count as a 1-element tensor on `device`, copied without a blocking transfer
    (pinned memory, non_blocking) so that it can join the device sums for one all-reduce."""
    t = torch.tensor([float(n)])
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def evaluate(model: nn.Module, loader: Iterable, *, autocast: Callable, max_batches: int | None = None,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, set_eval: bool = True,
             num_classes: int | None = None) -> dict:
    """top-1, top-5 and cross-entropy of `model` over the loader (every image once, across ranks).

    With `num_classes`, also per-class top-1: "class_images" and "class_top1_hits", lists indexed by
    label, counted on the device beside the sums and read in the same single sync.

    The forward runs under inference_mode, as the refinery does in the step (a compiled refinery keeps one
    graph); the loader is iterated outside it, so that a loader thread writing into buffers made here is
    never writing into inference tensors. set_eval=False evaluates the model in the modes it is in (a
    refinery in BN batch mode).
    """
    was_training = model.training
    if set_eval:
        model.eval()
    sums = None
    seen = done = 0
    batches = iter(loader)
    try:
        for i, (images, labels) in enumerate(batches):
            done = i + 1
            with torch.inference_mode():
                with autocast():
                    logits = model(images)
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit = top == labels[:, None]
                batch = torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum"),
                                     hit[:, 0].sum().float(), hit.any(dim=1).sum().float()])
                if num_classes is not None:  # per-class images and top-1 hits, on the device
                    batch = torch.cat([batch, torch.bincount(labels, minlength=num_classes).float(),
                                       torch.bincount(labels[hit[:, 0]], minlength=num_classes).float()])
                sums = batch if sums is None else sums + batch
            seen += labels.shape[0]
            if max_batches and i + 1 >= max_batches:
                break
    finally:
        _close(batches)
        if set_eval:
            model.train(was_training)
    if sums is None:
        raise RunError("the val loader yielded no batch")
    totals = all_reduce(torch.cat([sums.clone(), _host_count(seen, sums.device)])).tolist()  # one sync per evaluation
    loss, top1, top5, n = totals[:3] + totals[-1:]
    out = {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "images": int(n), "batches": done,
           "total_batches": _length(loader)}
    if num_classes is not None:
        per = totals[3:-1]
        out["class_images"] = [int(v) for v in per[:num_classes]]
        out["class_top1_hits"] = [int(v) for v in per[num_classes:]]
    return out


def build_step(**kwargs) -> Callable:
    """Bind everything but the batch, once per round: the step that updates the weights."""
    return functools.partial(train_step, **kwargs)


def build_accumulate_step(*, optimizer=None, clip=None, **kwargs) -> Callable:
    """Bind everything but the batch: the backward-only step of the batches before an update (the
    optimizer and the clipper are accepted so that both steps are built from the same arguments)."""
    return functools.partial(accumulate_step, **kwargs)
