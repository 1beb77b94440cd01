"""One camera stream through FluxShard: motion-aware residuals, per-frame edge/cloud dispatch.

:class:`FluxShardStream` follows v1 Algorithm 1 (docs/DESIGN.md, "Per frame, on the edge", steps
2-5). It keeps one :class:`fluxshard.endpoint.EndpointPath` per endpoint (edge, cloud): the input
that endpoint last ran on and the motion accumulated since (a remote endpoint's path shares its
transport's uplink and mirror). Per frame both states accumulate the frame's motion field, each
computes its residual block set at the dispatch tau, the :class:`Dispatcher` picks the endpoint,
the chosen one runs and resets its state with the input it ran on, the other keeps accumulating (so
when it runs again it gets a residual frame, not a key frame).

Endpoints are treated alike: :class:`LocalEndpoint` (the sparse executor in this process) or
:class:`RemoteEndpoint` (a Triton ``fluxshard`` model through :class:`fluxshard_client.Stream`:
the cloud, or a local Triton on the edge box). A remote endpoint's state is reset with the input
its server rebuilt (the transport's mirror), so the residual sets we compute stay exact for it.

Motion fields are quantized to the wire's quarter-pel before use (``fluxshard.wire``), for every
endpoint, so local and remote endpoints see identical fields.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, replace as dataclass_replace
from pathlib import Path
from typing import AsyncIterator, Iterator

import numpy as np

from fluxshard import wire
from fluxshard.endpoint import EndpointPath
from fluxshard.letterbox import Letterbox
from fluxshard.motion.estimate import DEFAULT_ESTIMATOR, FrameMotion, check_frame
from fluxshard.motion.state import ResidualSet
from fluxshard.predict import (DEFAULT_CONF, DEFAULT_IMGSZ, DEFAULT_IOU, DEFAULT_MAX_DET,
                               PredictOptions)
from fluxshard.sessions import SessionResult
from fluxshard.tau import DEFAULT_TAU, TauPolicy, TruncationTable

from .dispatch import (BandwidthEstimator, Decision, Dispatcher, LatencyProfile,
                       edge_executor_name)
from .deadline import (PROBE_TIMEOUT_S, CloudWatch, Deadline, check_deadline_ms,
                       default_deadline_ms, no_deadline)
from .results import EndpointRun, FrameResult
from .transport import CloudError, CloudUnavailable, DeadlineMissed

MAX_CLOUD_FAILURES_KEPT = 100


# --------------------------------------------------------------------------------- endpoints

class LocalEndpoint:
    """An executor in this process (any :class:`fluxshard.sessions.StreamSession`
    works). Default: ``yolo_session_factory("exact")`` (the sparse executor) with the embedded
    demo weights; ``factory_kwargs`` go to ``yolo_session_factory`` (``executor="tiles"``: the
    tile executor).

    The exact executor runs on the residual-assembled input (its reuse is exact on it); a
    session with ``full_frame`` (tiles, dense) gets the whole decoded frame, with the field
    accumulated since this endpoint last ran (frames dispatched to the cloud in between
    included). Either way the input it ran on becomes the endpoint's dispatch cache."""

    remote = False

    def __init__(self, session=None, **factory_kwargs):
        if session is None:
            from fluxshard.sessions import yolo_session_factory

            session = yolo_session_factory(**factory_kwargs)(0)
        self.session = session

    @property
    def executor(self) -> str:
        """Which executor runs here ("exact", "tiles", "dense"): picks the latency table."""
        return getattr(self.session, "executor_kind", "exact")

    def run(self, frame: np.ndarray, residual: ResidualSet | None, key: bool,
            index: int, tau: float = 0.0) -> EndpointRun:
        full = key or getattr(self.session, "full_frame", False)
        image = frame if full else residual.assemble(frame)
        # a session of its own may return a plain (detections, stats) pair
        out = SessionResult(*self.session.infer(image, None if key else residual.field,
                                                None if key else residual.mask, key, tau=tau))
        recomputed = None if key else getattr(self.session, "last_recomputed", None)
        return EndpointRun(out.detections, out.stats, image, key, masks=out.masks,
                           recomputed=recomputed)

    @property
    def names(self) -> dict[int, str] | None:
        """The class names of the model the session runs ({index: name}), when it says."""
        return model_names(self.session)

    def close(self) -> None:
        self.session.close()


