#!/usr/bin/env bash
# GPU benchmark in one go (about 5-8 minutes on one A100/H100/H200), written as ONE JSON file.
#
#   tools/gpu_bench.sh [OUT.json] [CONVERTED_DATA [ORIGINAL_JPEG_FOLDER]]
#
# What it runs (all with `fastrefine bench`, protocol: warm-up, >= 3 timed repeats, median and spread):
#   1. step: ResNet-50 student alone vs ResNet-50 student + ResNet-50 refinery, AMP bf16, channels-last,
#      at 160 px and 224 px, eager and torch.compile'd (compile time reported apart as first_call_s).
#   2. loader (only when CONVERTED_DATA is given): dali, ffcv (where installed), torch alone at 160 and 224 px, batch 256,
#      beside the torchvision ImageFolder baseline on ORIGINAL_JPEG_FOLDER (default: the manifest's source).
#   3. decode: the JPEG decode ceiling of the same data (all cores).
# The published anchors to compare with: FFCV ~3,500 img/s per A100 for ResNet-50 at 160 px (their
# rn50 configs, end to end); NVIDIA DALI ResNet-50 AMP training 2,470 img/s per A100.
#
# Environment: PYTHON (default: .venv/bin/python where it exists, else python3, as on a bare GPU host after
# tools/gpu_check.sh has installed the checkout), BATCH (default 256), STEP_ITERS (default 20),
# SKIP_COMPILE=1 to leave out the compiled runs when time is short. The loaders timed are torch and
# whichever of DALI and FFCV import here (a bare GPU host has neither).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-gpu_bench.json}
DATA=${2:-}
BASELINE=${3:-}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
"$PY" -c 'import fastrefine.loaders' 2> /dev/null ||
  { echo "gpu_bench.sh: fastrefine does not import in $PY: run tools/gpu_check.sh first (it installs the checkout)" >&2; exit 2; }
BACKENDS=$("$PY" -c 'from fastrefine.loaders import backend_available as a; print(",".join(b for b in ("dali", "ffcv", "torch") if a(b)[0]))')
BATCH=${BATCH:-256}
ITERS=${STEP_ITERS:-20}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script is for a GPU machine")'
"$PY" -m fastrefine doctor --json "$TMP/doctor.json" > "$TMP/doctor.txt" || true

fr() { echo "+ fastrefine $*" >&2; "$PY" -m fastrefine "$@"; }

for RES in 160 224; do
  fr bench step --model resnet50 --refinery none,same --resolution "$RES" --batch-size "$BATCH" \
     --precision bf16 --device cuda --warmup 5 --iters "$ITERS" --repeats 3 --json "$TMP/step-$RES.json"
  if [ "${SKIP_COMPILE:-0}" != 1 ]; then
    fr bench step --model resnet50 --refinery none,same --resolution "$RES" --batch-size "$BATCH" \
       --precision bf16 --device cuda --compile --warmup 5 --iters "$ITERS" --repeats 3 \
       --json "$TMP/step-$RES-compile.json"
  fi
done

if [ -n "$DATA" ]; then
  EXTRA=()
  [ -n "$BASELINE" ] && EXTRA=(--baseline-folder "$BASELINE")
  for RES in 160 224; do
    fr bench loader "$DATA" --backend "$BACKENDS" --torch-decodes device,host --resolution "$RES" --batch-size "$BATCH" \
       --batches 30 --warmup 10 --repeats 3 --device cuda --no-ceiling "${EXTRA[@]}" \
       --json "$TMP/loader-$RES.json" || echo "loader bench at $RES px failed (see above)" >&2
  done
  fr bench decode "$DATA" --images 5000 --repeats 3 --json "$TMP/decode.json" || true
fi

"$PY" - "$TMP" "$OUT" <<'EOF'
import json, sys, time
from pathlib import Path
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
merged = {"script": "tools/gpu_bench.sh", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": {}}
for f in sorted(tmp.glob("*.json")):
    merged["runs"][f.stem] = json.loads(f.read_text())
out.write_text(json.dumps(merged, indent=2))
print(f"wrote {out} ({', '.join(merged['runs'])})")
EOF
