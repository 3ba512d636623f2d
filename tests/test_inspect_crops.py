"""`fastrefine inspect`: crop boxes, the checkpoint's own probabilities, the PNG, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from typer.testing import CliRunner

from fastrefine.cli import app
from fastrefine.inspect_crops import inspect_image, load_class_list
from fastrefine.recipe import load_recipe
from fastrefine.chain import run_recipe
from fastrefine.checkpoint import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_tree) -> Path:
    """A real (briefly trained) round-0 checkpoint in a real run folder."""
    root = tmp_path_factory.mktemp("inspect")
    recipe = root / "r.toml"
    recipe.write_text(f"""
[run]
device = "cpu"
name = "insp"
out = "{root}/runs"
progress = false
max_steps_per_epoch = 12
[data]
path = "{demo_tree}"
[loader]
backend = "torch"
workers = 0
batch_size = 32
resolution = 32
val_crop_ratio = 1.0
[model]
name = "tiny_cnn"
options = {{width = 8}}
[[rounds]]
name = "labels"
epochs = 1
""")
    run_recipe(load_recipe(recipe))
    return root / "runs/insp/labels/last.pt"


@pytest.fixture(scope="module")
def dress(demo_tree) -> Path:
    return sorted((demo_tree / "val/n90000003").iterdir())[0]


def _direct_probs(checkpoint: Path, image: Path, box, resolution: int) -> torch.Tensor:
    """An independent path: PIL crop + resize, normalise by hand, forward the loaded model."""
    model, _ = load_model(checkpoint, device=torch.device("cpu"))
    model.eval()
    left, top, w, h = box
    with Image.open(image) as im:
        crop = im.convert("RGB").crop((left, top, left + w, top + h))
    crop = crop.resize((resolution, resolution), Image.BILINEAR)
    x = TF.pil_to_tensor(crop).float().div(255)
    x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).unsqueeze(0)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0]


def test_probabilities_come_from_the_checkpoint(trained, dress, tmp_path):
    res = inspect_image(checkpoint=trained, image=dress, crops=3, out=tmp_path / "a.png", class_names=None,
                        seed=5, resolution=None)
    assert res["resolution"] == 32                       # from the round's resolved recipe
    assert res["ground_truth"] == "dress" and res["ground_truth_index"] == 3
    assert len(res["crops"]) == 3
    names = load_class_list(Path(load_recipe(trained.parent / "recipe.toml").data.path)).names
    for c in res["crops"]:
        left, top, w, h = c["box"]
        assert 0 <= left and 0 <= top and left + w <= 32 and top + h <= 32 and w * h >= 0.08 * 32 * 32 - 32
        direct = _direct_probs(trained, dress, c["box"], 32)
        idx = direct.topk(5).indices.tolist()
        assert c["top5_index"] == idx
        assert [n for n, _ in c["top5"]] == [names[i] for i in idx]
        # the same numbers up to PIL's vs torchvision's resize filter on a crop
        assert torch.allclose(torch.tensor([p for _, p in c["top5"]]), direct[idx], atol=0.03)
        assert c["gt_prob"] == pytest.approx(float(direct[3]), abs=0.03)
    probs = torch.tensor([p for _, p in res["crops"][0]["top5"]])
    assert (probs[:-1] >= probs[1:]).all() and probs.sum() <= 1 + 1e-5


def test_exact_match_on_a_full_image_box(trained, dress, tmp_path, monkeypatch):
    """A box covering the whole 32 px image needs no resize: the numbers must agree exactly."""
    import fastrefine.inspect_crops as insp
    monkeypatch.setattr(insp, "sample_boxes", lambda **kw: [(0, 0, 32, 32)] * kw["crops"])
    res = inspect_image(checkpoint=trained, image=dress, crops=1, out=tmp_path / "b.png", class_names=None,
                        seed=0, resolution=32)
    direct = _direct_probs(trained, dress, (0, 0, 32, 32), 32)
    got = torch.tensor([p for _, p in res["crops"][0]["top5"]])
    assert torch.allclose(got, direct[res["crops"][0]["top5_index"]], atol=1e-5)


def test_png_grows_with_crops_and_seed_fixes_boxes(trained, dress, tmp_path):
    one = inspect_image(checkpoint=trained, image=dress, crops=1, out=tmp_path / "1.png", class_names=None,
                        seed=1, resolution=32)
    six = inspect_image(checkpoint=trained, image=dress, crops=6, out=tmp_path / "6.png", class_names=None,
                        seed=1, resolution=32)
    again = inspect_image(checkpoint=trained, image=dress, crops=6, out=tmp_path / "6b.png", class_names=None,
                          seed=1, resolution=32)
    other = inspect_image(checkpoint=trained, image=dress, crops=6, out=tmp_path / "6c.png", class_names=None,
                          seed=2, resolution=32)
    with Image.open(tmp_path / "1.png") as a, Image.open(tmp_path / "6.png") as b:
        assert a.format == b.format == "PNG"
        assert b.height > 1.5 * a.height                  # one row per crop
    assert len(six["crops"]) == 6 and len(one["crops"]) == 1
    assert [c["box"] for c in six["crops"]] == [c["box"] for c in again["crops"]]
    assert [c["box"] for c in six["crops"]] != [c["box"] for c in other["crops"]]


def test_class_names_as_a_plain_list_and_unknown_folder(trained, tmp_path, dress):
    img = tmp_path / "loose.jpg"
    img.write_bytes(dress.read_bytes())
    names = [f"c{i}" for i in range(10)]
    res = inspect_image(checkpoint=trained, image=img, crops=2, out=tmp_path / "c.png", class_names=names,
                        seed=0, resolution=32)
    assert res["ground_truth"] is None and all(c["gt_prob"] is None for c in res["crops"])
    assert all(n.startswith("c") for c in res["crops"] for n, _ in c["top5"])
    from fastrefine.errors import UsageError
    with pytest.raises(UsageError, match="10 classes but 3 class names"):
        inspect_image(checkpoint=trained, image=img, crops=1, out=tmp_path / "d.png", class_names=names[:3],
                      seed=0, resolution=32)


def test_cli(trained, dress, tmp_path, demo_tree):
    out = tmp_path / "cli.png"
    res = runner.invoke(app, ["inspect", str(trained), str(dress), "--crops", "2", "--out", str(out),
                              "--data", str(demo_tree), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "ground truth: dress" in res.output and "crop 2" in res.output
    res = runner.invoke(app, ["inspect", str(trained), str(tmp_path / "missing.jpg")])
    assert res.exit_code == 2 and "image not found" in res.output
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    res = runner.invoke(app, ["inspect", str(trained), str(bad), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "not an image" in res.output


def test_out_is_a_png_or_a_folder_never_a_guess(trained, dress, tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    res = runner.invoke(app, ["inspect", str(trained), str(dress), "--crops", "1", "--out", str(folder)])
    assert res.exit_code == 0, res.output
    assert [p.name for p in folder.iterdir()] == [f"{dress.stem}-inspect.png"]  # written into the folder
    for bad, why in ((f"{tmp_path}/nowhere/", "not an existing folder"), (f"{tmp_path}/nowhere/x.png", "does not exist"),
                     (f"{tmp_path}/x.jpg", "nor a .png")):
        res = runner.invoke(app, ["inspect", str(trained), str(dress), "--out", bad])
        assert res.exit_code == 2 and why in res.output, res.output
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "x.jpg").exists()


# ------------------------------------------------------------------------------ size limits (issue 23)

def test_a_header_claiming_13000x13000_is_refused_in_one_line(trained, dress, tmp_path):
    data = bytearray(dress.read_bytes())
    sof = min(i for i in (data.find(b"\xff\xc0"), data.find(b"\xff\xc2")) if i >= 0)
    data[sof + 5:sof + 9] = (13000).to_bytes(2, "big") * 2            # height, width
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(bytes(data))
    res = runner.invoke(app, ["inspect", str(trained), str(huge), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2, res.output
    assert "13000x13000 = 169 MP, more than the 128 MP fastrefine decodes" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.png").exists()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    """A 6000x4500 JPEG (27 MP: 81 MB as RGB pixels) decodes DCT-scaled to at most 1120 px, and the peak
    memory of the decode (the process's VmHWM, in a child of its own) stays far below the full size."""
    import subprocess
    import sys
    big = tmp_path / "big.jpg"
    Image.radial_gradient("L").resize((6000, 4500)).convert("RGB").save(big, quality=90)
    code = f"""
from pathlib import Path
from fastrefine.bench.protocol import proc_status_kib
from fastrefine.inspect_crops import open_shown, shown_side
before = proc_status_kib("VmHWM")
img = open_shown(Path({str(big)!r}), resolution=224)
print(img.size[0], img.size[1], shown_side(224), (proc_status_kib("VmHWM") - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    width, height, side, grown_mib = map(int, done.stdout.split())
    assert (width, height) == (side, side * 3 // 4) == (1120, 840)
    assert grown_mib < 40, f"the decode grew the peak by {grown_mib} MiB (a full-size decode is >= 81)"
