"""Issue 14: a dead or slow cloud never stalls the camera (item 6), and the SDK reaches a cloud
served over TLS with an auth header (transport security). Real tritonservers throughout;
deadlines run on injected clocks."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TickingClock, crash_and_restart, require_triton
from fluxshard import wire
from fluxshard.serving.pki import make_pki
from fluxshard.serving.tritonserver import TlsFiles, TritonServer, auth_header
from fluxshard_client import (AsyncFluxShardClient, AsyncFluxShardStream, CloudError,
                              FluxShardClient, FluxShardStream, LocalEndpoint, auth_headers)
from fluxshard_client.deadline import (COLD_DEADLINE_MS, DEADLINE_FLOOR_MS, CloudWatch,
                                       Deadline, default_deadline_ms)

H, W = 96, 160


def frames(n: int, seed: int = 0):
    """A moving bright square on noise: (frame, field) pairs, the first a key frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    zero = np.zeros(wire.field_shape(H, W), np.float32)
    for t in range(n):
        frame = base.copy()
        frame[20:50, 10 + 3 * t:40 + 3 * t] = 255
        yield frame, None if t == 0 else zero


def edge():
    return LocalEndpoint(threads=1)


# ------------------------------------------------------------------------------ the deadline

def test_default_deadline_follows_the_edge_and_the_cloud_estimate():
    assert default_deadline_ms(10, 5) == DEADLINE_FLOOR_MS
    assert default_deadline_ms(10, 5, cloud_warm=False) == COLD_DEADLINE_MS
    assert default_deadline_ms(400, 5) == 1600  # four full edge frames
    assert default_deadline_ms(10, 300) == 1200  # four times the cloud's estimate
    clock = TickingClock(1.0)
    deadline = Deadline.after(2.5, clock)  # read at 1: due at 3.5
    assert deadline.remaining() == 1.5 and deadline.remaining() == 0.5
    with pytest.raises(ValueError, match="deadline_ms must be > 0"):
        FluxShardStream(edge(), dispatch="edge", deadline_ms=0, imgsz=None)


def test_a_late_cloud_answer_is_abandoned_and_the_edge_answers(tritonserver):
    """On a clock that moves 30 s per reading, a cloud call with a 60 s deadline is read due when
    its answer arrives (read at plan, before the send, after the answer): the answer is dropped,
    the edge runs the frame, and the cloud's next frame is a key frame. On a slow clock the same
    stream gets the cloud back."""
    clock = TickingClock(30.0)
    with FluxShardClient(tritonserver.grpc_url) as client:
        stream = FluxShardStream(edge(), client.open_stream(3101), dispatch="cloud",
                                 deadline_ms=60_000, clock=clock, imgsz=None)
        results, source = [], frames(10_000)
        for t in range(3):
            results.append(stream.process(*next(source), index=t))
        clock.step = 1.0  # answers come in time from here on
        while sum(r.endpoint == "cloud" for r in results) < 3:
            results.append(stream.process(*next(source), index=len(results)))
            if results[-1].endpoint == "edge":
                time.sleep(0.05)  # a camera's frame interval: the watch probes meanwhile
        stream.close()
    missed = results[0]
    assert missed.endpoint == "edge" and "within the frame's deadline" in missed.decision.reason
    assert missed.stats["cloud_fallback"] == missed.decision.reason
    assert all(r.endpoint == "edge" for r in results[:3])
    cloud = [r for r in results if r.endpoint == "cloud"]
    # the cloud may or may not have applied the abandoned frame: it resumes from a key frame
    assert [r.key for r in cloud] == [True, False, False]
    assert results.index(cloud[0]) == len(results) - 3  # and stays once it answers


