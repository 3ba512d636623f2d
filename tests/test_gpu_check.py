"""The device check's own pieces, on the CPU: its summary (tools/gpu_summary.py), its peak-memory
wrapper (tools/cuda_peak.py), its fallback install (tools/link_checkout.py), the generated data it and the
gpu-marked tests use (fastrefine/synthetic.py) and the packaging it installs with (pyproject.toml).
The whole script is rehearsed in a bare venv as docs/benchmarks.md says (too slow for the suite)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_summary  # noqa: E402


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def test_summary_reads_each_part_by_name_with_status_files_beside_results(tmp_path):
    _write(tmp_path / "environment.json", {"gpus": ["NVIDIA H200"], "nvidia_smi": "NVIDIA H200, 570.1, 143771 MiB",
                                           "torch": "2.11.0", "cuda": "12.8", "cudnn": 91002, "python": "3.12.3",
                                           "torchvision": "0.26.0", "setuptools": "80.9.0", "install": "pip",
                                           "dali": "not installed: skipped", "ffcv": "not installed: skipped"})
    _write(tmp_path / "a-pytest-gpu.status.json", {"part": "a-pytest-gpu", "rc": 0, "seconds": 40, "note": ""})
    _write(tmp_path / "a-pytest-gpu.peak.json", {"max_memory_allocated_mib": 812.4})
    _write(tmp_path / "a-pytest-gpu.xml", '<testsuites><testsuite tests="9" failures="0" errors="0" skipped="3">'
           '<testcase name="x"><skipped message="needs DALI and FFCV"/></testcase></testsuite></testsuites>')
    step = {"settings": {"resolution": 160}, "results": [
        {"case": "resnet50 alone", "student": "resnet50", "refinery": None, "images_per_s": {"median": 9000.0},
         "peak_memory_mib": 20000, "first_call_s": 2.0},
        {"case": "resnet50 + resnet50", "student": "resnet50", "refinery": "resnet50",
         "images_per_s": {"median": 4200.0}, "peak_memory_mib": 26000, "first_call_s": 3.0}]}
    _write(tmp_path / "d-step-160-eager.status.json", {"part": "d-step-160-eager", "rc": 0, "seconds": 25})
    _write(tmp_path / "d-step-160-eager.json", step)
    loader = {"results": [
        {"backend": "torch[device]", "ok": True, "images_per_s": {"median": 9000.0}, "batch_shape": [128, 3, 224, 224],
         "startup_s": 1.5},
        {"backend": "torch[host]", "ok": True, "images_per_s": {"median": 3000.0}, "batch_shape": [128, 3, 224, 224],
         "startup_s": 2.5}]}
    _write(tmp_path / "e-loader.status.json", {"part": "e-loader", "rc": 0, "seconds": 30})
    _write(tmp_path / "e-loader.json", loader)
    _write(tmp_path / "b-tiny-chain.status.json", {"part": "b-tiny-chain", "skipped": "out of time (budget 480 s)"})
    text = gpu_summary.summarize(tmp_path)
    assert "NVIDIA H200" in text and "cuDNN 91002" in text and "nvidia-smi: NVIDIA H200, 570.1" in text
    assert "6 passed, 0 failed, 0 errors, 3 skipped" in text and "1 skipped: needs DALI and FFCV" in text
    assert "peak 812 MiB" in text
    assert "resnet50 + resnet50: 4,200 img/s" in text and "target >= 5,000: MISSED" in text
    assert "torch[device]: 9,000 img/s" in text and "device decode / host decode = 3.00" in text
    assert "b-tiny-chain" in text and "out of time" in text
    assert len(text.splitlines()) < 40  # one screen


def test_summary_survives_missing_and_broken_files(tmp_path):
    _write(tmp_path / "d-step-224-eager.status.json", {"part": "d-step-224-eager", "rc": 1, "seconds": 3})
    _write(tmp_path / "e-loader.status.json", {"part": "e-loader", "rc": 0, "seconds": 3})
    _write(tmp_path / "e-loader.json", "{torn")
    text = gpu_summary.summarize(tmp_path)
    assert "no d-step-224-eager.json" in text and "no e-loader.json" in text and "GPU: none" in text


def test_cuda_peak_runs_the_module_and_writes_why_there_is_no_figure(tmp_path):
    out = tmp_path / "peak.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools/cuda_peak.py"), str(out), "-m", "json.tool", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "json.tool" in done.stdout or "usage" in done.stdout.lower()
    assert json.loads(out.read_text()) == {"max_memory_allocated_mib": None, "why": "torch was not imported"}
    bad = tmp_path / "bad.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools/cuda_peak.py"), str(bad), "-m", "fastrefine", "nosuch"],
                          capture_output=True, text=True)
    assert done.returncode == 2                  # the module's exit status passes through
    assert json.loads(bad.read_text())["max_memory_allocated_mib"] is None


def test_link_checkout_makes_the_package_and_its_loaders_importable(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run([sys.executable, str(ROOT / "tools/link_checkout.py"), "--site", str(site)], check=True,
                   capture_output=True)
    assert (site / "fastrefine_checkout.pth").read_text().startswith("import ")
    code = ("import site, sys; site.addsitedir(sys.argv[1]); import fastrefine.loaders.torch as t, fastrefine;"
            "print(t.__file__); print(any(getattr(f, '__name__', '') == 'CheckoutFinder' for f in sys.meta_path))")
    done = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path,
                          check=True)
    path, hooked = done.stdout.split()
    assert Path(path) == ROOT / "loaders/torch.py" and hooked == "True"
    subprocess.run([sys.executable, str(ROOT / "tools/link_checkout.py"), "--site", str(site), "--remove"], check=True)
    assert not list(site.iterdir())


def test_pyproject_installs_with_setuptools_61():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # a PEP 639 license string needs setuptools >= 77; the table form works from 61 on
    assert meta["project"]["license"] == {"text": "MIT"}
    assert meta["build-system"]["requires"] == ["setuptools>=61"]


def test_synthetic_tree_is_reproducible_and_its_classes_differ(tmp_path):
    from fastrefine.synthetic import write_synthetic_tree
    counts = write_synthetic_tree(tmp_path / "a", classes=3, train_per_class=4, val_per_class=2, seed=1)
    write_synthetic_tree(tmp_path / "b", classes=3, train_per_class=4, val_per_class=2, seed=1)
    assert counts == {"train": 12, "val": 6}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 18 and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    sizes = {Image.open(tmp_path / "a" / f).size for f in files}
    assert len(sizes) > 1                                   # mixed sizes, as a batch of photos
    hue = [np.asarray(Image.open(next((tmp_path / "a/train" / f"class{c}").iterdir())), dtype=float).mean((0, 1))
           for c in range(3)]
    assert min(np.abs(hue[i] - hue[j]).max() for i in range(3) for j in range(i + 1, 3)) > 15  # colours differ
