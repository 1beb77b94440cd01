#!/usr/bin/env bash
# The prepared device check for a lent GPU (run by the `device` tool, which copies the work tree):
# every GPU check in one run, each run even when another failed:
#   1. the CUDA kernels of plugins_trt/ against the torch executor's golden cases;
#   2. the torch sparse executor on CUDA: tau 0 with strict RFAP equals dense over decoded H.264
#      (tests/test_executor.py -k cuda; the same cases run on the CPU everywhere else);
#   3. the tile executor's TensorRT maps engine: build it from the carried raw-maps ONNX with its
#      crop-bucket profiles, check its maps against onnxruntime / the torch model
#      (tests/test_tiles_tensorrt.py -m gpu), time the whole frame against crop batches;
#   4. the FluxShard graph (fluxshard_trt.onnx, plugin nodes) on TensorRT: the FP32 and FP16
#      engines built with the plugins loaded (scripts/build_trt_engine.sh: the Triton model folder
#      with both), each run as a stream against onnxruntime's reference frames
#      (export/check_engine.py run), and, where this machine has a tritonserver with the TensorRT
#      backend, the served `fluxshard_trt` model (implicit state) against the same frames.
# Everything is built, generated and downloaded HERE beforehand (the GPU machine has torch, numpy
# and pytest, but not our toolchain, and no PyAV, which the executor case decodes its clips with).
# On a GPU machine of your own, `scripts/install.sh --gpu` installs the CUDA torch this needs:
#
#   scripts/build_plugins.sh && python3 -m fluxshard.graph.golden .cache/plugins_trt/golden
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl av==18.1.0
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl polygraphy==0.53.6
#   python3 -m fluxshard.tiles.tensorrt_engine export --out .cache/tiles_trt/yolo11n-raw-maps.onnx
#   python3 -m fluxshard.cli export --size 320 192 --out /tmp/fluxshard_export && \
#       python3 export/check_engine.py reference --export /tmp/fluxshard_export --frames 4 && \
#       mkdir -p .cache/export_trt && cp /tmp/fluxshard_export/{fluxshard_trt.onnx,fluxshard_io.json,reference.npz} .cache/export_trt/
#   python3 scripts/check_served_tiles_trt.py payloads --out .cache/served_trt/payloads.npz
#   device run:  bash scripts/gpu_check.sh
#       (carry: .cache/plugins_trt, .cache/tiles_trt, .cache/export_trt, .cache/served_trt, .whl)
#
# Section 3 needs the full `tensorrt` Python module on the GPU machine: its libraries are not on
# PyPI as binary wheels (NVIDIA's own index only, unreachable here) and are far over the 64 MiB
# carry, so the section says so and fails when the image lacks it. The ONNX is exported here
# because the export needs the `onnx` package; onnxruntime does not fit the carry beside PyAV,
# so where the image lacks it the maps are checked against the torch model on the CPU. The
# engine is built at builder optimization level 2 to keep the run short.
# Exit status: 0 every check passed, 1 a check failed or lacks its inputs, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=.cache/plugins_trt/build
GOLDEN=.cache/plugins_trt/golden
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null || true
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # a CPU build (scripts/install.sh without --gpu) sees no device even on a GPU machine
    echo "torch sees no CUDA device (torch $(python3 -c 'import torch; print(torch.__version__)' 2>&1);" \
         "a +cpu build needs scripts/install.sh --gpu)" >&2
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

echo "== 3. tile executor on TensorRT: crop-bucket profiles, maps against the CPU, timings"
TRT_ONNX=.cache/tiles_trt/yolo11n-raw-maps.onnx
TRT_ENGINE=/tmp/fluxshard_tiles_trt/yolo11n-raw-maps-384x640-b8.engine
if ! python3 -c 'import tensorrt; print("tensorrt", tensorrt.__version__)'; then
    echo "the tensorrt Python module is missing on this machine (trtexec: $(command -v trtexec || echo none);" \
         "libnvinfer: $(ldconfig -p 2>/dev/null | grep -o 'libnvinfer.so[.0-9]*' | head -1 || true))" >&2
    failed+=(tiles_trt)
elif [ ! -f "$TRT_ONNX" ]; then
    echo "missing $TRT_ONNX: export it here and carry .cache/tiles_trt (see above)" >&2
    failed+=(tiles_trt)
elif ! python3 -c 'import polygraphy' 2>/dev/null; then
    echo "polygraphy is missing: download its wheel into .whl and carry it (see above)" >&2
    failed+=(tiles_trt)
elif ! python3 -c 'import fluxshard.tiles.tensorrt_engine'; then
    echo "fluxshard.tiles does not import here (a dependency missing from the image?)" >&2
    failed+=(tiles_trt)
elif ! timeout 300 python3 -m fluxshard.tiles.tensorrt_engine build --onnx "$TRT_ONNX" \
        --out "$TRT_ENGINE" --frame 384x640 --max-batch 8 --opt-level 2; then
    failed+=(tiles_trt)