def model_names(session) -> dict[int, str] | None:
    """A session's model's class names: the session's own ``names``, else its model's (the
    executors keep the model as ``model``, ``executor.model``, ``tile_executor.model`` or
    ``runners.model``)."""
    names = getattr(session, "names", None)
    for holder in ("executor", "tile_executor", "runners", None):
        if names is not None:
            break
        owner = getattr(session, holder, None) if holder else session
        names = getattr(getattr(owner, "model", None), "names", None)
    if names is None:
        return None
    pairs = names.items() if isinstance(names, dict) else enumerate(names)
    return {int(k): str(v) for k, v in pairs}


def _remote_run(result, stream) -> EndpointRun:
    server_s = float(result.stats.get("server_ms", 0.0)) / 1e3
    transfer = max(result.round_trip_ms / 1e3 - server_s, 0.0)
    # resyncs (why the frame was re-sent as a key frame) reach the application in the stats
    stats = {**result.stats, "resyncs": list(result.resyncs)} if result.resyncs else result.stats
    return EndpointRun(result.detections, stats, stream.mirror.cache, result.key,
                       result.wire_bytes, transfer, result.masks)


class RemoteEndpoint:
    """A Triton ``fluxshard`` model through a transport :class:`fluxshard_client.Stream`."""

    remote = True

    def __init__(self, stream):
        self.stream = stream

    @classmethod
    def connect(cls, url: str, stream_id: int | None, block: int = 16, **client_kwargs) -> "RemoteEndpoint":
        from .transport import FluxShardClient

        endpoint = cls(FluxShardClient(url, **client_kwargs).open_stream(stream_id, block=block))
        endpoint._own_client = True
        return endpoint

    def run(self, frame, residual, key, index, tau: float = 0.0, deadline=None) -> EndpointRun:
        if key:
            result = self.stream.send(frame, key=True, frame_index=index, tau=tau,
                                      deadline=deadline)
        else:
            result = self.stream.send(frame, residual=residual, frame_index=index, tau=tau,
                                      deadline=deadline)
        return _remote_run(result, self.stream)

    def probe(self) -> bool:
        """Whether the server and its model are ready (asked off the frame path)."""
        return self.stream.client.is_ready(PROBE_TIMEOUT_S)

    def close(self) -> None:
        self.stream.close()
        if getattr(self, "_own_client", False):
            self.stream.client.close()


class AsyncRemoteEndpoint:
    """asyncio twin of :class:`RemoteEndpoint` over an :class:`fluxshard_client.AsyncStream`."""

    remote = True

    def __init__(self, stream):
        self.stream = stream

    async def run(self, frame, residual, key, index, tau: float = 0.0,
                  deadline=None) -> EndpointRun:
        if key:
            result = await self.stream.send(frame, key=True, frame_index=index, tau=tau,
                                            deadline=deadline)
        else:
            result = await self.stream.send(frame, residual=residual, frame_index=index,
                                            tau=tau, deadline=deadline)
        return _remote_run(result, self.stream)

    async def probe(self) -> bool:
        return await self.stream.client.is_ready(PROBE_TIMEOUT_S)

    async def close(self) -> None:
        await self.stream.close()


# ------------------------------------------------------------------------------- the stream

@dataclass
class _Plan:
    index: int
    frame: np.ndarray
    key: dict  # endpoint -> must run as a key frame
    residual: dict  # endpoint -> ResidualSet | None
    tau: dict  # endpoint -> the tau its residual set was picked at (its executor truncates with it)
    decision: Decision
    started: float
    deadline: Deadline | None = None  # of the cloud call (None: the edge runs it, or no deadline)
    fallback: str | None = None  # why the edge runs a frame the cloud would have
    cloud_attempt_ms: float | None = None  # how long the failed cloud call took
    timestamp: float | None = None  # the frame's, in seconds
    motion: str = "given"  # FrameResult.motion


