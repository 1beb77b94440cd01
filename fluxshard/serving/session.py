"""Model-side session logic: per-stream state keyed by Triton's correlation id.

The Triton model (``model_repository/fluxshard/1/model.py``) is a thin adapter around
:class:`SessionManager`; everything here is plain Python so it can run in-process too.

The compute behind a stream is a :class:`StreamSession`: it gets the rebuilt input frame, the
(dequantized) accumulated field and the residual mask, and returns detections and stats. The
executors (:data:`EXECUTORS`, see :func:`yolo_session_factory`): ``exact`` runs the sparse
executor with one cache state per stream (the default of the ``fluxshard`` model; ``sparse`` is
its older name), ``tiles`` the v2 tile executor (``fluxshard.tiles.TileExecutor``) with one
``TileStreamState`` per stream, ``dense`` YOLO11 on every frame. Every session's stats name the
executor that ran (``stats["executor"]``).
"""

from __future__ import annotations

import hmac
import threading
import time
import warnings
from dataclasses import dataclass, field as dataclass_field
from typing import Callable, Protocol

import numpy as np

from fluxshard.wire import PayloadError, Request, Response, decode_request, peek_header
from fluxshard.serving.limits import FrameLimits, release_memory
from fluxshard.receive import ReceiveState, ResyncNeeded


