"""The edge process behind `fluxshard run` (fluxshard.tools.run): :func:`run` decodes the stream
with its motion fields, dispatches every frame to the in-process edge executor or the Triton
`fluxshard` model (cloud), and writes detections.jsonl, annotated.mp4, report.png and
summary.json. On a live source (a URL, or a file played in a loop) memory stays bounded and the
annotated video and the report are opt-in (docs/metrics.md); ``--metrics-port`` serves its
Prometheus metrics (edge_runtime/metrics.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

DEMO_SIZE = (640, 384)
DEMO_FRAMES = 90  # 3 s at 30 fps
# what report.png plots: the last frames of a long stream, every frame of a shorter clip
REPORT_FRAMES = 18_000  # 10 min at 30 fps
MAX_CLOUD_EVENTS = 100  # the summary's latest cloud losses and recoveries


UPLINK_CODECS = ("h264", "lossless", "jpeg")  # fluxshard.wire.Codec.H264 / .ZLIB / .JPEG
UPLINK_WIRE_CODECS = {"h264": "H264", "lossless": "ZLIB", "jpeg": "JPEG"}
EDGE_EXECUTORS = ("exact", "tiles", "dense")  # fluxshard.sessions.EXECUTORS
DEFAULT_EXECUTOR = "tiles"  # what the edge runs on a detect or seg model unless --executor says


def default_executor(model) -> str:
    """What the edge runs when --executor is not given: ``DEFAULT_EXECUTOR`` (the tile executor,
    the fastest on every clip of perf/bench_real.py) on a detect or seg model; dense otherwise.
    ``exact`` stays the reference and the TensorRT plugin path, asked for by name."""
    return DEFAULT_EXECUTOR if model.task in ("detect", "segment") else "dense"


@contextlib.contextmanager
def _cloud(cloud_url: str | None, dispatch: str, out: Path, weights=None,
           executor: str | None = None, predict=None):
    """Yields the cloud's gRPC URL (None: edge only): --cloud-url, or a local tritonserver
    (``executor``: its fluxshard model's, None: the config's; ``predict``: its predict options,
    None: the config's)."""
    if dispatch == "edge":
        yield None
        return
    if cloud_url:
        yield cloud_url
        return
    from fluxshard.serving.tritonserver import TritonNotInstalled, TritonServer

    parameters = {**({"executor": executor} if executor else {}),
                  **(predict.parameters() if predict is not None else {})}
    server = TritonServer(models=["fluxshard"], log_file=out / "tritonserver.log",
                          weights=weights, parameters=parameters or None)
    try:
        server.start()
    except TritonNotInstalled as e:
        if dispatch != "auto":
            raise RuntimeError(f"dispatch {dispatch!r} needs a cloud: {e}") from None
        warnings.warn(f"{e}; running edge-only", stacklevel=2)
        yield None
        return
    try:
        yield server.grpc_url
    finally:
        server.stop()


def _executor_options(policy, bypass: str) -> dict:
    """The edge executor's options: a truncation table's taus hold only for the executor options
    it was profiled with, so those come from the table (an explicit --bypass still wins)."""
    options = dict(bypass=bypass)
    measured = policy.executor_options
    for name in ("strict_rfap", "grid_snap"):
        if name in measured:
            options[name] = bool(measured[name])
    if bypass == "none" and measured.get("bypass") and measured.get("best_dense"):
        options["bypass"] = measured["best_dense"]
    return options


def _edge_session(executor: str, model, executor_options: dict, tiles_table=None,
                  tile_options: dict | None = None, predict=None):
    """The in-process session behind the edge endpoint, on one thread like the server.
    ``tile_options``: TileExecutor knobs over the edge's own (benchmark ablations only; the
    command never sets them). ``predict``: its NMS options (the stream letterboxes the frames
    before, so its ``imgsz`` is not the session's)."""
    from fluxshard.sessions import (NATIVE, best_dense_session_factory, shared_dense_runners,
                                    yolo_session_factory)

    predict = NATIVE if predict is None else dataclasses.replace(predict, imgsz=None)
    if executor == "dense":
        return best_dense_session_factory(model, threads=1, predict=predict)(0)
    # the tile executor's dense frames run on the dense executor's engine (the same session in
    # this process): they cost what dense costs
    dense_runner = shared_dense_runners(model, threads=1) if executor == "tiles" else None
    if executor == "tiles" and tiles_table is not None:
        from fluxshard.sessions import TileYoloSession
        from fluxshard.tiles.profile import ProfiledTileExecutor

        return TileYoloSession(ProfiledTileExecutor(model, tiles_table, engine="onnxruntime",
                                                    threads=1, adaptive=True,
                                                    dense_runner=dense_runner), predict=predict)
    if executor == "tiles":  # the edge adapts to its machine's measured latency
        options = {"adaptive": True, "dense_runner": dense_runner, **(tile_options or {})}
        return yolo_session_factory("tiles", model=model, threads=1, predict=predict,
                                    tile_engine="onnxruntime", **options)(0)
    return yolo_session_factory("exact", model=model, threads=1, predict=predict,
                                **executor_options)(0)


def edge_policies(tau=None, tau_table=None, bypass: str = "none", latency_profile=None):
    """(tau policy, edge executor options, latency profile) as `fluxshard run` derives them from
    its options: one tau for dispatch, the edge's executor and the cloud's (it travels with each
    frame); the profile defaults to the profile verb's output when present."""
    from fluxshard.tau import TauPolicy
    from fluxshard_client import LatencyProfile
    from fluxshard_client.dispatch import DEFAULT_PROFILE_PATH

    tau_policy = TauPolicy.from_options(tau, tau_table)
    executor_options = _executor_options(tau_policy, bypass)
    if latency_profile is None and DEFAULT_PROFILE_PATH.is_file():
        latency_profile = DEFAULT_PROFILE_PATH  # the command's default: the profile verb's output
    return tau_policy, executor_options, LatencyProfile.load_or_default(latency_profile)


def edge_model(weights=None):
    """The detector the edge runs (``weights`` None: the embedded demo detector), fused, with
    one torch thread like the server: on a small shared box (and beside a local tritonserver)
    two spinning OpenMP threads were measured up to 10x slower, not faster."""
    from fluxshard.sessions import load_dense_model

    return load_dense_model(str(weights) if weights else None, threads=1)


def edge_endpoint(executor: str, model, executor_options: dict, tiles_table=None,
                  weights=None, tile_options: dict | None = None, predict=None):
    """The in-process edge endpoint running ``executor`` (a loaded ``TilesTable`` or None)
    with ``predict``'s NMS options (fluxshard.predict; None: ultralytics' defaults)."""
    from fluxshard_client import LocalEndpoint

    return LocalEndpoint(_edge_session(executor, model, executor_options, tiles_table,
                                       tile_options, predict))


def prepare_edge(edge, executor: str, video: str, predict=None) -> None:
    """Pick the dense engine for ``video``'s input size (``predict``'s letterbox, None: native)
    before the first frame, not inside its latency."""
    from fluxshard.models.ops import padded_shape

    size = _video_size(video) if executor in ("dense", "tiles") else None
    if size is None:
        return
    hw = (size[1], size[0]) if predict is None else predict.letterbox(size[1], size[0]).input_hw
    if executor == "dense":
        edge.session.runners.prepare(padded_shape(*hw))
    else:  # the tile executor's dense frames
        edge.session.tile_executor.prepare(padded_shape(*hw))


def edge_stream(edge, cloud=None, *, dispatch: str = "edge", tau_policy, profile,
                margin_ms: float = 2.0, bandwidth_mbps: float | None = None,
                deadline_ms: float | None = None, predict=None):
    """The camera stream `fluxshard run` drives (``cloud`` None: edge only; ``predict``:
    fluxshard.predict's options, None: ultralytics' defaults)."""
    from fluxshard.predict import PredictOptions
    from fluxshard_client import FluxShardStream

    return FluxShardStream(edge, cloud, dispatch=dispatch if cloud else "edge",
                           tau=tau_policy, profile=profile, margin_ms=margin_ms,
                           initial_mbps=bandwidth_mbps or 20.0, deadline_ms=deadline_ms,
                           **dataclasses.asdict(predict or PredictOptions()))


def edge_frames(video: str, frames: int | None = None, loop: bool = False):
    """The decoded frames with their motion fields, on the edge's motion path (codec vectors,
    validated; block matching where the codec has none). ``loop``: the file over and over, an
    endless source (each pass opens it anew, so its first frame is a key frame; frame indices
    go on counting)."""
    from fluxshard.motion import iter_motion

    if not loop:
        return iter_motion(video, max_frames=frames)
    return _looped(video, frames)


def _looped(video: str, frames: int | None):
    from fluxshard.motion import iter_motion

    done = 0
    while frames is None or done < frames:
        decoded = 0
        for mf in iter_motion(video, max_frames=None if frames is None else frames - done):
            yield dataclasses.replace(mf, index=done + decoded)
            decoded += 1
        if decoded == 0:  # nothing to loop over
            return
        done += decoded


def is_live(video: str, loop: bool = False) -> bool:
    """A source without an end: a URL other than file://, or a file played in a loop."""
    return loop or ("://" in str(video) and not str(video).startswith("file://"))


def edge_only_stream(executor: str, video: str, model=None, *, weights=None, tau=None,
                     tau_table=None, bypass: str = "none", latency_profile=None,
                     margin_ms: float = 2.0, tiles_table=None, tile_options: dict | None = None,
                     predict=None):
    """The stream `fluxshard run VIDEO --executor EXECUTOR --dispatch edge` builds, with the
    same defaults (``model``: an ``edge_model(weights)`` already loaded, shared between
    streams; ``predict``: fluxshard.predict's options, None: ultralytics' defaults). Feed it
    ``edge_frames(video)``: ``stream.process(mf.image, None if mf.is_key else mf.field,
    mf.is_key, index)``; each FrameResult's ``latency_ms`` is what the command reports
    per frame."""
    if executor not in EDGE_EXECUTORS:
        raise ValueError(f"executor must be one of {EDGE_EXECUTORS}, got {executor!r}")
    if tiles_table is not None:
        from fluxshard.tiles.profile import TilesTable

        tiles_table = TilesTable.load(tiles_table)
    tau_policy, executor_options, profile = edge_policies(tau, tau_table, bypass, latency_profile)
    model = model if model is not None else edge_model(weights)
    edge = edge_endpoint(executor, model, executor_options, tiles_table, weights, tile_options,
                         predict)
    prepare_edge(edge, executor, str(video), predict)
    return edge_stream(edge, None, tau_policy=tau_policy, profile=profile, margin_ms=margin_ms,
                       predict=predict)


def _uplink_quality_summary(cloud) -> dict:
    core = getattr(getattr(cloud, "stream", None), "core", None)
    rate = core.uplink.link_rate if core is not None else None
    if rate is None:
        return {}
    return {"uplink_quality_crf": rate.base_crf, "uplink_crf_final": rate.crf,
            "uplink_crf_changes": rate.changes}


def run(video: str | None = None, *, out: str | Path = "out/run", demo: bool = False,
        cloud_url: str | None = None, dispatch: str = "auto", bandwidth_mbps: float | None = None,
        tau: float | None = None, tau_table: str | Path | None = None,
        latency_profile: str | Path | None = None, margin_ms: float = 2.0,
        frames: int | None = None, size: tuple[int, int] = DEMO_SIZE, camera: str = "static",
        progress: bool = True, stream_id: int | None = None, bypass: str = "none",
        uplink_codec: str = "h264", uplink_quality: int | None = None, fallback: str = "none",
        weights: str | Path | None = None, executor: str | None = None,
        tiles_table: str | Path | None = None, deadline_ms: float | None = None,
        tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None, auth_header: tuple[str, str] | None = None,
        loop: bool = False, save_video: bool | None = None, save_report: bool | None = None,
        metrics_port: int | None = None, metrics_address: str = "127.0.0.1",
        track: bool = False, predict=None) -> dict:
    """The main job; returns the summary (also written to ``out/summary.json``).

    ``predict``: fluxshard.predict's options (``--imgsz --conf --iou --classes --max-det``;
    None: ultralytics' defaults): every frame is letterboxed to ``imgsz`` before the stream,
    and a local tritonserver gets them as its model parameters.

    ``fallback`` (``dispatch="cloud"`` only): "none" raises RuntimeError when the cloud cannot be
    reached, "edge" runs those frames on the edge (counted in the summary). Losing and regaining
    the cloud is reported on stderr as it happens. ``weights``: the detector (None: the embedded
    demo one); its class names label the outputs, and a local tritonserver loads it too.
    ``executor``: what the edge runs (:data:`EDGE_EXECUTORS`; None: :func:`default_executor`
    of the model, or "tiles" with a ``tiles_table``; ``bypass`` and a truncation table's
    executor options apply to "exact" only). ``tiles_table``: with executor "tiles", a
    tiles table (fluxshard.tiles.profile) whose knobs the edge takes per frame's motion level.
    ``deadline_ms``: see ``--deadline-ms``. ``tls_ca``/``tls_cert``/``tls_key``/``auth_header``:
    how to reach a ``cloud_url`` served with TLS and an auth header (``fluxshard serve``).
    ``loop``: play the file over and over. ``save_video`` / ``save_report``: write annotated.mp4
    / report.png (None: on a file yes, on a live source no, see :func:`is_live`).
    ``metrics_port``: serve Prometheus metrics there (0: a free port) on ``metrics_address``.
    ``track``: track ids from supervision's ByteTrack in detections.jsonl and the video's labels.
    A Ctrl-C (or SIGTERM through the command) while frames run ends the stream there: the
    outputs are written and the summary says ``stopped``.

    The steps: check the options (:func:`_check_options`), load the edge
    (:func:`_load_edge`), open the source (:func:`_open_source`), build the stream
    (:func:`_open_stream`), the per-frame loop (:func:`_process_frames`) and the outputs
    (:class:`_FrameOutputs`, :func:`_write_summary`)."""
    from fluxshard.predict import PredictOptions

    out = Path(out)
    predict = predict or PredictOptions()
    executor, tiles = _check_options(bandwidth_mbps, fallback, uplink_codec, executor,
                                     tiles_table)
    connection = _connection(cloud_url, tls_ca, tls_cert, tls_key, auth_header)
    # a --cloud-url that does not answer is known before the clip is made or the model loads
    health = _CloudHealth(where=cloud_url or "local tritonserver",
                          strict=dispatch == "cloud" and fallback == "none")
    if health.strict and deadline_ms is None:
        deadline_ms = float("inf")  # the cloud's answer or an error, never the edge's
    if cloud_url and dispatch != "edge":
        health.down = _unreachable(cloud_url, **connection)
    if health.down and health.strict:
        raise RuntimeError(f"--dispatch cloud: cannot reach the cloud at {health.where} "
                           f"({health.down}); --fallback edge runs on the edge instead")
    tau_policy, executor_options, profile = edge_policies(tau, tau_table, bypass,
                                                          latency_profile)
    model, executor, edge, notes = _load_edge(weights, executor, executor_options, tiles,
                                              predict)
    class_names = [model.names[k] for k in range(model.nc)]

    out.mkdir(parents=True, exist_ok=True)  # once the options are known to be good
    video = _open_source(video, demo, out, size, frames, camera, progress)
    saved = _SavedOutputs.for_source(video, loop, save_video, save_report)
    prepare_edge(edge, executor, video, predict)
    t_start = time.perf_counter()
    # a local cloud runs its config's executor (tiles), which takes every detect family
    with _serving_metrics(metrics_port, metrics_address) as (metrics, metrics_url), \
            _cloud(cloud_url, dispatch, out, weights, None, predict) as url:
        client, cloud = _open_cloud(url, bandwidth_mbps, connection, stream_id, uplink_codec,
                                    uplink_quality)
        stream = edge_stream(edge, cloud, dispatch=dispatch, tau_policy=tau_policy,
                             profile=profile, margin_ms=margin_ms, bandwidth_mbps=bandwidth_mbps,
                             deadline_ms=deadline_ms, predict=predict)
        health.start(stream, metrics if url else None)
        try:
            with _FrameOutputs(out, class_names, executor, stream.core.block, saved,
                               _tracker(video) if track else None) as writer:
                broke, stopped = _process_frames(
                    stream, edge_frames(video, frames, loop), writer, health, metrics,
                    has_cloud=bool(url), total=frames if saved.live else frames or
                    _frame_count(video), progress=progress)
        finally:
            stream.close()
            if client is not None:
                client.close()
    if not writer.summary.frames:
        raise ValueError(f"{video}: no frames decoded" + (f" ({broke})" if broke else ""))
    return _write_summary(writer, out, video, stream, cloud, health, broke, bool(url), {
        "source": "live" if saved.live else "file", "loop": loop, "stopped": stopped,
        "metrics_url": metrics_url,
        "dispatch": dispatch if url else "edge (no cloud)",
        "executor": executor,
        "tiles_table": str(tiles_table) if tiles_table is not None else None,
        "edge_latency_table": "profiled" if profile.source != "default"
        and profile.has_edge_table(executor) else "built-in",
        "cloud_url": cloud_url or ("local tritonserver" if url else None),
        "bandwidth_limit_mbps": bandwidth_mbps, "uplink_codec": uplink_codec,
        "weights": str(weights) if weights else "embedded demo detector",
        "classes": class_names, "predict": predict.describe(),
        "tau": tau_policy.source, "latency_profile": profile.source, "margin_ms": margin_ms,
        "deadline_ms": "derived" if deadline_ms is None else deadline_ms,
        "tls": bool(connection.get("ssl")), "auth_header": auth_header is not None,
        "wall_s": round(time.perf_counter() - t_start, 2), "warnings": notes,
        "fallback": fallback, "track": track})


def _check_options(bandwidth_mbps, fallback: str, uplink_codec: str, executor: str | None,
                   tiles_table):
    """(executor, loaded tiles table or None) once the options are known to be good: a bad one
    is refused before the model loads."""
    if bandwidth_mbps is not None and bandwidth_mbps <= 0:
        raise ValueError(f"--bandwidth-mbps must be > 0, got {bandwidth_mbps}")
    if fallback not in ("none", "edge"):
        raise ValueError(f"fallback must be 'none' or 'edge', got {fallback!r}")
    if uplink_codec not in UPLINK_CODECS:
        raise ValueError(f"uplink codec must be one of {UPLINK_CODECS}, got {uplink_codec!r}")
    if executor is not None and executor not in EDGE_EXECUTORS:
        raise ValueError(f"executor must be one of {EDGE_EXECUTORS}, got {executor!r}")
    if tiles_table is None:
        return executor, None
    executor = executor or "tiles"
    if executor != "tiles":
        raise ValueError(f"--tiles-table sets the tile executor's knobs; give --executor tiles "
                         f"with it (got --executor {executor})")
    from fluxshard.tiles.profile import TilesTable

    return executor, TilesTable.load(tiles_table)


def _load_edge(weights, executor: str | None, executor_options: dict, tiles_table, predict):
    """(model, executor, edge endpoint, warnings printed while loading them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = edge_model(weights)
        executor = executor or default_executor(model)
        edge = edge_endpoint(executor, model, executor_options, tiles_table, weights,
                             predict=predict)
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return model, executor, edge, notes


def _open_source(video, demo: bool, out: Path, size: tuple[int, int], frames: int | None,
                 camera: str, progress: bool) -> str:
    """The video to decode: ``video`` (a file or a URL), or with ``demo`` a synthesized clip."""
    if demo:
        from fluxshard import synth

        w, h = size
        spec = synth.SceneSpec(width=w, height=h, frames=frames or DEMO_FRAMES, camera=camera)
        video = synth.make_clip(spec, out, name="demo", progress=progress).video
    video = str(video)
    if not (Path(video).exists() or "://" in video):
        raise FileNotFoundError(f"video not found: {video}")
    return video


def _open_cloud(url: str | None, bandwidth_mbps, connection: dict, stream_id, uplink_codec: str,
                uplink_quality):
    """(client, cloud endpoint) for the cloud at ``url`` ((None, None) without one)."""
    from fluxshard import wire
    from fluxshard_client import FluxShardClient, RemoteEndpoint, RetryPolicy

    if not url:
        return None, None
    # without a deadline (--dispatch cloud --fallback none) a cloud gone for 10 s ends the run
    client = FluxShardClient(url, uplink_mbps=bandwidth_mbps,
                             retry=RetryPolicy(reconnect_timeout_s=10.0), **connection)
    codec = wire.Codec[UPLINK_WIRE_CODECS[uplink_codec]]
    return client, RemoteEndpoint(client.open_stream(stream_id, key_codec=codec,
                                                     residual_codec=codec,
                                                     uplink_quality=uplink_quality))


@dataclass
class _CloudHealth:
    """Losing and regaining the cloud as the frames go (printed on stderr as it happens), and
    the frames the edge ran for want of it. ``strict``: --dispatch cloud --fallback none, where
    losing the cloud ends the run."""

    where: str
    strict: bool
    down: str | None = None  # why the cloud is out of the stream now (None: it answers)
    events: list[str] = field(default_factory=list)
    failures_seen: int = 0
    edge_fallback: int = 0
    metrics: object = None  # EdgeMetrics told of the cloud's state (None: no cloud)

    def start(self, stream, metrics=None) -> None:
        self.metrics = metrics
        self._tell_metrics()
        if self.down:
            self._event(f"cloud {self.where} unreachable ({self.down}): running on the edge "
                        "until it answers", print)
            # left out like a cloud that failed mid-run: back once it answers a readiness probe
            stream.cloud_lost(f"unreachable ({self.down})")

    def observe(self, stream, result, has_cloud: bool) -> None:
        """Take note of one frame's result."""
        from tqdm import tqdm

        failures = stream.core.cloud_failures
        if stream.core.cloud_failure_count > self.failures_seen:  # the cloud gave up on this frame
            self.failures_seen = stream.core.cloud_failure_count
            if self.strict:
                raise RuntimeError(f"--dispatch cloud: lost the cloud at {self.where} "
                                   f"({failures[-1]}); --fallback edge runs on the edge instead")
            if not self.down:
                self.down = failures[-1]
                self._event(f"cloud {self.where} failed at {self.down}: running on the edge "
                            "until it answers", tqdm.write)
                self._tell_metrics()
        elif self.down and result.endpoint == "cloud":
            self.down = None
            self._event(f"cloud {self.where} answers again from frame {result.index}",
                        tqdm.write)
            self._tell_metrics()
        reason = result.decision.reason
        if has_cloud and result.endpoint == "edge" and (
                reason == "no cloud" or reason.startswith(("cloud failed", "cloud down"))):
            self.edge_fallback += 1
            if self.metrics is not None:
                self.metrics.edge_fallback.inc()

    def _tell_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.cloud_state(self.where, up=self.down is None)

    def _event(self, what: str, say) -> None:
        self.events.append(what)
        del self.events[:-MAX_CLOUD_EVENTS]  # a flapping cloud on an endless stream
        say(f"fluxshard run: {what}", file=sys.stderr)


@dataclass(frozen=True)
class _SavedOutputs:
    """Which optional outputs a run writes; a live source keeps memory bounded and writes
    neither unless asked (detections.jsonl and summary.json are always written)."""

    live: bool
    video: bool  # annotated.mp4
    report: bool  # report.png, with its per-frame JPEG baseline

    @classmethod
    def for_source(cls, video: str, loop: bool, save_video: bool | None,
                   save_report: bool | None) -> "_SavedOutputs":
        live = is_live(video, loop)
        return cls(live, not live if save_video is None else save_video,
                   not live if save_report is None else save_report)


class _FrameOutputs:
    """What each frame leaves behind: its detections.jsonl line, its annotated video frame
    (``saved.video``), its share of the rolling summary and, for the report (``saved.report``),
    a row among the last :data:`REPORT_FRAMES`."""

    def __init__(self, out: Path, class_names: list[str], executor: str, block: int,
                 saved: _SavedOutputs, tracker=None):
        from collections import deque

        from .metrics import RollingSummary

        self.out, self.class_names, self.executor, self.block = out, class_names, executor, block
        self.saved = saved
        self.tracker = tracker  # a fluxshard_client.DetectionTracker, or None: no track ids
        self.summary = RollingSummary()
        self.report_rows = deque(maxlen=REPORT_FRAMES) if saved.report else None
        self.detections = open(out / "detections.jsonl", "w")
        self.video = None  # opened at the first frame, which gives the size
        self.sized = False  # the model's input size said

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, mf, result) -> None:
        from . import outputs

        if not self.sized:  # what the model runs on, once
            self.sized = True
            _say_input_size(mf.image.shape[1], mf.image.shape[0], result.letterbox)
        track_ids = self.tracker.track_ids(result) if self.tracker is not None else None
        record = outputs.detection_record(result, self.class_names, track_ids)
        if result.endpoint == "edge":
            record["executor"] = self.executor
            if "crop_area_fraction" in result.stats:
                record["crop_area_fraction"] = result.stats["crop_area_fraction"]
        self.detections.write(json.dumps(record) + "\n")
        jpeg = outputs.jpeg_bytes(mf.image) if self.saved.report else None
        self.summary.add(record, jpeg)
        if self.report_rows is not None:
            self.report_rows.append(outputs.report_row(record, jpeg))
        if self.saved.video:
            self._write_video(mf, result, track_ids)

    def _write_video(self, mf, result, track_ids=None) -> None:
        from . import outputs

        h, w = mf.image.shape[:2]
        if self.video is None:
            self.video = outputs.VideoWriter(self.out / "annotated.mp4", w - w % 2, h - h % 2)
        image = outputs.annotate(mf.image, result, self.class_names, self.block, track_ids)
        self.video.write(image[:h - h % 2, :w - w % 2])

    def written(self) -> list[str]:
        """The files this run writes."""
        return ["detections.jsonl"] + ["annotated.mp4"] * self.saved.video + \
            ["report.png"] * self.saved.report + ["summary.json"]

    def close(self) -> None:
        self.detections.close()
        if self.video is not None:
            self.video.close()
            self.video = None