class _DispatchCore:
    """Algorithm 1 without the I/O: shared by the sync and the asyncio streams."""

    def __init__(self, dispatcher: Dispatcher, tau, block: int, deadline_ms: float | None = None,
                 clock=time.monotonic, motion: FrameMotion | None = None):
        self.motion = motion or FrameMotion()  # fields of bare frames, against the previous one
        self.deadline_ms = check_deadline_ms(deadline_ms)  # None: derived per frame
        self.clock = clock  # what the frames' deadlines are measured on
        self.watch: CloudWatch | None = None  # the cloud's readiness, probed off the frame path
        self.cloud_warm = False  # it answered since it was (re)gained
        self.dispatcher = dispatcher
        self.tau = TauPolicy.of(tau)
        self.block = block
        self.states = {name: EndpointPath(self.tau, block) for name in ("edge", "cloud")}
        self.next_index = 0
        # uplink bytes per raw residual byte (EWMA of what the wire really carried)
        self.wire_ratio = {"key": 0.5, "residual": 0.5}
        # H.264 uplink: bytes per pixel learned per residual fraction (fluxshard.uplink_h264)
        self.h264_bytes = None
        self.h264_uplink = None  # the cloud transport's Uplink: its quality follows the link
        self.cloud_down_until = 0  # frame index from which the cloud may be tried again
        # the latest cloud failures (bounded: a stream may run for weeks) and how many there were
        self.cloud_failures: deque[str] = deque(maxlen=MAX_CLOUD_FAILURES_KEPT)
        self.cloud_failure_count = 0
        self.names: dict[int, str] | None = None  # the model's class names (FrameResult.names)

    @property
    def edge_runs_whole_frames(self) -> bool:
        """The edge's executor runs on the whole frame and finds its own change (tiles, dense):
        it needs the edge's motion, not its residual set."""
        return self.dispatcher.edge_executor in ("tiles", "dense")

    def residual_set(self, path: EndpointPath, frame: np.ndarray) -> tuple[ResidualSet, float]:
        """The residual set at the tau the policy picks for this endpoint, and that tau."""
        return path.residual_at_tau(frame)

    def cloud_usable(self, cloud) -> bool:
        return (cloud is not None and self.next_index >= self.cloud_down_until
                and (self.watch is None or self.watch.up))

    def cloud_down(self) -> str:
        """Why the cloud is left out now."""
        if self.watch is not None and not self.watch.up:
            return f"waiting for it to answer ({self.watch.reason})"
        return self.cloud_failures[-1] if self.cloud_failures else "left out"

    def frame_deadline(self, decision: Decision, width: int, height: int) -> Deadline | None:
        """The deadline of this frame's cloud call (fluxshard_client.deadline)."""
        if decision.endpoint != "cloud" or no_deadline(self.deadline_ms):
            return None
        ms = self.deadline_ms
        if ms is None:
            edge_full_ms = (self.dispatcher.load["edge"].factor
                            * self.dispatcher.profiled_ms("edge", 1.0, width, height))
            ms = default_deadline_ms(edge_full_ms, decision.cloud_ms, self.cloud_warm)
        return Deadline.after(ms / 1e3, self.clock)

    def cloud_failed(self, plan: _Plan, error: Exception,
                     attempt_started: float | None = None) -> _Plan:
        """The cloud gave up on this frame (unreachable past its reconnect timeout, or it
        rejected the frame): run it on the edge, leave the cloud out for a while, and restart
        its state with a key frame when it is back."""
        if isinstance(error, (CloudUnavailable, DeadlineMissed)) and self.watch is not None:
            self.watch.lost(str(error))  # back in dispatch once it answers a readiness probe
            self.cloud_warm = False
        else:
            self.cloud_down_until = plan.index + (self.dispatcher.probe_interval or 30)
        self.cloud_failures.append(f"frame {plan.index}: {error}")
        self.cloud_failure_count += 1
        self.states["cloud"].forget()
        edge = self.states["edge"]
        if plan.residual["edge"] is None and not plan.key["edge"]:
            plan.residual["edge"], plan.tau["edge"] = self.residual_set(edge, plan.frame)
        d = plan.decision
        plan.decision = Decision("edge", d.edge_ms, d.cloud_ms, d.transfer_ms,
                                 f"cloud failed: {error}")
        plan.fallback = plan.decision.reason
        if attempt_started is not None:  # perf_counter when the cloud call began
            plan.cloud_attempt_ms = (time.perf_counter() - attempt_started) * 1e3
        return plan

    def tau_for(self, motion: float) -> float:
        return self.tau.tau_for(motion)

    def estimate_bytes(self, residual: ResidualSet | None, shape) -> int:
        h, w = shape[:2]
        if self.h264_bytes is not None:  # a P-frame codes the change since the cloud last ran
            fraction = 1.0 if residual is None else residual.fraction
            return (self.h264_bytes.estimate(residual is None, fraction, h * w,
                                             self.h264_uplink.link_rate.crf)
                    + wire.HEADER_SIZE + wire.PACKET_SEQ.size)
        if residual is None:
            return int(h * w * 3 * self.wire_ratio["key"]) + wire.HEADER_SIZE
        raw = int(residual.mask.sum()) * self.block * self.block * 3
        field = int(np.prod(wire.field_shape(h, w))) // 8  # a smooth field compresses ~16x
        return int(raw * self.wire_ratio["residual"]) + field + wire.HEADER_SIZE

    def frame_motion(self, frame: np.ndarray, field: np.ndarray | None,
                     is_key: bool) -> tuple[np.ndarray | None, bool, str]:
        """(field, is_key, FrameResult.motion) of a frame: a bare frame's field (none given,
        not a key frame) is estimated against the previous frame; with none to compare with
        (the first frame, a size change) it is a key frame."""
        if is_key or field is not None:
            self.motion.observe(frame)
            return field, is_key, "key" if is_key else "given"
        field = self.motion.field(frame)
        return field, field is None, "key" if field is None else "estimated"

    def plan(self, frame: np.ndarray, field: np.ndarray | None, is_key: bool,
             index: int | None, cloud_available: bool, timestamp: float | None = None) -> _Plan:
        started = time.perf_counter()  # the frame's latency includes its motion estimate
        frame = check_frame(frame)
        index = self.next_index if index is None else int(index)
        if index < self.next_index:
            raise ValueError(f"frame index {index} is not after the previous one "
                             f"({self.next_index - 1})")
        h, w = frame.shape[:2]
        field, is_key, motion = self.frame_motion(frame, field, is_key)
        if is_key or any(s.cache is not None and s.cache.shape != frame.shape
                         for s in self.states.values()):
            for s in self.states.values():  # the motion since the caches is unknown
                s.forget()
        elif field is not None and np.asarray(field).shape != wire.field_shape(h, w):
            raise ValueError(f"motion field shape {np.asarray(field).shape} does not match a "
                             f"{h}x{w} frame ({wire.field_shape(h, w)})")
        key, residual, fraction = {}, {}, {}  # fraction: the x of each endpoint's table
        taus = {name: self.tau.tau_for(0.0) for name in self.states}  # key frames: no motion
        candidates = self.dispatcher.candidates(cloud_available)
        for name, state in self.states.items():
            if name == "cloud" and name not in candidates:  # it will not run: keep no state
                state.forget()
            if state.cache is None:
                key[name], residual[name], fraction[name] = True, None, 1.0
                continue
            state.accumulate(field)
            if name not in candidates:  # the edge under a forced cloud: kept current, since it
                key[name], residual[name], fraction[name] = False, None, 1.0  # is the fallback
                continue
            if name == "edge" and "cloud" not in candidates and self.edge_runs_whole_frames:
                # nothing to choose between, and the executor finds its own change: the field
                # and tau only
                res, taus[name] = state.motion_at_tau(frame)
                share = 1.0  # every block marked: what edge_share gives, without its dilation
            else:
                res, taus[name] = self.residual_set(state, frame)
                # the edge's table is its executor's: for tiles the predicted crop area share
                share = (self.dispatcher.edge_share(res.mask, self.block) if name == "edge"
                         else res.fraction)
            key[name], residual[name], fraction[name] = False, res, share
        if self.h264_uplink is not None:
            self.h264_uplink.link_bytes_per_s = self.dispatcher.bandwidth.bytes_per_s
        cloud_bytes = self.estimate_bytes(residual["cloud"], frame.shape)
        decision = self.dispatcher.decide(fraction["edge"], fraction["cloud"], cloud_bytes, w, h,
                                          cloud_available)
        return _Plan(index, frame, key, residual, taus, decision, started,
                     self.frame_deadline(decision, w, h), timestamp=timestamp, motion=motion)

    def commit(self, plan: _Plan, run: EndpointRun, endpoint_ms: float,
               remote: bool) -> FrameResult:
        name = plan.decision.endpoint
        self.states[name].reset(run.input_image)
        self.next_index = plan.index + 1
        self.cloud_warm = self.cloud_warm or name == "cloud"
        residual = plan.residual[name]
        h, w = plan.frame.shape[:2]
        grid = wire.residual_grid(h, w, self.block)
        if remote and name == "cloud" and self.h264_bytes is not None:
            fraction = 1.0 if run.key or residual is None else residual.fraction
            self.h264_bytes.observe(run.key, fraction, h * w, run.uplink_bytes,
                                    self.h264_uplink.encoder.crf)
            if run.transfer_s is not None:
                self.dispatcher.observe_uplink(run.uplink_bytes, run.transfer_s)
        elif remote:
            raw = (h * w * 3 if run.key else
                   int(run.stats.get("residual_blocks", 0)) * self.block * self.block * 3)
            if raw:
                kind = "key" if run.key else "residual"
                ratio = run.uplink_bytes / raw
                self.wire_ratio[kind] = 0.7 * self.wire_ratio[kind] + 0.3 * min(ratio, 1.5)
            if run.transfer_s is not None and name == "cloud":
                self.dispatcher.observe_uplink(run.uplink_bytes, run.transfer_s)
        # the endpoint's load: its compute time (a remote one's server time: the uplink has its
        # own estimate) against its latency table at the fraction it was estimated at
        compute_ms = float(run.stats.get("server_ms", endpoint_ms)) if remote else endpoint_ms
        if run.key or residual is None:
            fraction = 1.0
        elif name == "edge":
            fraction = self.dispatcher.observed_edge_share(run.stats, residual.mask, self.block)
        else:
            fraction = residual.fraction
        self.dispatcher.observe_latency(name, fraction, w, h, compute_ms)
        mask = recomputed_blocks(run.recomputed, self.block, grid)
        if mask is None:
            mask = np.ones(grid, bool) if run.key or residual is None else residual.mask
        return FrameResult(
            index=plan.index, endpoint=name, key=run.key, detections=run.detections,
            latency_ms=(time.perf_counter() - plan.started) * 1e3, endpoint_ms=endpoint_ms,
            uplink_bytes=run.uplink_bytes if remote else 0,
            cache_hit_rate=float(run.stats.get("cache_hit_rate", 0.0)),
            computed_fraction=float(run.stats.get("computed_fraction", 1.0)),
            residual_fraction=float(mask.mean()), residual_mask=mask,
            field=None if run.key or residual is None else residual.field, decision=plan.decision,
            bandwidth_mbps=self.dispatcher.bandwidth.mbps, orig_shape=(h, w), names=self.names,
            timestamp=plan.timestamp, masks=run.masks, motion=plan.motion,
            stats={"tau": plan.tau[name], **run.stats,  # a server's own word on tau wins
                   **({"cloud_fallback": plan.fallback} if plan.fallback else {}),
                   **({"cloud_attempt_ms": round(plan.cloud_attempt_ms, 1)}
                      if plan.cloud_attempt_ms is not None else {}),
                   **({"deadline_ms": round(plan.deadline.seconds * 1e3, 1)}
                      if plan.deadline is not None else {})})


