#!/usr/bin/env bash
# GPU check for the DALI and FFCV loaders (cannot run on the CPU-only dev machine).
# Runs the @pytest.mark.gpu loader tests, then a mixed-decode (nvJPEG) smoke check with timings.
#   bash tools/gpu_check.sh            (from the repository root; ~2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_loaders.py -m gpu -rA
timeout 300 "$PY" - <<'PY'
import tempfile, time
from pathlib import Path
import torch
import importlib.util
spec = importlib.util.spec_from_file_location("bench", "tools/bench_loaders.py")
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
from fastrefine.bench import time_batches
from fastrefine.convert import convert_dataset
from fastrefine.loaders import build
work = Path(tempfile.mkdtemp(prefix="gpucheck-"))
bench.make_tree(work / "src", images=1000)
convert_dataset(src=work / "src", out=work / "conv", layout="folder", max_side=256, progress=False)
dev = torch.device("cuda")
for backend in ("dali", "ffcv"):
    for split in ("train", "val"):
        ld = build(data=work / "conv", backend=backend, split=split, batch_size=64, resolution=224,
                   device=dev, dtype=torch.float16, workers=8)
        x, y = next(iter(ld))
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float16, (backend, split, x.device, x.dtype)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.shape[1:] == (3, 224, 224)
        assert abs(float(x.float().mean())) < 3 and 0.2 < float(x.float().std()) < 3
        rate = (time_batches(lambda: ld, batches=20, warmup=3, repeats=3, device=dev)["images_per_s"]["median"]
                if split == "train" else float("nan"))
        print(f"{backend:5s} {split:5s} ok  {tuple(x.shape)} {x.dtype} normalize_on={ld.normalize_on} "
              f"train images/s={rate:.0f}")
print("gpu_check: OK")
PY
