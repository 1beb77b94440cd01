"""A tritonserver process started from a plain command line (no `fluxshard serve`, no
fluxshard.serving.tritonserver.TritonServer): what a Triton user runs. For the deploy tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def wait_ready(process: subprocess.Popen, http_url: str, log: Path,
               timeout_s: float = 300.0) -> None:
    """Until /v2/health/ready answers 200; fails the test with the log's tail if the server
    exits or is not ready in time."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url, connection_timeout=2.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"tritonserver exited ({process.returncode}):\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after {timeout_s:.0f} s:\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
    finally:
        client.close()


@contextlib.contextmanager
def plain_tritonserver(argv: list[str], env: dict[str, str], cwd: Path, log: Path,
                       http_url: str, timeout_s: float = 300.0):
    """Run ``argv`` (in its own process group, output to ``log``) until ready; on exit stop it
    as an orchestrator would (SIGTERM, then SIGKILL) and clean up its stubs' leftovers."""
    from fluxshard.serving.tritonserver import clean_leftovers, python_stubs

    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_ready(process, http_url, log, timeout_s)
        yield process
    finally:
        stubs = [s.pid for s in python_stubs() if s.parent_pid == process.pid]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        clean_leftovers(dying=stubs)
