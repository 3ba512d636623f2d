#!/usr/bin/env python
"""Run a Python module as `python -m MODULE ARGS...` would, then write the process's CUDA peak memory.

    python tools/cuda_peak.py OUT.json -m fastrefine run recipe.toml

OUT.json gets {"max_memory_allocated_mib": ..., "max_memory_reserved_mib": ...} of every visible GPU
this process used (torch.cuda.max_memory_allocated), or null with the reason when it used none. It is
written at exit, also when the module fails; a process killed with SIGKILL writes nothing. The module's
exit status is this script's.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys


def peak_record() -> dict:
    torch = sys.modules.get("torch")
    if torch is None:
        return {"max_memory_allocated_mib": None, "why": "torch was not imported"}
    if not torch.cuda.is_available():
        return {"max_memory_allocated_mib": None, "why": "no CUDA"}
    if not torch.cuda.is_initialized():
        return {"max_memory_allocated_mib": None, "why": "CUDA not used"}
    devices = range(torch.cuda.device_count())
    alloc = [torch.cuda.max_memory_allocated(d) / 2**20 for d in devices]
    reserved = [torch.cuda.max_memory_reserved(d) / 2**20 for d in devices]
    return {"max_memory_allocated_mib": max(alloc), "max_memory_reserved_mib": max(reserved),
            "per_device_allocated_mib": alloc}


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: cuda_peak.py OUT.json -m MODULE [ARGS...]")
    out, module = sys.argv[1], sys.argv[3]

    def write() -> None:
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(peak_record(), f)
        os.replace(tmp, out)

    atexit.register(write)
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