def recomputed_blocks(recomputed, block: int, grid: tuple[int, int]) -> np.ndarray | None:
    """An executor's (block, recomputed blocks on its padded input) as the stream's residual
    grid; None when it said nothing or its grid is another (another block size, or an input
    the session letterboxed)."""
    if recomputed is None:
        return None
    its_block, blocks = recomputed
    if its_block != block or blocks.shape[0] < grid[0] or blocks.shape[1] < grid[1]:
        return None
    return np.ascontiguousarray(blocks[:grid[0], :grid[1]])


def _dispatcher(dispatch: str, profile, margin_ms: float, initial_mbps: float,
                probe_interval: int | None) -> Dispatcher:
    if isinstance(profile, (str, Path)):
        profile = LatencyProfile.load(profile)
    return Dispatcher(profile or LatencyProfile.load_or_default(), dispatch, margin_ms,
                      BandwidthEstimator(initial_mbps * 1e6 / 8), probe_interval)


class _StreamBase:
    """What the sync and asyncio camera streams share: endpoints and the dispatch core."""

    def _set_up(self, edge, cloud, dispatch, tau, profile, margin_ms, initial_mbps, block,
                probe_interval, deadline_ms=None, clock=time.monotonic, names=None,
                motion_estimator: str = DEFAULT_ESTIMATOR,
                predict: PredictOptions | None = None) -> None:
        motion = FrameMotion(motion_estimator)  # a wrong name is told before anything opens
        self.predict = predict or PredictOptions()
        # the edge gets frames at their input size already: its sessions need not letterbox
        self.edge = edge if edge is not None else LocalEndpoint(
            predict=dataclass_replace(self.predict, imgsz=None))
        self.cloud = cloud
        if dispatch == "cloud" and cloud is None:
            raise ValueError("dispatch 'cloud' needs a cloud endpoint")
        self.core = _DispatchCore(_dispatcher(dispatch, profile, margin_ms, initial_mbps,
                                              probe_interval), tau, block, deadline_ms, clock,
                                  motion)
        self.core.names = (names if names is not None
                           else getattr(self.edge, "names", None))
        if hasattr(self.cloud, "probe"):
            self.core.watch = CloudWatch(self.cloud.probe)
        for name, endpoint in (("edge", self.edge), ("cloud", self.cloud)):
            uplink = getattr(getattr(getattr(endpoint, "stream", None), "core", None), "uplink",
                             None)
            if uplink is not None:
                # a remote endpoint's path and its transport share one uplink: the cache its
                # residual set is aligned from is the mirror's, which then rebuilds without a
                # second warp
                self.core.states[name].uplink = uplink
                if name == "cloud" and uplink.encoder is not None:  # the cloud's uplink is H.264
                    from fluxshard.uplink_h264 import BytesModel

                    self.core.h264_bytes = BytesModel()
                    self.core.h264_uplink = uplink
        # the edge's latency table is the one of the executor it runs
        self.core.dispatcher.edge_executor = edge_executor_name(
            getattr(self.edge, "executor", "exact"))

    @property
    def dispatcher(self) -> Dispatcher:
        return self.core.dispatcher

    def cloud_lost(self, reason: str) -> None:
        """Leave the cloud out until it answers a readiness probe (off the frame path)."""
        if self.core.watch is not None:
            self.core.watch.lost(reason)
        else:
            self.core.cloud_down_until = self.core.next_index + (self.dispatcher.probe_interval
                                                                 or 30)

    def _letterbox(self, frame, field) -> tuple[np.ndarray, np.ndarray | None, Letterbox | None]:
        """The frame and its field at the model's input size (``imgsz``), and the transform. A
        bare frame's field is estimated after, at the input size."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or self.predict.imgsz is None:
            return frame, field, None  # a bad frame is refused by the plan, in its words
        h, w = frame.shape[:2]
        box = self.predict.letterbox(h, w)
        if field is not None and np.asarray(field).shape != wire.field_shape(h, w):
            raise ValueError(f"motion field shape {np.asarray(field).shape} does not match a "
                             f"{h}x{w} frame ({wire.field_shape(h, w)})")
        return box.image(frame), box.field(field), box

    def _to_source(self, result: FrameResult, box: Letterbox | None) -> FrameResult:
        """Detections (and masks) in the source frame's pixels, narrowed to this stream's
        options (a cloud with looser ones answers with more)."""
        rows, masks = result.detections, result.masks
        if box is not None:
            rows = box.rows_to_source(rows)
            masks = None if masks is None else box.masks_to_source(masks)
            result.orig_shape, result.letterbox = box.source_hw, box
        keep = self.predict.keep(rows)
        result.detections = rows[keep]
        result.masks = None if masks is None else masks[keep]
        return result

    def _plan(self, frame, field, is_key: bool, index: int | None,
              timestamp: float | None = None) -> _Plan:
        usable = self.core.cloud_usable(self.cloud)
        plan = self.core.plan(frame, field, is_key, index, usable, timestamp)
        if self.cloud is not None and not usable:
            plan.decision.reason = plan.fallback = f"cloud down: {self.core.cloud_down()}"
        return plan

    @property
    def states(self) -> dict[str, EndpointPath]:
        """Per-endpoint dispatch state: input cache and motion accumulated since it last ran."""
        return self.core.states

    @property
    def names(self) -> dict[int, str] | None:
        """The model's class names ({index: name}), as the results carry them."""
        return self.core.names

    def _release(self) -> None:
        """Drop the frames this stream holds (caches, the last frame seen) and stop the cloud
        watch; the endpoints close apart (the async ones are awaited)."""
        if self.core.watch is not None:
            self.core.watch.close()
        for state in self.core.states.values():
            state.forget()
        self.core.motion.reset()


