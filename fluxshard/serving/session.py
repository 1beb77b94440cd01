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
        try:
            rebuilt = stream.receive.apply(request)
        except ResyncNeeded:
            self.observer.resync(corrid)
            raise
        detections, compute_stats, masks = SessionResult(*stream.session.infer(
            rebuilt, request.field, request.residual_mask, request.key, tau=request.tau))
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


__all__ = ["SessionManager", "ResyncNeeded", "PayloadError", "ServerFull", "unknown_stream"]
