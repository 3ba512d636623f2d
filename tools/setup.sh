#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu x86_64 machine: system libraries, a virtualenv, fastrefine.
#   - Debian packages: pkg-config, libturbojpeg0-dev, libopencv-dev (FFCV builds against them and
#     loads them at run time) and dataset-fashion-mnist (the real demo and test data, no download).
#   - .venv with torch 2.14.1 / torchvision 0.29.1, DALI (CPU mode without a GPU), FFCV 1.0.2.
# Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need=()
for pkg in pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "setup: installing fastrefine with DALI and FFCV into $VENV (first time: a few minutes)"
# pip's own noise about unreachable mirror folders is dropped; real errors still fail the script.
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[all,dev]' 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -c "import fastrefine.loaders, torch, nvidia.dali, ffcv.loader; print('setup: ok, torch', torch.__version__)"
