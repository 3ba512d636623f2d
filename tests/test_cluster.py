"""What a cluster does to a run, on the CPU with gloo over loopback: a worker killed under torchrun's
elastic restarts, preemption signals in the middle of an epoch, ranks that do not share the run folder.
docs/survival.md lists each case beside its test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_recipe


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def worker_of_rank(agent: int, rank: int) -> int | None:
    """The pid of the worker of `rank` among the torchrun agent's children (its RANK variable)."""
    for pid in children(agent):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def epochs_logged(metrics: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in metrics.read_text().splitlines() if json.loads(x)["kind"] == "epoch"]


@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_resumes_and_finishes(tmp_path, demo_tree):
    """kill -9 of one worker once last.pt exists: torchrun (--max-restarts=1) stops the other and starts
    both again; the new group resumes from last.pt and finishes with exit 0, each epoch logged once.
    Without a store prefix per attempt the restarted workers read the dead group's keys from torchrun's
    shared store (its ranks' addresses) and fail to connect or wait."""
    p = write_recipe(tmp_path, demo_tree, name="elastic", rounds='[[rounds]]\nname = "r0"\nepochs = 3\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(torchrun("--max-restarts=1", "-m", "fastrefine", "--quiet", "run", str(p)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last = tmp_path / "runs/elastic/r0/last.pt"
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = worker_of_rank(agent.pid, 1)
        assert victim is not None, "no worker of rank 1 to kill (the run ended before its first checkpoint?)"
        os.kill(victim, signal.SIGKILL)
        out, err = agent.communicate(timeout=180)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    assert agent.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err  # torchrun saw the kill
    run = json.loads((tmp_path / "runs/elastic/r0/run.json").read_text())
    assert run["resumed_after_epoch"] >= 1  # the restarted group resumed from last.pt
    assert epochs_logged(tmp_path / "runs/elastic/r0/metrics.jsonl") == [0, 1, 2]
    assert (tmp_path / "runs/elastic/r0/done.json").is_file()
