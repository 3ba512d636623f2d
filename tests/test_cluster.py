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


def signal_rank_when(agent: subprocess.Popen, ready, signum: int, *, timeout: float, missing: str,
                     rank: int = 1) -> str:
    """Once `ready()` holds (or the agent ended, or 120 s passed), send `signum` to the worker of `rank`;
    returns the agent's stderr once it ends (killed after `timeout` s)."""
    try:
        deadline = time.monotonic() + 120
        while not ready() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        victim = worker_of_rank(agent.pid, rank)
        assert victim is not None, missing
        os.kill(victim, signum)
        return agent.communicate(timeout=timeout)[1]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()


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
    err = signal_rank_when(agent, last.exists, signal.SIGKILL, timeout=180,
                           missing="no worker of rank 1 to kill (the run ended before its first checkpoint?)")
    assert agent.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err  # torchrun saw the kill
    run = json.loads((tmp_path / "runs/elastic/r0/run.json").read_text())
    assert run["resumed_after_epoch"] >= 1  # the restarted group resumed from last.pt
    assert epochs_logged(tmp_path / "runs/elastic/r0/metrics.jsonl") == [0, 1, 2]
    assert (tmp_path / "runs/elastic/r0/done.json").is_file()


def signal_after(monkeypatch, steps: int, signum: int = signal.SIGTERM) -> None:
    """This process gets `signum` in the middle of step `steps` + 1 (from inside the step, as a scheduler's
    signal would arrive while a step runs)."""
    import fastrefine.engine as engine
    real, count = engine.train_step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        if count[0] == steps + 1:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "train_step", step)