def test_the_transport_gives_up_at_once_on_an_unreachable_cloud_with_a_deadline():
    """No retry sleep inside a frame: the policy's 120 s reconnect wait does not apply to a
    frame with a deadline (the clock never moves, so only an immediate give-up passes)."""
    from fluxshard.serving.tritonserver import free_port
    from fluxshard_client import CloudUnavailable

    client = FluxShardClient(f"127.0.0.1:{free_port()}")
    stream = client.open_stream(3102)
    frame, _ = next(frames(1))
    frozen = Deadline(math.inf, clock=lambda: 0.0)
    with pytest.raises(CloudUnavailable, match="unreachable"):
        stream.send(frame, key=True, deadline=frozen)
    assert stream.core.need_key and stream.core.need_start
    client.close()


@pytest.mark.slow
def test_a_stopped_server_costs_no_frame_and_the_cloud_comes_back(tmp_path, triton_installed):
    """Every frame returns while the server is gone (the edge, with the reason in stats), no
    frame waits on the transport's retry policy, and after the restart the cloud is used again,
    resuming with a key frame."""
    server = TritonServer(models=["fluxshard"], log_file=tmp_path / "first.log").start()
    waits = []  # retry pauses the transport asked for: none may happen inside a frame
    with FluxShardClient(server.grpc_url) as client:
        stream = FluxShardStream(edge(), client.open_stream(3103), dispatch="cloud", imgsz=None)
        core = stream.cloud.stream.core
        on_unavailable = core.on_unavailable

        def recorded(*args, **kwargs):
            pause = on_unavailable(*args, **kwargs)  # raises when the frame has a deadline
            waits.append(pause)
            return pause

        core.on_unavailable = recorded
        source = frames(10_000)
        before = [stream.process(*next(source), index=t) for t in range(3)]
        during, t = [], 3
        with crash_and_restart(server, tmp_path / "restarted.log"):
            while True:
                result = stream.process(*next(source), index=t)
                t += 1
                if result.endpoint == "cloud":
                    break
                during.append(result)
                time.sleep(0.05)  # a camera's frame interval
            after = [result] + [stream.process(*next(source), index=t + k) for k in range(3)]
            stream.close()
    server.stop()
    assert [r.endpoint for r in before] == ["cloud"] * 3
    assert during and all(r.endpoint == "edge" and r.stats["cloud_fallback"] for r in during)
    assert during[0].decision.reason.startswith("cloud failed")
    assert all(r.decision.reason.startswith("cloud down") for r in during[1:])
    assert not waits
    assert [r.endpoint for r in after] == ["cloud"] * 4 and after[0].key
    assert not any(r.key for r in after[1:])


def test_the_asyncio_stream_watches_the_cloud_with_a_task():
    """The asyncio twin: the unreachable cloud is left out and probed by a task of the loop."""
    from fluxshard.serving.tritonserver import free_port

    async def main():
        async with AsyncFluxShardClient(f"127.0.0.1:{free_port()}") as aio:
            stream = AsyncFluxShardStream(edge(), aio.open_stream(3104), dispatch="cloud", imgsz=None)
            out = [await stream.process(frame, field, field is None, t)
                   for t, (frame, field) in enumerate(frames(3))]
            watch = stream.core.watch
            probing = isinstance(watch._worker, asyncio.Task) and not watch.up
            await stream.close()
            return out, probing

    results, probing = asyncio.run(main())
    assert [r.endpoint for r in results] == ["edge"] * 3 and probing
    assert "unreachable" in results[0].decision.reason


def test_cloud_watch_probes_until_ready():
    answers = iter([False, RuntimeError("refused"), True])

    def probe():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch = CloudWatch(probe, backoff_s=(0.01, 0.02))
    watch.lost("gone")
    watch._worker.join()
    assert watch.up and watch.probes == 3
    watch.close()


# -------------------------------------------------------------------------- transport security

AUTH = ("fluxshard-auth", "s3cret-token")


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory):
    """A server with mutual TLS and an auth header, and the PEM files of its PKI."""
    require_triton()
    folder = tmp_path_factory.mktemp("pki")
    pki = make_pki(folder)
    tls = TlsFiles(pki["server"][0], pki["server"][1], root=pki["ca"][0])
    with TritonServer(models=["fluxshard"], log_file=folder / "server.log", tls=tls,
                      auth_header=AUTH) as server:
        yield server, pki


