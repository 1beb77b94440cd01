"""How many camera streams one server holds: real streams replayed, the server's batching set.

:func:`clip_payloads` encodes a clip as the SDK sends a stream whose every frame goes to the
cloud (``fluxshard.endpoint.EndpointPath`` with an ``Uplink``: a key frame, then residual frames
with the field accumulated since the last one), and keeps the digest the server's input must
have after each. :class:`PacedStream` sends them from a thread at the clip's frame rate, one
request in flight (a stream's frames are applied in order), and records each frame's latency
from the moment the camera had it: a server that falls behind shows it as latency, since a
frame that waits for the previous answer is late from its capture time on. A frame is *lost*
when it is refused or answered from another input than its own (wrong digest).
:func:`batching_repository` serves the ``fluxshard`` model with other sequence-batching
settings (instances, batch size, queue delay), :func:`group_cpu_seconds` reads what a server's
process group used. ``perf/bench_capacity.py`` runs them; ``perf/load_test.py`` builds its
payloads here too; the server's tests drive streams with them (a test driver beside its users,
like ``perf/reliability_kit.py``).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from fluxshard.wire import PayloadError, response_from_tensors


@dataclass
class ClipPayloads:
    """A clip's frames as wire payloads: ``payloads[k]`` is frame k's request (frame 0 a key
    frame), ``digests[k]`` the server input's digest after it, ``fps`` the clip's frame rate."""

    payloads: list[bytes]
    digests: list[bytes]
    keys: list[bool]
    fps: float
    shape: tuple[int, int]  # (H, W)

    def __len__(self) -> int:
        return len(self.payloads)


def clip_fps(video: str | Path) -> float:
    """The clip's average frame rate (25 when the container does not say)."""
    import av

    with av.open(str(video)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate or Fraction(25))


def clip_payloads(video: str | Path, tau: float | None = None, block: int = 16,
                  frames: int | None = None, keyframe_every: int | None = None,
                  validate: bool = True, start: int = 0) -> ClipPayloads:
    """The wire payloads of ``video``'s ``frames`` frames (all when None) from frame ``start``
    (its key frame: a camera joining mid-clip) along a cloud
    :class:`fluxshard.endpoint.EndpointPath` at ``tau`` (None: the SDK's default policy),
    with a key frame every ``keyframe_every`` frames (None: only the first; a sequence then
    starts at each key frame); ``validate``: as ``fluxshard.motion.decode.iter_motion``."""
    from fluxshard.endpoint import EndpointPath, Uplink
    from fluxshard.motion.decode import iter_motion

    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    path = EndpointPath(tau, block, uplink=Uplink(block))
    payloads, digests, keys, shape = [], [], [], None
    decoded = iter_motion(str(video), validate=validate,
                          max_frames=None if frames is None else start + frames)
    for k, mf in enumerate(itertools.islice(decoded, start, None)):
        key = k == 0 or bool(keyframe_every and k % keyframe_every == 0)
        step = path.step(mf.image, None if key else mf.field, key=key, index=k)
        payloads.append(step.sent.payload)
        digests.append(step.sent.mirror.digest)
        keys.append(step.sent.key)
        shape = mf.image.shape[:2]
    if not payloads:
        raise ValueError(f"{video}: no frames decoded")
    return ClipPayloads(payloads, digests, keys, clip_fps(video), shape)


@dataclass
class PacedReport:
    """What one paced stream saw; latencies, dues and stats of the measured frames only."""

    stream_id: int
    frames_sent: int = 0
    frames_answered: int = 0
    frames_lost: int = 0
    latencies_s: list = field(default_factory=list)  # from each frame's capture time
    dues: list = field(default_factory=list)  # each measured frame's capture time (clock)
    stats: list = field(default_factory=list)  # each answer's STATS (fluxshard.wire)
    errors: list = field(default_factory=list)
    stopped_early: bool = False  # join's timeout ended it before every frame was sent


