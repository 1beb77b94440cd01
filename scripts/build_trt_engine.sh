#!/usr/bin/env bash
# Build the TensorRT engines of `fluxshard export`'s fluxshard_trt.onnx (FP32 and FP16) with the
# FluxShard plugins loaded, into a Triton model repository ready for the TensorRT backend:
#
#   REPO/fluxshard_trt/config.pbtxt        tensorrt_plan, implicit state (export/triton_config.py)
#   REPO/fluxshard_trt/configs/fp16.pbtxt  the same for the FP16 engine (--model-config-name=fp16)
#   REPO/fluxshard_trt/1/model.plan        FP32 (TF32 off: the numbers of the ONNX graph)
#   REPO/fluxshard_trt/1/model_fp16.plan   FP16 where the builder finds it faster
#   PLUGINS_DIR/libfluxshard_trt_triton.so what `--backend-config=tensorrt,plugins=` loads
#
#   scripts/build_trt_engine.sh [--onnx out/export/fluxshard_trt.onnx] [--repository out/triton_trt]
#       [--plugins .cache/plugins_trt/build/libfluxshard_trt_plugins.so] [--precisions "fp32 fp16"]
#       [--loader-only] [--dry-run]
#
# Needs: the plugin library (scripts/build_plugins.sh), g++ and the TensorRT headers it unpacked
# (for the loader), and on a GPU machine trtexec (loads the plugins with --dynamicPlugins, i.e.
# IPluginRegistry::loadLibrary) or else polygraphy with the `tensorrt` module (loads the loader
# library, which registers the plugins in the tensorrt module's registry). --loader-only builds
# the loader and the configs alone (no GPU needed); --dry-run prints the engine commands.
# An engine runs only on the GPU model and TensorRT version that built it.
set -euo pipefail
cd "$(dirname "$0")/.."
ONNX=out/export/fluxshard_trt.onnx
REPO=out/triton_trt
PLUGINS=.cache/plugins_trt/build/libfluxshard_trt_plugins.so
PRECISIONS="fp32 fp16"
LOADER_ONLY=0
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --onnx) ONNX=$2; shift 2 ;;
        --repository) REPO=$2; shift 2 ;;
        --plugins) PLUGINS=$2; shift 2 ;;
        --precisions) PRECISIONS=$2; shift 2 ;;
        --loader-only) LOADER_ONLY=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) echo "build_trt_engine.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
for file in "$ONNX" "$PLUGINS"; do
    if [ ! -f "$file" ]; then
        echo "build_trt_engine.sh: $file not found (fluxshard_trt.onnx: \`fluxshard export\`;" \
             "the plugin library: scripts/build_plugins.sh)" >&2
        exit 1
    fi
done
PLUGINS=$(cd "$(dirname "$PLUGINS")" && pwd)/$(basename "$PLUGINS")
LOADER=$(dirname "$PLUGINS")/libfluxshard_trt_triton.so
HEADERS=${TENSORRT_INCLUDE_DIR:-.cache/plugins_trt/tensorrt-include}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
SOURCE=export/triton_plugins/fluxshardTritonPlugins.cpp

# 1. the loader Triton's backend dlopens (it has TensorRT load the plugin library beside it)
if [ ! -f "$LOADER" ] || [ "$SOURCE" -nt "$LOADER" ]; then
    if [ -f "$LOADER" ] && ! command -v g++ >/dev/null; then
        echo "g++ missing: keeping the loader built earlier ($LOADER)" >&2
    else
        g++ -shared -fPIC -O2 -std=c++17 -Wno-deprecated-declarations -I"$HEADERS" \
            -I"$CUDA_HOME/include" -o "$LOADER" "$SOURCE" -ldl
    fi
fi
echo "loader: $LOADER"

# 2. the model folder, its configs written from the ONNX
python3 export/triton_config.py "$ONNX" --repository "$REPO" >/dev/null
MODEL=$REPO/fluxshard_trt
mkdir -p "$MODEL/1"
echo "model: $MODEL"
[ "$LOADER_ONLY" = 1 ] && exit 0

# 3. the engines
failed=()
for precision in $PRECISIONS; do
    case "$precision" in
        fp32) plan=$MODEL/1/model.plan; trtexec_flags=(--noTF32); polygraphy_flags=() ;;
        fp16) plan=$MODEL/1/model_fp16.plan; trtexec_flags=(--fp16); polygraphy_flags=(--fp16) ;;
        *) echo "unknown precision $precision (fp32, fp16)" >&2; exit 2 ;;
    esac
    if command -v trtexec >/dev/null || [ "$DRY_RUN" = 1 ]; then
        cmd=(trtexec --onnx="$ONNX" --dynamicPlugins="$PLUGINS" --saveEngine="$plan"
             --skipInference "${trtexec_flags[@]}")
    else
        cmd=(polygraphy convert "$ONNX" --convert-to trt --plugins "$LOADER" -o "$plan"
             "${polygraphy_flags[@]}")
    fi
    echo "== $precision: ${cmd[*]}"
    [ "$DRY_RUN" = 1 ] && continue
    start=$(date +%s)
    if "${cmd[@]}" >"$plan.log" 2>&1 && [ -s "$plan" ]; then
        echo "$plan: $(du -h "$plan" | cut -f1), built in $(( $(date +%s) - start )) s"
    else
        tail -20 "$plan.log" >&2
        echo "$precision engine build failed (log: $plan.log)" >&2
        failed+=("$precision")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    exit 1
fi
echo "serve: tritonserver --model-repository=$REPO --backend-config=tensorrt,plugins=$LOADER" \
     "[--model-config-name=fp16]"
