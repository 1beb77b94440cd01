"""Model-side session logic: per-stream state keyed by Triton's correlation id.

The Triton model (``model_repository/fluxshard/1/model.py``) is a thin adapter around
:class:`SessionManager`; everything here is plain Python so it can run in-process too. The
compute behind a stream is a :class:`fluxshard.sessions.StreamSession`.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, field as dataclass_field
from typing import Callable

import numpy as np

from fluxshard.wire import PayloadError, Request, Response, decode_request, peek_header
from fluxshard.serving.limits import FrameLimits, release_memory
from fluxshard.serving.metrics import SessionObserver
from fluxshard.receive import ReceiveState, ResyncNeeded
from fluxshard.sessions import SessionFactory, SessionResult, StreamSession


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
    ``observer`` hears of frames served, resyncs and streams freed (the served model's metrics,
    :mod:`fluxshard.serving.metrics`).
    """

    def __init__(self, session_factory: SessionFactory, idle_seconds: float = 60.0,
                 max_streams: int = 256, clock: Callable[[], float] = time.monotonic,
                 frame_limits: FrameLimits | None = None,
                 observer: SessionObserver | None = None):
        self.session_factory = session_factory
        self.observer = observer or SessionObserver()
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
            request = self._decode(payload)
            with self._lock:
                stream, rebuilt = self._admit(corrid, start, end, request, secret)
                result = SessionResult(*stream.session.infer(
                    rebuilt, request.field, request.residual_mask, request.key, tau=request.tau))
                return self._respond(corrid, stream, request, result, t0)
        finally:
            if end:  # END frees the session whatever became of the frame
                self.end(corrid, secret)

    def handle_many(self, frames: list[StreamFrame]) -> list[Response | Exception]:
        """Several streams' frames (one Triton ``execute``) computed together: each frame is
        checked, admitted and rebuilt per stream as :meth:`handle` does, then the frames whose
        sessions share an engine are computed in one engine call per input size
        (``fluxshard.tiles.batching``: the tile executor's crops of every stream grouped by
        size, dense frames of the same size in one batch); sessions without steps (the exact
        executor) run alone. Returns, per frame in order, its response or the exception
        :meth:`handle` would have raised for it. Two frames of one stream are computed one
        after the other, in order."""
        results: list[Response | Exception | None] = [None] * len(frames)
        started = [time.perf_counter()] * len(frames)
        todo = list(range(len(frames)))
        while todo:  # rounds in which every stream has at most one frame
            seen, now_round, later = set(), [], []
            for i in todo:
                (later if frames[i].corrid in seen else now_round).append(i)
                seen.add(frames[i].corrid)
            self._handle_round(frames, now_round, results, started)
            todo = later
        return results

    def _handle_round(self, frames, indices, results, started) -> None:
        admitted = []  # (frame index, stream, request, rebuilt)
        try:
            with self._lock:
                for i in indices:
                    f = frames[i]
                    try:
                        request = self._decode(f.payload)
                        stream, rebuilt = self._admit(f.corrid, f.start, f.end, request, f.secret)
                    except Exception as e:
                        results[i] = e
                        continue
                    admitted.append((i, stream, request, rebuilt))
                for (i, stream, request, rebuilt), outcome in zip(
                        admitted, _compute_together(admitted)):
                    if outcome.error is not None:
                        results[i] = outcome.error
                        continue
                    results[i] = self._respond(frames[i].corrid, stream, request,
                                               SessionResult(*outcome.value), started[i])
        finally:
            for i in indices:
                if frames[i].end:  # END frees the session whatever became of the frame
                    self.end(frames[i].corrid, frames[i].secret)

    def _decode(self, payload) -> Request:
        if isinstance(payload, np.ndarray):
            payload = payload.tobytes()
        header = peek_header(payload)
        self.frame_limits.check(header["height"], header["width"])  # before any decode work
        return decode_request(payload)

    def _admit(self, corrid: int, start: bool, end: bool, request: Request,
               secret: str) -> tuple[_Stream, np.ndarray]:
        """The stream ``request`` belongs to (opened, reset or found; the secret checked) and
        the input it rebuilds; raises what :meth:`handle` raises for it."""
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
        try:
            rebuilt = stream.receive.apply(request)
        except ResyncNeeded:
            self.observer.resync(corrid)
            raise
        return stream, rebuilt

    def _respond(self, corrid: int, stream: _Stream, request: Request,
                 result: SessionResult, t0: float) -> Response:
        detections, compute_stats, masks = result
        stream.frames += 1
        grid = -(-np.array(request.shape) // request.block)
        stats = {"frame_index": request.frame_index, "key": request.key,
                 "wire_bytes": request.wire_bytes,
                 "residual_blocks": 0 if request.key else int(request.residual_mask.sum()),
                 "uplink_codec": request.codec.name.lower(),
                 "total_blocks": int(grid.prod()), "tau": request.tau,
                 "server_ms": round((time.perf_counter() - t0) * 1e3, 3), **compute_stats}
        self.observer.frame(corrid, stats)
        return Response(detections=detections, digest=stream.receive.digest, stats=stats,
                        masks=masks)

    def close(self, corrid: int) -> None:
        """Free a stream, whoever owns it (the server's own clean-up)."""
        with self._lock:
            stream = self.streams.pop(corrid, None)
        if stream is not None:
            stream.session.close()
            self.observer.closed(corrid)
            release_memory()

    def end(self, corrid: int, secret: str) -> bool:
        """Free a stream on its owner's END; whether one was freed."""
        with self._lock:
            stream = self.streams.get(corrid)
            if stream is None or not _same_secret(stream.secret, secret):
                return False
            del self.streams[corrid]
        stream.session.close()
        self.observer.closed(corrid)
        release_memory()
        return True

    def sweep(self, now: float | None = None) -> list[int]:
        """Free streams idle longer than ``idle_seconds``; returns their ids."""
        with self._lock:
            now = self.clock() if now is None else now
            stale = [c for c, s in self.streams.items() if now - s.last_seen > self.idle_seconds]
            for c in stale:
                self.streams.pop(c).session.close()
                self.observer.closed(c)
        if stale:
            release_memory()
        return stale


def _same_secret(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


@dataclass
class StreamFrame:
    """One request of :meth:`SessionManager.handle_many`: :meth:`SessionManager.handle`'s
    arguments."""

    corrid: int
    start: bool
    end: bool
    payload: bytes
    secret: str = ""


def _batchable(session) -> bool:
    """Whether ``session`` can share engine calls (``infer_steps`` and an ``engine``)."""
    return callable(getattr(session, "infer_steps", None)) and \
        getattr(session, "engine", None) is not None


def _compute_together(admitted) -> list:
    """Outcomes (``fluxshard.tiles.batching.Outcome``) of ``infer`` for every admitted
    (index, stream, request, rebuilt): batchable sessions in one :func:`run_together` (under
    their sessions' locks), the others alone."""
    import contextlib

    import torch

    from fluxshard.tiles.batching import Outcome, run_together

    outcomes: list = [None] * len(admitted)
    jobs, where = [], []
    for k, (_i, stream, request, rebuilt) in enumerate(admitted):
        session = stream.session
        args = (rebuilt, request.field, request.residual_mask, request.key)
        if len(admitted) > 1 and _batchable(session):
            jobs.append((session.infer_steps(*args, tau=request.tau), session.engine))
            where.append(k)
            continue
        try:
            outcomes[k] = Outcome(session.infer(*args, tau=request.tau))
        except Exception as e:
            outcomes[k] = Outcome(error=e)
    if jobs:
        locks = {id(lock): lock for lock in (getattr(admitted[k][1].session, "lock", None)
                                             for k in where) if lock is not None}
        with contextlib.ExitStack() as held, torch.inference_mode():
            for key in sorted(locks):  # one order for every caller
                held.enter_context(locks[key])
            for k, outcome in zip(where, run_together(jobs)):
                if outcome.error is None:
                    outcome.value[1]["batched_streams"] = len(jobs)
                outcomes[k] = outcome
    return outcomes


__all__ = ["SessionManager", "StreamFrame", "ResyncNeeded", "PayloadError", "ServerFull", "unknown_stream"]
