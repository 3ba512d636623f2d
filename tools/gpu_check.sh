#!/usr/bin/env bash
# The one device check: what only a CUDA GPU can show, in at most 8 minutes of wall clock.
#
#   bash tools/gpu_check.sh [OUT]        (from anywhere; OUT defaults to $OUT or gpu-check/ in the checkout)
#
# For a bare GPU machine: Python (PY, default python3) with torch, torchvision, numba, opencv, typer,
# rich, matplotlib, pytest and setuptools >= 61, no DALI, no FFCV, no network, no data set. It installs
# this checkout (`pip install --no-deps --no-build-isolation -e .`; where pip cannot build because
# setuptools < 70.1 has no `wheel` package beside it, tools/link_checkout.py links the checkout
# instead), generates its images (fastrefine/synthetic.py) and runs, each part under its own time cap
# (caps add up to 450 s, the set-up takes the rest of the 480 s budget):
#   a-pytest-gpu     90 s  pytest -m gpu (CUDA chain under sync debug mode "error", CUDA resume, the
#                          torch loader's CUDA decode, the models in bf16); DALI/FFCV tests skip, saying so
#   b-tiny-chain     45 s  a 2-round resnet18 recipe on CUDA, torch loader with nvJPEG decode
#   c-kill-resume    55 s  kill -9 in the middle of a CUDA round, then the resume
#   d-step-160-eager 30 s  bench step, ResNet-50 alone and + ResNet-50 refinery, batch 256, bf16,
#   d-step-224-eager 30 s  channels-last (target: >= 5,000 img/s with the refinery at 160 px)
#   d-step-160-compiled 140 s  the same compiled (compile time reported apart as first_call_s)
#   e-loader         60 s  bench loader --backend torch: nvJPEG (device) vs PIL (host) decode on 2,560
#                          ImageNet-sized JPEGs, 20 batches of 128 an epoch, 20 timed per repeat
# Every part writes OUT/PART.status.json (rc, seconds), OUT/PART.peak.json (torch.cuda.max_memory_allocated,
# tools/cuda_peak.py) and its result (OUT/PART.json, or .xml for pytest) as it ends, so a failure keeps the
# parts before it; tools/gpu_summary.py prints the one-screen summary (OUT/summary.txt).
# Without CUDA (the rehearsal on a CPU machine, docs/benchmarks.md) parts b-e say "no CUDA: skipped" and
# run the same commands on the CPU with tiny sizes instead, so that every command line and the summary
# are exercised; their figures are not measurements.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
BUDGET=${BUDGET:-480}
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
fail() { echo "gpu_check.sh: $*" >&2; exit 2; }

# -- install -------------------------------------------------------------------------------------
command -v "$PY" > /dev/null || fail "$PY not found (set PY to the Python that has torch)"
ST=$("$PY" -c 'import setuptools; print(setuptools.__version__)' 2> /dev/null) ||
  fail "setuptools is not installed for $PY: pip install 'setuptools>=61' (from a local wheel) and rerun"
"$PY" - "$ST" <<'PY' || fail "setuptools $ST is too old for pyproject.toml's [project] table: need >= 61"
import sys
sys.exit(0 if int(sys.argv[1].split(".")[0]) >= 61 else 1)
PY
if "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
  INSTALL="pip install -e . (setuptools $ST)"
elif ! "$PY" -c 'import wheel' 2> /dev/null && "$PY" tools/link_checkout.py >> "$OUT/install.log" 2>&1; then
  INSTALL="linked by tools/link_checkout.py (setuptools $ST cannot build without the wheel package)"
else
  tail -5 "$OUT/install.log" >&2
  fail "installing the checkout failed (log: $OUT/install.log)"
fi
"$PY" -c 'import fastrefine.loaders.torch' 2>> "$OUT/install.log" || fail "fastrefine does not import after the install (log: $OUT/install.log)"
echo "install: $INSTALL"

"$PY" - "$INSTALL" > "$OUT/environment.json" <<'PY'
import importlib.util, json, platform, shutil, subprocess, sys
import setuptools, torch, torchvision
smi = None
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    smi = " | ".join(q.stdout.strip().splitlines()) or q.stderr.strip()[:200]
cuda = torch.cuda.is_available()
print(json.dumps({
    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    "nvidia_smi": smi or "not present",
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "torchvision": torchvision.__version__, "python": platform.python_version(),
    "setuptools": setuptools.__version__, "install": sys.argv[1],
    "dali": "installed" if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali") else "not installed: skipped",
    "ffcv": "installed" if importlib.util.find_spec("ffcv") else "not installed: skipped"}, indent=1))