class PacedStream:
    """One camera: ``clip`` sent through ``client`` (a ``fluxshard_client.FluxShardClient`` of
    its own: its raw ``infer`` and ``close``) as sequence ``stream_id`` from a thread, frame k
    due at start + k / fps (the clip played over and over: each pass starts a new sequence with
    its key frame). ``clock`` and ``sleep`` are injectable.
    """

    def __init__(self, client, stream_id: int, clip: ClipPayloads,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.client = client
        self.stream_id, self.clip = stream_id, clip
        self.clock, self.sleep = clock, sleep
        self.report = PacedReport(stream_id)
        # frames due before this (clock) are sent and checked but not measured (a warm-up)
        self.measure_from: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, k: int, due: float) -> None:
        """Send frame ``k`` of the replay (due at ``due`` on ``clock``) and check its answer."""
        clip = self.clip
        i = k % len(clip)
        self.report.frames_sent += 1
        try:
            out = self.client.infer(clip.payloads[i], self.stream_id, start=i == 0, end=False)
        except Exception as e:  # refused, timed out, server gone: lost
            self.report.frames_lost += 1
            self.report.errors.append(f"frame {k}: {type(e).__name__}: {e}")
            return
        latency = self.clock() - due
        self.report.frames_answered += 1
        try:
            answer = response_from_tensors(out["DETECTIONS"], out["STATS"], out["DIGEST"])
        except PayloadError as e:
            answer = None
            self.report.errors.append(f"frame {k}: {e}")
        if answer is None or answer.digest != clip.digests[i]:
            self.report.frames_lost += 1
            if answer is not None:
                self.report.errors.append(f"frame {k}: answered from another input")
            return
        if self.measure_from is None or due >= self.measure_from:
            self.report.latencies_s.append(latency)
            self.report.dues.append(due)
            self.report.stats.append(answer.stats)

    def run(self, frames: int, start: float) -> PacedReport:
        """Send ``frames`` frames, frame k due at ``start + k / fps`` (later when the previous
        answer came later); stops early when :meth:`stop` is called."""
        period = 1.0 / self.clip.fps
        for k in range(frames):
            if self._stop.is_set():
                break
            due = start + k * period
            wait = due - self.clock()
            if wait > 0:
                self.sleep(wait)
            self.send(k, due)
        return self.report

    def start(self, frames: int, start: float, measure_from: float | None = None) -> "PacedStream":
        self.measure_from = measure_from
        self._thread = threading.Thread(target=self.run, args=(frames, start), daemon=True,
                                        name=f"camera-{self.stream_id}")
        self._thread.start()
        return self

    def join(self, timeout_s: float | None = None) -> PacedReport:
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._stop.set()
                self._thread.join()
                self.report.stopped_early = True
        return self.report

    def close(self) -> None:
        """End the sequence on the server (frees its session) and the connection."""
        try:
            self.client.infer(self.clip.payloads[0], self.stream_id, start=True, end=True)
        except Exception:  # the server may be gone; nothing to free then
            pass
        finally:
            self.client.close()


def answered_rate(report: PacedReport) -> float:
    """Measured frames answered per second, first answer to last (nan with fewer than 2): the
    frame rate a stream that keeps up sees, the server's pace for one that falls behind."""
    answers = sorted(d + lat for d, lat in zip(report.dues, report.latencies_s))
    if len(answers) < 2:
        return float("nan")
    return (len(answers) - 1) / max(answers[-1] - answers[0], 1e-9)


def latency_percentiles(reports: list[PacedReport]) -> tuple[float, float]:
    """(p50, p95) in ms over every answered frame of ``reports`` (nan when none)."""
    lat = np.concatenate([np.asarray(r.latencies_s, float) for r in reports]) * 1e3 \
        if reports else np.zeros(0)
    if not lat.size:
        return float("nan"), float("nan")
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 95))


# the sequence-batching fields batching_repository sets (model config field names)
BATCHING_FIELDS = ("max_batch_size", "instance_count", "max_candidate_sequences",
                   "preferred_batch_size", "max_queue_delay_microseconds")


def batching_repository(source: Path, folder: Path, parameters: dict[str, str],
                        batching: dict | None = None, model: str = "fluxshard") -> Path:
    """A repository in ``folder`` serving ``source``'s ``model`` alone with ``parameters`` set
    (``fluxshard.serving.tritonserver.repository_with_parameters``) and the sequence-batching
    fields in ``batching`` (:data:`BATCHING_FIELDS`; ``preferred_batch_size`` a list, the
    others ints) changed in every config of the model."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from fluxshard.serving.tritonserver import repository_with_parameters

    batching = dict(batching or {})
    unknown = set(batching) - set(BATCHING_FIELDS)
    if unknown:
        raise ValueError(f"unknown batching field(s) {sorted(unknown)}; known: {BATCHING_FIELDS}")
    repository_with_parameters(Path(source), parameters, Path(folder), models=[model])
    model_dir = Path(folder) / model
    for config in [model_dir / "config.pbtxt", *sorted(model_dir.glob("configs/*.pbtxt"))]:
        message = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        oldest = message.sequence_batching.oldest
        for name, value in batching.items():
            if name == "max_batch_size":
                message.max_batch_size = int(value)
            elif name == "instance_count":
                for group in message.instance_group:
                    group.count = int(value)
            elif name == "preferred_batch_size":
                del oldest.preferred_batch_size[:]
                oldest.preferred_batch_size.extend(int(v) for v in value)
            else:
                setattr(oldest, name, int(value))
        config.write_text(text_format.MessageToString(message))
    return Path(folder)


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every live process of process group ``pgid``
    (a server and its python-backend stubs)."""
    import os

    from perf.reliability_kit import group_pids

    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in group_pids(pgid):
        try:
            stat = open(f"/proc/{pid}/stat", "rb").read()
            fields = stat[stat.rindex(b")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return total / ticks


__all__ = ["BATCHING_FIELDS", "ClipPayloads", "PacedReport", "PacedStream", "answered_rate",
           "batching_repository",
           "clip_fps", "clip_payloads", "group_cpu_seconds", "latency_percentiles"]