def _say_input_size(width: int, height: int, letterbox) -> None:
    """What the model runs on, when that is not the frame as it is."""
    from fluxshard.models.ops import padded_size

    if letterbox is None or letterbox.identity:
        padded_size(width, height, who="fluxshard run")  # preprocess pads each frame
        return
    ih, iw = letterbox.input_hw
    print(f"fluxshard run: size {width}x{height} letterboxed to {iw}x{ih} (--imgsz)")


def _process_frames(stream, frames, writer: _FrameOutputs, health: _CloudHealth, metrics, *,
                    has_cloud: bool, total: int | None,
                    progress: bool) -> tuple[str | None, str | None]:
    """The per-frame loop: each decoded frame through the stream into ``writer`` and
    ``metrics``. Returns (why the source broke off mid-way, why the run stopped it): (None,
    None) when it ended; a Ctrl-C stops it ("interrupted")."""
    from tqdm import tqdm

    broke: list[str] = []
    bar = tqdm(total=total, desc="fluxshard run", unit="frame", disable=not progress,
               dynamic_ncols=True)
    try:
        for mf in _frames_until_break(frames, broke):
            result = stream.process(mf.image, None if mf.is_key else mf.field, mf.is_key,
                                    mf.index)
            health.observe(stream, result, has_cloud)
            writer.write(mf, result)
            metrics.observe(result, writer.executor)
            bar.update(1)
            bar.set_postfix_str(f"{result.endpoint} {result.latency_ms:.0f} ms")
    except KeyboardInterrupt:  # the way a live source ends: the frames so far are kept
        return (broke[0] if broke else None), "interrupted"
    finally:
        bar.close()
    return (broke[0] if broke else None), None


