"""Faults and attacks against a real server, and the streams that watch what they do (issue 14).

``perf/reliability*.py`` and the server's tests share these pieces: the synthetic camera of
:mod:`fluxshard.digest_scene` driven by :class:`StreamDriver` (one stream in a thread: frames
sent, lost, resynced, the longest gap between answers), and the injectors (:func:`kill_stub`, :func:`try_model_upload`,
:func:`try_shared_memory`, :func:`group_rss_mb`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fluxshard import wire
from fluxshard.digest_scene import BLOCK, Scene, residual_mask


@dataclass
class StreamReport:
    stream_id: int
    frames_sent: int = 0
    frames_answered: int = 0
    frames_lost: int = 0  # raised, or answered from an input that was not the frame
    resyncs: int = 0  # frames the stream had to re-send (key frame or after a wait)
    worst_stall_s: float = 0.0  # longest gap between two answers (or start and first answer)
    errors: list = field(default_factory=list)

    @property
    def unaffected(self) -> bool:
        return self.frames_lost == 0 and self.resyncs == 0


class StreamDriver:
    """One camera stream against the ``fluxshard`` model, sent frame after frame in a thread.

    The field between frames is zero (the scene's frames are compared against the aligned
    previous frame at tau 0), so the answer's digest must equal the true frame's digest.
    """

    def __init__(self, url: str, stream_id: int, seed: int = 0, reconnect_timeout_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        from fluxshard_client import FluxShardClient, RetryPolicy

        self.client = FluxShardClient(url, retry=RetryPolicy(reconnect_timeout_s=reconnect_timeout_s,
                                                             backoff_s=(0.2, 1.0)))
        self.stream = self.client.open_stream(stream_id, block=BLOCK)
        self.scene = Scene(seed)
        self.clock = clock
        self.report = StreamReport(stream_id)
        self._t = 0
        self._prev: np.ndarray | None = None
        self._last_answer: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def send_next(self) -> None:
        from fluxshard_client import CloudError

        t, frame = self._t, self.scene.frame(self._t)
        self._t += 1
        if self._last_answer is None:
            self._last_answer = self.clock()
        self.report.frames_sent += 1
        try:
            if self._prev is None:
                res = self.stream.send(frame, key=True, frame_index=t)
            else:
                zero = np.zeros(wire.field_shape(*frame.shape[:2]), np.float32)
                res = self.stream.send(frame, zero, residual_mask(self._prev, frame, zero),
                                       frame_index=t)
        except (CloudError, ValueError) as e:
            self.report.frames_lost += 1
            self.report.errors.append(f"frame {t}: {e}")
            return
        now = self.clock()
        self.report.worst_stall_s = max(self.report.worst_stall_s, now - self._last_answer)
        self._last_answer = now
        self.report.frames_answered += 1
        self.report.resyncs += bool(res.resyncs)
        if res.digest != wire.cache_digest(frame) or res.frame_index != t:
            self.report.frames_lost += 1
            self.report.errors.append(f"frame {t}: answered from another input")
        self._prev = frame

    def start(self, pause_s: float = 0.05) -> "StreamDriver":
        def loop():
            while not self._stop.is_set():
                self.send_next()
                self._stop.wait(pause_s)

        self._thread = threading.Thread(target=loop, daemon=True, name=f"stream-{self.report.stream_id}")
        self._thread.start()
        return self

    def stop(self) -> StreamReport:
        """Stop after the frame in flight (which is still answered or counted lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.stream.close()
        finally:
            self.client.close()
        return self.report


def case_row(case: str, survived, reports: list[StreamReport], rss_before_mb: float,
             rss_after_mb: float, passed: bool, note: str, *, touched=(),
             unaffected: Callable[[StreamReport], bool] = lambda r: r.unaffected,
             **extra) -> dict:
    """One row of perf/reliability.py's table from a case's stream reports. ``touched``: stream
    ids the case disturbs on purpose (left out of 'other streams unaffected'); ``unaffected``:
    what that means for one stream (default: nothing lost and no resync); ``extra``: more
    columns."""
    others = [r for r in reports if r.stream_id not in touched]
    return {"case": case, "server_survived": survived,
            "other_streams_unaffected": all(unaffected(r) for r in others) if others else None,
            "frames_lost": sum(r.frames_lost for r in reports),
            "worst_stall_s": round(max((r.worst_stall_s for r in reports), default=0.0), 2),
            "rss_before_mb": round(rss_before_mb, 1), "rss_after_mb": round(rss_after_mb, 1),
            "resyncs": sum(r.resyncs for r in reports), "passed": passed, "note": note, **extra}


def kill_stub(server, model_instance_prefix: str = "fluxshard") -> list[int]:
    """SIGKILL the server's python-backend stubs of one model, as the OOM killer does."""
    from fluxshard.serving.tritonserver import python_stubs

    killed = []
    for stub in python_stubs():
        if stub.parent_pid == server.process.pid and stub.model_instance.startswith(
                model_instance_prefix):
            os.kill(stub.pid, signal.SIGKILL)
            killed.append(stub.pid)
    if not killed:
        raise RuntimeError(f"no {model_instance_prefix} stub of server pid {server.process.pid}")
    return killed


UPLOADED_MODEL = '''
import os
class TritonPythonModel:
    def initialize(self, args):
        open("/tmp/fluxshard-uploaded-code-ran", "w").write(str(os.getuid()))
    def execute(self, requests):
        return []
'''


def try_model_upload(server, headers: dict | None = None) -> str:
    """Try to upload and load a python model, and to unload ``fluxshard``: returns the refusal
    (raises AssertionError when anything was accepted)."""
    import json

    import tritonclient.grpc as grpcclient

    config = json.dumps({"name": "uploaded", "backend": "python", "max_batch_size": 0,
                         "input": [{"name": "X", "data_type": "TYPE_UINT8", "dims": [1]}],
                         "output": [{"name": "Y", "data_type": "TYPE_UINT8", "dims": [1]}]})
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return _all_refused("a model", (
            ("upload", lambda: client.load_model(
                "uploaded", config=config, files={"file:1/model.py": UPLOADED_MODEL.encode()},
                headers=headers)),
            ("unload", lambda: client.unload_model("fluxshard", headers=headers))))


def try_shared_memory(server, headers: dict | None = None) -> str:
    """Try to read the shared-memory status and to register the python backend's own region."""
    import tritonclient.grpc as grpcclient

    from fluxshard.serving.tritonserver import python_stubs

    regions = [s.region for s in python_stubs() if s.parent_pid == server.process.pid]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return _all_refused("shared-memory", (
            ("status", lambda: client.get_system_shared_memory_status(headers=headers)),
            ("register", lambda: client.register_system_shared_memory(
                "stolen", f"/{regions[0]}", 4096, headers=headers))))


def _all_refused(subject: str, calls) -> str:
    """Make each (what, call) admin call: every one must be refused; returns the refusals
    ("what: message; ..."), raises AssertionError on the first call the server accepted."""
    from tritonclient.utils import InferenceServerException

    refusals = []
    for what, call in calls:
        try:
            call()
        except InferenceServerException as e:
            refusals.append(f"{what}: {e.message()}")
            continue
        raise AssertionError(f"the server accepted {subject} {what}")
    return "; ".join(refusals)


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (a server and its stubs)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat", "rb").read()
            if int(stat[stat.rindex(b")") + 2:].split()[2]) == pgid:
                pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group (the server and its stubs), MB."""
    total_kb = 0
    for pid in group_pids(pgid):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total_kb / 1024.0
