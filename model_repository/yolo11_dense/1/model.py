"""Dense YOLO11 baseline in the python backend: one frame in, detections (and a seg model's
masks, `fluxshard.wire.encode_masks`) out, no state.

The `engine` parameter picks what runs the network at the model input sizes in `prepare_sizes`:
`onnxruntime` (the CPU config: the fastest dense engine on a CPU; a static-shape export per size,
made at load), `fused_channels_last` (BN-fused torch), or `torch` (the model on the instance's
device: the GPU config). Frames of any other size run on the BN-fused torch model: no client can
make the server export (seconds, and memory) for sizes it was not set up for.

The predict parameters (`imgsz`, `conf`, `iou`, `classes`, `max_det`; fluxshard.predict) are the
fluxshard model's: a frame over `imgsz` is letterboxed down to it, its boxes come back in the
frame's pixels."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from fluxshard.models.ops import padded_shape
from fluxshard.serving.backend_tensors import error_response, input_array, output_tensor
from fluxshard.serving.instance import instance_device
from fluxshard.predict import PredictOptions
from fluxshard.sessions import (BestDenseRunners, DenseRunnerSession, DenseYoloSession,
                                LetterboxSession, load_dense_model)
from fluxshard.wire import MAX_PIXELS, MAX_SIDE, encode_masks


def model_input_sizes(text: str) -> list[tuple[int, int]]:
    """`prepare_sizes`: comma-separated HxW model input sizes (multiples of 32)."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        h, sep, w = item.partition("x")
        if not (sep and h.isdigit() and w.isdigit() and int(h) % 32 == 0 and int(w) % 32 == 0
                and int(h) > 0 and int(w) > 0):
            raise ValueError(f"prepare_sizes: expected HxW in multiples of 32, got {item!r}")
        sizes.append((int(h), int(w)))
    return sizes


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine = params.get("engine") or "onnxruntime"
        device = instance_device(args, params)
        threads = int(params.get("torch_threads", "1"))
        self.predict = PredictOptions.from_parameters(params)
        if engine != "torch" and device != "cpu":
            raise ValueError(f"engine {engine!r} runs on the CPU; a {device} instance needs "
                             "engine 'torch' (configs/gpu.pbtxt)")
        model = load_dense_model(params.get("weights") or None, threads=threads, device=device)
        self.any_size = DenseYoloSession(model, self.predict)
        self.prepared = {}  # model input size -> its session
        if engine != "torch":
            runners = BestDenseRunners(model, threads=threads, kinds=(engine,))
            for size in model_input_sizes(params.get("prepare_sizes", "")):
                runners.prepare(size)  # the export happens now, not in a request's latency
                self.prepared[size] = DenseRunnerSession(runners, self.predict)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                frame = np.ascontiguousarray(input_array(request, "FRAME"))
                h, w = frame.shape[:2]
                if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and h * w <= MAX_PIXELS):
                    raise ValueError(f"frame {h}x{w} outside the limits ({MAX_SIDE} px a side, "
                                     f"{MAX_PIXELS} pixels)")
                imgsz = self.predict.imgsz
                letterboxed = imgsz is not None and max(h, w) > imgsz  # down to imgsz
                size = self.predict.letterbox(h, w).input_hw if letterboxed else (h, w)
                session = self.prepared.get(padded_shape(*size), self.any_size)
                if letterboxed:
                    session = LetterboxSession(session, imgsz)
                result = session.infer(frame, None, None, True)
                masks = np.frombuffer(encode_masks(result.masks), np.uint8)
                out = [output_tensor("DETECTIONS", result.detections),
                       output_tensor("MASKS", masks.copy())]
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except Exception as e:  # the server keeps serving
                responses.append(error_response(f"{type(e).__name__}: {e}", "INVALID_ARG"))
        return responses
