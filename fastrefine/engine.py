"""The training step, the epoch loop and evaluation. The loop never branches on backend or precision.

Precision is resolved once (`resolve_precision`) into an autocast factory and a GradScaler that is
enabled only for fp16. Metrics stay on the device; the host reads them every `log_every` steps.
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


@dataclass(frozen=True)
class Precision:
    name: str                      # "bf16" | "fp16" | "fp32"
    device_type: str               # "cpu" | "cuda"
    dtype: torch.dtype | None      # autocast dtype, None for fp32

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    @property
    def input_dtype(self) -> torch.dtype:
        """What loaders hand over: the AMP dtype on CUDA (halves the copy), fp32 on the CPU."""
        return self.dtype if (self.device_type == "cuda" and self.dtype is not None) else torch.float32


def resolve_precision(choice: str, device: torch.device) -> Precision:
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            choice = "bf16"
    if choice == "fp16" and device.type != "cuda":
        raise RunError("run.precision = 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[choice]
    return Precision(choice, device.type, dtype)


def param_groups(model: nn.Module, *, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Two groups by module type: weights of conv/linear layers decay; norm layers and biases do not."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, norm_types) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, nesterov: bool, weight_decay: float,
                   decay_norm_and_bias: bool) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay=weight_decay, decay_norm_and_bias=decay_norm_and_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def make_clipper(max_norm: float, scaler: torch.amp.GradScaler, optimizer) -> Callable[[nn.Module], None]:
    if max_norm <= 0:
        return lambda model: None

    def clip(model: nn.Module) -> None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return clip


def train_step(images: torch.Tensor, labels: torch.Tensor, *, student: nn.Module, refinery: nn.Module,
               loss_fn: Callable, jitter: Callable, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, autocast: Callable, clip: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """One step; returns (detached loss, detached student logits). Nothing here syncs with the host."""
    images = jitter(images)                      # identity unless adversarial jittering is on
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        target = refinery(images)                # refinery softmax on this very batch (None in round 0)
        logits = student(images)
        loss = loss_fn(logits, target, labels)
    scaler.scale(loss).backward()
    clip(student)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


@dataclass
class EpochResult:
    loss: float
    top1: float          # student's train top-1 against the ground-truth labels, on the augmented crops
    images: int
    seconds: float
    steps: int


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def train_epoch(loader: Iterable, *, step: Callable, optimizer, lr_fn: Callable[[float], float], epoch: int,
                steps_per_epoch: int, max_steps: int = 0, log_every: int = 50,
                on_log: Callable[[dict], None] = lambda rec: None, on_step: Callable[[int], None] = lambda n: None,
                all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> EpochResult:
    """Run one epoch of `step`; device-side sums, read every `log_every` steps and at the end."""
    sums = None  # [loss * n, correct, n] on the device
    start = time.perf_counter()
    last_t, last_n = start, 0
    n_steps = 0
    seen = 0
    for i, (images, labels) in enumerate(loader):
        if max_steps and i >= max_steps:
            break
        set_lr(optimizer, lr_fn(epoch + i / steps_per_epoch))
        loss, logits = step(images, labels)
        batch = torch.stack([loss.float() * labels.shape[0], (logits.argmax(1) == labels).sum().float(),
                             torch.tensor(float(labels.shape[0]), device=labels.device)])
        sums = batch if sums is None else sums + batch
        n_steps += 1
        seen += labels.shape[0]
        on_step(labels.shape[0])
        if n_steps % log_every == 0:
            # .item() here on purpose: a read of the on-device sums every log_every steps, not every step
            loss_now = loss.item()
            if not math.isfinite(loss_now):
                raise RunError(f"loss became {loss_now} at epoch {epoch} step {i}; stopped before writing a "
                               f"checkpoint (the last good one is kept)")
            now = time.perf_counter()
            on_log({"kind": "step", "epoch": epoch, "step": i, "lr": optimizer.param_groups[0]["lr"],
                    "loss": loss_now, "img_s": (seen - last_n) / max(now - last_t, 1e-9)})
            last_t, last_n = now, seen
    if sums is None:
        raise RunError(f"epoch {epoch}: the train loader yielded no full batch (batch size larger than the "
                       f"dataset share of this process?)")
    sums = all_reduce(sums)
    loss_sum, correct, n = sums.tolist()  # one sync per epoch, for the record
    if not math.isfinite(loss_sum):
        raise RunError(f"loss became {loss_sum} during epoch {epoch}; stopped before writing a checkpoint "
                       f"(the last good one is kept)")
    return EpochResult(loss=loss_sum / n, top1=correct / n, images=int(n),
                       seconds=time.perf_counter() - start, steps=n_steps)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, autocast: Callable, max_batches: int = 0,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, set_eval: bool = True) -> dict:
    """top-1, top-5 and cross-entropy of `model` over the loader (every image once, across ranks).

    set_eval=False evaluates the model in the modes it is in (a refinery in BN batch mode).
    """
    was_training = model.training
    if set_eval:
        model.eval()
    sums = None
    for i, (images, labels) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        with autocast():
            logits = model(images)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        batch = torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum"), hit[:, 0].sum().float(),
                             hit.any(dim=1).sum().float(), torch.tensor(float(labels.shape[0]), device=labels.device)])
        sums = batch if sums is None else sums + batch
    if set_eval:
        model.train(was_training)
    if sums is None:
        raise RunError("the val loader yielded no batch")
    loss, top1, top5, n = all_reduce(sums).tolist()  # one sync per evaluation
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "images": int(n)}


def build_step(**kwargs) -> Callable:
    """Bind everything but the batch, once per round."""
    return functools.partial(train_step, **kwargs)