else
    FLUXSHARD_TILES_TRT_ENGINE=$TRT_ENGINE FLUXSHARD_TILES_TRT_ONNX=$TRT_ONNX \
        python3 -m pytest -q -s -rs -p no:cacheprovider tests/test_tiles_tensorrt.py -m gpu \
        || failed+=(tiles_trt)
    timeout 120 python3 -m fluxshard.tiles.tensorrt_engine bench --engine "$TRT_ENGINE" \
        || failed+=(tiles_trt_bench)
fi

echo "== 4. the FluxShard graph on TensorRT: FP32 / FP16 engines with the plugins, as a stream"
EXPORT=.cache/export_trt
TRT_REPO=/tmp/fluxshard_triton_trt
if ! python3 -c 'import tensorrt' 2>/dev/null && ! command -v trtexec >/dev/null; then
    echo "neither trtexec nor the tensorrt Python module is on this machine: the engines of" \
         "fluxshard_trt.onnx are not built" >&2
    failed+=(graph_trt)
elif [ ! -f "$EXPORT/fluxshard_trt.onnx" ] || [ ! -f "$EXPORT/reference.npz" ]; then
    echo "missing $EXPORT/fluxshard_trt.onnx or reference.npz: export them here and carry" \
         "$EXPORT (see above)" >&2
    failed+=(graph_trt)
elif ! timeout 420 bash scripts/build_trt_engine.sh --onnx "$EXPORT/fluxshard_trt.onnx" \
        --repository "$TRT_REPO" --plugins "$BUILD/libfluxshard_trt_plugins.so"; then
    failed+=(graph_trt_build)
else
    # the stream check needs the tensorrt module and torch on CUDA (the engine alone: trtexec)
    python3 export/check_engine.py run --engine "$TRT_REPO/fluxshard_trt/1/model.plan" \
        --plugins "$BUILD/libfluxshard_trt_plugins.so" --reference "$EXPORT/reference.npz" \
        --tolerance 1e-4 || failed+=(graph_trt_fp32)
    python3 export/check_engine.py run --engine "$TRT_REPO/fluxshard_trt/1/model_fp16.plan" \
        --plugins "$BUILD/libfluxshard_trt_plugins.so" --reference "$EXPORT/reference.npz" \
        --tolerance 5e-2 || failed+=(graph_trt_fp16)
    TRITON=${TRITON_HOME:-/opt/tritonserver}
    if [ -x "$TRITON/bin/tritonserver" ] && [ -d "$TRITON/backends/tensorrt" ]; then
        "$TRITON/bin/tritonserver" --model-repository="$TRT_REPO" --model-control-mode=none \
            --grpc-port=18001 --http-port=18000 --metrics-port=18002 \
            --backend-config=tensorrt,plugins="$BUILD/libfluxshard_trt_triton.so" \
            >/tmp/fluxshard_triton_trt.log 2>&1 &
        triton_pid=$!
        for _ in $(seq 120); do
            curl -sf localhost:18000/v2/models/fluxshard_trt/ready >/dev/null 2>&1 && break
            sleep 1
        done
        python3 export/check_engine.py serve --url 127.0.0.1:18001 \
            --reference "$EXPORT/reference.npz" --tolerance 1e-4 || {
            tail -30 /tmp/fluxshard_triton_trt.log >&2; failed+=(graph_trt_triton); }
        kill "$triton_pid" 2>/dev/null; wait "$triton_pid" 2>/dev/null
    else
        echo "no tritonserver with the TensorRT backend under $TRITON: the served" \
             "fluxshard_trt model is not checked (set TRITON_HOME)"
    fi
fi

echo "== 5. the served fluxshard model's tiles on the TensorRT engine against onnxruntime"
SERVED_PAYLOADS=.cache/served_trt/payloads.npz
if [ ! -f "$TRT_ENGINE" ]; then
    echo "no tiles engine $TRT_ENGINE (section 3 builds it): the served engine is not checked" >&2
    failed+=(served_tiles_trt)
elif [ ! -f "$SERVED_PAYLOADS" ]; then
    echo "missing $SERVED_PAYLOADS: write it here and carry .cache/served_trt (see above)" >&2
    failed+=(served_tiles_trt)
elif ! timeout 400 python3 scripts/check_served_tiles_trt.py check --payloads "$SERVED_PAYLOADS" \
        --reference "$(python3 -c 'import onnxruntime' 2>/dev/null && echo onnxruntime || echo torch)" \
        --kind tensorrt --engine "$TRT_ENGINE" --config-name gpu --log /tmp/fluxshard_served_trt.log; then
    tail -30 /tmp/fluxshard_served_trt.log >&2 2>/dev/null
    failed+=(served_tiles_trt)
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all GPU checks passed"
