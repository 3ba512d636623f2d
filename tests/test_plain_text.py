"""Names from recipes, folders and files print as they are wherever rich renders them: the summary
table's title and cells, progress descriptions and notes, `inspect`'s labels (docs/survival.md)."""

from __future__ import annotations

import io

from rich.console import Console
from typer.testing import CliRunner

from fastrefine.progress import progress_bar
from fastrefine.report import summary_table

NAMES = ["exp[/]b", "exp[v2]", "crane [/], bird", "[bold]x"]


def rendered(renderable) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_summary_table_title_and_cells_print_as_they_are():
    for name in NAMES:
        rows = [{"round": name, "model": "tiny_cnn", "refinery": name, "epochs": 1, "val_top1": 0.5, "minutes": 0.1}]
        text = rendered(summary_table(rows, title=f"{name}: runs/{name}"))
        assert f"{name}: runs/{name}" in text
        assert text.count(name) >= 3


def test_progress_descriptions_and_notes_print_as_they_are():
    for name in NAMES:
        out = io.StringIO()
        console = Console(file=out, width=200, color_system=None, force_terminal=True)
        with progress_bar(console=console) as bar:
            task = bar.add_task(f"{name} 1/2 32px", total=4, info=f"note {name}")
            bar.advance(task, 2)
            bar.refresh()
        assert f"{name} 1/2 32px" in out.getvalue() and f"note {name}" in out.getvalue()


def test_inspect_labels_print_as_they_are(tmp_path, monkeypatch):
    import fastrefine.inspect_crops as inspect_crops
    from fastrefine.cli import app
    name = "crane [/], bird"

    def fake(**kwargs):
        return {"ground_truth": name, "resolution": 32, "out": str(tmp_path / "exp[v2].png"),
                "crops": [{"box": (0, 0, 8, 8), "top5": [(name, 0.9), ("exp[v2]", 0.1)]}]}
    monkeypatch.setattr(inspect_crops, "inspect_image", fake)
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "c.pt"), str(tmp_path / "i.jpg")])
    assert res.exit_code == 0, res.output
    assert f"ground truth: {name} (32px crops)" in res.output
    assert f"{name} 0.90, exp[v2] 0.10" in res.output
    assert "exp[v2].png" in res.output


class _Bad:
    """A dataset whose item 3 fails as a loader fails on a bad file."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 3:
            from fastrefine.errors import RunError
            raise RunError("/data/fast/dali/train-000002.tar: image 3 (n01440764/x.JPEG) cannot be decoded "
                           "(broken data stream)")
        return i


def test_a_dataloader_worker_error_prints_its_own_message_with_the_file(capsys):
    import pytest
    import torch.utils.data as tud
    from fastrefine.cli import print_error
    from fastrefine.errors import RunError
    with pytest.raises(RunError) as caught:
        list(tud.DataLoader(_Bad(), batch_size=2, num_workers=1))
    assert str(caught.value).startswith("Caught RunError in DataLoader worker process 0")  # what torch raises
    print_error(str(caught.value))
    err = capsys.readouterr().err
    assert err == ("error: /data/fast/dali/train-000002.tar: image 3 (n01440764/x.JPEG) cannot be decoded "
                   "(broken data stream) (in DataLoader worker process 0)\n")