PY
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
# the CPU dry run only checks that every command runs: its caps and budget are 4x (a shared 2-core CPU)
CAPX=1
[ "$CUDA" = 1 ] || { CAPX=4; BUDGET=$(( BUDGET * 4 )); }

# part NAME CAP CMD...: run under min(CAP, time left); rc and seconds into OUT/NAME.status.json
part() {
  local name=$1 cap=$2; shift 2
  local t0 limit
  t0=$(date +%s)
  limit=$(left)
  if [ "$limit" -lt 10 ]; then
    echo "{\"part\": \"$name\", \"skipped\": \"out of time (budget ${BUDGET} s)\"}" > "$OUT/$name.status.json"
    echo "== $name: out of time"; return
  fi
  cap=$(( cap * CAPX ))
  [ "$cap" -lt "$limit" ] && limit=$cap
  echo "== $name (limit ${limit} s)"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] && note="timed out after ${limit} s"
  [ "$CUDA" = 1 ] || [ "$name" = a-pytest-gpu ] || note="no CUDA: skipped (CPU dry run of the same command: tiny sizes, fp32, no --compile; not a figure)"
  printf '{"part": "%s", "rc": %d, "seconds": %d, "note": "%s"}\n' "$name" "$rc" $(( $(date +%s) - t0 )) "$note" \
    > "$OUT/$name.status.json"
  tail -2 "$OUT/$name.log"
}
# pypart NAME CAP MODULE ARGS...: `python -m MODULE ARGS` as a part, its CUDA peak into OUT/NAME.peak.json
pypart() { local name=$1 cap=$2; shift 2; part "$name" "$cap" "$PY" tools/cuda_peak.py "$OUT/$name.peak.json" -m "$@"; }

# -- settings: the real sizes on CUDA, tiny ones for the CPU dry run --------------------------------
if [ "$CUDA" = 1 ]; then
  DEV=cuda; CHAIN_MODEL=resnet18; CHAIN_RES=96; CHAIN_BS=64; SMALL="10 64 16 ((160,120),(120,160),(128,128))"
  BIG="10 256 4 ((500,375),(375,500),(640,480))"; STEP_MODEL=resnet50; STEP_BS=256; STEP_RES=(160 224); COMPILE=(--compile)
  STEP_TIMING=(--warmup 3 --iters 10 --repeats 3 --precision bf16); LOAD=(--resolution 224 --batch-size 128 --batches 20 --warmup 5 --repeats 3 --rounds 2)
else
  DEV=cpu; CHAIN_MODEL=tiny_cnn; CHAIN_RES=32; CHAIN_BS=32; SMALL="10 16 4 ((48,40),(40,48),(32,32))"
  BIG="4 16 2 ((64,48),(48,64))"; STEP_MODEL=tiny_cnn; STEP_BS=8; STEP_RES=(32 48)
  COMPILE=()  # a cold torch.compile takes minutes on a shared 2-core CPU: the dry run leaves the flag out
  STEP_TIMING=(--warmup 0 --iters 1 --repeats 3 --precision fp32); LOAD=(--resolution 32 --batch-size 16 --batches 2 --warmup 1 --repeats 3 --rounds 1 --workers 1)
fi

# (a) the gpu-marked tests (their data is generated; DALI/FFCV tests skip when the library is missing)
pypart a-pytest-gpu 90 pytest -q -p no:cacheprovider -m gpu tests -rs --junitxml="$OUT/a-pytest-gpu.xml"

# data: generated JPEG trees (no data set on a bare host); SMALL for the chain, BIG (ImageNet-sized) for the loader
"$PY" - "$OUT/data" "$SMALL" "$OUT/data-big" "$BIG" > "$OUT/data.log" 2>&1 <<'PY' || fail "generating the data failed (log: $OUT/data.log)"
import ast, sys
from fastrefine.synthetic import write_synthetic_tree
for root, spec in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):
    classes, train, val, sizes = spec.split(" ", 3)
    print(root, write_synthetic_tree(root, classes=int(classes), train_per_class=int(train),
                                     val_per_class=int(val), sizes=ast.literal_eval(sizes)))
