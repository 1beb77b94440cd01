"""Shaped links (fluxshard.serving.netshape): the shaper limits throughput, teardown leaves no
namespace, veth or qdisc behind, the delay proxy carries bytes intact, and without privileges the
harness refuses before making anything."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from fluxshard.serving import netshape
from fluxshard.serving.netshape import (GilbertElliott, LossSpec, RateTrace, ShapedLink,
                                        ShapingUnavailable, check_privileges)
from fluxshard.serving.tritonserver import process_alive

from conftest import delay_proxy

REPO_ROOT = Path(__file__).resolve().parents[1]


def _namespaces() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def _our_links() -> str:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if f": {netshape.NAME_PREFIX}" in line)


def test_shaper_limits_throughput():
    # a bound with a wide margin either side: the bucket lets its first 128 KiB through at line
    # rate, and a loaded machine can only slow the sender; an unshaped veth is far above both
    with ShapedLink(rate_mbit=8, rtt_ms=0) as link:
        first = link.measure_mbit(1_000_000)
        assert 8 * 0.5 < first < 8 * 1.5, first
        link.set_rate(4)
        second = link.measure_mbit(500_000)
        assert 4 * 0.5 < second < 4 * 1.5, second
        assert "rate 4Mbit" in link.qdisc()


def test_teardown_leaves_nothing_even_on_error():
    with pytest.raises(KeyboardInterrupt):
        with ShapedLink(rate_mbit=25) as link:
            assert link.exists() == {"namespace": True, "veth": True}
            assert "tbf" in link.qdisc()
            raise KeyboardInterrupt
    assert link.exists() == {"namespace": False, "veth": False}
    assert link.namespace not in _namespaces()
    assert link.veth_edge not in _our_links()
    link.close()  # twice is fine


def test_cloud_server_in_the_namespace(triton_installed):
    from fluxshard import wire
    from fluxshard.digest_scene import Scene
    from fluxshard_client import FluxShardClient

    with ShapedLink(rate_mbit=56, rtt_ms=20) as link:
        server = link.start_server(models=["fluxshard"])
        assert server.host == link.cloud_address
        frame = Scene(0).frame(0)
        with FluxShardClient(link.grpc_url) as client:
            stream = client.open_stream(7)
            result = stream.send(frame, key=True)
            stream.close()
        assert result.digest == wire.cache_digest(frame)
        pid = server.process.pid
    assert not process_alive(pid)
    assert link.exists() == {"namespace": False, "veth": False}


def test_rate_trace_schedule():
    trace = RateTrace(((2.0, 130.0), (1.0, 25.0), (1.0, 56.0)))
    assert [trace.rate_at(t) for t in (0, 1.9, 2.0, 3.5, 4.0, 6.5)] == [130, 130, 25, 56, 130, 25]
    changes = trace.changes()
    assert [next(changes) for _ in range(4)] == [(0.0, 130.0), (2.0, 25.0), (3.0, 56.0),
                                                 (4.0, 130.0)]
    assert trace.mean_mbit() == pytest.approx((260 + 25 + 56) / 4)
    once = RateTrace(((1.0, 10.0),), loop=False)
    assert list(once.changes()) == [(0.0, 10.0)] and once.rate_at(5.0) == 10.0
    with pytest.raises(ValueError, match="seconds > 0"):
        RateTrace(((1.0, 0.0),))


def test_follow_applies_the_trace():
    with ShapedLink(rate_mbit=25) as link:
        # the first step applies at once; the second is far beyond the test
        link.follow(RateTrace(((3600.0, 9.0), (1.0, 25.0))))
        while len(link.rate_log) < 2:
            threading.Event().wait(0.05)
        link.stop_trace()
        assert "rate 9Mbit" in link.qdisc()


@contextlib.contextmanager
def _echo_behind_proxy(delay_s: float, **proxy_kwargs):
    """An echo server on loopback and the proxy in front of it (in a thread); yields the
    proxy's port."""
    echo = socket.create_server(("127.0.0.1", 0))
    echo_port = echo.getsockname()[1]

    def serve_echo():
        conn, _ = echo.accept()
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except ConnectionError:
                pass  # the proxy reset it

    threading.Thread(target=serve_echo, daemon=True).start()
    try:
        with delay_proxy(echo_port, delay_s, **proxy_kwargs) as proxy_port:
            yield proxy_port
    finally:
        echo.close()


