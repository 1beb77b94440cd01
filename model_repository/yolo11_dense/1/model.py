"""Dense YOLO11 baseline in the python backend: one frame in, detections out, no state."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from fluxshard.serving.backend_tensors import error_response, input_array, output_tensor
from fluxshard.serving.instance import instance_device
from fluxshard.sessions import DenseYoloSession, load_dense_model
from fluxshard.wire import MAX_PIXELS, MAX_SIDE


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model = load_dense_model(params.get("weights") or None,
                                 threads=int(params.get("torch_threads", "1")),
                                 device=instance_device(args, params))
        self.session = DenseYoloSession(model, float(params.get("conf_threshold", "0.25")))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                frame = np.ascontiguousarray(input_array(request, "FRAME"))
                h, w = frame.shape[:2]
                if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and h * w <= MAX_PIXELS):
                    raise ValueError(f"frame {h}x{w} outside the limits ({MAX_SIDE} px a side, "
                                     f"{MAX_PIXELS} pixels)")
                detections = self.session.infer(frame, None, None, True).detections
                out = output_tensor("DETECTIONS", detections)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as e:  # the server keeps serving
                responses.append(error_response(f"{type(e).__name__}: {e}", "INVALID_ARG"))
        return responses
