#!/usr/bin/env bash
# The one device check: what only a CUDA GPU can show, in at most ~8 minutes of wall clock.
#
#   bash tools/gpu_check.sh [OUT]        (from the repository root; OUT defaults to $OUT or gpu-check/)
#
# Runs on a bare GPU machine that has Python with torch, torchvision, numba, opencv, typer, rich,
# matplotlib and pytest but no DALI and no FFCV: it installs this checkout with
# `pip install --no-deps --no-build-isolation -e .` and reports DALI/FFCV as "not installed: skipped".
# Each part writes its own JSON into OUT as it finishes, so a failure keeps the parts before it:
#   a-pytest-gpu.json     pytest -m gpu (CUDA chain under sync debug mode "error", CUDA resume, GPU loader tests)
#   b-tiny-chain.json     a 2-round tiny recipe on CUDA, torch loader with GPU (nvJPEG) decode
#   c-kill-resume.json    kill -9 in the middle of a CUDA round, then the resume
#   d-step-*.json         bench step: ResNet-50 + ResNet-50 refinery at 160 and 224 px, bf16, channels-last,
#                         eager and compiled (target: >= 5,000 img/s at 160 px on one H100/H200)
#   e-loader-*.json       bench loader --backend torch on ImageNet-like JPEGs: GPU decode vs host decode
# and ends with a one-screen summary (summary.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT"
PY=${PY:-python3}
START=$(date +%s)
left() { echo $(( 480 - ($(date +%s) - START) )); }
part() {  # part NAME TIMEOUT CMD...: run, record rc and seconds in OUT/NAME.status.json
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  if [ "$(left)" -lt 20 ]; then echo "{\"part\": \"$name\", \"skipped\": \"out of time\"}" > "$OUT/$name.status.json"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" > "$OUT/$name.status.json"
  tail -3 "$OUT/$name.log"
}

"$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { echo "install failed"; cat "$OUT/install.log"; exit 1; }
"$PY" - > "$OUT/environment.json" <<'PY'
import importlib.util, json, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "dali": "installed" if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali") else "not installed: skipped",
                  "ffcv": "installed" if importlib.util.find_spec("ffcv") else "not installed: skipped"}, indent=1))
PY
cat "$OUT/environment.json"

# (a) the gpu-marked tests; DALI/FFCV tests skip themselves when the library is missing
part a-pytest-gpu 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests -rs --junitxml="$OUT/a-pytest-gpu.xml"

# data for (b), (c), (e): a small ImageNet-like tree (real Fashion-MNIST mosaics, 500x375 JPEGs) if the
# Debian dataset is there, else a tree of the repository's own doc PNGs re-encoded (real pictures either way)
DATA="$OUT/data"
"$PY" - "$DATA" > "$OUT/data.log" 2>&1 <<'PY'
import sys
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1])
try:
    from fastrefine.fashion_mnist import export_imagenet_like
    export_imagenet_like(root, images=1000)
except Exception as e:  # no Fashion-MNIST here: crops of the repository's own figures, 10 classes
    print("fashion-mnist unavailable:", e)
    pngs = sorted(Path("docs").glob("*.png"))
    for split, n in (("train", 60), ("val", 10)):
        for c in range(10):
            d = root / split / f"class{c}"; d.mkdir(parents=True, exist_ok=True)
            im = Image.open(pngs[c % len(pngs)]).convert("RGB")
            for i in range(n):
                w, h = im.size
                box = ((i * 7) % max(1, w - 300), (i * 5) % max(1, h - 200))
                im.crop((box[0], box[1], box[0] + min(w, 500), box[1] + min(h, 375))).save(d / f"{i:04d}.jpg", quality=90)
print("data ready")
PY

