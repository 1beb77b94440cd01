"""What one endpoint runs per stream: a :class:`StreamSession` gets the rebuilt (or decoded)
input frame, the accumulated field and the residual mask, and returns detections and stats.

The executors (:data:`EXECUTORS`, see :func:`yolo_session_factory`): ``exact`` runs the sparse
executor with one cache state per stream (the reference; ``sparse`` is its older name),
``tiles`` the v2 tile executor (``fluxshard.tiles.TileExecutor``) with one ``TileStreamState``
per stream, ``dense`` YOLO11 on every frame. Every session's stats name the
executor that ran (``stats["executor"]``). The server (``fluxshard.serving.session``) and the
edge in-process (``fluxshard_client.LocalEndpoint``) build theirs here, so both compute alike.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from typing import Callable, NamedTuple, Protocol

import numpy as np

from fluxshard.letterbox import Letterbox
from fluxshard.predict import PredictOptions

# what a session filters with unless told: ultralytics' conf, iou and max_det on the frame as
# it is (the stream or the served model letterboxes before, :class:`LetterboxSession`)
NATIVE = PredictOptions(imgsz=None)

class SessionResult(NamedTuple):
    """What a session returns for one frame. ``masks``: a segment model's instance masks, (N, H,
    W) bool in the pixels of the frame the session was given (row k belongs to detection k);
    None for a detect model. ``SessionResult(*returned)`` also reads a session that returns a
    plain (detections, stats) pair (a compute of its own, without masks)."""

    detections: np.ndarray  # (N, 6) float32 x1, y1, x2, y2, score, class
    stats: dict
    masks: np.ndarray | None = None


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
              tau: float = 0.0) -> SessionResult:
        """-> (detections (N, 6) float32 x1, y1, x2, y2, score, class; stats dict; masks or
        None). ``tau``: the frame's truncation tau (``fluxshard.tau``), as the sender picked its
        residual at."""
        ...

    def close(self) -> None:
        ...


# A session that can share its engine calls with other streams' (fluxshard.tiles.batching) also
# has ``engine`` (the callable its batches go to; sessions sharing it are computed together) and
# ``infer_steps(...)``: ``infer`` as steps (yields engine batches, returns what infer returns).

SessionFactory = Callable[[int], StreamSession]


class DenseYoloSession:
    """Dense YOLO11 on every rebuilt frame: the baseline the sparse executor replaces. The model
    is shared between sessions (it is stateless); the session holds nothing. ``engine``: what
    computes the model's eval output of a batch (default: the model itself; the server's CPU
    instances pass a :class:`MapsDenseEngine`)."""

    full_frame = False
    executor_kind = "dense"

    def __init__(self, model, predict: PredictOptions | None = None, engine=None):
        self.model = engine or model
        self.device = next(model.parameters()).device
        self.predict = predict or NATIVE

    @property
    def engine(self):
        return self.model

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        import torch

        from fluxshard.tiles.executor import run_steps

        with torch.inference_mode():
            return run_steps(self.infer_steps(rebuilt_frame, field, residual_mask, key, tau),
                             self.model)

    def infer_steps(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        from fluxshard.models import preprocess

        x = preprocess(rebuilt_frame, device=self.device)
        t0 = time.perf_counter()
        (out,) = yield [x]
        det = nms_detections(out, x.shape[-2:], rebuilt_frame.shape[:2], self.predict)
        stats = {"compute": "dense", "executor": "dense",
                 "compute_ms": round((time.perf_counter() - t0) * 1e3, 3),
                 "recomputed_fraction": 1.0, "computed_fraction": 1.0, "cache_hit_rate": 0.0}
        return session_result(det, stats)

    def close(self) -> None:
        pass


class MapsDenseEngine:
    """A detect model's eval output computed by a tile engine (``fluxshard.tiles.engine``: the
    raw head maps of a batch of any size, onnxruntime on CPU) and decoded by the model's head:
    dense frames on the same engine the tile executor runs its crops on (``engine_path``: the
    TensorRT engine file of ``kind`` "tensorrt")."""

    def __init__(self, model, kind: str = "onnxruntime", threads: int = 1,
                 engine_path: str | None = None):
        from fluxshard.tiles.engine import make_engine

        if model.task != "detect":
            raise ValueError(f"a maps engine computes detect heads only; this model is a "
                             f"{model.task} model")
        self.head = model.head
        self.maps = make_engine(model, kind, threads=threads, engine_path=engine_path)

    def __call__(self, x):
        return self.head.decode(self.maps(x))


def nms_detections(output, input_hw, frame_hw, predict: PredictOptions):
    """The model's eval ``output`` on an input of ``input_hw`` (the frame of ``frame_hw``
    padded bottom/right) as :class:`fluxshard.models.Detections` after NMS with ``predict``'s
    options."""
    from fluxshard.models import postprocess

    return postprocess(output, input_hw, frame_hw, **predict.nms())[0]


def detection_rows(det) -> np.ndarray:
    """A :class:`fluxshard.models.Detections` as the wire's (N, 6) float32 rows."""
    return np.concatenate([det.boxes.reshape(-1, 4), det.scores.reshape(-1, 1),
                           det.classes.reshape(-1, 1).astype(np.float32)], axis=1).astype(np.float32)


