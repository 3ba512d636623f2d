"""The run folder at start (fastrefine/runfolder.py): one run at a time, a name that stays inside run.out,
a run.out that can be written, temporaries of killed writers removed. docs/survival.md lists each case."""

from __future__ import annotations

import pytest

from fastrefine.chain import run_recipe
from fastrefine.convert.lock import out_lock
from fastrefine.errors import UsageError
from fastrefine.recipe import load_recipe
from fastrefine.runfolder import lock_path
from helpers import write_recipe

ONE = '[[rounds]]\nname = "r0"\nepochs = 1\n'
QUICK = ["run.max_steps_per_epoch=2", "run.max_val_batches=1"]


def test_a_second_run_of_the_same_folder_is_refused_naming_the_holder(tmp_path, demo_tree):
    r = load_recipe(write_recipe(tmp_path, demo_tree, name="twice", rounds=ONE), QUICK)
    (tmp_path / "runs").mkdir()
    held = lock_path(tmp_path / "runs/twice")
    with out_lock(held.parent, name=held.name):        # what the first run holds while it trains
        with pytest.raises(UsageError, match=r"runs: run folder 'twice' is in use by another run \(PID \d+ on .*\); wait"):
            run_recipe(r)
    assert not (tmp_path / "runs/twice/r0").exists()   # nothing trained, nothing written
    run_recipe(r)                                       # the lock is released with its holder
    assert (tmp_path / "runs/twice/r0/done.json").is_file()


@pytest.mark.parametrize("name", ["", " ", "..", "../escape", "a/b", "."])
def test_run_name_must_be_one_folder_name(tmp_path, demo_tree, name):
    r = load_recipe(write_recipe(tmp_path, demo_tree, name="n", rounds=ONE), [f"run.name={name!r}"])
    with pytest.raises(UsageError, match=r"run.name = "):
        run_recipe(r)
    assert not (tmp_path / "escape").exists()


def test_an_unwritable_run_out_is_one_line_naming_it(tmp_path, demo_tree):
    (tmp_path / "afile").write_text("not a folder")
    r = load_recipe(write_recipe(tmp_path, demo_tree, name="w", rounds=ONE), [f"run.out='{tmp_path}/afile/runs'"])
    with pytest.raises(UsageError, match=r"run.out = '.*afile/runs': cannot create .*(Not a directory|File exists)"):
        run_recipe(r)


def test_stale_temporaries_in_the_run_folder_are_removed(tmp_path, demo_tree):
    r = load_recipe(write_recipe(tmp_path, demo_tree, name="tmp", rounds=ONE), QUICK)
    run_dir = tmp_path / "runs/tmp"
    run_dir.mkdir(parents=True)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [run_dir / f".recipe.toml.tmp-{dead}", run_dir / f".summary.md.tmp-{dead}"]
    for p in stale:
        p.write_text("half")
    run_recipe(r)
    assert not any(p.exists() for p in stale)


KILLED = '[[rounds]]\nname = "r0"\nepochs = 2\n'


@pytest.fixture()
def killed_after_epoch_1(tmp_path, demo_tree, monkeypatch):
    """A run killed in its second epoch: r0 has last.pt (epoch 1) and no done.json."""
    from helpers import Killed, die_after
    p = write_recipe(tmp_path, demo_tree, name="k", rounds=KILLED)
    with monkeypatch.context() as m:
        die_after(m, 400 // 32 + 2)
        with pytest.raises(Killed):
            run_recipe(load_recipe(p))
    return p


@pytest.mark.parametrize("change", ["optim.lr=0.05", "loader.batch_size=16", "run.seed=9",
                                    "refinery.loss='kl'", "rounds[0].epochs=3"])
def test_a_resume_with_a_changed_recipe_is_refused_naming_the_keys(killed_after_epoch_1, tmp_path, change):
    import json
    key = change.split("=")[0]
    record = (tmp_path / "runs/k/r0/recipe.toml").read_text()
    info = (tmp_path / "runs/k/r0/run.json").read_text()
    with pytest.raises(UsageError, match=rf"r0/recipe.toml: round 'r0' would resume with a changed recipe: "
                                         rf"{key.replace('[', '.').replace(']', '.')}.*--accept-changes"):
        run_recipe(load_recipe(killed_after_epoch_1, [change]))
    # nothing was rewritten: the record still says what the round started with
    assert (tmp_path / "runs/k/r0/recipe.toml").read_text() == record
    assert (tmp_path / "runs/k/r0/run.json").read_text() == info
    json.loads(info)


def test_accepted_recipe_changes_are_recorded_with_their_epoch(killed_after_epoch_1, tmp_path):
    import json
    run_recipe(load_recipe(killed_after_epoch_1, ["optim.lr=0.05", "run.progress=false", "loader.workers=0"]),
               accept_changes=True)
    info = json.loads((tmp_path / "runs/k/r0/run.json").read_text())
    # the round's own lr is resolved from [optim].lr at load, so it changed with it
    assert info["recipe_changes"] == [{"from_epoch": 2, "from_step": 0,
                                       "keys": {"optim.lr": [0.1, 0.05], "rounds[0].lr": [0.1, 0.05]}}]
    assert (tmp_path / "runs/k/r0/done.json").is_file()


def _fill_save(path):
    """A checkpoint larger than the space left (about 1 MB of float32 weights)."""
    import torch
    from fastrefine import checkpoint as ckpt
    ckpt.write(path, ckpt.weights_layout({"w": torch.zeros(250_000)}, ckpt.Meta.of("tiny_cnn", num_classes=1)))


def test_a_real_full_disk_during_a_checkpoint_save_says_so_and_keeps_the_old_file(tmp_path):
    """A 256 KiB tmpfs (mounted when this runs as root): torch.save's own error is
    RuntimeError("[enforce fail at inline_container.cc] ... unexpected pos"); the message is the full disk."""
    import subprocess
    import torch
    from fastrefine import checkpoint as ckpt
    from fastrefine.errors import RunError
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the next test covers the same error chain")
    try:
        old = small / "last.pt"
        ckpt.write(old, ckpt.weights_layout({"w": torch.ones(4)}, ckpt.Meta.of("tiny_cnn", num_classes=1)))
        with pytest.raises(RunError, match=r"last.pt: no space left on device while writing it"):
            _fill_save(old)
        assert torch.equal(ckpt.load(old)["model"]["w"], torch.ones(4))     # the old file kept
        assert [p.name for p in small.iterdir()] == ["last.pt"]            # no temporary left
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_full_disk_inside_torch_save_is_found_in_the_error_chain(tmp_path, monkeypatch):
    """The same case without a mount: every write past 100 KB fails with ENOSPC, as a full disk's would,
    and torch.save turns it into its RuntimeError."""
    import builtins
    import errno as errno_mod
    from fastrefine import atomic
    from fastrefine.errors import RunError
    real_open = builtins.open

    class Full:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100_000:
                raise OSError(errno_mod.ENOSPC, "No space left on device")
            return self.fh.write(b)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def small_disk_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return Full(fh) if ".tmp-" in str(path) and "w" in mode else fh
    monkeypatch.setattr(atomic, "open", small_disk_open, raising=False)
    with pytest.raises(RunError, match=r"last.pt: no space left on device") as caught:
        _fill_save(tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())
    import torch   # what torch.save itself raises on that write: not an OSError
    with pytest.raises(RuntimeError, match="inline_container"):
        with small_disk_open(tmp_path / ".raw.tmp-1", "wb") as fh:
            torch.save({"w": torch.zeros(250_000)}, fh)


def test_a_recipe_with_a_utf8_bom_is_read(tmp_path, demo_tree):
    p = write_recipe(tmp_path, demo_tree, name="bom", rounds=ONE)
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())   # what Notepad writes at the start
    assert load_recipe(p).run.name == "bom"


