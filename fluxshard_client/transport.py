"""Transport to the FluxShard cloud model: one Triton sequence per camera stream.

``FluxShardClient(url).open_stream(stream_id)`` gives a :class:`Stream`; ``stream.send(frame,
field, residual_mask)`` encodes the frame (fluxshard.wire), sends it, and checks that the cloud's
rebuilt input equals the stream's mirror of it (digest). The stream recovers by itself: when the
server asks for a resync (unknown stream, frame out of order), when the digests disagree, or when
the server went away and came back, it re-sends the same frame as a key frame. A frame is either
answered correctly or raises; it is never silently lost or answered from a wrong input.

With the H.264 uplink (``residual_codec=Codec.H264``) the stream keeps a low-latency x264 encoder
(``fluxshard.uplink_h264``) fed only the frames it sends, and decodes its own packets with the
cloud's decoder for its mirror; field and residual mask are then not sent (the cloud takes the
decoder's vectors), and every resync is an IDR. Any failed send makes the next frame an IDR.

The caller's motion field is quantized to the wire's quarter-pel (``fluxshard.wire.quantize_field``)
before use; callers that pick residual blocks themselves should quantize first too.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

import numpy as np

from fluxshard import wire
from fluxshard.protocol import (SECRET_PARAMETER, grpc_channel_args, random_stream_id,
                                restricted_header)
from fluxshard.endpoint import Uplink
from fluxshard.receive import ReceiveState

MODEL_NAME = "fluxshard"
OUTPUTS = ("DETECTIONS", "STATS", "DIGEST", "MASKS")


class CloudError(RuntimeError):
    """The cloud rejected a frame for a reason a key frame does not fix (bad payload, internal
    error), or did not come back within the reconnect timeout."""


class CloudUnavailable(CloudError):
    """The cloud could not be reached and the frame has a deadline: given up at once, without
    the retry policy's pauses (the caller runs the frame elsewhere and watches for the cloud)."""


class DeadlineMissed(CloudError):
    """The cloud did not answer within the frame's deadline: the call was abandoned (the cloud
    may or may not have applied the frame, so the stream's next frame is a key frame)."""


