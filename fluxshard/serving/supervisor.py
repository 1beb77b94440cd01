"""Keep the served model alive: probe it with real inferences, restart the server when it is dead.

Triton's readiness does not see a dead python-backend stub (killed by the OOM killer, say): the
server and the model keep answering ``/v2/health/ready`` with 200 while every request fails with
``Stub process ... is not healthy`` (Triton server issues 8604 and 7230). So ``fluxshard serve``
runs a :class:`Supervisor`: every ``probe_interval_s`` one tiny key frame goes through the real
client path (:class:`ModelProbe`), and after ``failures_before_restart`` failed probes in a row, or
when tritonserver itself is gone, the server is restarted on the same ports (model control is
``none``, so reloading just the model is not possible; a restart also frees the dead stub's
memory). Clients see the server go away and come back, and their streams resync with key frames.

Readiness as ``fluxshard serve`` reports it is the supervisor's :class:`SupervisorStatus`: log
lines, and a JSON status file (``--status-file``) rewritten atomically on every change.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# Streams pick their ids; None: every probe draws a random id and secret, so no client can
# occupy the probe's sequence and make a healthy server look dead (CORRID is a uint64).
PROBE_STREAM_ID = None
PROBE_SIZE = (64, 96)  # (H, W): the smallest frames the tests use; a key frame costs milliseconds


class ProbeFailed(RuntimeError):
    pass


class ModelProbe:
    """One real inference on the ``fluxshard`` model: a small key frame that opens and ends its own
    sequence; passes when the answer carries the digest of exactly that frame."""

    def __init__(self, url: str, model_name: str = "fluxshard", timeout_s: float = 20.0,
                 stream_id: int | None = PROBE_STREAM_ID, ssl_options: dict | None = None,
                 headers: dict[str, str] | None = None):
        from fluxshard import wire

        self.url, self.model_name, self.timeout_s = url, model_name, timeout_s
        self.stream_id = stream_id
        self.ssl_options = dict(ssl_options or {})
        self.headers = headers  # the server's auth header, when it requires one
        h, w = PROBE_SIZE
        # a gradient, not a flat frame: the probe exercises decode, rebuild and compute alike
        ramp = np.add.outer(np.arange(h), np.arange(w)).astype(np.uint8)
        self.frame = np.ascontiguousarray(np.stack([ramp, ramp[::-1], ramp[:, ::-1]], axis=2))
        self.payload = np.frombuffer(wire.encode_key_frame(self.frame, 0), np.uint8)[None]
        self.expected_digest = wire.cache_digest(self.frame)

    def __call__(self) -> None:
        import secrets

        import tritonclient.grpc as grpcclient

        from fluxshard.protocol import SECRET_PARAMETER, grpc_channel_args, random_stream_id

        try:
            # a connection of its own: a client's failed connects must not delay the probe's
            with grpcclient.InferenceServerClient(self.url, channel_args=grpc_channel_args(True),
                                                  **self.ssl_options) as client:
                inp = grpcclient.InferInput("PAYLOAD", list(self.payload.shape), "UINT8")
                inp.set_data_from_numpy(self.payload)
                result = client.infer(self.model_name, [inp],
                                      outputs=[grpcclient.InferRequestedOutput("DIGEST")],
                                      sequence_id=self.stream_id or random_stream_id(),
                                      sequence_start=True, sequence_end=True,
                                      client_timeout=self.timeout_s, headers=self.headers,
                                      parameters={SECRET_PARAMETER: secrets.token_urlsafe(16)})
                digest = result.as_numpy("DIGEST")
        except Exception as e:  # noqa: BLE001 - any failure of the request is a failed probe
            message = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
            raise ProbeFailed(f"{type(e).__name__}: {message}") from None
        if digest is None or digest.tobytes() != self.expected_digest:
            raise ProbeFailed("the model answered with a digest of some other frame")


@dataclass
class SupervisorStatus:
    """What ``fluxshard serve`` reports: ``ready`` means the last probe passed."""

    state: str = "starting"  # starting | ready | unhealthy | restarting | failed | stopped
    ready: bool = False
    server_pid: int | None = None
    grpc: str = ""
    http: str = ""
    restarts: int = 0
    probes: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_restart_reason: str = ""
    history: list = field(default_factory=list)  # (state, detail) of each change, newest last


class Supervisor:
    """Probe-and-restart loop around a started :class:`TritonServer`.

    ``step()`` does one probe and acts on it (tests call it directly); ``run(stop)`` steps every
    ``probe_interval_s`` until ``stop`` is set, waiting with ``wait`` (``stop.wait`` by default),
    so a test can drive the loop without real time passing.
    """

    def __init__(self, server, probe: Callable[[], None] | None = None,
                 probe_interval_s: float = 5.0, failures_before_restart: int = 2,
                 status_file: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None, start_timeout_s: float = 300.0):
        if probe_interval_s <= 0 or failures_before_restart < 1:
            raise ValueError("probe_interval_s must be > 0 and failures_before_restart >= 1")
        self.server = server
        self.probe = probe or ModelProbe(server.grpc_url)
        self.probe_interval_s = probe_interval_s
        self.failures_before_restart = failures_before_restart
        self.status_file = Path(status_file) if status_file else None
        self.log = log or (lambda line: print(line, flush=True))
        self.start_timeout_s = start_timeout_s
        self.status = SupervisorStatus(grpc=server.grpc_url, http=server.http_url)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ one step
    def step(self) -> SupervisorStatus:
        with self._lock:
            if not self.server.is_running():
                code = self.server.process.returncode if self.server.process else None
                self._restart(f"tritonserver exited (code {code})")
                return self.status
            self.status.probes += 1
            try:
                self.probe()
            except ProbeFailed as e:
                self.status.consecutive_failures += 1
                self.status.last_error = str(e)
                if self.status.consecutive_failures >= self.failures_before_restart:
                    self._restart(f"{self.status.consecutive_failures} failed probe(s): {e}")
                else:
                    self._set("unhealthy", str(e))
                return self.status
            self.status.consecutive_failures = 0
            self._set("ready", "probe passed")
            return self.status

    def _restart(self, reason: str) -> None:
        self.status.last_restart_reason = reason
        self._set("restarting", reason)
        try:
            self.server.restart(self.start_timeout_s)
        except Exception as e:  # noqa: BLE001 - reported, and tried again next step
            self.status.last_error = f"restart failed: {e}"
            self._set("failed", self.status.last_error)
            return
        self.status.restarts += 1
        self.status.consecutive_failures = 0
        try:
            self.probe()
        except ProbeFailed as e:
            self.status.consecutive_failures = 1
            self.status.last_error = str(e)
            self._set("unhealthy", f"restarted, but: {e}")
            return
        self._set("ready", f"restarted ({reason})")

    # ------------------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event, wait: Callable[[float], bool] | None = None) -> None:
        """Step every ``probe_interval_s`` until ``stop`` is set."""
        wait = wait or stop.wait
        while not stop.is_set():
            self.step()
            wait(self.probe_interval_s)

    def mark_stopped(self, detail: str = "stopped") -> None:
        with self._lock:
            self._set("stopped", detail)

    # ------------------------------------------------------------------------------ reporting
    def _set(self, state: str, detail: str) -> None:
        status = self.status
        status.ready = state == "ready"
        status.server_pid = self.server.process.pid if self.server.is_running() else None
        changed = state != status.state or state in ("restarting", "failed")
        status.state = state
        if changed:
            status.history = (status.history + [[state, detail]])[-20:]
            self.log(f"fluxshard serve: {state}: {detail}")
        self._write_status()

    def _write_status(self) -> None:
        if self.status_file is None:
            return
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.status_file.with_name(self.status_file.name + ".tmp")
        temporary.write_text(json.dumps(asdict(self.status), indent=1))
        os.replace(temporary, self.status_file)  # readers never see half a file


def read_status(path: str | os.PathLike) -> dict | None:
    """The status file's content; None while it does not exist yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
