"""Scale rows of perf/reliability.py (issue 14): 1, 2, 3 and 6 streams on one server, and a
stream set spread over 2 servers by the SDK's rendezvous homing, one server stopped mid-run.

Streams send frames back to back (each waits for its answer, then sends the next), so per-stream
latency and total throughput show where one server saturates: past that, more streams share the
same frames per second and each waits longer. Every answer is checked against the true frame's
digest (perf/reliability_kit.py: StreamDriver). ``cases(args, log_dir)``: ``args.quick``
runs 1 and 3 streams and few frames.

    python3 perf/reliability.py [--quick]          # with the other cases
    python3 perf/reliability_scale.py [--quick]    # these rows alone
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fluxshard.digest_scene import Scene  # noqa: E402
from perf.reliability_kit import StreamDriver, case_row, group_rss_mb  # noqa: E402
from fluxshard.serving.tritonserver import TritonServer  # noqa: E402

FRAME_SIZE = (192, 320)  # H, W: a small camera frame, a few residual blocks per frame
# a stream count whose throughput reaches this share of the peak: the server is saturated
SATURATED = 0.9


class TimedDriver(StreamDriver):
    """A :class:`StreamDriver` on :data:`FRAME_SIZE` frames that records each frame's latency."""

    def __init__(self, url: str, stream_id: int, cluster=None):
        super().__init__(url, stream_id, seed=stream_id)
        self.scene = Scene(stream_id, *FRAME_SIZE)
        self.latencies_s: list[float] = []
        if cluster is not None:  # send through the cluster's homing instead
            self.client.close()
            self.stream = cluster.open_stream(stream_id, block=self.stream.core.block)
            self.client = self.stream.client  # HomedRoute: closing it leaves the cluster open

    def send_next(self) -> None:
        t0 = time.perf_counter()
        super().send_next()
        self.latencies_s.append(time.perf_counter() - t0)


