"""The refinery: losses against its softmax, the frozen refinery wrapper, adversarial jittering.

Label Refinery trains the student on the refinery's softmax computed on the very crop the student
sees. Both losses here use `batchmean` reduction: the sum over classes, averaged over the batch.
  soft_ce(s, r) = -1/B sum_b sum_c p_r(c|x_b) log p_s(c|x_b)
  kl(s, r)      =  1/B sum_b sum_c p_r log(p_r / p_s) = soft_ce(s, r) - H(p_r)
They have the same gradient with respect to the student; KL reads 0 when the student matches.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p(c) log softmax(s)(c), averaged over the batch (reduction 'batchmean')."""
    log_p = F.log_softmax(student_logits.float(), dim=1)
    return -(target_probs.float() * log_p).sum(dim=1).mean()


def kl_batchmean(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || student), summed over classes, averaged over the batch."""
    log_p = F.log_softmax(student_logits.float(), dim=1)
    return F.kl_div(log_p, target_probs.float(), reduction="batchmean")


REFINERY_LOSSES = {"soft_ce": soft_cross_entropy, "kl": kl_batchmean}


def make_loss(*, refined: bool, kind: str = "soft_ce", gt_weight: float = 0.0,
              label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]:
    """loss(student_logits, refinery_probs or None, labels), chosen once per round.

    Round 0 (refined=False): cross-entropy on the labels (optional label smoothing).
    Refined rounds: the refinery loss, plus gt_weight * cross-entropy on the labels when asked for.
    """
    if not refined:
        def label_loss(logits, probs, labels):
            del probs
            return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        return label_loss
    soft = REFINERY_LOSSES[kind]
    if gt_weight == 0.0:
        def refined_loss(logits, probs, labels):
            del labels
            return soft(logits, probs)
        return refined_loss

    def mixed_loss(logits, probs, labels):
        return (1 - gt_weight) * soft(logits, probs) + gt_weight * F.cross_entropy(logits.float(), labels)
    return mixed_loss


def _set_bn_batch_mode(model: nn.Module) -> None:
    """BN layers normalise with the batch's statistics, and never update their running stats."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: the stored statistics stay as trained


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, str]:
    """An eval-mode copy of `model` with every BatchNorm that follows a convolution (or a linear layer)
    folded into it (w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta):
    the same function up to float rounding, one memory pass fewer per layer. Uses torch.fx's
    conv/linear-BN fusion; a model torch.fx cannot trace is returned unchanged, with the reason.
    Returns (model, note)."""
    from torch.fx.experimental.optimization import fuse
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n_bn == 0:
        return model, "no BatchNorm to fold"
    channels_last = any(isinstance(m, nn.Conv2d) and m.weight.is_contiguous(memory_format=torch.channels_last)
                        and not m.weight.is_contiguous() for m in model.modules())
    try:
        folded = fuse(copy.deepcopy(model).eval())
    except Exception as e:  # noqa: BLE001  torch.fx could not trace it: keep the plain model
        return model, f"BatchNorm not folded (torch.fx: {type(e).__name__}: {e})"
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return folded, f"folded {n_bn - left} of {n_bn} BatchNorm layers into the layers before them"