class StreamSession(Protocol):
    """Per-stream compute. ``infer`` is called once per applied frame, in order.

    ``full_frame``: an in-process caller (``fluxshard_client.LocalEndpoint``) passes this session
    the whole decoded frame instead of the residual-assembled input (the tile and dense
    executors find their own changes; only the exact executor's reuse relies on assembled
    inputs)."""

    full_frame: bool
    executor_kind: str  # "exact", "tiles" or "dense" (EXECUTORS)

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

    full_frame = False
    executor_kind = "dense"

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
        stats = {"compute": "dense", "executor": "dense",
                 "compute_ms": round((time.perf_counter() - t0) * 1e3, 3),
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

    full_frame = False  # reuse is exact on the residual-assembled input only
    executor_kind = "exact"

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
        stats = {"compute": "sparse", "executor": "exact",
                 "compute_ms": round(report.seconds * 1e3, 3),
                 "cache_hit_rate": round(report.cache_hit_rate, 6),
                 "computed_fraction": round(report.computed_fraction, 6),
                 "recomputed_fraction": round(report.computed_fraction, 6),
                 "input_changed": round(report.input_changed, 6), "dense_pass": report.key,
                 "bypassed": report.bypassed}
        return rows, stats

    def close(self) -> None:
        self.state.reset()


class TileYoloSession:
    """The tile executor (``fluxshard.tiles.TileExecutor``) behind one stream: its own
    ``TileStreamState`` (warped head-map cache, block ages), the executor shared with every other
    stream (serialized on ``lock``, like :class:`SparseYoloSession`).

    It runs on whatever frame it is given: the decoded frame in process (``full_frame``), the
    rebuilt input in the server. ``field`` must be the motion since the frame this stream last
    ran on (the dispatch state's accumulated field); a key frame resets the state with a dense
    pass. ``tau`` only picked the residual blocks the sender sent: the executor finds its own
    critical blocks with its threshold."""

    full_frame = True
    executor_kind = "tiles"

    def __init__(self, executor, lock: threading.Lock | None = None,
                 conf_threshold: float = 0.25, iou_threshold: float = 0.45):
        from fluxshard.tiles import TileStreamState

        self.tile_executor = executor
        self.state = TileStreamState()
        self.lock = lock or threading.Lock()
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.last_report = None  # TileReport of the last frame

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        from fluxshard.models import postprocess
        from fluxshard.models.ops import padded_shape

        frame = np.ascontiguousarray(rebuilt_frame)
        with self.lock:
            out, report = self.tile_executor.run(self.state, frame, None if key else field,
                                                 key=bool(key))
        rows = detection_rows(postprocess(out, padded_shape(*frame.shape[:2]), frame.shape[:2],
                                          conf_thres=self.conf_threshold,
                                          iou_thres=self.iou_threshold)[0])
        self.last_report = report
        crop = float(report.crop_area_fraction)
        # crops include their halo, so 1 - crop area is a lower bound of the outputs reused
        stats = {"compute": "tiles", "executor": "tiles",
                 "compute_ms": round(report.seconds * 1e3, 3),
                 "crop_area_fraction": round(crop, 6),
                 "critical_fraction": round(float(report.critical_fraction), 6),
                 "computed_fraction": round(crop, 6), "recomputed_fraction": round(crop, 6),
                 "cache_hit_rate": round(max(0.0, 1.0 - crop), 6), "dense_pass": report.dense,
                 "refresh": report.refresh, "crops": report.crops}
        return rows, stats

    def close(self) -> None:
        from fluxshard.tiles import TileStreamState

        self.state = TileStreamState()


class DenseRunnerSession:
    """The fastest dense engine on this machine (``fluxshard.models.dense.best_dense_runner``,
    picked once per input size) on every whole frame: the edge's ``dense`` executor."""

    full_frame = True
    executor_kind = "dense"

    def __init__(self, runners: "BestDenseRunners", conf_threshold: float = 0.25,
                 iou_threshold: float = 0.45):
        self.runners = runners
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        from fluxshard.models import postprocess, preprocess

        x = preprocess(rebuilt_frame)
        t0 = time.perf_counter()
        out, engine = self.runners(x)
        rows = detection_rows(postprocess(out, x.shape[-2:], rebuilt_frame.shape[:2],
                                          conf_thres=self.conf_threshold,
                                          iou_thres=self.iou_threshold)[0])
        stats = {"compute": "dense", "executor": "dense", "engine": engine,
                 "compute_ms": round((time.perf_counter() - t0) * 1e3, 3),
                 "recomputed_fraction": 1.0, "computed_fraction": 1.0, "cache_hit_rate": 0.0}
        return rows, stats

    def close(self) -> None:
        pass


class BestDenseRunners:
    """``best_dense_runner`` per input size, chosen on first use (a few timed runs of every
    engine, and an ONNX export for onnxruntime). Returns the model's eval output as torch
    tensors, and the engine's name."""

    def __init__(self, model, threads: int = 1, warmup: int = 1, runs: int = 3):
        self.model, self.threads, self.warmup, self.runs = model, threads, warmup, runs
        self.lock = threading.Lock()
        self._best: dict = {}

    def prepare(self, input_hw: tuple[int, int]):
        """Pick the engine for model inputs of ``input_hw`` now (not in the first frame's
        latency); returns the runner."""
        from fluxshard.models.dense import best_dense_runner

        shape = tuple(int(v) for v in input_hw)
        with self.lock:
            runner = self._best.get(shape)
            if runner is None:
                runner, _medians = best_dense_runner(self.model, shape, threads=self.threads,
                                                     warmup=self.warmup, runs=self.runs)
                self._best[shape] = runner
        return runner

    def __call__(self, x):
        import torch

        runner = self.prepare(x.shape[-2:])
        with self.lock:
            out = runner.run(x)
        if isinstance(out, (list, tuple)):  # onnxruntime: numpy outputs
            out = [torch.from_numpy(o) if isinstance(o, np.ndarray) else o for o in out]
            out = out[0] if len(out) == 1 else tuple(out)
        return out, runner.name

    @property
    def chosen(self) -> dict:
        """Input size -> the engine picked for it."""
        return {shape: r.name for shape, r in self._best.items()}


def best_dense_session_factory(model, threads: int = 1,
                               conf_threshold: float = 0.25) -> SessionFactory:
    """Sessions sharing one :class:`BestDenseRunners` for ``model``."""
    runners = BestDenseRunners(model, threads=threads)
    return lambda corrid: DenseRunnerSession(runners, conf_threshold=conf_threshold)


# executor -> what it is; "sparse" is the older name of "exact"
EXECUTORS = ("exact", "tiles", "dense")
EXECUTOR_ALIASES = {"sparse": "exact"}


def executor_name(name: str) -> str:
    """The executor ``name`` means (an older alias resolved); a clear error for anything else."""
    canonical = EXECUTOR_ALIASES.get(name, name)
    if canonical not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {name!r}")
    return canonical


def yolo_session_factory(executor: str = "exact", weights: str | None = None, scale: str = "n",
                         threads: int = 1, conf_threshold: float = 0.25, seed: int = 0,
                         device: str = "cpu", strict_rfap: bool = False,
                         keyframe_interval: int | None = None, grid_snap: bool = False,
                         model=None, bypass: str = "none",
                      tile_engine: str = "onnxruntime", **tile_options) -> SessionFactory:
    """Sessions for the ``fluxshard`` model, by ``executor``: "exact" (default, older name
    "sparse"; per-stream feature caches, truncating with the tau each frame carries
    (``StreamSession.infer``); grid_snap the relaxed RFAP Cond. 2 of fluxshard.sparse), "tiles"
    (``fluxshard.tiles.TileExecutor`` on ``tile_engine`` with ``threads`` and ``tile_options``,
    detect models only)
    or "dense" (YOLO11 on every rebuilt frame). The Triton model and in-process users build theirs here, so
    both run the same thing. ``model`` overrides the weights lookup (a loaded, fused YOLO11).
    ``bypass``: "none", or a dense runner kind ("onnxruntime", "fused_channels_last") that runs
    the frames with nothing to reuse, and reusable ones too while it measures faster per stream
    (fluxshard.sparse.SparseExecutor's bypass, adaptive)."""
    executor = executor_name(executor)
    if model is None:
        model = load_dense_model(weights, scale, threads, seed, device)
    if executor == "dense":
        return lambda corrid: DenseYoloSession(model, conf_threshold=conf_threshold)
    if executor == "tiles":
        return tile_session_factory(model, threads=threads, engine=tile_engine,
                                    conf_threshold=conf_threshold, **tile_options)
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


def tile_session_factory(model, threads: int = 1, engine: str = "onnxruntime",
                         conf_threshold: float = 0.25, **tile_options) -> SessionFactory:
    """Sessions sharing one ``TileExecutor`` of ``model`` (``tile_options``: its knobs)."""
    if model.task != "detect":
        raise ValueError(f"the tiles executor handles detect models only; this model is a "
                         f"{model.task} model (use the exact or dense executor)")
    from fluxshard.tiles import TileExecutor

    shared = TileExecutor(model, engine=engine, threads=threads, **tile_options)
    lock = threading.Lock()
    return lambda corrid: TileYoloSession(shared, lock, conf_threshold=conf_threshold)


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
    secret: str = ""  # fixed at START: every later frame, START and END must carry it
    receive: ReceiveState = dataclass_field(default_factory=ReceiveState)
    last_seen: float = 0.0
    frames: int = 0


class ServerFull(RuntimeError):
    """No room for another stream on this instance (``max_streams``); retry later."""


def unknown_stream(corrid: int) -> ResyncNeeded:
    """The one answer for a stream this server does not hold *and* for a secret that does not
    match one it holds: a stranger learns nothing about other streams from it."""
    return ResyncNeeded(f"unknown stream {corrid} (server restarted, stream timed out, or the "
                        "stream secret does not match)")


class SessionManager:
    """Per-stream sessions keyed by correlation id, each owned by the secret it started with.

    ``handle`` applies one request: START resets the stream (and must carry a key frame), END frees
    it (always: whatever the payload, once the secret matches), streams idle longer than
    ``idle_seconds`` are freed by :meth:`sweep` (Triton does not tell a python-backend model when a
    sequence times out). A stream's secret is fixed when it opens; a request with another secret
    gets exactly the unknown-stream answer (:func:`unknown_stream`), so it can neither read,
    reset nor end the stream. Frames over ``frame_limits`` are refused from their header, before
    any decoding. Errors the client can fix by sending a key frame raise :class:`ResyncNeeded`;
    malformed or oversized payloads raise ``PayloadError``; a full instance :class:`ServerFull`.
    """

    def __init__(self, session_factory: SessionFactory, idle_seconds: float = 60.0,
                 max_streams: int = 256, clock: Callable[[], float] = time.monotonic,
                 frame_limits: FrameLimits | None = None):
        self.session_factory = session_factory
        self.idle_seconds = idle_seconds
        self.max_streams = max_streams
        self.clock = clock
        self.frame_limits = frame_limits or FrameLimits()
        self.streams: dict[int, _Stream] = {}
        self._lock = threading.RLock()  # in-process users may call from several threads

    def handle(self, corrid: int, start: bool, end: bool, payload: bytes,
               secret: str = "") -> Response:
        t0 = time.perf_counter()
        try:
            if isinstance(payload, np.ndarray):
                payload = payload.tobytes()
            header = peek_header(payload)
            self.frame_limits.check(header["height"], header["width"])  # before any decode work
            request = decode_request(payload)
            with self._lock:
                return self._handle(corrid, start, end, request, t0, secret)
        finally:
            if end:  # END frees the session whatever became of the frame
                self.end(corrid, secret)

    def _handle(self, corrid: int, start: bool, end: bool, request: Request, t0: float,
                secret: str) -> Response:
        now = self.clock()
        self.sweep(now)
        stream = self.streams.get(corrid)
        # checked before the secret, so its answer does not depend on whether the stream exists
        if start and not request.key:
            raise ResyncNeeded(f"stream {corrid} started with a residual frame; the first frame of "
                               "a sequence must be a key frame")
        if stream is not None and not _same_secret(stream.secret, secret):
            raise unknown_stream(corrid)
        if start or (stream is None and request.key):
            # START resets; a key frame also re-opens a stream the server forgot (restart, sweep)
            if stream is not None:
                stream.session.close()
            elif len(self.streams) >= self.max_streams and not end:
                raise ServerFull(f"server full: this instance holds its limit of "
                                 f"{self.max_streams} streams (max_streams); retry later")
            stream = _Stream(self.session_factory(corrid), secret=secret)
            self.streams[corrid] = stream
        elif stream is None:
            raise unknown_stream(corrid)
        stream.last_seen = now
        rebuilt = stream.receive.apply(request)
        detections, compute_stats = stream.session.infer(rebuilt, request.field,
                                                         request.residual_mask, request.key,
                                                         tau=request.tau)
        stream.frames += 1
        grid = -(-np.array(request.shape) // request.block)
        stats = {"frame_index": request.frame_index, "key": request.key,
                 "wire_bytes": request.wire_bytes,
                 "residual_blocks": 0 if request.key else int(request.residual_mask.sum()),
                 "uplink_codec": request.codec.name.lower(),
                 "total_blocks": int(grid.prod()), "tau": request.tau,
                 "server_ms": round((time.perf_counter() - t0) * 1e3, 3), **compute_stats}
        return Response(detections=detections, digest=stream.receive.digest, stats=stats)

    def close(self, corrid: int) -> None:
        """Free a stream, whoever owns it (the server's own clean-up)."""
        with self._lock:
            stream = self.streams.pop(corrid, None)
        if stream is not None:
            stream.session.close()
            release_memory()

    def end(self, corrid: int, secret: str) -> bool:
        """Free a stream on its owner's END; whether one was freed."""
        with self._lock:
            stream = self.streams.get(corrid)
            if stream is None or not _same_secret(stream.secret, secret):
                return False
            del self.streams[corrid]
        stream.session.close()
        release_memory()
        return True

    def sweep(self, now: float | None = None) -> list[int]:
        """Free streams idle longer than ``idle_seconds``; returns their ids."""
        with self._lock:
            now = self.clock() if now is None else now
            stale = [c for c, s in self.streams.items() if now - s.last_seen > self.idle_seconds]
            for c in stale:
                self.streams.pop(c).session.close()
        if stale:
            release_memory()
        return stale


def _same_secret(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


__all__ = ["StreamSession", "SessionFactory", "DenseYoloSession", "SparseYoloSession",
           "TileYoloSession", "DenseRunnerSession", "BestDenseRunners",
           "best_dense_session_factory", "tile_session_factory", "executor_name",
           "EXECUTORS", "EXECUTOR_ALIASES", "yolo_session_factory", "detection_rows",
           "dense_yolo_factory", "load_dense_model", "SessionManager", "ResyncNeeded", "PayloadError",
           "ServerFull", "unknown_stream"]