def _echo_round_trip(port: int, payload: bytes) -> bytes:
    """Send ``payload`` through the echo in pieces, half-close, return what came back (until
    EOF or a reset)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            for k in range(0, len(payload), 7000):
                s.sendall(payload[k:k + 7000])
            s.shutdown(socket.SHUT_WR)
            while data := s.recv(65536):
                received += data
        except ConnectionError:
            pass
        except OSError as e:  # a reset that lands before the half-close
            if e.errno != errno.ENOTCONN:
                raise
    return bytes(received)


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


def test_delay_proxy_keeps_bytes_and_order():
    """Both directions through the proxy on loopback: an echo server behind it."""
    stats = netshape.ProxyStats()
    with _echo_behind_proxy(0.002, stats=stats) as port:
        assert _echo_round_trip(port, PAYLOAD) == PAYLOAD
    assert stats.bytes_up == stats.bytes_down == len(PAYLOAD)
    assert stats.segments_lost == stats.resets == 0


def test_gilbert_elliott_loses_at_its_rate_in_bursts():
    chain = GilbertElliott(0.05, mean_burst=3.0, seed=1)
    lost = np.array([chain.lost() for _ in range(400_000)])
    assert lost.mean() == pytest.approx(0.05, rel=0.1)
    starts = np.flatnonzero(lost[1:] & ~lost[:-1])  # bursts: runs of lost segments
    assert lost.sum() / len(starts) == pytest.approx(3.0, rel=0.1)
    again = GilbertElliott(0.05, mean_burst=3.0, seed=1)
    assert [again.lost() for _ in range(1000)] == lost[:1000].tolist()  # seeded
    never = GilbertElliott(0.0)
    assert not any(never.lost() for _ in range(10_000))
    with pytest.raises(ValueError, match="longer than 1.0 segments"):
        GilbertElliott(0.6)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        LossSpec(1.0)
    with pytest.raises(ValueError, match="loss effect"):
        LossSpec(0.01, effect="drop")


def test_lossy_proxy_retransmits_lost_segments_late_bytes_intact():
    """TCP's answer to a lost packet: the bytes come late, never missing or reordered."""
    stats = netshape.ProxyStats()
    loss = LossSpec(0.1, mean_burst=2.0, seed=3, rto_s=0.005)
    with _echo_behind_proxy(0.0, stats=stats, loss=loss) as port:
        assert _echo_round_trip(port, PAYLOAD) == PAYLOAD
    assert stats.segments_up >= len(PAYLOAD) // netshape.MSS
    assert stats.segments_lost > 0 and stats.retransmitted_bytes > 0 and stats.resets == 0


def test_lossy_proxy_resets_the_connection_on_a_loss():
    stats = netshape.ProxyStats()
    with _echo_behind_proxy(0.0, stats=stats, loss=LossSpec(0.1, 2.0, seed=3,
                                                            effect="reset")) as port:
        received = _echo_round_trip(port, PAYLOAD)
    assert stats.resets == 1 and stats.segments_lost == 1
    assert len(received) < len(PAYLOAD) and PAYLOAD.startswith(received)


def test_proxy_command_line_refuses_a_bad_loss():
    """The options the link starts the proxy with, and a loss the chain cannot make refused in
    one line."""
    bad = subprocess.run([sys.executable, "-m", "fluxshard.serving.netshape", "proxy",
                          "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2", "--delay-ms",
                          "0", "--loss", "0.7"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "needs bursts longer" in bad.stderr
    assert LossSpec(0.05, 3.0, 7, "reset", 0.25).args() == [
        "--loss", "0.05", "--burst", "3.0", "--loss-seed", "7", "--loss-effect", "reset",
        "--rto-ms", "250.0"]


def test_refuses_without_privileges_injected():
    with pytest.raises(ShapingUnavailable, match="CAP_NET_ADMIN and CAP_SYS_ADMIN"):
        check_privileges(capabilities=lambda: 0)
    with pytest.raises(ShapingUnavailable, match="need ip and tc"):
        check_privileges(which=lambda tool: None)
    made_before = _namespaces()
    with pytest.raises(ShapingUnavailable):
        with ShapedLink(rate_mbit=25, check=lambda: check_privileges(capabilities=lambda: 0)):
            pass
    assert _namespaces() == made_before


def test_refuses_as_an_unprivileged_user():
    code = ("from fluxshard.serving.netshape import ShapedLink\n"
            "with ShapedLink(rate_mbit=25):\n    pass\n")
    if shutil.which("setpriv"):
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    elif shutil.which("runuser"):
        drop = ["runuser", "-u", "nobody", "--"]
    else:  # no tool to drop privileges with: the refusal path, by an injected check
        return test_refuses_without_privileges_injected()
    done = subprocess.run(drop + [sys.executable, "-c", code], cwd=REPO_ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode != 0
    assert "ShapingUnavailable: shaped links need root" in done.stderr, done.stderr[-2000:]
