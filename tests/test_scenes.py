"""The scene benchmark (tools/make_scenes.py), the refinery's whole-image view (refinery.view = "image",
torch loader) and the chain figure every run writes (runs/NAME/chain.png, chain.md). CPU only.

Data: real Fashion-MNIST photos (the `demo_tree` fixture, 32 px) composed into a few 48 px scenes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fastrefine.engine import train_step
from fastrefine.loaders import build
from fastrefine.loaders.base import Views
from fastrefine.recipe import RecipeError, load_recipe

from helpers import convert_in_child, write_recipe

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def make_scenes_module():
    spec = importlib.util.spec_from_file_location("make_scenes", ROOT / "tools" / "make_scenes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_scenes"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scenes(demo_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "scenes-k2"
    rc = make_scenes_module().main([str(demo_tree), str(out), "--objects", "2", "--size", "48",
                                    "--train", "24", "--val", "12", "--seed", "1"])
    assert rc == 0
    return out


def box_area(b) -> int:
    return (b[2] - b[0]) * (b[3] - b[1])


def test_scenes_tree_manifest_and_labels(scenes, demo_tree):
    m = json.loads((scenes / "scenes.json").read_text())
    classes = sorted(p.name for p in (demo_tree / "train").iterdir() if p.is_dir())
    assert m["classes"] == classes and m["objects"] == 2
    assert (scenes / "classes.txt").read_text().split() == classes
    for split, n in (("train", 24), ("val", 12)):
        recs = m["splits"][split]
        assert len(recs) == n and len(list((scenes / split).rglob("*.JPEG"))) == n
        for r in recs:
            objs = r["objects"]
            assert len(objs) == 2 and objs[0]["class"] != objs[1]["class"]
            for o in objs:
                x0, y0, x1, y1 = o["box"]
                assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
                assert f"/{split}/" in o["source"]          # val scenes from val photos only
            largest = max(objs, key=lambda o: box_area(o["box"]))
            assert r["label"] == largest["class"]
            assert r["file"] == f"{split}/{classes[r['label']]}/{Path(r['file']).name}"
            assert (scenes / r["file"]).is_file()


def test_scenes_are_reproducible_and_holdout_uses_train_photos_only(demo_tree, tmp_path):
    mod = make_scenes_module()
    args = ["--objects", "3", "--size", "40", "--train", "6", "--val", "4", "--holdout", "0.25"]
    assert mod.main([str(demo_tree), str(tmp_path / "a"), *args]) == 0
    assert mod.main([str(demo_tree), str(tmp_path / "b"), *args]) == 0
    a = json.loads((tmp_path / "a" / "scenes.json").read_text())
    b = json.loads((tmp_path / "b" / "scenes.json").read_text())
    assert a["splits"] == b["splits"]
    train_src = {o["source"] for r in a["splits"]["train"] for o in r["objects"]}
    val_src = {o["source"] for r in a["splits"]["val"] for o in r["objects"]}
    assert all("/train/" in s for s in train_src | val_src) and not train_src & val_src
    f = a["splits"]["val"][0]["file"]
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_bad_arguments_are_one_line_errors(demo_tree, tmp_path, capsys):
    mod = make_scenes_module()
    assert mod.main([str(demo_tree), str(tmp_path / "x"), "--objects", "11"]) == 2
    assert mod.main([str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--objects 11" in err[0] and "missing" in err[1]


def test_convert_folder_takes_the_scenes(scenes, tmp_path):
    convert_in_child(scenes, tmp_path / "conv", formats=("dali",), max_side=48, quality=90, workers=1,
                     shard_size=16, progress=False)
    manifest = json.loads((tmp_path / "conv" / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert '"train"' in text and '"val"' in text
    ld = build(data=tmp_path / "conv", backend="torch", split="val", batch_size=12, resolution=24, device=CPU,
               workers=0)
    assert sum(y.numel() for _, y in ld) == 12


# ------------------------------------------------------------------------- refinery.view = "image"

def torch_loader(data, **kw):
    decode = kw.pop("decode", "host")
    opts = dict(split="train", batch_size=8, resolution=24, device=CPU, workers=0, seed=3, val_crop_ratio=1.0)
    return build(data=data, backend="torch", backend_options={"torch": {"decode": decode}}, **{**opts, **kw})


def test_image_view_hands_out_the_crop_and_the_whole_image(scenes):
    crop_only = torch_loader(scenes)
    views = torch_loader(scenes, refinery_view="image")
    # the whole image, in the sample order of an unshuffled epoch without flips: the val transform at
    # val_crop_ratio 1 on these square scenes is the same resize
    plain = torch_loader(scenes, refinery_view="image", shuffle=False, flip=False)
    whole = torch_loader(scenes, split="train", shuffle=False, drop_last=False, flip=False)
    for ld in (crop_only, views):
        ld.set_epoch(1)
    n = 0
    for (x, y), (v, vy) in zip(crop_only, views):
        assert isinstance(v, Views) and torch.equal(vy, y)
        assert torch.equal(v.crop, x)                      # the student's crops are unchanged
        assert v.image.shape == x.shape and not torch.equal(v.image, x)
        n += 1
    assert n == 3
    # with neither shuffle nor flip: the crops differ from the whole image, the whole image is the resize
    from torchvision.transforms.functional import resize
    from PIL import Image
    import numpy as np
    (v, y), = [next(iter(plain))]
    table = plain.table
    for k in range(4):
        with Image.open(table.files[k]) as im:
            ref = torch.from_numpy(np.array(resize(im.convert("RGB"), [24, 24], antialias=True))).permute(2, 0, 1)
        mean, std = torch.tensor(plain.normalization.mean), torch.tensor(plain.normalization.std)
        expect = (ref.float() / 255 - mean[:, None, None]) / std[:, None, None]
        assert torch.allclose(v.image[k].float(), expect, atol=1e-5)
    assert whole is not None


def test_image_view_device_decode_matches_the_host_path(scenes):
    host = torch_loader(scenes, refinery_view="image", decode="host")
    dev = torch_loader(scenes, refinery_view="image", decode="device")
    """Same boxes and flips, two resamplers (see test_loader_torch). Measured in normalised units: crops
    0.016 mean, 0.039 worst image; whole images (48 -> 24 px, a 2x shrink, where PIL's antialiasing
    triangle and roi_align's averaged samples differ most) 0.046 and 0.056; two different images ~0.9."""
    (h, hy), (d, dy) = next(iter(host)), next(iter(dev))
    assert torch.equal(hy, dy)
    for (a, b), tol in (((h.crop, d.crop), 0.03), ((h.image, d.image), 0.08)):
        diff = (a.float() - b.float()).abs()
        assert float(diff.mean()) < tol and float(diff.mean((1, 2, 3)).max()) < 0.12
    assert d.image.is_contiguous(memory_format=torch.channels_last)


def test_the_step_gives_the_refinery_the_whole_image_and_the_student_the_crop():
    seen = {}
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))

    def refinery(x):
        seen["refinery"] = x
        return torch.full((x.shape[0], 3), 1 / 3)

    def student_fn(x):
        seen["student"] = x
        return student(x)

    crop, image = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    import contextlib
    from fastrefine.refinery import make_loss, no_jitter
    kw = dict(student=student_fn, refinery=refinery, loss_fn=make_loss(refined=True), jitter=no_jitter,
              optimizer=opt, scaler=torch.amp.GradScaler("cpu", enabled=False), autocast=contextlib.nullcontext,
              clip=lambda m: None)
    train_step(Views(crop, image), torch.tensor([0, 1]), **kw)
    assert seen["student"] is crop and seen["refinery"] is image
    train_step(crop, torch.tensor([0, 1]), **kw)
    assert seen["student"] is crop and seen["refinery"] is crop