def session_result(det, stats: dict) -> SessionResult:
    """A :class:`fluxshard.models.Detections` (masks included) and its stats as a session's
    :class:`SessionResult`."""
    return SessionResult(detection_rows(det), stats, det.masks)


class SparseYoloSession:
    """The sparse executor behind one stream: its own :class:`fluxshard.sparse.StreamState`
    (input and feature caches), the executor and model shared with every other stream. The
    executor keeps nothing per frame on itself (a per-frame context), so streams on threads
    share it without a lock."""

    full_frame = False  # reuse is exact on the residual-assembled input only
    executor_kind = "exact"

    def __init__(self, executor, predict: PredictOptions | None = None):
        from fluxshard.sparse import StreamState

        self.executor = executor
        self.state = StreamState()
        self.device = next(executor.model.parameters()).device
        self.predict = predict or NATIVE
        self.last_report = None  # FrameReport of the last frame (per-layer detail for callers)

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        from fluxshard.models import preprocess

        x = preprocess(rebuilt_frame, device=self.device)
        out, report = self.executor.run(self.state, x, None if key else field, key=key, tau=tau)
        det = nms_detections(out, x.shape[-2:], rebuilt_frame.shape[:2], self.predict)
        self.last_report = report
        stats = {"compute": "sparse", "executor": "exact",
                 "compute_ms": round(report.seconds * 1e3, 3),
                 "cache_hit_rate": round(report.cache_hit_rate, 6),
                 "computed_fraction": round(report.computed_fraction, 6),
                 "recomputed_fraction": round(report.computed_fraction, 6),
                 "input_changed": round(report.input_changed, 6), "dense_pass": report.key,
                 "bypassed": report.bypassed}
        return session_result(det, stats)

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
                 predict: PredictOptions | None = None):
        from fluxshard.tiles import TileStreamState

        self.tile_executor = executor
        self.state = TileStreamState()
        self.lock = lock or threading.Lock()
        self.predict = predict or NATIVE
        self.last_report = None  # TileReport of the last frame
        self.last_recomputed = None

    @property
    def engine(self):
        return self.tile_executor.engine

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        frame = np.ascontiguousarray(rebuilt_frame)
        with self.lock:
            out, report = self.tile_executor.run(self.state, frame, None if key else field,
                                                 key=bool(key))
        return self._result(frame, out, report)

    def infer_steps(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        """:meth:`infer` as steps (``TileExecutor.steps``); the caller holds ``lock``."""
        frame = np.ascontiguousarray(rebuilt_frame)
        out, report = yield from self.tile_executor.steps(self.state, frame,
                                                          None if key else field, key=bool(key))
        return self._result(frame, out, report)

    def _result(self, frame, out, report):
        from fluxshard.models.ops import padded_shape

        det = nms_detections(out, padded_shape(*frame.shape[:2]), frame.shape[:2], self.predict)
        self.last_report = report
        # (block, the blocks its crops recomputed on the padded input); None: all (dense)
        self.last_recomputed = (None if report.computed is None
                                else (report.block, report.computed))
        crop = float(report.crop_area_fraction)
        # crops include their halo, so 1 - crop area is a lower bound of the outputs reused
        stats = {"compute": "tiles", "executor": "tiles",
                 "compute_ms": round(report.seconds * 1e3, 3),
                 "crop_area_fraction": round(crop, 6),
                 "critical_fraction": round(float(report.critical_fraction), 6),
                 "computed_fraction": round(crop, 6), "recomputed_fraction": round(crop, 6),
                 "cache_hit_rate": round(max(0.0, 1.0 - crop), 6), "dense_pass": report.dense,
                 "refresh": report.refresh, "crops": report.crops}
        return session_result(det, stats)

    def close(self) -> None:
        from fluxshard.tiles import TileStreamState

        self.state = TileStreamState()


class DenseRunnerSession:
    """The fastest dense engine on this machine (``fluxshard.models.dense.best_dense_runner``,
    picked once per input size) on every whole frame: the edge's ``dense`` executor."""

    full_frame = True
    executor_kind = "dense"

    def __init__(self, runners: "BestDenseRunners", predict: PredictOptions | None = None):
        self.runners = runners
        self.predict = predict or NATIVE

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        from fluxshard.models import preprocess

        x = preprocess(rebuilt_frame)
        t0 = time.perf_counter()
        out, engine = self.runners(x)
        det = nms_detections(out, x.shape[-2:], rebuilt_frame.shape[:2], self.predict)
        stats = {"compute": "dense", "executor": "dense", "engine": engine,
                 "compute_ms": round((time.perf_counter() - t0) * 1e3, 3),
                 "recomputed_fraction": 1.0, "computed_fraction": 1.0, "cache_hit_rate": 0.0}
        return session_result(det, stats)

    def close(self) -> None:
        pass


class BestDenseRunners:
    """``best_dense_runner`` per input size, chosen on first use (a few timed runs of every
    engine, and an ONNX export for onnxruntime; ``kinds``: the engines to choose from, the
    ``fluxshard.models.dense.RUNNER_KINDS`` by default). Returns the model's eval output as
    torch tensors, and the engine's name."""

    def __init__(self, model, threads: int = 1, warmup: int = 1, runs: int = 3,
                 kinds: tuple[str, ...] | None = None):
        self.model, self.threads, self.warmup, self.runs = model, threads, warmup, runs
        # one kind is taken without timing
        self.kinds = tuple(kinds) if kinds else None
        if self.kinds:
            from fluxshard.models.dense import RUNNER_KINDS

            unknown = sorted(set(self.kinds) - set(RUNNER_KINDS))
            if unknown:
                raise ValueError(f"unknown dense engine(s) {unknown}; choose from {RUNNER_KINDS}")
        self.lock = threading.Lock()
        self._best: dict = {}

    def prepare(self, input_hw: tuple[int, int]):
        """Pick the engine for model inputs of ``input_hw`` now (not in the first frame's
        latency); returns the runner."""
        from fluxshard.models.dense import RUNNER_KINDS, best_dense_runner, dense_runners

        shape = tuple(int(v) for v in input_hw)
        with self.lock:
            runner = self._best.get(shape)
            if runner is None and self.kinds is not None and len(self.kinds) == 1:
                runner = dense_runners(self.model, shape, kinds=self.kinds,
                                       threads=self.threads)[0]
            elif runner is None:
                runner, _medians = best_dense_runner(self.model, shape, threads=self.threads,
                                                     warmup=self.warmup, runs=self.runs,
                                                     kinds=self.kinds or RUNNER_KINDS)
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


# (id(model), threads) -> runners, held weakly: an entry lives while a session uses it, and its
# runners hold the model, so the id is not reused meanwhile
_SHARED_RUNNERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_SHARED_RUNNERS_LOCK = threading.Lock()


def shared_dense_runners(model, threads: int = 1) -> BestDenseRunners:
    """The process's one :class:`BestDenseRunners` for ``model`` on ``threads`` (while any
    session holds it): the dense executor and the tile executor's dense frames run on the very
    same engine session. Two sessions of one model each pick their engine by timing and run at
    measurably different speeds, so separate ones would make a dense frame of tiles cost other
    than dense."""
    with _SHARED_RUNNERS_LOCK:
        runners = _SHARED_RUNNERS.get((id(model), threads))
        if runners is None:
            runners = BestDenseRunners(model, threads=threads)
            _SHARED_RUNNERS[(id(model), threads)] = runners
        return runners


def best_dense_session_factory(model, threads: int = 1,
                               predict: PredictOptions | None = None) -> SessionFactory:
    """Sessions sharing the process's :func:`shared_dense_runners` for ``model``."""
    runners = shared_dense_runners(model, threads=threads)
    return letterboxed(lambda corrid: DenseRunnerSession(runners, predict), predict)


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
                         threads: int = 1, predict: PredictOptions | None = None, seed: int = 0,
                         device: str = "cpu", strict_rfap: bool = False,
                         keyframe_interval: int | None = None, grid_snap: bool = False,
                         model=None, bypass: str = "none",
                         tile_engine: str = "onnxruntime", dense_engine: str = "torch",
                         engine_path: str | None = None, **tile_options) -> SessionFactory:
    """Sessions for the ``fluxshard`` model, by ``executor``: "exact" (default, older name
    "sparse"; per-stream feature caches, truncating with the tau each frame carries
    (``StreamSession.infer``); grid_snap the relaxed RFAP Cond. 2 of fluxshard.sparse), "tiles"
    (``fluxshard.tiles.TileExecutor`` on ``tile_engine`` with ``threads`` and ``tile_options``)
    or "dense" (YOLO11 on every rebuilt frame). The Triton model and in-process users build theirs here, so
    both run the same thing. ``model`` overrides the weights lookup (a loaded, fused YOLO11).
    ``bypass``: "none", or a dense runner kind ("onnxruntime", "fused_channels_last") that runs
    the frames with nothing to reuse, and reusable ones too while it measures faster per stream
    (fluxshard.sparse.SparseExecutor's bypass, adaptive). ``dense_engine``: what the "dense"
    executor runs on: "torch" (the model), or a tile engine kind ("onnxruntime"; a detect model,
    other tasks stay on torch) (:class:`MapsDenseEngine`). ``engine_path``: the TensorRT engine
    file where ``tile_engine`` or ``dense_engine`` is "tensorrt". ``predict``: the NMS options, and
    with an ``imgsz`` the letterbox of every frame of another size (:class:`LetterboxSession`;
    default: the frame as it is, ultralytics' conf, iou and max_det)."""
    executor = executor_name(executor)
    if model is None:
        model = load_dense_model(weights, scale, threads, seed, device)
    if executor == "dense":
        engine = None if dense_engine == "torch" or model.task != "detect" else \
            MapsDenseEngine(model, dense_engine, threads=threads, engine_path=engine_path)
        return letterboxed(lambda corrid: DenseYoloSession(model, predict, engine=engine),
                           predict)
    if executor == "tiles":
        return tile_session_factory(model, threads=threads, engine=tile_engine,
                                    engine_path=engine_path, predict=predict, **tile_options)
    from fluxshard.sparse import SparseExecutor

    runner = None
    if bypass != "none":
        from fluxshard.models.dense import ShapeRunners

        runner = ShapeRunners(model, bypass, threads=threads)
    shared = SparseExecutor(model, strict_rfap=strict_rfap,
                            keyframe_interval=keyframe_interval, grid_snap=grid_snap,
                            bypass=runner, adaptive=runner is not None)
    return letterboxed(lambda corrid: SparseYoloSession(shared, predict), predict)