class FluxShardStream(_StreamBase):
    """One camera: decoded frames + motion fields in, detections out, edge or cloud per frame.

    ``edge``: a :class:`LocalEndpoint` (default: the in-process sparse executor), a
    :class:`RemoteEndpoint`, or a Triton URL (a local server on the edge box). ``cloud``: a
    :class:`RemoteEndpoint`, a transport :class:`fluxshard_client.Stream`, a URL, or None (edge
    only). ``dispatch``: auto | edge | cloud | alternate. ``tau``: the one tau
    (``fluxshard.tau``) on the [0, 1] input scale, a :class:`fluxshard.tau.TruncationTable` or a
    :class:`TauPolicy`; per frame it picks each endpoint's residual blocks, and that endpoint's
    executor truncates with the same value.
    ``profile``: a :class:`LatencyProfile` or its JSON path (default: the file
    ``$FLUXSHARD_LATENCY_PROFILE`` names, else the built-in tables). ``margin_ms``: eps (within it, prefer the cloud).
    ``initial_mbps``: the uplink's nominal rate, the estimate until measured transfers rule it
    out (:class:`fluxshard_client.dispatch.BandwidthEstimator`). ``probe_interval``: in
    auto mode the cloud runs at least every N frames, so the estimate and its cache stay fresh.
    ``deadline_ms``: a cloud call not answered within it is abandoned and the edge runs the
    frame (None: derived per frame, :func:`fluxshard_client.deadline.default_deadline_ms`;
    ``math.inf``: none); an unreachable cloud is left out until it answers a readiness probe
    made off the frame path. ``clock``: what deadlines are measured on.
    ``names``: the model's class names for the results (default: the in-process edge's model's).
    ``motion_estimator``: how a bare frame's field is estimated
    (``fluxshard.motion.estimate.FIELD_ESTIMATORS``).

    Predict options, ultralytics' names and defaults (fluxshard.predict): ``imgsz`` letterboxes
    every frame and its field to that long side before anything else (None: the frame as it
    is), so motion estimates, residual sets, caches, the uplink and the model all work at the
    input size; ``conf``, ``iou``, ``classes``, ``max_det`` are the default edge's NMS options,
    and narrow a cloud's answers (its own ``iou`` stands). Results' boxes and masks are in the
    source frame's pixels.

    Use it as a context manager (``with FluxShardStream(...) as stream:``) or call
    :meth:`close`: it ends the cloud stream and releases the caches.
    """

    def __init__(self, edge=None, cloud=None, *, dispatch: str = "auto",
                 tau: float | TauPolicy | TruncationTable = DEFAULT_TAU, profile=None,
                 margin_ms: float = 2.0, initial_mbps: float = 20.0, block: int = 16,
                 probe_interval: int | None = 30, stream_id: int | None = None,
                 deadline_ms: float | None = None, clock=time.monotonic,
                 names: dict[int, str] | None = None,
                 motion_estimator: str = DEFAULT_ESTIMATOR, imgsz: int | None = DEFAULT_IMGSZ,
                 conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU, classes=None,
                 max_det: int = DEFAULT_MAX_DET):
        if isinstance(edge, str):
            edge = RemoteEndpoint.connect(edge, stream_id, block)
        if isinstance(cloud, str):
            cloud = RemoteEndpoint.connect(cloud, stream_id, block)
        elif cloud is not None and not hasattr(cloud, "run"):
            cloud = RemoteEndpoint(cloud)  # a transport Stream
        self._set_up(edge, cloud, dispatch, tau, profile, margin_ms, initial_mbps, block,
                     probe_interval, deadline_ms, clock, names, motion_estimator,
                     PredictOptions(imgsz, conf, iou, classes, max_det))

    def process(self, frame: np.ndarray, field: np.ndarray | None = None, is_key: bool = False,
                index: int | None = None, *, timestamp: float | None = None) -> FrameResult:
        """One decoded frame (H, W, 3) uint8 RGB. ``field``: its per-frame motion field (pixel x
        of this frame came from x + d(x) in the previous one), e.g. the codec's; None: a bare
        frame, whose field is estimated against the previous frame (the first one is a key
        frame). ``is_key``: reset every cache with a dense pass. ``timestamp``: the frame's time
        in seconds, carried to the result."""
        frame, field, box = self._letterbox(frame, field)
        plan = self._plan(frame, field, is_key, index, timestamp)
        name = plan.decision.endpoint
        endpoint = self.edge if name == "edge" else self.cloud
        t0 = time.perf_counter()
        try:
            run = endpoint.run(plan.frame, plan.residual[name], plan.key[name], plan.index,
                               plan.tau[name], **_deadline(plan, endpoint))
        except CloudError as e:
            if name != "cloud":
                raise
            plan, endpoint = self.core.cloud_failed(plan, e, t0), self.edge
            run = endpoint.run(plan.frame, plan.residual["edge"], plan.key["edge"], plan.index,
                               plan.tau["edge"])
        return self._to_source(self.core.commit(plan, run, (time.perf_counter() - t0) * 1e3,
                                                endpoint.remote), box)

    def run(self, source, max_frames: int | None = None, validate: bool = True
            ) -> Iterator[FrameResult]:
        """Decode ``source`` (a file or URL FFmpeg opens) with its motion fields and process
        every frame."""
        from fluxshard.motion import iter_motion

        for mf in iter_motion(source, validate=validate, max_frames=max_frames):
            yield self.process(mf.image, None if mf.is_key else mf.field, mf.is_key, mf.index,
                               timestamp=mf.time)

    def close(self) -> None:
        self._release()
        for endpoint in (self.edge, self.cloud):
            if endpoint is not None:
                endpoint.close()

    def __enter__(self) -> "FluxShardStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _deadline(plan: _Plan, endpoint, name: str = "cloud") -> dict:
    """The deadline argument of a remote cloud's call, when the frame has one."""
    return ({"deadline": plan.deadline} if name == "cloud" and plan.deadline is not None
            and endpoint.remote else {})