class _Resync(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Unavailable(Exception):
    pass


class DetectionRows:
    """Column views of ``detections`` ((N, 6) float32: x1, y1, x2, y2, score, class)."""

    detections: np.ndarray

    @property
    def boxes(self) -> np.ndarray:
        return self.detections[:, :4]

    @property
    def scores(self) -> np.ndarray:
        return self.detections[:, 4]

    @property
    def classes(self) -> np.ndarray:
        return self.detections[:, 5].astype(np.int64)


@dataclass
class CloudResult(DetectionRows):
    """The cloud's answer for one frame."""

    frame_index: int
    detections: np.ndarray  # (N, 6) float32 x1, y1, x2, y2, score, class
    digest: bytes
    stats: dict
    key: bool  # sent as a key frame
    resyncs: list[str] = dataclass_field(default_factory=list)  # why it was re-sent, if it was
    wire_bytes: int = 0  # bytes of the payload that was answered
    round_trip_ms: float = 0.0
    masks: np.ndarray | None = None  # (N, H, W) bool in the sent frame's pixels; None: detect


@dataclass
class RetryPolicy:
    """How long a stream waits for an unreachable server, and how often it re-sends."""

    reconnect_timeout_s: float = 120.0
    backoff_s: tuple[float, float] = (0.1, 2.0)  # first, largest pause between tries
    max_resyncs: int = 3  # key-frame re-sends per frame before giving up


def _classify(exc: Exception) -> Exception:
    """Map a tritonclient / transport exception onto resync, unavailable, or a CloudError."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        msg = exc.message() or str(exc)
        status = str(exc.status() or "")
        low = msg.lower()
        if "resync needed" in low or "must specify the start flag" in low:
            return _Resync(msg)
        if "bad payload" in low or "internal error" in low:  # the model's own answers
            return CloudError(f"cloud rejected the frame: {msg}")
        if "cancelled" in status.lower():
            # the server did not compute the frame: Triton cancels a START that waited in its
            # backlog for a sequence slot until the idle timeout (every slot is held by other
            # streams), and the requests in flight when it shuts down
            if not msg:
                return _Unavailable("the server has no free stream slot (Triton cancelled the "
                                    "queued start)")
            return _Unavailable(f"the server cancelled the request (shutting down?): {msg}")
        if "protocol is restricted" in low:  # Triton says so with status UNAVAILABLE
            return CloudError(f"cloud refused the request: {msg} (the server requires an auth "
                              "header: FluxShardClient(headers=auth_headers(KEY, VALUE)), "
                              "`fluxshard run --auth-header KEY=VALUE`)")
        if ("unavailable" in status.lower() or "deadline" in status.lower()
                or "not found" in low or "not ready" in low or "unavailable" in low
                or "failed to connect" in low or "connection" in low or "socket closed" in low
                # a dead python-backend stub: `fluxshard serve`'s supervisor restarts the server
                or "is not healthy" in low):
            return _Unavailable(msg)
        return CloudError(f"cloud rejected the frame: {msg}")
    if isinstance(exc, (ConnectionError, OSError, TimeoutError)):
        return _Unavailable(f"{type(exc).__name__}: {exc}")
    return exc


def _tls_options(protocol: str, ssl: bool, root_certificates, private_key,
                 certificate_chain) -> dict:
    """tritonclient's gRPC TLS arguments (PEM file paths): ``ssl`` with the CA to trust
    (``root_certificates``; None: the system's) and, for mutual TLS, the client's key and
    certificate chain."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (mutual TLS)")
    ssl = bool(ssl or root_certificates or private_key)
    if not ssl:
        return {}
    if protocol != "grpc":
        raise ValueError("TLS needs protocol 'grpc' (tritonserver serves gRPC over TLS; its "
                         "HTTP endpoint has none)")
    for what, path in (("root_certificates", root_certificates), ("private_key", private_key),
                       ("certificate_chain", certificate_chain)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"TLS {what} file not found: {path}")
    return {"ssl": True, "root_certificates": None if root_certificates is None
            else str(root_certificates), "private_key": None if private_key is None
            else str(private_key), "certificate_chain": None if certificate_chain is None
            else str(certificate_chain)}


def auth_headers(key: str, value: str, protocol: str = "grpc") -> dict[str, str]:
    """The request header that opens a ``fluxshard serve --auth-header KEY=VALUE`` server
    (Triton matches gRPC restricted-protocol headers under a fixed key prefix)."""
    return restricted_header(key, value, protocol)


def _close_deadline():
    from .deadline import CLOSE_TIMEOUT_S, Deadline

    return Deadline.after(CLOSE_TIMEOUT_S)


def _uplink_delay(uplink_mbps: float | None):
    """Seconds a payload of n bytes takes on a simulated uplink of ``uplink_mbps`` (None: no
    limit). Localhost has no link to speak of; this lets demos and benchmarks impose one. The
    delay is part of the measured round trip, as a real slow link would be."""
    if uplink_mbps is None:
        return lambda n: 0.0
    if not uplink_mbps > 0:
        raise ValueError(f"uplink_mbps must be > 0, got {uplink_mbps}")
    bytes_per_s = uplink_mbps * 1e6 / 8
    return lambda n: n / bytes_per_s


class _StreamCore:
    """The protocol state of one stream, shared by the sync and the asyncio streams."""

    def __init__(self, stream_id: int | None, block: int, retry: RetryPolicy,
                 key_codec: wire.Codec, residual_codec: wire.Codec = wire.Codec.ZLIB,
                 uplink_quality: int | None = None, secret: str | None = None):
        if stream_id is None:
            stream_id = random_stream_id()
        # fixed for the stream's life: the server lets only requests carrying it touch the stream
        self.secret = secret or secrets.token_urlsafe(24)
        if not 0 < int(stream_id) < 2**64:
            raise ValueError(f"stream id must be in [1, 2**64), got {stream_id} (0 means 'no "
                             "sequence' to Triton)")
        self.stream_id = int(stream_id)
        self.block = block
        self.retry = retry
        # codecs, the H.264 encoder and the mirror of the cloud's input cache
        self.uplink = Uplink(block, key_codec, residual_codec, uplink_quality)
        self.need_start = True  # next request opens the Triton sequence
        self.need_key = True
        self.next_index = 0
        self.closed = False

    @property
    def mirror(self) -> ReceiveState:
        """What the cloud's input cache holds, as far as we know (the uplink's)."""
        return self.uplink.mirror

    def prepare(self, frame, field, residual_mask, key, frame_index, tau=0.0, residual=None):
        """-> (payload, the mirror state after the cloud applies it, key). ``tau``: the cloud's
        executor truncates with it (``fluxshard.tau``). ``residual``: a residual set in place of
        ``field`` and ``residual_mask`` (``fluxshard.endpoint.Uplink.encode``)."""
        if self.closed:
            raise RuntimeError(f"stream {self.stream_id} is closed")
        index = self.next_index if frame_index is None else int(frame_index)
        if index < self.next_index:
            raise ValueError(f"frame index {index} is not after the previous one "
                             f"({self.next_index - 1})")
        sent = self.uplink.encode(np.asarray(frame), index, key or self.need_key, tau,
                                  field=field, residual_mask=residual_mask, residual=residual)
        return sent.payload, sent.mirror, sent.key, index

    def finish(self, outputs: dict, predicted: ReceiveState, key: bool, index: int,
               payload: bytes, resyncs: list[str], round_trip_ms: float) -> CloudResult:
        response = wire.response_from_tensors(outputs["DETECTIONS"], outputs["STATS"],
                                              outputs["DIGEST"], outputs.get("MASKS"))
        if response.digest != predicted.digest:
            raise _Resync(f"digest mismatch at frame {index}: cloud "
                          f"{response.digest.hex()} != mirror {predicted.digest.hex()}")
        if response.frame_index != index:
            raise _Resync(f"cloud answered frame {response.frame_index} for frame {index}")
        self.commit(predicted, index)
        return CloudResult(index, response.detections, response.digest, response.stats, key,
                           resyncs, len(payload), round_trip_ms, response.masks)

    def commit(self, predicted: ReceiveState, index: int) -> None:
        """The cloud applied frame ``index``: the mirror becomes what ``prepare`` predicted."""
        self.uplink.commit(predicted)
        self.need_start = self.need_key = False
        self.next_index = index + 1

    def on_resync(self, reason: str, resyncs: list[str]) -> None:
        resyncs.append(reason)
        if sum(1 for r in resyncs if not r.startswith("unavailable")) > self.retry.max_resyncs:
            raise CloudError(f"stream {self.stream_id}: still out of sync after "
                             f"{self.retry.max_resyncs} key frames: {resyncs[-1]}")
        self.need_key = True
        # a resync may mean Triton forgot the sequence; START makes the key frame open it again
        self.need_start = True

    def time_left(self, deadline) -> float | None:
        """Seconds left until the frame's ``deadline`` (None: it has none). A deadline already
        gone abandons the frame and makes the next one a key frame: the cloud may or may not
        have applied it."""
        if deadline is None:
            return None
        left = deadline.remaining()
        if left <= 0:
            self.need_key = self.need_start = True
            raise DeadlineMissed(f"stream {self.stream_id}: no answer within the frame's "
                                 "deadline")
        return left

    def on_unavailable(self, reason: str, resyncs: list[str], started: float,
                       deadline=None) -> float:
        """Mark the stream for a key frame and return the pause before the next try; a frame
        with a deadline is given up at once (no pauses inside a frame)."""
        if deadline is not None:
            self.need_key = self.need_start = True
            if "deadline exceeded" in reason.lower():  # the call's own timeout: the deadline's
                raise DeadlineMissed(f"stream {self.stream_id}: no answer within the frame's "
                                     f"deadline ({reason})")
            self.time_left(deadline)
            raise CloudUnavailable(f"stream {self.stream_id}: cloud unreachable: {reason}")
        if time.monotonic() - started > self.retry.reconnect_timeout_s:
            raise CloudError(f"stream {self.stream_id}: cloud unreachable for "
                             f"{self.retry.reconnect_timeout_s:.0f} s: {reason}")
        if not resyncs or resyncs[-1] != f"unavailable: {reason}":
            resyncs.append(f"unavailable: {reason}")
        # the server may have restarted and lost every stream: come back with a key frame
        self.need_key = self.need_start = True
        first, largest = self.retry.backoff_s
        tries = sum(1 for r in resyncs if r.startswith("unavailable"))
        return min(largest, first * 2 ** min(tries, 10))


class FluxShardClient:
    """A connection to the cloud model. ``protocol`` is "grpc" (url like ``host:8001``) or
    "http" (``host:8000``). gRPC over TLS: ``ssl=True`` with ``root_certificates`` (PEM file of
    the CA to trust; None: the system's), and for mutual TLS ``private_key`` and
    ``certificate_chain`` (the client's). ``headers`` go with every request (an auth header:
    :func:`auth_headers`)."""

    def __init__(self, url: str, protocol: str = "grpc", model_name: str = MODEL_NAME,
                 timeout_s: float = 60.0, retry: RetryPolicy | None = None,
                 uplink_mbps: float | None = None, ssl: bool = False,
                 root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, headers: dict[str, str] | None = None):
        tls = _tls_options(protocol, ssl, root_certificates, private_key, certificate_chain)
        self.headers = dict(headers) if headers else None  # sent with every request
        if protocol == "grpc":
            import tritonclient.grpc as tc
        elif protocol == "http":
            import tritonclient.http as tc
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self._tc = tc
        self.url, self.protocol, self.model_name = url, protocol, model_name
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.uplink_delay = _uplink_delay(uplink_mbps)
        kwargs = {"network_timeout": timeout_s, "connection_timeout": 5.0} if protocol == "http" else {}
        if protocol == "grpc":  # reconnect to a restarted server within a second
            kwargs["channel_args"] = grpc_channel_args()
        self._client = tc.InferenceServerClient(url, **kwargs, **tls)

    def open_stream(self, stream_id: int | None = None, block: int = 16,
                    key_codec: wire.Codec = wire.Codec.ZLIB,
                    residual_codec: wire.Codec = wire.Codec.ZLIB,
                    uplink_quality: int | None = None, secret: str | None = None) -> "Stream":
        """A camera stream. Codecs of the pixels it sends (fluxshard.wire.Codec): ZLIB (lossless,
        the default), JPEG (lossy, several times fewer bytes; the mirror follows what the cloud
        decodes) or H264 for both (a video encoder per stream; ``uplink_quality`` its crf,
        default ``fluxshard.uplink_h264.DEFAULT_CRF``). ``stream_id``: the Triton sequence id;
        None (the default) draws a random 63-bit one no other client can guess. ``secret``: the
        stream's secret, sent with every request (default: a random one; pass your own to
        re-open the same stream from another process while the server still holds it)."""
        return Stream(self, _StreamCore(stream_id, block, self.retry, key_codec, residual_codec,
                                        uplink_quality, secret))

    def is_ready(self, timeout_s: float | None = None) -> bool:
        extra = {"headers": self.headers}
        if timeout_s is not None and self.protocol == "grpc":
            extra["client_timeout"] = timeout_s
        try:
            return bool(self._client.is_server_ready(**extra)
                        and self._client.is_model_ready(self.model_name, **extra))
        except Exception:
            return False

    def infer(self, payload: bytes, stream_id: int, start: bool, end: bool,
              timeout_s: float | None = None, *,
              secret: str | None = None) -> dict[str, np.ndarray]:
        """One raw request; tritonclient exceptions propagate. ``timeout_s``: this call's limit
        (gRPC; at most the client's ``timeout_s``), the simulated uplink's wait included."""
        limit = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        delay = self.uplink_delay(len(payload))
        if delay >= limit:
            time.sleep(limit)
            raise TimeoutError("deadline exceeded on the simulated uplink")
        time.sleep(delay)
        tc = self._tc
        data = np.frombuffer(payload, np.uint8)[None]
        inp = tc.InferInput("PAYLOAD", list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        if self.protocol == "http":  # timeouts: network_timeout of the connection
            outputs = [tc.InferRequestedOutput(n, binary_data=True) for n in OUTPUTS]
            extra = {}
        else:
            outputs = [tc.InferRequestedOutput(n) for n in OUTPUTS]
            extra = {"client_timeout": limit - delay}
        result = self._client.infer(self.model_name, [inp], outputs=outputs, sequence_id=stream_id,
                                    sequence_start=start, sequence_end=end, headers=self.headers,
                                    parameters={SECRET_PARAMETER: secret} if secret else None,
                                    **extra)
        return {n: result.as_numpy(n) for n in OUTPUTS}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "FluxShardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StreamHandle:
    """What the sync and asyncio streams share: their client and protocol core."""

    def __init__(self, client, core: _StreamCore):
        self.client, self.core = client, core

    @property
    def stream_id(self) -> int:
        return self.core.stream_id

    @property
    def mirror(self) -> ReceiveState:
        """The edge's mirror of the cloud's input cache for this stream."""
        return self.core.mirror


class Stream(_StreamHandle):
    """One camera stream on the cloud (a Triton sequence)."""

    def send(self, frame: np.ndarray, field: np.ndarray | None = None,
             residual_mask: np.ndarray | None = None, key: bool = False,
             frame_index: int | None = None, end: bool = False, tau: float = 0.0,
             deadline=None, *, residual=None) -> CloudResult:
        """Send one frame: a residual frame (``field``, ``residual_mask``, or ``residual``: a
        :class:`fluxshard.endpoint.EndpointPath`'s residual set, whose aligned cache the mirror
        reuses) or, with ``key`` (or when the stream needs one), the full frame. ``frame`` is always the full decoded frame so
        the stream can fall back to a key frame. ``end`` closes the stream after this frame. ``tau``:
        the cloud's executor truncates with it (the tau the residual blocks were picked at).
        ``deadline`` (:class:`fluxshard_client.deadline.Deadline`): past it the frame is
        abandoned (:class:`DeadlineMissed`), and an unreachable cloud raises
        :class:`CloudUnavailable` at once instead of waiting out the retry policy."""
        core, resyncs, started = self.core, [], time.monotonic()
        while True:
            left = core.time_left(deadline)
            payload, predicted, is_key, index = core.prepare(frame, field, residual_mask, key,
                                                             frame_index, tau, residual)
            t0 = time.perf_counter()
            try:
                outputs = self.client.infer(payload, core.stream_id, core.need_start, end, left,
                                            secret=core.secret)
                core.time_left(deadline)  # an answer past the deadline was not waited for
                result = core.finish(outputs, predicted, is_key, index, payload, resyncs,
                                     (time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001 - classified below
                kind = e if isinstance(e, (_Resync, _Unavailable)) else _classify(e)
                if isinstance(kind, _Resync):
                    core.on_resync(kind.reason, resyncs)
                    continue
                if isinstance(kind, _Unavailable):
                    time.sleep(core.on_unavailable(str(kind), resyncs, started, deadline))
                    continue
                core.need_key = True  # whatever the cloud holds now, come back with a key frame
                raise kind from e
            if end:
                core.closed = True
            return result

    def close(self) -> None:
        """End the Triton sequence (one last no-change frame with END) so the server frees it."""
        core = self.core
        if core.closed:
            return
        if core.mirror.cache is not None and not core.need_start:
            h, w = core.mirror.cache.shape[:2]
            zero = np.zeros(wire.field_shape(h, w), np.float32)
            none = np.zeros(wire.residual_grid(h, w, core.block), bool)
            try:
                # one prompt try: a server that is gone frees the sequence by its idle sweep
                self.send(core.mirror.cache, zero, none, end=True, deadline=_close_deadline())
            except CloudError:
                pass  # the server forgot the stream already; its idle sweep frees the rest
        core.closed = True

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------- asyncio

class AsyncFluxShardClient:
    """The asyncio client (gRPC): many streams in one event loop."""

    def __init__(self, url: str, model_name: str = MODEL_NAME, timeout_s: float = 60.0,
                 retry: RetryPolicy | None = None, uplink_mbps: float | None = None,
                 ssl: bool = False, root_certificates: str | None = None,
                 private_key: str | None = None, certificate_chain: str | None = None,
                 headers: dict[str, str] | None = None):
        """TLS and ``headers``: see :class:`FluxShardClient`."""
        import tritonclient.grpc.aio as aio

        tls = _tls_options("grpc", ssl, root_certificates, private_key, certificate_chain)
        self.headers = dict(headers) if headers else None
        self._aio = aio
        self.uplink_delay = _uplink_delay(uplink_mbps)
        self.url, self.model_name, self.timeout_s = url, model_name, timeout_s
        self.retry = retry or RetryPolicy()
        self._client = aio.InferenceServerClient(url, channel_args=grpc_channel_args(), **tls)

    async def is_ready(self, timeout_s: float | None = None) -> bool:
        try:
            return bool(await self._client.is_server_ready(headers=self.headers,
                                                           client_timeout=timeout_s)
                        and await self._client.is_model_ready(self.model_name,
                                                              headers=self.headers,
                                                              client_timeout=timeout_s))
        except Exception:
            return False

    def open_stream(self, stream_id: int | None = None, block: int = 16,
                    key_codec: wire.Codec = wire.Codec.ZLIB,
                    residual_codec: wire.Codec = wire.Codec.ZLIB,
                    uplink_quality: int | None = None, secret: str | None = None) -> "AsyncStream":
        """See :meth:`FluxShardClient.open_stream`."""
        return AsyncStream(self, _StreamCore(stream_id, block, self.retry, key_codec,
                                             residual_codec, uplink_quality, secret))

    async def infer(self, payload: bytes, stream_id: int, start: bool, end: bool,
                    timeout_s: float | None = None, *, secret: str | None = None):
        limit = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        delay = self.uplink_delay(len(payload))
        if delay >= limit:
            await asyncio.sleep(limit)
            raise TimeoutError("deadline exceeded on the simulated uplink")
        await asyncio.sleep(delay)
        aio = self._aio
        data = np.frombuffer(payload, np.uint8)[None]
        inp = aio.InferInput("PAYLOAD", list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        result = await self._client.infer(self.model_name, [inp],
                                          outputs=[aio.InferRequestedOutput(n) for n in OUTPUTS],
                                          sequence_id=stream_id, sequence_start=start,
                                          sequence_end=end, client_timeout=limit - delay,
                                          headers=self.headers,
                                          parameters={SECRET_PARAMETER: secret} if secret else None)
        return {n: result.as_numpy(n) for n in OUTPUTS}

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncFluxShardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncStream(_StreamHandle):
    """asyncio twin of :class:`Stream`; the same protocol, the same recovery."""

    async def send(self, frame: np.ndarray, field: np.ndarray | None = None,
                   residual_mask: np.ndarray | None = None, key: bool = False,
                   frame_index: int | None = None, end: bool = False,
                   tau: float = 0.0, deadline=None, *, residual=None) -> CloudResult:
        core, resyncs, started = self.core, [], time.monotonic()
        while True:
            left = core.time_left(deadline)
            payload, predicted, is_key, index = core.prepare(frame, field, residual_mask, key,
                                                             frame_index, tau, residual)
            t0 = time.perf_counter()
            try:
                outputs = await self.client.infer(payload, core.stream_id, core.need_start, end,
                                                  left, secret=core.secret)
                core.time_left(deadline)  # an answer past the deadline was not waited for
                result = core.finish(outputs, predicted, is_key, index, payload, resyncs,
                                     (time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001 - classified below
                kind = e if isinstance(e, (_Resync, _Unavailable)) else _classify(e)
                if isinstance(kind, _Resync):
                    core.on_resync(kind.reason, resyncs)
                    continue
                if isinstance(kind, _Unavailable):
                    await asyncio.sleep(core.on_unavailable(str(kind), resyncs, started,
                                                            deadline))
                    continue
                core.need_key = True  # whatever the cloud holds now, come back with a key frame
                raise kind from e
            if end:
                core.closed = True
            return result

    async def close(self) -> None:
        core = self.core
        if core.closed:
            return
        if core.mirror.cache is not None and not core.need_start:
            h, w = core.mirror.cache.shape[:2]
            zero = np.zeros(wire.field_shape(h, w), np.float32)
            none = np.zeros(wire.residual_grid(h, w, core.block), bool)
            try:
                await self.send(core.mirror.cache, zero, none, end=True,
                                deadline=_close_deadline())
            except CloudError:
                pass
        core.closed = True

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