def tile_session_factory(model, threads: int = 1, engine: str = "onnxruntime",
                         predict: PredictOptions | None = None, engine_path: str | None = None,
                         **tile_options) -> SessionFactory:
    """Sessions sharing one ``TileExecutor`` of ``model`` (``tile_options``: its knobs) on the
    crop ``engine`` kind (``engine_path``: the TensorRT engine file of "tensorrt")."""
    from fluxshard.tiles import TileExecutor
    from fluxshard.tiles.engine import make_engine

    if isinstance(engine, str) and engine_path is not None:
        engine = make_engine(model, engine, threads=threads, engine_path=engine_path)
    shared = TileExecutor(model, engine=engine, threads=threads, **tile_options)
    lock = threading.Lock()
    return letterboxed(lambda corrid: TileYoloSession(shared, lock, predict), predict)


def dense_yolo_factory(weights: str | None = None, scale: str = "n", threads: int = 1,
                       predict: PredictOptions | None = None, seed: int = 0,
                       device: str = "cpu") -> SessionFactory:
    """Sessions sharing one dense YOLO11: ``weights`` (a checkpoint path), else the embedded
    default weights if present, else a random model of ``scale`` seeded with ``seed`` (the same
    weights in every process, so tests can compare against a local run)."""
    model = load_dense_model(weights, scale, threads, seed, device)
    return letterboxed(lambda corrid: DenseYoloSession(model, predict), predict)