def _wait_answered(drivers, frames: int, timeout_s: float = 600.0) -> None:
    marks = [d.report.frames_answered + frames for d in drivers]
    deadline = time.monotonic() + timeout_s
    while not all(d.report.frames_answered >= m or d.report.frames_lost for d, m in
                  zip(drivers, marks)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {frames} more answers per stream")
        time.sleep(0.02)


def _window(drivers, frames: int) -> dict:
    """Throughput and latency over the next ``frames`` answers of every stream."""
    starts = [(d.report.frames_answered, len(d.latencies_s)) for d in drivers]
    t0 = time.perf_counter()
    _wait_answered(drivers, frames)
    seconds = time.perf_counter() - t0
    answered = sum(d.report.frames_answered - a for d, (a, _) in zip(drivers, starts))
    lat = np.concatenate([d.latencies_s[k:] for d, (_, k) in zip(drivers, starts)]) * 1e3
    return {"throughput_fps": round(answered / seconds, 2),
            "latency_mean_ms": round(float(lat.mean()), 1),
            "latency_p95_ms": round(float(np.percentile(lat, 95)), 1)}


def one_server(server: TritonServer, counts, frames: int) -> list[dict]:
    rows = []
    for n in counts:
        before = group_rss_mb(server.process.pid)
        drivers = [TimedDriver(server.grpc_url, 100 * n + k) for k in range(1, n + 1)]
        for d in drivers:
            d.start(pause_s=0.0)
        try:
            _wait_answered(drivers, 2)  # the key frame and one residual frame: warm
            measured = _window(drivers, frames)
        finally:
            reports = [d.stop() for d in drivers]
        lost = sum(r.frames_lost for r in reports)
        rows.append(case_row(f"scale: {n} stream{'s' * (n > 1)} on one server",
                             server.is_running(), reports, before,
                             group_rss_mb(server.process.pid), server.is_running() and lost == 0,
                             f"{measured['throughput_fps']} frames/s in all; per stream "
                             f"{measured['latency_mean_ms']} ms mean, "
                             f"{measured['latency_p95_ms']} ms p95", streams=n, **measured))
    peak = max(row["throughput_fps"] for row in rows)
    saturated = next(row["streams"] for row in rows if row["throughput_fps"] >= SATURATED * peak)
    if saturated == rows[-1]["streams"]:
        saturated = None  # still growing at the most streams tried
    for row in rows:
        row["saturated_from_streams"] = saturated
    if saturated is not None:
        rows[-1]["note"] += (f"; from {saturated} stream(s) within {1 - SATURATED:.0%} of the "
                             "peak throughput: saturated")
    return rows


def two_servers(servers: list[TritonServer], streams: int, frames: int) -> dict:
    """``streams`` homed over 2 servers; the first server stops mid-run."""
    from fluxshard_client.cluster import ClusterClient, home

    urls = [s.grpc_url for s in servers]
    before = sum(group_rss_mb(s.process.pid) for s in servers)
    # stream ids homed half on each server (the servers' ports, hence the homes, vary per run)
    homed = {url: [] for url in urls}
    for i in range(1001, 100000):
        if len(homed[home(i, urls)]) < streams // 2:
            homed[home(i, urls)].append(i)
        if sum(map(len, homed.values())) == streams // 2 * 2:
            break
    ids = sorted(homed[urls[0]] + homed[urls[1]])
    with ClusterClient(urls, retry=None) as cluster:
        drivers = [TimedDriver(urls[0], i, cluster=cluster) for i in ids]
        for d in drivers:
            d.start(pause_s=0.0)
        try:
            _wait_answered(drivers, 2)
            both = _window(drivers, frames)
            servers[0].stop()  # the home of some streams leaves
            _wait_answered(drivers, 2)  # the moved streams' key frames
            one = _window(drivers, frames)
        finally:
            reports = [d.stop() for d in drivers]
    moved = [d for d in drivers if d.stream.client.rehomes]
    expected = set(homed[urls[0]])
    lost = sum(r.frames_lost for r in reports)
    errors = [e for r in reports for e in r.errors][:2]
    ok = ({d.report.stream_id for d in moved} == expected
          and all(d.stream.client.home == urls[1] for d in drivers) and lost == 0)
    return case_row("2 servers, streams homed by rendezvous hashing; one server stopped",
                    servers[1].is_running(), reports, before,
                    group_rss_mb(servers[1].process.pid), ok,
                    f"{len(homed[urls[0]])} + {len(homed[urls[1]])} streams; {len(moved)} "
                    f"re-homed with a key frame; {both['throughput_fps']} frames/s on 2 servers, "
                    f"{one['throughput_fps']} on 1"
                    + (f"; lost: {'; '.join(errors)}" if errors else ""),
                    touched=expected, streams=streams,
                    throughput_two_fps=both["throughput_fps"],
                    throughput_one_fps=one["throughput_fps"],
                    latency_mean_ms=one["latency_mean_ms"], latency_p95_ms=one["latency_p95_ms"])


def shaped_link(frames: int, log_dir: Path) -> dict:
    """Two streams to a server behind a shaped link (fluxshard.serving.netshape: 25 Mbit/s,
    20 ms RTT, then a trace down to 5 Mbit/s): slower, but no frame lost."""
    from fluxshard.serving.netshape import (RateTrace, ShapedLink, ShapingUnavailable,
                                            check_privileges)

    case = "shaped link: 2 streams at 25 Mbit/s, 20 ms RTT, then a 56/10/5 Mbit/s trace"
    try:
        check_privileges()
    except ShapingUnavailable as e:
        return {"case": case, "server_survived": None, "other_streams_unaffected": None,
                "frames_lost": 0, "worst_stall_s": None, "rss_before_mb": None,
                "rss_after_mb": None, "passed": None, "note": str(e)}
    with ShapedLink(25, rtt_ms=20) as link:
        server = link.start_server(models=["fluxshard"], exit_timeout_s=1,
                                   log_file=Path(log_dir) / "shaped-server.log")
        before = group_rss_mb(server.process.pid)
        drivers = [TimedDriver(link.grpc_url, k) for k in (2001, 2002)]
        for d in drivers:
            d.start(pause_s=0.0)
        try:
            _wait_answered(drivers, 2)
            steady = _window(drivers, frames)
            link.follow(RateTrace(((2.0, 56.0), (2.0, 10.0), (2.0, 5.0))))
            traced = _window(drivers, frames)
        finally:
            reports = [d.stop() for d in drivers]
            link.stop_trace()
        after = group_rss_mb(server.process.pid)
        survived = server.is_running()
    lost = sum(r.frames_lost for r in reports)
    return case_row(case, survived, reports, before, after, survived and lost == 0,
                    f"{steady['latency_mean_ms']} ms mean per frame at 25 Mbit/s, "
                    f"{traced['latency_mean_ms']} ms on the trace", streams=2, **traced)


def cases(args, log_dir: Path) -> list[dict]:
    quick = getattr(args, "quick", False)
    counts = (1, 3) if quick else (1, 2, 3, 6)
    frames = 4 if quick else 30
    servers = [TritonServer(models=["fluxshard"], log_file=Path(log_dir) / f"scale-server{k}.log",
                            exit_timeout_s=1) for k in range(2)]
    starting = [threading.Thread(target=s.start) for s in servers]
    try:
        for th in starting:
            th.start()
        for th in starting:
            th.join()
        for s in servers:
            if not s.is_running():
                raise RuntimeError(f"a scale server did not start: {s.log_tail()}")
        rows = one_server(servers[0], counts, frames)
        rows.append(two_servers(servers, 4, frames))
    finally:
        for s in servers:
            s.stop()
    if not quick:  # one more server start: out of the quick (CI) budget
        rows.append(shaped_link(frames, log_dir))
    return rows


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    import reliability

    return reliability.main(argv, modules=("reliability_scale",))


if __name__ == "__main__":
    sys.exit(main())