cat > "$OUT/tiny.toml" <<EOF
[run]
name = "tiny"
out = "$OUT/runs"
device = "cuda"
progress = false
log_every = 10
[data]
path = "$DATA"
[loader]
backend = "torch"
batch_size = 64
resolution = 96
[loader.torch]
decode = "device"
[model]
name = "resnet18"
[[rounds]]
name = "labels"
epochs = 2
[[rounds]]
name = "refined"
epochs = 2
EOF

# (b) a 2-round recipe on CUDA with the GPU decode path
part b-tiny-chain 120 "$PY" -m fastrefine run "$OUT/tiny.toml"
"$PY" - "$OUT" > "$OUT/b-tiny-chain.json" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(p.read_text()) for p in sorted((out / "runs/tiny").glob("*/done.json"))]
runs = [json.loads(p.read_text()) for p in sorted((out / "runs/tiny").glob("*/run.json"))]
print(json.dumps({"rounds": rows, "run": runs}, indent=1))
PY

# (c) kill -9 in the middle of a CUDA round, then resume
sed -e 's/name = "tiny"/name = "killed"/' -e 's/epochs = 2/epochs = 3/' "$OUT/tiny.toml" > "$OUT/killed.toml"
kill_resume() {
  "$PY" -m fastrefine run "$OUT/killed.toml" & local pid=$!
  for _ in $(seq 1 120); do [ -f "$OUT/runs/killed/labels/last.pt" ] && break; sleep 1; done
  sleep 2; kill -9 "$pid"; wait "$pid"
  "$PY" -m fastrefine run "$OUT/killed.toml"
}
part c-kill-resume 150 bash -c "$(declare -f kill_resume); OUT=$OUT PY=$PY kill_resume"
"$PY" - "$OUT" > "$OUT/c-kill-resume.json" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]) / "runs/killed"
print(json.dumps({r.name: {"done": (r / "done.json").is_file(),
                           "resumed_after_epoch": json.loads((r / "run.json").read_text()).get("resumed_after_epoch")}
                  for r in sorted(out.iterdir()) if r.is_dir()}, indent=1))
PY

# (d) the step alone: ResNet-50 student + ResNet-50 refinery, bf16, channels-last, eager and compiled
for res in 160 224; do
  part "d-step-$res-eager" 60 "$PY" -m fastrefine bench step --model resnet50 --refinery none,same \
      --resolution "$res" --batch-size 256 --precision bf16 --iters 10 --repeats 3 --json "$OUT/d-step-$res-eager.json"
done
part d-step-160-compiled 150 "$PY" -m fastrefine bench step --model resnet50 --refinery none,same \
    --resolution 160 --batch-size 256 --precision bf16 --compile --iters 10 --repeats 3 --json "$OUT/d-step-160-compiled.json"

# (e) the torch loader alone: GPU (nvJPEG) decode vs host decode, same JPEGs, taking turns
part e-loader 90 "$PY" -m fastrefine bench loader "$DATA" --backend torch --torch-decodes device,host \
    --resolution 224 --batch-size 128 --batches 10 --warmup 2 --rounds 2 --no-ceiling --no-baseline \
    --json "$OUT/e-loader.json"

"$PY" - "$OUT" | tee "$OUT/summary.txt" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
env = json.loads((out / "environment.json").read_text())
print(f"GPU {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}); DALI: {env['dali']}; FFCV: {env['ffcv']}")
for st in sorted(out.glob("*.status.json")):
    s = json.loads(st.read_text())
    print(f"  {s['part']:22s} " + (f"rc {s['rc']} in {s['seconds']} s" if "rc" in s else s.get("skipped", "")))
for p in sorted(out.glob("d-step-*.json")):
    rec = json.loads(p.read_text())
    for r in rec["results"]:
        print(f"  {p.stem}: {r['case']:28s} {r['images_per_s']['median']:8.0f} img/s")
for p in sorted(out.glob("e-loader*.json")):
    rec = json.loads(p.read_text())
    for r in rec["results"]:
        if r.get("ok"):
            print(f"  {p.stem}: {r['backend']:22s} {r['images_per_s']['median']:8.0f} img/s")
PY
