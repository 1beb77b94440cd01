"""Triton python-backend adapter for fluxshard.serving.session.SessionManager."""

import json

import triton_python_backend_utils as pb_utils

from fluxshard.serving.backend_tensors import error_response, input_array, output_tensor
from fluxshard.serving.instance import instance_device
from fluxshard.serving.limits import FrameLimits, max_streams_from_parameters
from fluxshard.serving.metrics import ServedModelMetrics
from fluxshard.receive import ResyncNeeded
from fluxshard.sessions import yolo_session_factory
from fluxshard.serving.session import ServerFull, SessionManager
from fluxshard.protocol import SECRET_PARAMETER
from fluxshard.wire import PayloadError, response_tensors


def stream_secret(request) -> str:
    """The request's stream secret; empty when it carries none (a stream opened without one
    is open to any request without one, and to no other)."""
    value = json.loads(request.parameters() or "{}").get(SECRET_PARAMETER, "")
    return value if isinstance(value, str) else ""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # "executor" picks the compute; "compute" is the older name of the same parameter
        executor = params.get("executor") or params.get("compute") or "exact"
        keyframe_interval = int(params.get("keyframe_interval", "0") or 0)
        factory = yolo_session_factory(executor, weights=params.get("weights") or None,
                                       threads=int(params.get("torch_threads", "1")),
                                       conf_threshold=float(params.get("conf_threshold", "0.25")),
                                       device=instance_device(args, params),
                                       keyframe_interval=keyframe_interval or None,
                                       grid_snap=params.get("grid_snap", "false") == "true",
                                       bypass=params.get("bypass", "none") or "none")
        # Triton frees a timed-out sequence's slot without telling the model: sweep with the same
        # timeout so the model frees its session too
        idle_us = int(config.get("sequence_batching", {}).get("max_sequence_idle_microseconds",
                                                              60_000_000))
        # the model's own metrics on Triton's metrics port (fluxshard/serving/metrics.py)
        self.metrics = ServedModelMetrics(pb_utils, {"model": args["model_name"],
                                                     "version": args["model_version"]})
        self.manager = SessionManager(factory, idle_seconds=idle_us / 1e6,
                                      max_streams=max_streams_from_parameters(params),
                                      frame_limits=FrameLimits.from_parameters(params),
                                      observer=self.metrics)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                corrid = int(input_array(request, "CORRID").reshape(-1)[0])
                start = bool(input_array(request, "START").reshape(-1)[0])
                end = bool(input_array(request, "END").reshape(-1)[0])
                payload = input_array(request, "PAYLOAD").reshape(-1).tobytes()
                response = self.manager.handle(corrid, start, end, payload, stream_secret(request))
                # batch dimension of 1 (max_batch_size > 0)
                out = [output_tensor(name, value[None])
                       for name, value in response_tensors(response).items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except ResyncNeeded as e:  # the message says "resync needed": the client sends a key frame
                self.metrics.refused("resync")
                responses.append(error_response(str(e), "INVALID_ARG"))
            except PayloadError as e:
                self.metrics.refused("bad_payload")
                responses.append(error_response(f"bad payload: {e}", "INVALID_ARG"))
            except ServerFull as e:
                self.metrics.refused("server_full")
                responses.append(error_response(str(e), "UNAVAILABLE"))
            except Exception as e:  # the server keeps serving other streams
                self.metrics.refused("internal")
                responses.append(error_response(f"internal error: {type(e).__name__}: {e}"))
        return responses

    def finalize(self):
        for corrid in list(self.manager.streams):
            self.manager.close(corrid)
