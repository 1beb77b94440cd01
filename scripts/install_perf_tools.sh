#!/usr/bin/env bash
# Optional: perf_analyzer for perf/load_test.py (not needed by the package or its tests).
# perf_analyzer ships inside the tritonclient 2.44.0 wheel (data/bin); it links Debian's libb64
# and CUDA's libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel; no GPU needed). All wheels
# go --no-deps into a git-ignored cache dir, so our environment's tritonclient stays as it is.
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=.cache/perf_tools
PIP="$PY -m pip install -q --disable-pip-version-check --no-deps"
if [ ! -x "$DIR/tritonclient/bin/perf_analyzer" ]; then
    rm -rf "$DIR/tritonclient"
    $PIP --target "$DIR/tritonclient" tritonclient==2.44.0
    [ -x "$DIR/tritonclient/bin/perf_analyzer" ] || chmod +x "$DIR/tritonclient/bin/perf_analyzer"
fi
if ! ls "$DIR"/cuda/nvidia/cuda_runtime/lib/libcudart.so.12 >/dev/null 2>&1; then
    rm -rf "$DIR/cuda"
    $PIP --target "$DIR/cuda" 'nvidia-cuda-runtime-cu12==12.*'
fi
if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libb64-0d >/dev/null
fi
LD_LIBRARY_PATH="$PWD/$DIR/cuda/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}" \
    "$DIR/tritonclient/bin/perf_analyzer" --version >/dev/null
echo "perf_analyzer ready: $DIR/tritonclient/bin/perf_analyzer"