async def _call(endpoint, plan: _Plan, name: str) -> EndpointRun:
    args = (plan.frame, plan.residual[name], plan.key[name], plan.index, plan.tau[name])
    if asyncio.iscoroutinefunction(endpoint.run):
        return await endpoint.run(*args, **_deadline(plan, endpoint, name))
    return await asyncio.to_thread(endpoint.run, *args)  # in-process compute: off the loop


class AsyncFluxShardStream(_StreamBase):
    """asyncio twin of :class:`FluxShardStream`: ``cloud`` an :class:`AsyncRemoteEndpoint` or an
    :class:`fluxshard_client.AsyncStream`; the in-process edge runs in a worker thread so the
    event loop keeps serving other streams. ``async with`` closes it (the cloud stream ended,
    the caches released); so does ``await stream.close()``."""

    def __init__(self, edge=None, cloud=None, *, dispatch: str = "auto",
                 tau: float | TauPolicy | TruncationTable = DEFAULT_TAU, profile=None,
                 margin_ms: float = 2.0, initial_mbps: float = 20.0, block: int = 16,
                 probe_interval: int | None = 30, deadline_ms: float | None = None,
                 clock=time.monotonic, names: dict[int, str] | None = None,
                 motion_estimator: str = DEFAULT_ESTIMATOR, imgsz: int | None = DEFAULT_IMGSZ,
                 conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU, classes=None,
                 max_det: int = DEFAULT_MAX_DET):
        if cloud is not None and not hasattr(cloud, "run"):
            cloud = AsyncRemoteEndpoint(cloud)  # a transport AsyncStream
        self._set_up(edge, cloud, dispatch, tau, profile, margin_ms, initial_mbps, block,
                     probe_interval, deadline_ms, clock, names, motion_estimator,
                     PredictOptions(imgsz, conf, iou, classes, max_det))

    async def process(self, frame, field=None, is_key: bool = False, index: int | None = None,
                      *, timestamp: float | None = None) -> FrameResult:
        """See :meth:`FluxShardStream.process`; a bare frame is planned in a worker thread, its
        motion estimate off the event loop."""
        frame, field, box = self._letterbox(frame, field)
        if field is None and not is_key:
            plan = await asyncio.to_thread(self._plan, frame, field, is_key, index, timestamp)
        else:
            plan = self._plan(frame, field, is_key, index, timestamp)
        name = plan.decision.endpoint
        endpoint = self.edge if name == "edge" else self.cloud
        t0 = time.perf_counter()
        try:
            run = await _call(endpoint, plan, name)
        except CloudError as e:
            if name != "cloud":
                raise
            plan, endpoint = self.core.cloud_failed(plan, e, t0), self.edge
            run = await _call(endpoint, plan, "edge")
        return self._to_source(self.core.commit(plan, run, (time.perf_counter() - t0) * 1e3,
                                                endpoint.remote), box)

    async def run(self, source, max_frames: int | None = None,
                  validate: bool = True) -> AsyncIterator[FrameResult]:
        from fluxshard.motion import iter_motion

        frames = iter_motion(source, validate=validate, max_frames=max_frames)
        while True:
            mf = await asyncio.to_thread(next, frames, None)  # decoding blocks: off the loop
            if mf is None:
                return
            yield await self.process(mf.image, None if mf.is_key else mf.field, mf.is_key,
                                     mf.index, timestamp=mf.time)

    async def close(self) -> None:
        self._release()
        if self.cloud is not None:
            await self.cloud.close()
        if self.edge is not None:
            closing = self.edge.close()
            if asyncio.iscoroutine(closing):
                await closing

    async def __aenter__(self) -> "AsyncFluxShardStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