PY

write_recipe() {  # write_recipe NAME EPOCHS_FIRST_ROUND
  cat > "$OUT/$1.toml" <<EOF
[run]
name = "$1"
out = "$OUT/runs"
device = "$DEV"
progress = false
log_every = 10
[data]
path = "$OUT/data"
[loader]
backend = "torch"
batch_size = $CHAIN_BS
resolution = $CHAIN_RES
[loader.torch]
decode = "device"
[model]
name = "$CHAIN_MODEL"
[[rounds]]
name = "labels"
epochs = $2
[[rounds]]
name = "refined"
epochs = 2
EOF
}

# (b) a 2-round recipe with the device decode path
write_recipe tiny 2
pypart b-tiny-chain 45 fastrefine run "$OUT/tiny.toml"
"$PY" - "$OUT/runs/tiny" > "$OUT/b-tiny-chain.json" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
read = lambda p: json.loads(p.read_text()) if p.is_file() else None
rounds = [r for r in (read(run / n / "done.json") for n in ("labels", "refined")) if r]
records = {n: read(run / n / "run.json") for n in ("labels", "refined")}
print(json.dumps({"rounds": rounds, "run": records,
                  "compiles": [r.get("compiles") for r in rounds]}, indent=1))
PY

# (c) kill -9 in the middle of a round (right after its first per-epoch checkpoint), then the resume
write_recipe killed 8
kill_resume() {
  "$PY" -m fastrefine run "$OUT/killed.toml" & local pid=$!
  for _ in $(seq 1 600); do [ -f "$OUT/runs/killed/labels/last.pt" ] && break; sleep 0.1; done
  kill -9 "$pid"; wait "$pid"
  [ -f "$OUT/runs/killed/labels/done.json" ] && echo "the round ended before the kill" > "$OUT/c-kill-resume.late"
  "$PY" tools/cuda_peak.py "$OUT/c-kill-resume.peak.json" -m fastrefine run "$OUT/killed.toml"
}
part c-kill-resume 55 bash -c "$(declare -f kill_resume); OUT='$OUT' PY='$PY' kill_resume"
"$PY" - "$OUT" > "$OUT/c-kill-resume.json" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = out / "runs/killed"
rec = {r.name: {"done": (r / "done.json").is_file(),
                "resumed_after_epoch": json.loads((r / "run.json").read_text()).get("resumed_after_epoch")
                if (r / "run.json").is_file() else None}
       for r in sorted(runs.iterdir()) if r.is_dir()} if runs.is_dir() else {}
if (out / "c-kill-resume.late").is_file():
    rec["note"] = {"done": False, "resumed_after_epoch": "none: the round ended before the kill"}
print(json.dumps(rec, indent=1))
PY

# (d) the step alone: ResNet-50 student alone and with a ResNet-50 refinery, bf16, channels-last
for res in "${STEP_RES[@]}"; do
  pypart "d-step-$res-eager" 30 fastrefine bench step --model "$STEP_MODEL" --refinery none,same \
      --resolution "$res" --batch-size "$STEP_BS" --device "$DEV" "${STEP_TIMING[@]}" \
      --json "$OUT/d-step-$res-eager.json"
done
pypart "d-step-${STEP_RES[0]}-compiled" 140 fastrefine bench step --model "$STEP_MODEL" \
    --refinery none,same --resolution "${STEP_RES[0]}" --batch-size "$STEP_BS" --device "$DEV" \
    "${COMPILE[@]}" "${STEP_TIMING[@]}" --json "$OUT/d-step-${STEP_RES[0]}-compiled.json"

# (e) the torch loader alone: nvJPEG (device) vs PIL in workers (host), same JPEGs, taking turns
pypart e-loader 60 fastrefine bench loader "$OUT/data-big" --backend torch --torch-decodes device,host \
    --device "$DEV" "${LOAD[@]}" --no-ceiling --no-baseline --json "$OUT/e-loader.json"

echo "== summary (the whole check took $(( $(date +%s) - START )) s)"
"$PY" tools/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
# exit 1 when a part failed or timed out (the summary says which), 0 when every part ran and passed
! grep -l '"rc": [1-9]' "$OUT"/*.status.json > /dev/null 2>&1
