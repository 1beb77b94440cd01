"""Model-side session logic: per-stream state keyed by Triton's correlation id.

The Triton model (``model_repository/fluxshard/1/model.py``) is a thin adapter around
:class:`SessionManager`; everything here is plain Python so it can run in-process too.

The compute behind a stream is a :class:`StreamSession`: it gets the rebuilt input frame, the
(dequantized) accumulated field and the residual mask, and returns detections and stats. The dense
YOLO11 session recomputes every frame; the sparse session runs the sparse executor with one
cache state per stream (the default of the ``fluxshard`` model, see :func:`yolo_session_factory`).
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field as dataclass_field
from typing import Callable, Protocol

import numpy as np

from fluxshard.wire import PayloadError, Request, Response, decode_request
from fluxshard.serving.receive import ReceiveState, ResyncNeeded


class StreamSession(Protocol):
    """Per-stream compute. ``infer`` is called once per applied frame, in order."""

    def infer(self, rebuilt_frame: np.ndarray, field: np.ndarray | None,
              residual_mask: np.ndarray | None, key: bool,
              tau: float = 0.0) -> tuple[np.ndarray, dict]:
        """-> (detections (N, 6) float32 x1, y1, x2, y2, score, class; stats dict). ``tau``:
        the frame's truncation tau (``fluxshard.tau``), as the sender picked its residual at."""
        ...

    def close(self) -> None:
        ...


SessionFactory = Callable[[int], StreamSession]