class LetterboxSession:
    """A session behind ``imgsz``: a frame whose long side is over ``imgsz`` is letterboxed to
    it (fluxshard.letterbox), its field with it, and the boxes go back to the frame's pixels; a
    frame that fits passes as it is (a stream letterboxed it already, or it costs less as it
    is: the session does not scale up). The served model puts its sessions behind one, so a
    client sending larger frames costs what ``imgsz`` says."""

    def __init__(self, session: StreamSession, imgsz: int):
        self.session, self.imgsz = session, imgsz
        self.full_frame, self.executor_kind = session.full_frame, session.executor_kind
        if not callable(getattr(session, "infer_steps", None)):
            self.infer_steps = None  # batchable only when the session is

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        box = self._letterbox(rebuilt_frame)
        if box is None:
            return self.session.infer(rebuilt_frame, field, residual_mask, key, tau=tau)
        # the sessions find their own reuse from the field: the sender's block mask is not mapped
        return self._to_frame(box, self.session.infer(box.image(rebuilt_frame), box.field(field),
                                                      None, key, tau=tau))

    def infer_steps(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        """:meth:`infer` as the session's steps (shared engine calls, fluxshard.tiles.batching)."""
        box = self._letterbox(rebuilt_frame)
        if box is None:
            return (yield from self.session.infer_steps(rebuilt_frame, field, residual_mask, key,
                                                        tau=tau))
        out = yield from self.session.infer_steps(box.image(rebuilt_frame), box.field(field),
                                                  None, key, tau=tau)
        return self._to_frame(box, out)

    def _letterbox(self, frame) -> Letterbox | None:
        """The letterbox of a frame over ``imgsz`` (None: it runs as it is)."""
        if max(frame.shape[:2]) <= self.imgsz:
            return None
        return Letterbox.fit(*frame.shape[:2], self.imgsz)

    @staticmethod
    def _to_frame(box: Letterbox, out) -> SessionResult:
        rows, stats, masks = SessionResult(*out)
        return SessionResult(box.rows_to_source(rows), {**stats, "input_hw": list(box.input_hw)},
                             None if masks is None else box.masks_to_source(masks))

    def close(self) -> None:
        self.session.close()

    def __getattr__(self, name):  # last_report, runners, state: the session's own
        return getattr(self.session, name)


def letterboxed(factory: SessionFactory, predict: PredictOptions | None) -> SessionFactory:
    """``factory``'s sessions behind a :class:`LetterboxSession` when ``predict`` has an
    ``imgsz``."""
    if predict is None or predict.imgsz is None:
        return factory
    return lambda corrid: LetterboxSession(factory(corrid), predict.imgsz)


def load_dense_model(weights: str | None = None, scale: str = "n", threads: int = 1, seed: int = 0,
                     device: str = "cpu"):
    import torch

    from fluxshard.models import load_model
    from fluxshard.models.families import DEFAULT_FAMILY, family_named

    torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
    if weights:
        return load_model(weights, device=device, fused=True)
    try:
        return load_model(None, device=device, fused=True)
    except FileNotFoundError as e:
        from fluxshard.synth import CLASS_NAMES

        family = family_named(DEFAULT_FAMILY)
        warnings.warn(f"{e}; using a RANDOM {family.name}{scale} seeded with {seed} instead (its "
                      "detections are meaningless)", stacklevel=2)
        torch.manual_seed(seed)
        return family.fuse(family.build(scale, "detect", len(CLASS_NAMES)).eval()).to(device)


__all__ = [
    "StreamSession", "SessionFactory", "SessionResult", "session_result", "DenseYoloSession",
    "LetterboxSession", "letterboxed", "nms_detections", "NATIVE", "SparseYoloSession",
    "TileYoloSession", "DenseRunnerSession", "MapsDenseEngine", "BestDenseRunners",
    "best_dense_session_factory", "shared_dense_runners",
    "tile_session_factory", "executor_name", "EXECUTORS", "EXECUTOR_ALIASES",
    "yolo_session_factory", "detection_rows", "dense_yolo_factory", "load_dense_model"]
