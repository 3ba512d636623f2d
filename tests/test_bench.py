"""`fastrefine bench`: the protocol helper, the FLOPs bound, and each subcommand on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastrefine import bench
from fastrefine.bench import decode as bench_decode
from fastrefine.bench import step as bench_step
from fastrefine.cli import app
from fastrefine.errors import UsageError
from fastrefine.models import model_info

runner = CliRunner()
RECORD_KEYS = {"command", "created", "git", "hardware", "versions", "settings", "results", "summary", "notes"}


def _invoke(args: list[str]) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output


def _load(path: Path, command: str) -> dict:
    rec = json.loads(path.read_text())
    assert RECORD_KEYS <= set(rec), set(rec)
    assert rec["command"] == command
    assert rec["git"] and rec["hardware"]["cpus"] >= 1 and rec["versions"]["torch"]
    return rec


def _check_rate(rate: dict, *, repeats: int = 3) -> None:
    assert len(rate["repeats"]) == repeats
    assert 0 < rate["min"] <= rate["q1"] <= rate["median"] <= rate["q3"] <= rate["max"]


# ----------------------------------------------------------------------------------------- protocol

def test_measure_runs_warmup_then_blocks():
    calls = []
    seconds = bench.measure(lambda: calls.append(1), warmup=2, iters=4, repeats=3, sync=lambda: None)
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert len(calls) == 2 + 4 * 3


def test_measure_refuses_a_single_run():
    with pytest.raises(UsageError, match="at least 3"):
        bench.measure(lambda: None, warmup=0, iters=1, repeats=1, sync=lambda: None)


def test_spread_by_hand():
    s = bench.spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (3.0, 1.0, 5.0, 2.0, 4.0)
    assert s["repeats"] == [4.0, 1.0, 3.0, 2.0, 5.0]  # in the order they were measured
    r = bench.rates([2.0, 1.0, 4.0], items=8)
    assert (r["median"], r["min"], r["max"]) == (4.0, 2.0, 8.0)


# -------------------------------------------------------------------------------------- FLOPs bound

def _tiny_cnn_flops(*, res: int, classes: int, width: int = 16) -> int:
    """tiny_cnn by hand: 3x3 convs (2 FLOPs per multiply-add) with a 2x2 pool between blocks, + linear."""
    chans, total, side = [3, width, 2 * width, 4 * width, 8 * width], 0, res
    for i in range(4):
        if i:
            side //= 2
        total += 2 * chans[i] * chans[i + 1] * 9 * side * side
    return total + 2 * chans[-1] * classes


def test_flops_bound_known_pairs():
    same = bench_step.flops_bound(student="tiny_cnn", refinery="tiny_cnn", num_classes=10, resolution=32)
    assert same["student_flops"] == _tiny_cnn_flops(res=32, classes=10)
    assert same["bound"] == pytest.approx(1 + 1 / 3)
    big = bench_step.flops_bound(student="tiny_cnn", refinery="small_resnet", num_classes=10, resolution=32)
    fr = model_info("small_resnet", num_classes=10, resolution=32)["flops"]
    assert big["refinery_flops"] == fr
    assert big["bound"] == pytest.approx(1 + fr / (3 * _tiny_cnn_flops(res=32, classes=10)))
    assert big["bound"] > same["bound"]


# ------------------------------------------------------------------------------------- subcommands

def test_decode_writes_json(demo_tree, tmp_path):
    out = tmp_path / "decode.json"
    _invoke(["bench", "decode", str(demo_tree), "--images", "80", "--workers", "2", "--json", str(out)])
    rec = _load(out, "decode")
    assert [r["processes"] for r in rec["results"]] == [1, 2]
    for r in rec["results"]:
        assert r["images"] == 80
        _check_rate(r["images_per_s"])
    assert rec["settings"]["decoder"] == "cv2" and "libjpeg-turbo" in rec["settings"]["decoder_detail"]
    assert rec["summary"]["ceiling_images_per_s"] > 0
    # bits per pixel from the JPEG headers: the demo tree's 32x32 JPEGs, by hand
    blobs, _ = bench_decode.jpeg_blobs(demo_tree, split="train", limit=80, source="auto")
    assert rec["settings"]["bits_per_pixel"] == pytest.approx(8 * sum(map(len, blobs)) / (80 * 32 * 32))


def test_both_decoders_decode_real_pixels(demo_tree):
    blobs, where = bench_decode.jpeg_blobs(demo_tree, split="val", limit=3, source="folder")
    assert len(blobs) == 3 and "val" in where
    bgr = bench_decode.decode_one(blobs[0], decoder="cv2")
    rgb = bench_decode.decode_one(blobs[0], decoder="pil")
    turbo = bench_decode.decode_one(bench_decode.prepare_blobs(blobs, decoder="turbo")[0], decoder="turbo")
    assert bgr.shape == rgb.shape == turbo.shape == (32, 32, 3) and rgb.std() > 0  # a real photo, not flat
    assert abs(bgr[..., ::-1].astype(int) - rgb.astype(int)).max() <= 8  # same picture (IDCTs may differ a little)
    assert abs(turbo.astype(int) - rgb.astype(int)).max() <= 8  # RGB order, fast IDCT
    assert bench_decode.fastest_decoder() == "turbo"  # FFCV is installed by `make setup`


def test_loader_reports_working_and_failing_backends(demo_tree, tmp_path):
    out = tmp_path / "loader.json"
    _invoke(["bench", "loader", str(demo_tree), "--backend", "torch,ffcv", "--resolution", "32",
             "--batch-size", "16", "--batches", "2", "--warmup", "1", "--workers", "1",
             "--baseline-workers", "1", "--ceiling-images", "48", "--decode-resize", "--json", str(out)])
    rec = _load(out, "loader")
    by = {r["backend"]: r for r in rec["results"]}
    assert set(by) == {"torch", "ffcv", "torchvision-baseline"}
    torch_r = by["torch"]
    # device auto: the loop's input dtype there (fp32 on the CPU, the AMP dtype on a GPU host)
    from fastrefine.bench.protocol import pick_device
    from fastrefine.precision import resolve_precision
    expected = str(resolve_precision("auto", pick_device("auto")).input_dtype).replace("torch.", "")
    assert torch_r["ok"] and torch_r["dtype"] == expected and torch_r["normalize_on"] == "device"
    assert torch_r["batch_shape"] == [16, 3, 32, 32] and torch_r["channels_last"]
    _check_rate(torch_r["images_per_s"])
    # the demo tree was never converted: FFCV has no .beton to read, and says so instead of crashing
    reason = by["ffcv"]["error"].lower()
    assert by["ffcv"]["ok"] is False and ("beton" in reason or "convert" in reason), reason
    assert by["torchvision-baseline"]["ok"] and by["torchvision-baseline"]["normalize_on"] == "host"
    s = rec["summary"]
    assert s["best_backend"] == "torch" and "ffcv" in s["failed"]
    assert s["best_over_baseline"] == pytest.approx(s["best_images_per_s"] / s["baseline_images_per_s"])
    assert s["best_over_ceiling"] == pytest.approx(s["best_images_per_s"] / s["decode_ceiling_images_per_s"])
    assert s["decode_ceiling_decoder"] == "turbo"  # the FFCV loader's own decoder: the strictest ceiling
    bound = rec["decode_resize"]  # full decode + crop + resize alone, on the ceiling's 48 images
    assert bound["images"] == 48 and bound["resolution"] == 32 and bound["undecodable"] == 0
    _check_rate(bound["images_per_s"])
    assert s["best_over_decode_resize"] == pytest.approx(s["best_images_per_s"] / s["decode_resize_images_per_s"])
    assert s["decode_resize_over_ceiling"] == pytest.approx(
        s["decode_resize_images_per_s"] / s["decode_ceiling_images_per_s"])


def test_step_writes_json_with_bound_and_ratio(tmp_path):
    out = tmp_path / "step.json"
    _invoke(["bench", "step", "--model", "tiny_cnn", "--refinery", "same", "--resolution", "32",
             "--batch-size", "8", "--classes", "10", "--warmup", "1", "--iters", "2", "--json", str(out)])
    rec = _load(out, "step")
    alone, refined = rec["results"]
    assert alone["refinery"] is None and refined["refinery"] == "tiny_cnn"
    for r in (alone, refined):
        _check_rate(r["images_per_s"])
        assert r["peak_memory_mib"] > 0 and r["first_call_s"] > 0
    assert refined["bound"] == pytest.approx(4 / 3)
    assert refined["measured_ratio"] == pytest.approx(refined["step_s"]["median"] / alone["step_s"]["median"])
    from fastrefine.bench.protocol import pick_device
    from fastrefine.precision import resolve_precision
    assert rec["settings"]["precision"] == resolve_precision("auto", pick_device("auto")).name  # device auto
    assert "synthetic" in rec["notes"][0]


def test_train_writes_json(demo_tree, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[run]
device = "cpu"
name = "bench"
out = "{tmp_path / 'runs'}"
progress = false
[data]
path = "{demo_tree}"
[loader]
backend = "torch"
batch_size = 16
resolution = 32
workers = 1
[model]
name = "tiny_cnn"
[[rounds]]
name = "labels"
epochs = 1
[[rounds]]
name = "refined"
epochs = 1
""")
    out = tmp_path / "train.json"
    _invoke(["bench", "train", str(recipe), "--steps", "2", "--warmup", "1", "--set", "loader.batch_size=8",
             "--baseline", "--baseline-bf16", "--json", str(out)])
    rec = _load(out, "train")
    assert rec["settings"]["batch_size"] == 8 and rec["settings"]["round"] == "refined"
    # the round as `run` builds it: its refinery round has not run, so its architecture with random weights
    assert rec["settings"]["refinery"] == "labels (tiny_cnn, random weights)"
    cases = [r["case"] for r in rec["results"]]
    from fastrefine.precision import resolve_precision
    chosen = resolve_precision('auto', torch.device('cpu')).name
    extra = [] if chosen == "bf16" else ["torchvision baseline, channels_last + bf16"]   # --baseline-bf16
    assert cases == ["fastrefine end to end (engine.train_epoch)", "torchvision baseline, fp32",
                     f"torchvision baseline, channels_last + {chosen}", *extra,
                     "loader alone", "step alone (one real batch reused)"]
    for r in rec["results"][:3 + len(extra)]:
        assert [lp["images"] for lp in r["loops"]] == [16] * 3  # 2 steps of 8 images, 3 alternating repeats
    s = rec["summary"]
    e2e = rec["results"][0]["images_per_s"]["median"]
    assert s["over_baseline_fp32"] == pytest.approx(e2e / rec["results"][1]["images_per_s"]["median"])
    if extra:
        assert s["over_baseline_bf16"] == pytest.approx(e2e / rec["results"][3]["images_per_s"]["median"])
    assert s["end_to_end_over_step_alone"] == pytest.approx(e2e / s["step_alone_images_per_s"])
    assert rec["settings"]["torch_threads_in_epoch"] >= 1 and rec["settings"]["thread_plan"].startswith("CPU")


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("args, message", [
    (["bench", "step", "--model", "resnet_nope", "--resolution", "32"], "unknown model 'resnet_nope'"),
    (["bench", "step", "--model", "tiny_cnn", "--refinery", "nope", "--resolution", "32"], "unknown model 'nope'"),
    (["bench", "loader", "/nonexistent/data"], "/nonexistent/data does not exist"),
    (["bench", "decode", "/nonexistent/data"], "/nonexistent/data does not exist"),
    (["bench", "loader", "/tmp", "--backend", "torch,pillow"], "unknown ['pillow']"),
    (["bench", "train", "/nonexistent/recipe.toml"], "recipe file not found"),
    (["bench", "decode", "/tmp", "--workers", "100000"], "--workers 100000: expected 1 to"),
    (["bench", "loader", "/tmp", "--workers", "0"], "--workers 0: expected 1 to"),
    (["bench", "loader", "/tmp", "--resolution", "100000"], "--resolution 100000: expected 8 to 4096"),
    (["bench", "loader", "/tmp", "--resolution", "4096"], "one fp32 batch is 48.0 GiB, more than the 8 GiB"),
    (["bench", "step", "--model", "tiny_cnn", "--resolution", "100000"], "--resolution 100000: expected 8 to 4096"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_repeats_below_three_is_refused():
    res = runner.invoke(app, ["bench", "step", "--model", "tiny_cnn", "--repeats", "1"])
    assert res.exit_code == 2


@pytest.mark.parametrize("decoder", ["cv2", "pil"])
def test_decode_counts_images_it_cannot_decode(demo_tree, decoder):
    blobs, _ = bench_decode.jpeg_blobs(demo_tree, split="val", limit=6, source="folder")
    damaged = blobs[:4] + [blobs[4][:40], b"not a jpeg at all"]  # a truncated header, and no JPEG
    kept, failed = bench_decode.decodable(damaged, decoder=decoder)
    assert len(kept) == 4 and failed == 2
    res = bench_decode.bench_decode(blobs=damaged, decoder=decoder, workers=1, warmup=0, repeats=3)
    assert res[0]["images"] == 4 and res[0]["undecodable"] == 2


def test_loader_exits_1_when_every_case_fails(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)  # an ImageFolder tree with no image at all
    res = runner.invoke(app, ["bench", "loader", str(tmp_path), "--backend", "torch", "--no-baseline",
                              "--no-ceiling", "--batches", "1", "--warmup", "0"])
    assert res.exit_code == 1 and "every case failed" in res.output


def test_loader_times_torch_decode_modes_side_by_side(demo_tree, tmp_path):
    out = tmp_path / "loader.json"
    _invoke(["bench", "loader", str(demo_tree), "--backend", "torch", "--torch-decodes", "host,device",
             "--resolution", "32", "--batch-size", "16", "--batches", "2", "--warmup", "1", "--workers", "1",
             "--no-baseline", "--no-ceiling", "--json", str(out)])
    rec = _load(out, "loader")
    assert [(r["backend"], r["decoder"]) for r in rec["results"]] == [("torch[host]", "host"), ("torch[device]", "device")]
    assert all(r["ok"] for r in rec["results"])
