#!/usr/bin/env bash
# Build plugins_trt/ (TensorRT IPluginV3 plugins + kernel self-test) with nvcc for sm_87 and sm_90.
# TensorRT headers come from the MIT kernel-lens wheel, unpacked into a git-ignored cache (never
# committed). Output: .cache/plugins_trt/build/libfluxshard_trt_plugins.so and
# fluxshard_plugins_selftest. Idempotent; prints the library path last.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
CACHE=.cache/plugins_trt
HEADERS=$CACHE/tensorrt-include
for tool in "$CUDA_HOME/bin/nvcc" cmake ninja; do
    if ! command -v "$tool" >/dev/null; then
        echo "build_plugins.sh: $tool not found (nvcc: the CUDA toolkit, set CUDA_HOME;" \
             "cmake: apt-get install cmake; ninja: pip install ninja)" >&2
        exit 1
    fi
done
if [ ! -f "$HEADERS/NvInferRuntime.h" ]; then
    rm -rf "$CACHE/wheel" && mkdir -p "$CACHE/wheel" "$HEADERS"
    $PY -m pip download -q --disable-pip-version-check --no-deps -d "$CACHE/wheel" kernel-lens==2.0.1
    $PY - "$CACHE/wheel" "$HEADERS" <<'PYEOF'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("kernel_lens-*.whl"))
out = pathlib.Path(sys.argv[2])
prefix = "kernel_lens/include/tensorrt/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and name.endswith(".h"):
            (out / name[len(prefix):]).write_bytes(z.read(name))
PYEOF
fi
LOG=$CACHE/build.log
if ! { cmake -S plugins_trt -B "$CACHE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME" \
        -DTENSORRT_INCLUDE_DIR="$PWD/$HEADERS" && cmake --build "$CACHE/build"; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "plugins_trt build failed (log: $LOG)" >&2
    exit 1
fi
echo "$PWD/$CACHE/build/libfluxshard_trt_plugins.so"
