#!/usr/bin/env bash
# The prepared device check for a lent GPU (run by the `device` tool, which copies the work tree):
# every GPU check in one run, each run even when another failed:
#   1. the CUDA kernels of plugins_trt/ against the torch executor's golden cases;
#   2. the torch sparse executor on CUDA: tau 0 with strict RFAP equals dense over decoded H.264
#      (tests/test_executor.py -k cuda; the same cases run on the CPU everywhere else).
# Everything is built, generated and downloaded HERE beforehand (the GPU machine has torch, numpy
# and pytest, but not our toolchain, and no PyAV, which the executor case decodes its clips with):
#
#   scripts/build_plugins.sh && python3 -m fluxshard.graph.golden .cache/plugins_trt/golden
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl av==18.1.0
#   device run:  bash scripts/gpu_check.sh      (carry: .cache/plugins_trt, .whl)
#
# Exit status: 0 every check passed, 1 a check failed or lacks its inputs, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=.cache/plugins_trt/build
GOLDEN=.cache/plugins_trt/golden
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null || true
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "torch sees no CUDA device" >&2
    exit 2
fi
failed=()

echo "== 1. plugin kernels against the golden cases"
if [ ! -x "$BUILD/fluxshard_plugins_selftest" ] || [ ! -f "$GOLDEN/cases.txt" ]; then
    echo "missing $BUILD/fluxshard_plugins_selftest or $GOLDEN/cases.txt: build and generate first" >&2
    failed+=(plugins)
elif ! "$BUILD/fluxshard_plugins_selftest" plugins "$PWD/$BUILD/libfluxshard_trt_plugins.so" \
        || ! "$BUILD/fluxshard_plugins_selftest" kernels "$GOLDEN"; then
    failed+=(plugins)
fi

echo "== 2. sparse executor on CUDA: exact at tau 0"
if compgen -G ".whl/*.whl" >/dev/null; then  # into a private folder: the image's packages stay
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fluxshard_site .whl/*.whl || failed+=(wheels)
    export PYTHONPATH=/tmp/fluxshard_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c 'import av' 2>/dev/null; then
    echo "PyAV is missing: download its wheel into .whl and carry it (see above)" >&2
    failed+=(executor)
elif ! python3 -m pytest -q -rs -p no:cacheprovider tests/test_executor.py -k cuda; then
    failed+=(executor)
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all GPU checks passed"