@contextlib.contextmanager
def _serving_metrics(port: int | None, address: str):
    """Yields (the run's EdgeMetrics, the URL they are served on, None: not served)."""
    from .metrics import EdgeMetrics

    metrics = EdgeMetrics()
    if port is None:
        yield metrics, None
        return
    server = metrics.serve(port, address)
    url = f"http://{address}:{server.port}/metrics"
    print(f"fluxshard run: metrics on {url}", file=sys.stderr)
    try:
        yield metrics, url
    finally:
        server.close()


def _write_summary(writer: _FrameOutputs, out: Path, video: str, stream, cloud,
                   health: _CloudHealth, broke: str | None, has_cloud: bool,
                   settings: dict) -> dict:
    """report.png (when saved) and summary.json (returned): the run's rolling summary with its
    ``settings``."""
    from . import outputs

    if writer.report_rows is not None:
        outputs.plot_report(list(writer.report_rows), out / "report.png",
                            f"{Path(video).name}: dispatch {settings['dispatch']}"
                            + (f", uplink {settings['bandwidth_limit_mbps']} Mbit/s"
                               if settings["bandwidth_limit_mbps"] else ""))
    summary = writer.summary.summary({
        "video": video, **settings,
        # h264: the crf the uplink ended at (it follows the measured link) and how often it moved
        **_uplink_quality_summary(cloud),
        "bandwidth_estimate_mbps": round(stream.dispatcher.bandwidth.mbps, 3),
        "error": broke, "cloud_failures": list(stream.core.cloud_failures)[-MAX_CLOUD_EVENTS:],
        "cloud_events": health.events if has_cloud else [],
        "edge_fallback_frames": health.edge_fallback if has_cloud else 0,
        "outputs": {k: str(out / k) for k in writer.written()}})
    outputs.write_json(out / "summary.json", summary)
    return summary


