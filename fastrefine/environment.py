"""What a record says about where it was made: git revision, hardware, library versions.

One place for it: run.json, benchmark JSON, `fastrefine doctor` and the tools all read it from here.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

import torch

# distribution names, not module __version__ (ffcv 1.0.2 reports "0.0.3rc1" from its module)
_DISTS = {"torch": ("torch",), "torchvision": ("torchvision",), "numpy": ("numpy",), "ffcv": ("ffcv",),
          "numba": ("numba",), "opencv": ("opencv-python", "opencv-python-headless"), "pillow": ("pillow",),
          "typer": ("typer",), "rich": ("rich",)}


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def hardware() -> dict:
    return {"host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "cpu": cpu_model(), "cpus": os.cpu_count(), "usable_cores": usable_cores(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def versions() -> dict:
    """Installed versions of what the figures depend on (None when absent)."""
    out: dict = {}
    for label, names in _DISTS.items():
        out[label] = None
        for name in names:
            try:
                out[label] = version(name)
                break
            except PackageNotFoundError:
                continue
    dali = [d for d in distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]
    out["nvidia-dali"] = f"{dali[0].metadata['Name']} {dali[0].version}" if dali else None
    return out
