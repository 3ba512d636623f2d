"""Precision, chosen once outside the step (DESIGN.md convention 2): an autocast context and a
GradScaler that is enabled only for fp16. The step never asks which precision it runs in."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Without it torch emulates bf16
    and a training step runs several times slower than in fp32 (6-12x measured on an AVX2-only EPYC)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """"auto": bf16 on GPUs that support it, else fp16; on the CPU bf16 where the CPU has it natively,
    else fp32."""
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            choice = "bf16" if cpu_has_native_bf16() else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise RunError("run.precision = 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[choice]
    return Precision(choice, device.type, dtype)