def tls_client(server, pki, **kwargs):
    return FluxShardClient(server.grpc_url, ssl=True, root_certificates=pki["ca"][0],
                           private_key=pki["client"][1], certificate_chain=pki["client"][0],
                           **kwargs)


@pytest.mark.slow
def test_tls_and_auth_header_through_the_sdk(secured_server):
    server, pki = secured_server
    frame, _ = next(frames(1))
    with tls_client(server, pki, headers=auth_headers(*AUTH)) as client:
        assert client.is_ready(5.0)
        result = client.open_stream(3201).send(frame, key=True)
        assert result.digest == wire.cache_digest(frame)
    # the right certificates without the header: refused, saying what is missing
    with tls_client(server, pki) as client:
        with pytest.raises(CloudError, match="requires an auth header"):
            client.open_stream(3202).send(frame, key=True)
    # the header without a client certificate: the mutual-TLS handshake fails, the edge answers
    with FluxShardClient(server.grpc_url, ssl=True, root_certificates=pki["ca"][0],
                         headers=auth_headers(*AUTH)) as client:
        stream = FluxShardStream(edge(), client.open_stream(3203), dispatch="cloud", imgsz=None)
        result = stream.process(frame, None, True, 0)
        stream.close()
        assert result.endpoint == "edge" and "unreachable" in result.decision.reason

    async def asyncio_client():
        async with AsyncFluxShardClient(server.grpc_url, ssl=True,
                                        root_certificates=pki["ca"][0],
                                        private_key=pki["client"][1],
                                        certificate_chain=pki["client"][0],
                                        headers=auth_headers(*AUTH)) as aio:
            return await aio.open_stream(3204).send(frame, key=True)

    assert asyncio.run(asyncio_client()).digest == wire.cache_digest(frame)


@pytest.mark.slow
def test_run_reaches_a_secured_cloud_and_says_what_is_missing(secured_server, tmp_path):
    import subprocess

    server, pki = secured_server
    base = [sys.executable, "-m", "fluxshard.cli", "run", "--imgsz", "native",
            "--demo", "--size", "160", "96",
            "--frames", "3", "--dispatch", "cloud", "--no-progress", "--uplink-codec", "lossless",
            "--cloud-url", server.grpc_url]
    secured = ["--tls-ca", str(pki["ca"][0]), "--tls-cert", str(pki["client"][0]),
               "--tls-key", str(pki["client"][1])]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(base + secured + ["--auth-header", "=".join(AUTH), "--out",
                                            str(tmp_path / "ok")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| cloud | 3 |" in done.stdout
    no_header = subprocess.run(base + secured + ["--out", str(tmp_path / "no")], cwd=root,
                               capture_output=True, text=True, timeout=600)
    assert no_header.returncode == 1 and "--auth-header" in no_header.stderr
    plain = subprocess.run(base + ["--out", str(tmp_path / "plain")], cwd=root,
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 1 and "cannot reach the cloud" in plain.stderr


def test_auth_header_and_tls_options_are_checked():
    import argparse

    assert auth_header("x-key=abc.DEF_1") == ("x-key", "abc.DEF_1")
    for bad in ("novalue", "Upper=1", "k=a b", "fluxshard-admin=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            auth_header(bad)
    assert auth_headers("k", "v") == {"triton-grpc-protocol-k": "v"}
    assert auth_headers("k", "v", "http") == {"k": "v"}
    with pytest.raises(ValueError, match="go together"):
        FluxShardClient("127.0.0.1:1", private_key="key.pem")
    with pytest.raises(ValueError, match="needs protocol 'grpc'"):
        FluxShardClient("127.0.0.1:1", protocol="http", ssl=True)
    with pytest.raises(FileNotFoundError, match="root_certificates"):
        FluxShardClient("127.0.0.1:1", root_certificates="/nonexistent/ca.pem")
