#!/usr/bin/env bash
# Build the tile executor's TensorRT maps engine: the raw-maps ONNX (dynamic batch and size) with
# one optimization profile per crop size group and one for the whole frame (see
# `python3 -m fluxshard.tiles.tensorrt_engine plan --frame 384x640`). Needs a CUDA GPU, the full
# `tensorrt` Python module and polygraphy. Arguments go to the build command, e.g.
#
#   scripts/build_tiles_trt.sh --frame 384x640 --max-batch 8 [--fp16] [--no-tf32] [--out X.engine]
#
# Without --onnx it uses .cache/tiles_trt/yolo11n-raw-maps.onnx, exporting it first if missing
# (the export needs the `onnx` package, which GPU images may lack: export beforehand, see
# scripts/gpu_check.sh). The engine's sidecar X.engine.json names the profiles.
set -euo pipefail
cd "$(dirname "$0")/.."
ONNX=.cache/tiles_trt/yolo11n-raw-maps.onnx
if [[ " $* " != *" --onnx"* ]] && [ ! -f "$ONNX" ]; then
    python3 -m fluxshard.tiles.tensorrt_engine export --out "$ONNX"
fi
exec python3 -m fluxshard.tiles.tensorrt_engine build "$@"