TWO = ONE + '\n[[rounds]]\nname = "r1"\nepochs = 1\n'


def _nothing_trained(tmp_path, name):
    return not list((tmp_path / "runs" / name).glob("*/last.pt"))


def test_a_later_rounds_bad_model_options_are_refused_before_anything_trains(tmp_path, demo_tree):
    from typer.testing import CliRunner
    from fastrefine.cli import app
    p = write_recipe(tmp_path, demo_tree, name="opts", rounds=TWO)
    bad = ["rounds[1].model_options={nope=1}"]
    with pytest.raises(UsageError, match=r"rounds\[1\] \(r1\): model 'tiny_cnn' has no option 'nope'"):
        run_recipe(load_recipe(p, bad))
    assert _nothing_trained(tmp_path, "opts")
    res = CliRunner().invoke(app, ["run", str(p), "--dry-run", "--set", bad[0]])
    assert res.exit_code == 2 and "has no option 'nope'" in res.output


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty"])
def test_a_later_rounds_torchvision_refinery_weights_are_checked_at_start(tmp_path, demo_tree, damage):
    import torch
    import torchvision
    from typer.testing import CliRunner
    from fastrefine.cli import app
    weights = tmp_path / "resnet18.pth"
    if damage != "missing":
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    rounds = TWO + 'refinery = "torchvision:resnet18"\n'
    p = write_recipe(tmp_path, demo_tree, name="tv", rounds=rounds, tables=f'[refinery]\nweights = "{weights}"\n')
    why = {"missing": "file not found", "truncated": "damaged", "empty": "empty file"}[damage]
    with pytest.raises(UsageError, match=rf"refinery.weights = .*{why}"):
        run_recipe(load_recipe(p))
    assert _nothing_trained(tmp_path, "tv")
    res = CliRunner().invoke(app, ["run", str(p), "--dry-run"])
    assert res.exit_code == 2 and why in res.output


def test_a_missing_val_split_is_found_before_the_first_epoch(tmp_path, demo_tree):
    data = tmp_path / "trainonly"
    data.mkdir()
    (data / "train").symlink_to(demo_tree / "train")
    p = write_recipe(tmp_path, data, name="noval", rounds=ONE)
    with pytest.raises(UsageError, match=r"val"):
        run_recipe(load_recipe(p))
    assert _nothing_trained(tmp_path, "noval")


@pytest.mark.slow
def test_a_truncated_val_beton_is_found_before_the_first_epoch(tmp_path, demo_tree):
    pytest.importorskip("ffcv")
    from helpers import convert_in_child
    data = tmp_path / "fast"
    convert_in_child(demo_tree, data, formats=("ffcv",), max_side=32, workers=1, progress=False)
    beton = data / "val.beton"
    with open(beton, "r+b") as f:
        f.truncate(beton.stat().st_size // 2)
    p = write_recipe(tmp_path, data, name="beton", rounds=ONE)
    with pytest.raises(UsageError, match=r"val.beton: \d+ bytes, but the conversion wrote \d+"):
        run_recipe(load_recipe(p, ["loader.backend='ffcv'"]))
    assert _nothing_trained(tmp_path, "beton")