def _connection(cloud_url, tls_ca, tls_cert, tls_key, auth) -> dict:
    """FluxShardClient's TLS and header arguments for ``cloud_url``."""
    from fluxshard_client import auth_headers

    if (tls_cert is None) != (tls_key is None) or (tls_cert is not None and tls_ca is None):
        raise ValueError("--tls-cert and --tls-key go together, with --tls-ca")
    if not cloud_url:
        if tls_ca or auth:
            raise ValueError("--tls-ca and --auth-header are for a --cloud-url (a local "
                             "tritonserver needs neither)")
        return {}
    connection = {"headers": auth_headers(*auth)} if auth else {}
    if tls_ca:
        connection.update(ssl=True, root_certificates=str(tls_ca))
        if tls_cert:
            connection.update(private_key=str(tls_key), certificate_chain=str(tls_cert))
    return connection


def _unreachable(url: str, timeout_s: float = 5.0, headers=None, **tls) -> str | None:
    """Why the cloud at ``url`` cannot serve frames (None: its fluxshard model is ready). Asked
    once before the first frame, so an unreachable cloud is reported at once rather than after
    the stream's reconnect timeout."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    from fluxshard_client.transport import MODEL_NAME

    client = tc.InferenceServerClient(url, **tls)
    try:
        if not client.is_server_ready(client_timeout=timeout_s):
            return "server not ready"
        if not client.is_model_ready(MODEL_NAME, client_timeout=timeout_s):
            return f"model {MODEL_NAME!r} not ready"
        # health is open to all: a model-config request tells whether the auth header is right
        client.get_model_config(MODEL_NAME, headers=headers, client_timeout=timeout_s)
    except InferenceServerException as e:
        message = e.message() or str(e)
        if "protocol is restricted" in message:
            return f"{message}: the cloud requires --auth-header KEY=VALUE"
        if not tls and "socket closed" in message.lower():
            return f"{message} (a TLS server? --tls-ca)"
        return message
    except Exception as e:  # noqa: BLE001 - any transport failure means unreachable
        return f"{type(e).__name__}: {e}"
    finally:
        client.close()
    return None


def _frames_until_break(frames, broke: list[str]):
    """The decoded frames; a source that breaks off mid-way (truncated file, dropped stream)
    ends the run there, with the reason in ``broke``, so the frames before it are still written."""
    from fluxshard.motion import MotionSourceError

    try:
        yield from frames
    except MotionSourceError as e:
        broke.append(str(e))


def _video_size(video: str) -> tuple[int, int] | None:
    """(width, height) as the container says (None when it does not)."""
    try:
        import av

        with av.open(video) as container:
            ctx = container.streams.video[0].codec_context
            return (int(ctx.width), int(ctx.height)) if ctx.width and ctx.height else None
    except Exception:  # noqa: BLE001 - only an early engine pick; the first frame picks otherwise
        return None


def _tracker(video: str):
    """supervision's ByteTrack for ``video``'s frames (its frame rate when the container says)."""
    from fluxshard_client import DetectionTracker

    try:
        import av

        with av.open(video) as container:
            rate = container.streams.video[0].average_rate
    except Exception:  # noqa: BLE001 - only the lost-track buffer's scale; 30 fps otherwise
        rate = None
    return DetectionTracker(float(rate) if rate else 30.0)


def _frame_count(video: str) -> int | None:
    """The container's frame count for the progress bar (None when it does not say)."""
    try:
        import av

        with av.open(video) as container:
            return int(container.streams.video[0].frames) or None
    except Exception:  # noqa: BLE001 - only a progress-bar nicety; decoding reports real errors
        return None