class DenseYoloSession:
    """Dense YOLO11 on every rebuilt frame: the baseline the sparse executor replaces. The model
    is shared between sessions (it is stateless); the session holds nothing."""

    def __init__(self, model, conf_threshold: float = 0.25, iou_threshold: float = 0.45):
        self.model = model
        self.device = next(model.parameters()).device
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        import torch

        from fluxshard.models import postprocess, preprocess

        x = preprocess(rebuilt_frame, device=self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model(x)
        rows = detection_rows(postprocess(out, x.shape[-2:], rebuilt_frame.shape[:2],
                                          conf_thres=self.conf_threshold,
                                          iou_thres=self.iou_threshold)[0])
        stats = {"compute": "dense", "compute_ms": round((time.perf_counter() - t0) * 1e3, 3),
                 "recomputed_fraction": 1.0, "computed_fraction": 1.0, "cache_hit_rate": 0.0}
        return rows, stats

    def close(self) -> None:
        pass


def detection_rows(det) -> np.ndarray:
    """A :class:`fluxshard.models.Detections` as the wire's (N, 6) float32 rows."""
    return np.concatenate([det.boxes.reshape(-1, 4), det.scores.reshape(-1, 1),
                           det.classes.reshape(-1, 1).astype(np.float32)], axis=1).astype(np.float32)


class SparseYoloSession:
    """The sparse executor behind one stream: its own :class:`fluxshard.sparse.StreamState`
    (input and feature caches), the executor and model shared with every other stream.

    The executor keeps per-frame scratch state while it runs, so sessions sharing it serialize on
    ``lock`` (Triton's python backend calls one request at a time anyway; in-process users may
    not)."""

    def __init__(self, executor, lock: threading.Lock | None = None,
                 conf_threshold: float = 0.25, iou_threshold: float = 0.45):
        from fluxshard.sparse import StreamState

        self.executor = executor
        self.state = StreamState()
        self.lock = lock or threading.Lock()
        self.device = next(executor.model.parameters()).device
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.last_report = None  # FrameReport of the last frame (per-layer detail for callers)

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        from fluxshard.models import postprocess, preprocess

        x = preprocess(rebuilt_frame, device=self.device)
        with self.lock:
            out, report = self.executor.run(self.state, x, None if key else field, key=key,
                                            tau=tau)
        rows = detection_rows(postprocess(out, x.shape[-2:], rebuilt_frame.shape[:2],
                                          conf_thres=self.conf_threshold,
                                          iou_thres=self.iou_threshold)[0])
        self.last_report = report
        stats = {"compute": "sparse", "compute_ms": round(report.seconds * 1e3, 3),
                 "cache_hit_rate": round(report.cache_hit_rate, 6),
                 "computed_fraction": round(report.computed_fraction, 6),
                 "recomputed_fraction": round(report.computed_fraction, 6),
                 "input_changed": round(report.input_changed, 6), "dense_pass": report.key,
                 "bypassed": report.bypassed}
        return rows, stats

    def close(self) -> None:
        self.state.reset()


EXECUTORS = ("sparse", "dense")


def yolo_session_factory(executor: str = "sparse", weights: str | None = None, scale: str = "n",
                         threads: int = 1, conf_threshold: float = 0.25, seed: int = 0,
                         device: str = "cpu", strict_rfap: bool = False,
                         keyframe_interval: int | None = None, grid_snap: bool = False,
                         model=None, bypass: str = "none") -> SessionFactory:
    """Sessions for the ``fluxshard`` model, by ``executor``: "sparse" (default; per-stream feature
    caches, truncating with the tau each frame carries (``StreamSession.infer``); grid_snap the
    relaxed RFAP Cond. 2 of fluxshard.sparse) or "dense"
    (YOLO11 on every rebuilt frame). The Triton model and in-process users build theirs here, so
    both run the same thing. ``model`` overrides the weights lookup (a loaded, fused YOLO11).
    ``bypass``: "none", or a dense runner kind ("onnxruntime", "fused_channels_last") that runs
    the frames with nothing to reuse, and reusable ones too while it measures faster per stream
    (fluxshard.sparse.SparseExecutor's bypass, adaptive)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if model is None:
        model = load_dense_model(weights, scale, threads, seed, device)
    if executor == "dense":
        return lambda corrid: DenseYoloSession(model, conf_threshold=conf_threshold)
    from fluxshard.sparse import SparseExecutor

    runner = None
    if bypass != "none":
        from fluxshard.models.dense import ShapeRunners

        runner = ShapeRunners(model, bypass, threads=threads)
    shared = SparseExecutor(model, strict_rfap=strict_rfap,
                            keyframe_interval=keyframe_interval, grid_snap=grid_snap,
                            bypass=runner, adaptive=runner is not None)
    lock = threading.Lock()
    return lambda corrid: SparseYoloSession(shared, lock, conf_threshold=conf_threshold)


def dense_yolo_factory(weights: str | None = None, scale: str = "n", threads: int = 1,
                       conf_threshold: float = 0.25, seed: int = 0,
                       device: str = "cpu") -> SessionFactory:
    """Sessions sharing one dense YOLO11: ``weights`` (a checkpoint path), else the embedded
    default weights if present, else a random model of ``scale`` seeded with ``seed`` (the same
    weights in every process, so tests can compare against a local run)."""
    model = load_dense_model(weights, scale, threads, seed, device)
    return lambda corrid: DenseYoloSession(model, conf_threshold=conf_threshold)


def load_dense_model(weights: str | None = None, scale: str = "n", threads: int = 1, seed: int = 0,
                     device: str = "cpu"):
    import torch

    from fluxshard.models import build_yolo11, fuse, load_model

    torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
    if weights:
        return load_model(weights, device=device, fused=True)
    try:
        return load_model(None, device=device, fused=True)
    except FileNotFoundError as e:
        from fluxshard.synth import CLASS_NAMES

        warnings.warn(f"{e}; using a RANDOM YOLO11{scale} seeded with {seed} instead (its "
                      "detections are meaningless)", stacklevel=2)
        torch.manual_seed(seed)
        return fuse(build_yolo11(scale, "detect", len(CLASS_NAMES)).eval()).to(device)


@dataclass
class _Stream:
    session: StreamSession
    receive: ReceiveState = dataclass_field(default_factory=ReceiveState)
    last_seen: float = 0.0
    frames: int = 0


class SessionManager:
    """Per-stream sessions keyed by correlation id.

    ``handle`` applies one request: START resets the stream (and must carry a key frame), END frees
    it after answering, streams idle longer than ``idle_seconds`` are freed by :meth:`sweep` (Triton
    does not tell a python-backend model when a sequence times out). Errors the client can fix by
    sending a key frame raise :class:`ResyncNeeded`; malformed payloads raise ``PayloadError``.
    """

    def __init__(self, session_factory: SessionFactory, idle_seconds: float = 60.0,
                 max_streams: int = 256, clock: Callable[[], float] = time.monotonic):
        self.session_factory = session_factory
        self.idle_seconds = idle_seconds
        self.max_streams = max_streams
        self.clock = clock
        self.streams: dict[int, _Stream] = {}
        self._lock = threading.RLock()  # in-process users may call from several threads

    def handle(self, corrid: int, start: bool, end: bool, payload: bytes) -> Response:
        t0 = time.perf_counter()
        request = decode_request(payload)
        with self._lock:
            return self._handle(corrid, start, end, request, t0)

    def _handle(self, corrid: int, start: bool, end: bool, request: Request, t0: float) -> Response:
        now = self.clock()
        self.sweep(now)
        stream = self.streams.get(corrid)
        if start and not request.key:
            raise ResyncNeeded(f"stream {corrid} started with a residual frame; the first frame of "
                               "a sequence must be a key frame")
        if start or (stream is None and request.key):
            # START resets; a key frame also re-opens a stream the server forgot (restart, sweep)
            if stream is not None:
                stream.session.close()
            elif len(self.streams) >= self.max_streams:
                raise RuntimeError(f"too many open streams ({self.max_streams}); end some first")
            stream = _Stream(self.session_factory(corrid))
            self.streams[corrid] = stream
        elif stream is None:
            raise ResyncNeeded(f"unknown stream {corrid} (server restarted or stream timed out)")
        stream.last_seen = now
        try:
            rebuilt = stream.receive.apply(request)
            detections, compute_stats = stream.session.infer(rebuilt, request.field,
                                                             request.residual_mask, request.key,
                                                             tau=request.tau)
        finally:
            if end:
                self.close(corrid)
        stream.frames += 1
        grid = -(-np.array(request.shape) // request.block)
        stats = {"frame_index": request.frame_index, "key": request.key,
                 "wire_bytes": request.wire_bytes,
                 "residual_blocks": 0 if request.key else int(request.residual_mask.sum()),
                 "total_blocks": int(grid.prod()), "tau": request.tau,
                 "server_ms": round((time.perf_counter() - t0) * 1e3, 3), **compute_stats}
        return Response(detections=detections, digest=stream.receive.digest, stats=stats)

    def close(self, corrid: int) -> None:
        with self._lock:
            stream = self.streams.pop(corrid, None)
        if stream is not None:
            stream.session.close()

    def sweep(self, now: float | None = None) -> list[int]:
        """Free streams idle longer than ``idle_seconds``; returns their ids."""
        with self._lock:
            now = self.clock() if now is None else now
            stale = [c for c, s in self.streams.items() if now - s.last_seen > self.idle_seconds]
            for c in stale:
                self.streams.pop(c).session.close()
            return stale


__all__ = ["StreamSession", "SessionFactory", "DenseYoloSession", "SparseYoloSession",
           "EXECUTORS", "yolo_session_factory", "detection_rows", "dense_yolo_factory",
           "load_dense_model", "SessionManager", "ResyncNeeded", "PayloadError"]