def same_weights(a: Path, b: Path) -> None:
    import torch
    from fastrefine import checkpoint as ckpt
    wa, wb = ckpt.load(a)["model"], ckpt.load(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


PREEMPT_ROUNDS = '[[rounds]]\nname = "r0"\nepochs = 2\n'


@pytest.mark.parametrize("backend,signum", [("torch", signal.SIGTERM), ("dali", signal.SIGUSR1),
                                            pytest.param("ffcv", signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_stop_signal_mid_epoch_saves_that_step_and_the_resume_matches_an_uninterrupted_run(
        tmp_path, demo_tree, monkeypatch, backend, signum):
    """SIGTERM (or SIGUSR1) in the middle of epoch 2: the step finishes, last.pt holds that step, the run
    ends with Preempted (exit 143); the rerun skips the consumed batches and ends with the same weights,
    and the same log, as a run that never stopped. FFCV has no start_at: the engine reads and drops the
    consumed batches, exact because its order and crops depend on (seed, epoch, index) only."""
    from fastrefine.chain import run_recipe
    from fastrefine.preempt import Preempted
    from fastrefine.recipe import load_recipe
    from fastrefine import checkpoint as ckpt
    if backend in ("dali", "ffcv"):
        pytest.importorskip("nvidia.dali" if backend == "dali" else "ffcv")
        from helpers import convert_in_child
        data = tmp_path / "fast"
        convert_in_child(demo_tree, data, formats=(backend,), max_side=32, workers=1, progress=False)
    else:
        data = demo_tree
    sets = [f"loader.backend={backend!r}"]
    straight = load_recipe(write_recipe(tmp_path, data, name="straight", rounds=PREEMPT_ROUNDS), sets)
    run_recipe(straight)
    stopped = load_recipe(write_recipe(tmp_path, data, name="stopped", rounds=PREEMPT_ROUNDS), sets)
    steps_per_epoch = 400 // 32
    with monkeypatch.context() as m:
        signal_after(m, steps_per_epoch + 4, signum)  # arrives during step 5 of epoch 2
        with pytest.raises(Preempted, match=rf"stopped by {signal.Signals(signum).name} at epoch 2 step 5/12"):
            run_recipe(stopped)
    assert Preempted.exit_code == 143
    state = ckpt.load(tmp_path / "runs/stopped/r0/last.pt")
    assert (state["epoch"], state["epoch_step"], state["step"]) == (1, 5, steps_per_epoch + 5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    run_recipe(stopped)  # resumes at step 5 of epoch 2
    same_weights(tmp_path / "runs/straight/r0/last.pt", tmp_path / "runs/stopped/r0/last.pt")
    log_a = [json.loads(x) for x in (tmp_path / "runs/straight/r0/metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "runs/stopped/r0/metrics.jsonl").read_text().splitlines()]
    assert [(m["kind"], m.get("epoch"), m.get("step")) for m in log_a] == \
        [(m["kind"], m.get("epoch"), m.get("step")) for m in log_b]
    ea, eb = log_a[-1], log_b[-1]
    assert eb["train_images"] == ea["train_images"]
    assert eb["train_loss"] == pytest.approx(ea["train_loss"], rel=1e-5)


def test_checkpoint_every_steps_writes_mid_epoch_states(tmp_path, demo_tree, monkeypatch):
    from fastrefine.chain import run_recipe
    from fastrefine.recipe import load_recipe
    from fastrefine import checkpoint as ckpt
    from fastrefine.saver import Saver
    saves = []
    real = Saver.save

    def spy(self, **kwargs):
        saves.append((kwargs["epoch"], kwargs.get("epoch_step", 0)))
        return real(self, **kwargs)
    r = load_recipe(write_recipe(tmp_path, demo_tree, name="every", rounds=PREEMPT_ROUNDS,
                                 run={"checkpoint_every_steps": 5}))
    monkeypatch.setattr(Saver, "save", spy)
    run_recipe(r)
    # 12 steps per epoch: global steps 5, 10 | 15, 20 inside the epochs, and each epoch's end
    assert saves == [(0, 5), (0, 10), (1, 0), (1, 3), (1, 8), (2, 0)]
    assert ckpt.load(tmp_path / "runs/every/r0/last.pt").get("epoch_step", 0) == 0


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_ranks_at_the_same_step(tmp_path, demo_tree):
    """torchrun, 2 gloo processes: SIGTERM to rank 1 alone in the middle of an epoch. The ranks vote, stop
    after the same step, rank 0 writes last.pt with both ranks' states, each exits 143 with one line.
    (Resuming a mid-epoch last.pt exactly: the single-process test above; a DDP resume: the elastic test.)"""
    p = write_recipe(tmp_path, demo_tree, name="pre", rounds='[[rounds]]\nname = "r0"\nepochs = 2\n',
                     run={"log_every": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = tmp_path / "runs/pre/r0/metrics.jsonl"
    agent = subprocess.Popen(torchrun("--max-restarts=0", "-m", "fastrefine", "run", str(p)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err = signal_rank_when(agent, lambda: metrics.exists() and '"kind": "step"' in metrics.read_text(),
                           signal.SIGTERM, timeout=120, missing="the run ended before its first step record")
    assert "exitcode  : 143" in err or "exitcode: 143" in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "stopped by" in ln]
    assert len(lines) == 2, err[-3000:]                       # one line per rank, the same step
    assert any("SIGTERM" in ln for ln in lines) and any("another rank" in ln for ln in lines)
    assert lines[0].split(" at epoch ")[1] == lines[1].split(" at epoch ")[1]
    from fastrefine import checkpoint as ckpt
    state = ckpt.load(tmp_path / "runs/pre/r0/last.pt")
    if state.get("epoch_step"):
        assert len(state["partial"]) == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_ranks_that_do_not_share_the_run_folder_stop_at_start_naming_run_out(tmp_path, demo_tree):
    """Two ranks, each with its own run.out (as two nodes with local disks would have): rank 1 does not see
    the token rank 0 wrote; both stop before any round trains, with one line naming run.out."""
    p = write_recipe(tmp_path, demo_tree, name="split", rounds='[[rounds]]\nname = "r0"\nepochs = 1\n')
    script = tmp_path / "per_rank_out.py"
    script.write_text(
        "import os, sys\n"
        "from fastrefine.cli import main\n"
        f"sys.argv = ['fastrefine', 'run', {str(p)!r}, '--set', "
        f"'run.out={tmp_path}/node' + os.environ['RANK'] + '/runs']\n"
        "main()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(torchrun("--max-restarts=0", str(script)), capture_output=True, text=True, env=env,
                         timeout=180)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2, res.stderr[-3000:]    # every rank stops, each with the same one line
    assert all("run.out = " in ln and "rank 1 on" in ln and "does not see the run folder" in ln for ln in lines)
    assert not (tmp_path / "node0/runs/split/r0").exists()   # nothing trained


def test_sigterm_to_the_process_group_with_loader_workers_is_one_line_and_exit_143(tmp_path, demo_tree):
    """`kill -TERM -PGID` (a scheduler signalling the job's process group, the DataLoader worker included):
    the run exits 143 with its one line and no traceback from any process (an EOFError traceback was
    printed when SIGTERM ended the main process under its DataLoader workers)."""
    p = write_recipe(tmp_path, demo_tree, name="pg", rounds='[[rounds]]\nname = "r0"\nepochs = 3\n', workers=1)
    metrics = tmp_path / "runs/pg/r0/metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "fastrefine", "run", str(p)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while (not metrics.exists() or '"kind": "step"' not in metrics.read_text()) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "EOFError" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "stopped by SIGTERM at epoch 1 step" in errors[0], err[-2000:]
