"""What a run prints: one line and exit 130 when stopped by Ctrl-C (143 and preempt.py's line for SIGTERM),
plain lines instead of progress bars when the output is not a terminal."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from fastrefine import checkpoint as ckpt
from fastrefine.interrupt import Position
from fastrefine.progress import PlainProgress
from helpers import write_recipe


def test_position_messages():
    p = Position()
    assert p.message() == "interrupted before any round trained; rerun the same command to start"
    p.start_round("r1", saved_epochs=0)
    p.start_epoch(0)
    p.step = 7
    assert p.message() == ("interrupted at epoch 1 step 7 of round r1; no epoch of it finished: rerun the same "
                           "command to start it again (finished rounds are skipped)")
    p.saved(1)
    p.start_epoch(1)
    p.step = 3
    assert p.message() == ("interrupted at epoch 2 step 3 of round r1; rerun the same command to resume from "
                           "the end of epoch 1")
    p.saved(1, step=5)  # a mid-epoch last.pt (run.checkpoint_every_steps)
    p.step = 6
    assert p.message() == ("interrupted at epoch 2 step 6 of round r1; rerun the same command to resume from "
                           "step 5 of epoch 2")


def test_plain_progress_prints_one_line_per_epoch_and_step_record(tmp_path):
    out = tmp_path / "log.txt"
    with open(out, "w") as fh:
        bar = PlainProgress(Console(file=fh, width=80))
        task = bar.add_task("r0 2/5 224px", total=1000, info="")
        bar.advance(task, 500)
        bar.step_record({"kind": "step", "epoch": 1, "step": 49, "loss": 1.2345, "lr": 0.1, "img_s": 1234.5})
        bar.step_record({"kind": "epoch"})  # not a step record: no line
        bar.advance(task, 500)
        bar.update(task, info="loss 1.100 train 50% val 40.0% and a long tail that must not be wrapped at 80 columns")
    lines = out.read_text().splitlines()
    assert lines[0] == "r0 2/5 224px step 50: loss 1.234 lr 0.1 1,234 img/s"
    assert re.fullmatch(r"r0 2/5 224px: 1,000/1,000 in [\d.]+ s \([\d,]+ img/s\) loss 1.100 train 50% val 40.0% "
                        r"and a long tail that must not be wrapped at 80 columns", lines[1])
    assert len(lines) == 2


def _start(tmp_path, demo_tree, name):
    p = write_recipe(tmp_path, demo_tree, name=name, run={"progress": True, "max_steps_per_epoch": 3,
                                                           "max_val_batches": 1, "log_every": 1},
                     rounds='[[rounds]]\nname = "r0"\nepochs = 1000\n')
    # SIGINT's default action restored in the child: a shell's background job would have it ignored
    return subprocess.Popen([sys.executable, "-m", "fastrefine", "run", str(p)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_prints_one_line_and_exits_128_plus_signal(tmp_path, demo_tree, sig, code):
    proc = _start(tmp_path, demo_tree, "stop")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "runs/stop/r0/last.pt").is_file():
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Aborted" not in err, err
    last = err.strip().splitlines()[-1]
    saved = ckpt.load(tmp_path / "runs/stop/r0/last.pt")
    if sig == signal.SIGINT:
        m = re.fullmatch(r"interrupted at epoch (\d+) step (\d+) of round r0; rerun the same command to resume "
                         r"from the end of epoch (\d+)", last)
        assert m, err
        assert int(m.group(3)) == saved["epoch"] and int(m.group(1)) == saved["epoch"] + 1
        assert 0 <= int(m.group(2)) <= 3
    else:  # preempt.py's line: the step finished and last.pt holds it
        assert last.startswith("error: stopped by SIGTERM at epoch"), err
    # stdout is a pipe: plain lines, one per logged step and one per epoch, no bar drawing
    assert "r0 1/1000 32px step 1: loss" in out and re.search(r"r0 1/1000 32px: 96/96 in [\d.]+ s", out), out
    assert "\x1b[" not in out and "━" not in out


def test_a_signal_during_a_save_waits_for_the_save():
    from fastrefine.interrupt import deferred
    done, flags = [], []
    # the handlers a run has: Python's own for SIGINT (whatever an earlier test left), a flag for SIGTERM.
    # raise_signal delivers to this (the main) thread; os.kill may hand it to any thread of the process.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flags.append(signum))  # preempt.py's kind
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred():
                signal.raise_signal(signal.SIGINT)
                time.sleep(0.05)
                done.append("saved")   # reached: Ctrl-C waits for the block
        with deferred():
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.05)
            assert flags == []         # held during the block ...
        assert flags == [signal.SIGTERM]  # ... then handed to the handler that was there before
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    assert done == ["saved"]


def test_a_val_cut_short_is_marked_in_the_records_table_and_summary(tmp_path, demo_tree):
    from rich.console import Console as RichConsole

    from fastrefine.chain import run_recipe
    from fastrefine.recipe import load_recipe
    from fastrefine.report import summary_table
    rounds = '[[rounds]]\nname = "r0"\nepochs = 1\n[[rounds]]\nname = "r1"\nepochs = 1\n'
    p = write_recipe(tmp_path, demo_tree, name="cut", run={"max_steps_per_epoch": 2, "max_val_batches": 2},
                     rounds=rounds)
    rows = run_recipe(load_recipe(p))
    # demo_tree's val split: 200 images, 7 batches of 32; 2 evaluated
    assert [r["val_batches"] for r in rows] == ["2/7", "2/7"]
    run = tmp_path / "runs/cut"
    records = [json.loads(x) for x in (run / "r1/metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "refinery" and records[0]["val_batches"] == "2/7"
    assert [m["val_batches"] for m in records if m["kind"] == "epoch"] == ["2/7"]
    md = (run / "summary.md").read_text()
    assert f"| {100 * rows[0]['val_top1']:.2f}* |" in md
    assert "* r0 val 2/7, r1 val 2/7 batches: run.max_val_batches cut the val pass" in md
    screen = RichConsole(width=80, record=True)
    screen.print(summary_table(rows, title="cut"))
    text = screen.export_text()
    assert f"{100 * rows[0]['val_top1']:.2f}*" in text and "r0 val 2/7" in text
    # the whole val split: no mark
    rows = run_recipe(load_recipe(p, ["run.name=whole", "run.max_val_batches=7"]))
    assert [r["val_batches"] for r in rows] == [None, None]
    assert "*" not in (tmp_path / "runs/whole/summary.md").read_text()
