"""Triton python-backend adapter for fluxshard.serving.session.SessionManager."""

import json

import triton_python_backend_utils as pb_utils

from fluxshard.serving.backend_tensors import error_response, input_array, output_tensor
from fluxshard.serving.instance import instance_device
from fluxshard.serving.limits import FrameLimits, max_streams_from_parameters
from fluxshard.serving.metrics import ServedModelMetrics
from fluxshard.serving.served_engine import ServedEngine
from fluxshard.receive import ResyncNeeded
from fluxshard.predict import PredictOptions
from fluxshard.sessions import executor_name, yolo_session_factory
from fluxshard.serving.session import ServerFull, SessionManager, StreamFrame
from fluxshard.protocol import SECRET_PARAMETER
from fluxshard.wire import PayloadError, response_tensors


def stream_secret(request) -> str:
    """The request's stream secret; empty when it carries none (a stream opened without one
    is open to any request without one, and to no other)."""
    value = json.loads(request.parameters() or "{}").get(SECRET_PARAMETER, "")
    return value if isinstance(value, str) else ""


def answer_error(e: Exception, metrics):
    """The error response a frame's exception gets (its Triton status code), counted as a
    refusal by reason in ``metrics``."""
    if isinstance(e, ResyncNeeded):  # the message says "resync needed": the client sends a key frame
        metrics.refused("resync")
        return error_response(str(e), "INVALID_ARG")
    if isinstance(e, PayloadError):
        metrics.refused("bad_payload")
        return error_response(f"bad payload: {e}", "INVALID_ARG")
    if isinstance(e, ServerFull):
        metrics.refused("server_full")
        return error_response(str(e), "UNAVAILABLE")
    metrics.refused("internal")  # the server keeps serving other streams
    return error_response(f"internal error: {type(e).__name__}: {e}")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # "executor" picks the compute; "compute" is the older name of the same parameter
        executor = params.get("executor") or params.get("compute") or "exact"
        keyframe_interval = int(params.get("keyframe_interval", "0") or 0)
        device = instance_device(args, params)
        # the tiles / dense executors' engine, refused here (the load), not on a first frame
        engine = ServedEngine.from_parameters(params, device, executor_name(executor),
                                              model_dir=args.get("model_repository"))
        factory = yolo_session_factory(executor, weights=params.get("weights") or None,
                                       threads=int(params.get("torch_threads", "1")),
                                       # imgsz, conf, iou, classes, max_det
                                       predict=PredictOptions.from_parameters(params),
                                       device=device,
                                       keyframe_interval=keyframe_interval or None,
                                       grid_snap=params.get("grid_snap", "false") == "true",
                                       bypass=params.get("bypass", "none") or "none",
                                       # crops and dense frames on tiles_engine (a GPU
                                       # instance's dense frames: torch unless tensorrt)
                                       **engine.session_options(device))
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
        # every request of this call is computed together (SessionManager.handle_many: the
        # streams' engine calls shared per input size); each still gets its own answer or error
        responses = [None] * len(requests)
        frames = []  # (request index, StreamFrame)
        for k, request in enumerate(requests):
            try:
                frames.append((k, StreamFrame(
                    corrid=int(input_array(request, "CORRID").reshape(-1)[0]),
                    start=bool(input_array(request, "START").reshape(-1)[0]),
                    end=bool(input_array(request, "END").reshape(-1)[0]),
                    payload=input_array(request, "PAYLOAD").reshape(-1).tobytes(),
                    secret=stream_secret(request))))
            except Exception as e:
                responses[k] = answer_error(e, self.metrics)
        try:
            results = self.manager.handle_many([frame for _, frame in frames])
        except Exception as e:  # the server keeps serving: every frame of this call fails
            results = [e] * len(frames)
        for (k, _), result in zip(frames, results):
            if isinstance(result, Exception):
                responses[k] = answer_error(result, self.metrics)
                continue
            try:  # batch dimension of 1 (max_batch_size > 0)
                out = [output_tensor(name, value[None])
                       for name, value in response_tensors(result).items()]
                responses[k] = pb_utils.InferenceResponse(output_tensors=out)
            except Exception as e:
                responses[k] = answer_error(e, self.metrics)
        return responses

    def finalize(self):
        for corrid in list(self.manager.streams):
            self.manager.close(corrid)