def test_image_view_recipe_errors_name_the_key(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    base = write_recipe(tmp_path, data, name="v", rounds='[[rounds]]\nname = "a"\nepochs = 1\n',
                        tables='[refinery]\nview = "image"\n')
    assert load_recipe(base).refinery.view == "image"
    with pytest.raises(RecipeError, match=r"refinery\.view: 'image' needs loader\.backend = 'torch'"):
        load_recipe(base, ["loader.backend=ffcv"])
    with pytest.raises(RecipeError, match=r"refinery\.view: 'image' does not combine"):
        load_recipe(base, ["refinery.adversarial.fraction=0.5"])
    with pytest.raises(RecipeError, match=r"refinery\.view: expected one of 'crop', 'image'"):
        load_recipe(base, ["refinery.view=whole"])


def test_run_with_image_view_writes_the_chain_figure(scenes, tmp_path):
    from fastrefine.chain import run_recipe
    rounds = """
[[rounds]]
name = "labels"
epochs = 2
refinery = "none"
[[rounds]]
name = "refined"
epochs = 1
refinery = "labels"
seed_from = "labels"
"""
    p = write_recipe(tmp_path, scenes, name="chain", rounds=rounds, run={"max_steps_per_epoch": 2},
                     tables='[refinery]\nview = "image"\n')
    rows = run_recipe(load_recipe(p, ["loader.batch_size=8"]))
    assert [r["round"] for r in rows] == ["labels", "refined"]
    run = tmp_path / "runs" / "chain"
    md = (run / "chain.md").read_text()
    assert "| labels | none |" in md and "| refined | labels |" in md and "| labels |" in md.split("| refined |")[1]
    assert (run / "chain.png").stat().st_size > 1000 and (run / "refined" / "curves.png").is_file()
    assert rows[1]["refinery_val_top1"] == pytest.approx(rows[0]["val_top1"])


def test_crop_measurements_of_the_study(scenes, tmp_path):
    """Whole-image crops (scale [1, 1]) hold every object: none misses the label; random small crops do."""
    sys.path.insert(0, str(ROOT / "tools"))
    import scenes_study
    a = scenes_study.parse(["--recipe", str(ROOT / "recipes" / "scenes.toml"), "--data-root", str(scenes.parent),
                            "--out", str(tmp_path)])
    whole = scenes_study.measure_crops(a, 2, limit=24, scale=(1.0, 1.0))
    assert whole["crops"] == 24 and whole["below_half_of_labelled"] == 0 and whole["no_object"] == 0
    assert whole["label_is_dominant"] == 1 and "refinery_names_dominant" not in whole   # no labels round here
    small = scenes_study.measure_crops(a, 2, limit=24, scale=(0.05, 0.1))
    assert small["below_half_of_labelled"] > 0.3 and small["label_is_dominant"] < 1


def test_study_names_regimes_and_tables_paired_gains_per_scale(tmp_path):
    """Run names carry the regime (so regimes never share a folder); the crop-scale table pairs each seed's
    refined round with its own labels round."""
    sys.path.insert(0, str(ROOT / "tools"))
    import scenes_study
    a = scenes_study.parse(["--out", str(tmp_path), "--objects", "2", "--seeds", "0", "1",
                            "--extra-scales", "0.25,1"])
    assert scenes_study.run_name(a, 2, 0) == "scenes-k2-s0"
    assert scenes_study.run_name(a, 2, 1, scale=(0.25, 1.0)) == "scenes-k2-sc0.25-1-s1"
    b = scenes_study.parse(["--epochs", "24", "--width", "32"])
    assert scenes_study.run_name(b, 4, 2, "-image") == "scenes-k4-e24-w32-s2-image"
    vals = {((0.08, 1.0), 0): (0.50, 0.52), ((0.08, 1.0), 1): (0.40, 0.41),
            ((0.25, 1.0), 0): (0.60, 0.55), ((0.25, 1.0), 1): (0.70, 0.66)}
    for (sc, seed), (lab, ref) in vals.items():
        for rnd, v in (("labels", lab), ("refined", ref)):
            d = tmp_path / scenes_study.run_name(a, 2, seed, scale=sc) / rnd
            d.mkdir(parents=True)
            (d / "done.json").write_text(json.dumps({"val_top1": v, "train_top1": v - 0.1}))
    lines = scenes_study.scale_table(a, scenes_study.collect_scales(a), {})
    rows = [x for x in lines if x.startswith("| [")]
    assert rows[0].startswith("| [0.08, 1] |") and "+2.00, +1.00" in rows[0] and "| 1.50 ± 0.71 |" in rows[0]
    assert rows[1].startswith("| [0.25, 1] |") and "-5.00, -4.00" in rows[1] and "| -4.50 ± 0.71 |" in rows[1]
    with pytest.raises(SystemExit):
        scenes_study.parse(["--extra-scales", "0.5"])


def test_study_budget_table_pairs_each_budget_with_its_own_labels_round(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import scenes_study
    a = scenes_study.parse(["--out", str(tmp_path), "--objects", "2", "--seeds", "0", "1", "--budgets", "8", "24:32"])
    assert a.budgets == [(8, None), (24, 32)]
    vals = {(8, None): ((0.50, 0.49), (0.52, 0.50)), (24, 32): ((0.60, 0.62), (0.58, 0.61))}
    for (epochs, width), per_seed in vals.items():
        b = scenes_study.parse(["--out", str(tmp_path), "--epochs", str(epochs)] + (["--width", str(width)] if width else []))
        for seed, (lab, ref) in enumerate(per_seed):
            for rnd, v in (("labels", lab), ("refined", ref)):
                d = tmp_path / scenes_study.run_name(b, 2, seed) / rnd
                d.mkdir(parents=True)
                (d / "done.json").write_text(json.dumps({"val_top1": v, "train_top1": v - 0.1, "minutes": 1.0}))
    rows = [x for x in scenes_study.budget_table(a, a.budgets) if x.startswith("| 8 ") or x.startswith("| 24 ")]
    assert "| -1.00, -2.00 |" in rows[0] and "| -1.50 ± 0.71 |" in rows[0]
    assert rows[1].startswith("| 24 | 32 | 2 |") and "| +2.00, +3.00 |" in rows[1]
    assert (a.epochs, a.width) == (8, None)     # the report leaves the settings as they were
