"""Triton python-backend adapter for fluxshard.serving.session.SessionManager.

Tensors cross the backend boundary with DLPack only: the stub's ``as_numpy`` / ``Tensor(name,
ndarray)`` read numpy's old descriptor layout and return wrong or empty data under numpy 2, and
``Tensor.from_dlpack`` on a numpy array logs a capsule-name error per call (torch tensors are clean).
"""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from fluxshard.serving.receive import ResyncNeeded
from fluxshard.serving.session import SessionManager, dense_yolo_factory
from fluxshard.wire import PayloadError, response_tensors


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise PayloadError(f"missing input {name}")
    return np.from_dlpack(tensor)


def _error(message, code_name):
    code = getattr(pb_utils.TritonError, code_name, None)
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        compute = params.get("compute", "dense")
        if compute != "dense":
            raise ValueError(f"compute '{compute}' is not available (choose: dense)")
        factory = dense_yolo_factory(weights=params.get("weights") or None,
                                     threads=int(params.get("torch_threads", "1")),
                                     conf_threshold=float(params.get("conf_threshold", "0.25")))
        idle_us = int(config.get("sequence_batching", {}).get("max_sequence_idle_microseconds",
                                                              60_000_000))
        self.manager = SessionManager(factory, idle_seconds=idle_us / 1e6,
                                      max_streams=int(params.get("max_streams", "256")))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                corrid = int(_input(request, "CORRID").reshape(-1)[0])
                start = bool(_input(request, "START").reshape(-1)[0])
                end = bool(_input(request, "END").reshape(-1)[0])
                payload = _input(request, "PAYLOAD").reshape(-1).tobytes()
                response = self.manager.handle(corrid, start, end, payload)
                tensors = response_tensors(response)
                # batch dimension of 1 (max_batch_size > 0)
                out = [pb_utils.Tensor.from_dlpack(name, torch.from_numpy(np.ascontiguousarray(value[None])))
                       for name, value in tensors.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except ResyncNeeded as e:
                responses.append(_error(str(e), "INVALID_ARG"))
            except PayloadError as e:
                responses.append(_error(f"bad payload: {e}", "INVALID_ARG"))
            except Exception as e:  # the server keeps serving other streams
                responses.append(_error(f"internal error: {type(e).__name__}: {e}", "INTERNAL"))
        return responses

    def finalize(self):
        for corrid in list(self.manager.streams):
            self.manager.close(corrid)
