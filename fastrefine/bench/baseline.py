"""The torchvision baseline every `fastrefine bench` command compares against, written once.

The plain way to train on ImageNet with torchvision: ImageFolder + PIL + RandomResizedCrop / flip /
ToTensor / Normalize in a DataLoader with host workers, and a train step with SGD. `bench loader` times
`BaselineLoader` beside the loader backends; `bench train` times `baseline_step` over `baseline_batches`
beside the trainer's own epoch loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

NAME = "torchvision-baseline"


def baseline_dataloader(*, folder: Path, resolution: int, batch_size: int, workers: int, device: torch.device):
    """ImageFolder + PIL + RandomResizedCrop/flip/ToTensor/Normalize(ImageNet mean, std), host workers."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from ..loaders import IMAGENET_MEAN, IMAGENET_STD
    tf = transforms.Compose([transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return DataLoader(datasets.ImageFolder(str(folder), transform=tf), batch_size=batch_size, shuffle=True,
                      num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda")


class BaselineLoader:
    """The baseline DataLoader behind the loaders' interface: (images, labels) on the device, fp32."""

    backend, normalize_on = NAME, "host"

    def __init__(self, *, folder: Path, resolution: int, batch_size: int, workers: int, device: torch.device):
        self.device = device
        self.workers = workers
        self.dataloader = baseline_dataloader(folder=folder, resolution=resolution, batch_size=batch_size,
                                              workers=workers, device=device)

    def __iter__(self):
        for x, y in self.dataloader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def baseline_batches(dataloader) -> Iterator:
    """The baseline's batches forever, epoch after epoch (host tensors; the step moves them)."""
    while True:
        yield from dataloader


def baseline_step(*, student: torch.nn.Module, refinery: torch.nn.Module | None, lr: float, device: torch.device,
                  modern: bool, amp_dtype: torch.dtype | None = None) -> Callable:
    """One train step the torchvision way: the refinery's softmax as the target (soft cross-entropy), or
    the labels without a refinery; SGD. `modern` adds channels_last and autocast to `amp_dtype` (None: no
    autocast). Moves `student` and `refinery` to the device and memory format in place."""
    fmt = torch.channels_last if modern else torch.contiguous_format
    student = student.to(device, memory_format=fmt).train()
    if refinery is not None:
        refinery = refinery.to(device, memory_format=fmt).eval()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    use_amp = modern and amp_dtype is not None

    def step(x, y):
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=use_amp):
            if refinery is not None:
                with torch.no_grad():
                    target = F.softmax(refinery(x).float(), dim=1)
            logits = student(x)
            if refinery is not None:
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
            else:
                loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss
    return step
