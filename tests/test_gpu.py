"""The trainer on CUDA (marked gpu: skipped without a GPU; tools/gpu_check.sh runs them on a GPU host).

Data: the generated `synthetic_tree` (a bare GPU host has no Fashion-MNIST)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastrefine import checkpoint as ckpt
from helpers import Killed, die_after, write_recipe

pytestmark = pytest.mark.gpu


def _recipe(tmp_path: Path, data: Path, name: str, run: dict | None = None) -> Path:
    rounds = '\n[[rounds]]\nname = "r0"\nepochs = 2\n[[rounds]]\nname = "r1"\nepochs = 1\n'
    return write_recipe(tmp_path, data, name=name, rounds=rounds, device="cuda", seed=2, workers=2, run=run)


def test_refined_chain_on_cuda_without_host_sync_in_the_epoch(tmp_path, synthetic_tree, monkeypatch):
    """Both rounds on CUDA; train_epoch and evaluate run under sync debug mode "error"."""
    import fastrefine.engine as engine
    from fastrefine.chain import run_recipe
    from fastrefine.recipe import load_recipe

    real_epoch, real_eval = engine.train_epoch, engine.evaluate

    def strict(fn):
        def run(*args, **kwargs):
            # the loop's only syncs are the log_every read and the per-epoch totals: allow those by making
            # log_every larger than the epoch, and check everything before the final read
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run
    # the per-epoch `.tolist()` is a sync by design; the strict mode is switched off around it
    monkeypatch.setattr(torch.Tensor, "tolist", _unstrict(torch.Tensor.tolist))
    import fastrefine.round as round_mod
    monkeypatch.setattr(round_mod, "train_epoch", strict(real_epoch))
    monkeypatch.setattr(round_mod, "evaluate", strict(real_eval))
    rows = run_recipe(load_recipe(_recipe(tmp_path, synthetic_tree, "cuda", {"log_every": 1000})))
    assert [r["round"] for r in rows] == ["r0", "r1"] and rows[1]["val_top1"] > 0.15


def _unstrict(fn):
    def call(self, *args, **kwargs):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return fn(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    return call


def test_resume_on_cuda_after_a_kill(tmp_path, synthetic_tree, monkeypatch):
    from fastrefine.chain import run_recipe
    from fastrefine.recipe import load_recipe

    p = _recipe(tmp_path, synthetic_tree, "resume")
    with monkeypatch.context() as m:
        die_after(m, 16)  # 12 steps an epoch: dies in the middle of epoch 2
        with pytest.raises(Killed):
            run_recipe(load_recipe(p))
    assert ckpt.load(tmp_path / "runs/resume/r0/last.pt")["epoch"] == 1
    rows = run_recipe(load_recipe(p))  # RNG states restored from CPU tensors although the run is on CUDA
    assert [r["round"] for r in rows] == ["r0", "r1"]


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"DDP over NCCL needs 2 CUDA GPUs; {torch.cuda.device_count()} here")
def test_ddp_over_nccl_on_two_gpus(tmp_path, synthetic_tree):
    """Two processes under torchrun, one GPU each, NCCL (fastrefine.distributed picks it on CUDA)."""
    import json
    import os
    import subprocess
    import sys
    rounds = '\n[[rounds]]\nname = "r0"\nepochs = 1\n[[rounds]]\nname = "r1"\nepochs = 1\n'
    p = write_recipe(tmp_path, synthetic_tree, name="nccl", rounds=rounds, device="cuda", seed=2, workers=1)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fastrefine", "--quiet", "run", str(p)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs/nccl/r1"
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["device"].startswith("cuda")
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if json.loads(x)["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["val_images"] == 100          # every val image once across the ranks
    assert epochs[0]["train_images"] == 2 * (400 // 2 // 32 * 32)
    rng = ckpt.load(run / "last.pt")["rng"]
    assert len(rng) == 2                                                  # each rank's RNG state saved