class Refinery(nn.Module):
    """A frozen model that turns a batch into target probabilities, under inference mode.

    bn="eval": the whole model in eval mode (running BN statistics) -- fastrefine's default. With
    fold_bn (default) each BN after a convolution is folded into it (`fold_batchnorm`): the same
    function, a faster forward (measured on the CPU: darknet19 -23%, resnet50 -6%; docs/benchmarks.md).
    bn="batch": BN layers use the batch's statistics as the official Label Refinery code did (its
    refinery ran in train mode); dropout stays off, and the running statistics are not updated.
    resolution: None, the refinery sees the crop as it is; an int, the same crop resized to
    resolution x resolution on the device first (bilinear, antialiased when shrinking; computed in
    fp32, since CPU antialiasing has no bf16 kernel, then cast back), e.g. a refinery trained at 224
    labelling the 160 px crops of a fast recipe. It happens inside forward: the step is unchanged.
    The probabilities are cloned out of inference mode so the loss can save them for backward.
    """

    def __init__(self, model: nn.Module, *, bn: str = "eval", temperature: float = 1.0, fold_bn: bool = True,
                 resolution: int | None = None):
        super().__init__()
        model.eval()
        self.note = "BatchNorm kept (bn = 'batch')" if bn == "batch" else "BatchNorm kept (fold_bn = false)"
        if bn == "batch":
            _set_bn_batch_mode(model)
        elif bn != "eval":
            raise ValueError(f"refinery bn mode must be 'eval' or 'batch', got {bn!r}")
        elif fold_bn:
            model, self.note = fold_batchnorm(model)
            log.info("refinery: %s", self.note)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.temperature = temperature
        self.bn = bn
        if resolution is not None and resolution < 1:
            raise ValueError(f"refinery resolution must be a positive number of pixels, got {resolution}")
        self.resolution = resolution

    def train(self, mode: bool = True):  # the refinery's modes are fixed at construction
        del mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            probs = F.softmax(self.model(self.resize(x)).float() / self.temperature, dim=1)
        return probs.clone()

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """The crop at the refinery's resolution (unchanged when none is set or it is already that size)."""
        r = self.resolution
        if r is None or tuple(x.shape[-2:]) == (r, r):
            return x
        y = F.interpolate(x.float(), size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        return y.to(x.dtype).contiguous(memory_format=fmt)


class NoRefinery(nn.Module):
    """Round 0: there is no refinery; the loss reads the labels."""

    def forward(self, x: torch.Tensor) -> None:
        del x
        return None


def pixel_bounds(mean: tuple, std: tuple, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(low, high, one_pixel): normalised values of pixel 0 and 255 and the size of 1/255 step, per channel."""
    m = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    low, high, unit = (0 - m) / s, (1 - m) / s, (1 / 255) / s
    return low.to(dtype), high.to(dtype), unit.to(dtype)


class AdversarialJitter:
    """Replace a fraction of each batch with one-step adversarially jittered images (paper, Sec. 3.3).

    Gradient used: d/dx of KL(p_refinery(x) || p_student(x)), the divergence the student is trained
    to close, with the refinery's probabilities held fixed at the clean crop. One signed step of
    `epsilon` pixel units (0..255 scale) moves each jittered image to where the student disagrees
    with its refinery most, to first order; the result is clamped to valid pixels. The student is then
    trained on the jittered image against the refinery's softmax *of the jittered image* (the step's
    usual refinery forward sees the jittered batch). The student's plain module is used here, never
    its DDP wrapper: a gradient with respect to the input alone must not trigger DDP's all-reduce.
    """

    def __init__(self, *, student: nn.Module, refinery: nn.Module, fraction: float, epsilon: float,
                 mean: tuple, std: tuple, autocast: Callable):
        self.student, self.refinery = student, refinery
        self.fraction, self.epsilon, self.autocast = fraction, epsilon, autocast
        self.mean, self.std = mean, std
        self._bounds: tuple | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = int(round(self.fraction * x.shape[0]))
        if n == 0:
            return x
        if self._bounds is None or self._bounds[0].device != x.device:
            self._bounds = pixel_bounds(self.mean, self.std, x.device)
        low, high, unit = self._bounds
        # fp32 even when the loader hands over bf16/fp16: a one-pixel step is below bf16's spacing
        xa = x[:n].detach().float().requires_grad_(True)
        with self.autocast(), frozen_bn_statistics(self.student):
            target = self.refinery(xa.detach())
            div = kl_batchmean(self.student(xa), target)
        (grad,) = torch.autograd.grad(div, xa)
        jittered = torch.max(torch.min(xa.detach() + self.epsilon * unit * grad.sign(), high), low)
        return torch.cat([jittered.to(x.dtype), x[n:]]).contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module):
    """BN layers keep normalising with batch statistics (train mode) but leave their running
    statistics and counters as they were: the jitter's extra forward must not count as a step."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def no_jitter(x: torch.Tensor) -> torch.Tensor:
    return x
