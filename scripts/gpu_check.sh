#!/usr/bin/env bash
# The prepared device check for a lent GPU (run by the `device` tool, which copies the work tree):
# the CUDA kernels of plugins_trt/ against the torch executor's golden cases. Everything is built
# and generated HERE beforehand (the GPU machine may lack the toolchain and our Python deps):
#
#   scripts/build_plugins.sh && python3 -m fluxshard.graph.golden .cache/plugins_trt/golden
#   device run:  bash scripts/gpu_check.sh      (carry: .cache/plugins_trt)
#
# Exit status is the self-test's: 0 all cases match, 1 a mismatch, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=.cache/plugins_trt/build
GOLDEN=.cache/plugins_trt/golden
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null || true
if [ ! -x "$BUILD/fluxshard_plugins_selftest" ] || [ ! -f "$GOLDEN/cases.txt" ]; then
    echo "missing $BUILD/fluxshard_plugins_selftest or $GOLDEN/cases.txt: build and generate first" >&2
    exit 1
fi
"$BUILD/fluxshard_plugins_selftest" plugins "$PWD/$BUILD/libfluxshard_trt_plugins.so" || exit $?
"$BUILD/fluxshard_plugins_selftest" kernels "$GOLDEN"
