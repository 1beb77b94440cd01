"""Replay faults and attacks against a real `fluxshard serve` stack and print one table (issue 14).

Per case: did the server survive (or stop cleanly, where stopping was asked for), were the streams
the case did not target unaffected, frames lost (must be 0), the worst stall between two answers
of any stream, and the server's process group resident memory before and after. Writes
``out/perf/reliability.json`` (top-level ``frames_lost``, one row per case). ``--quick`` (CI)
probes every second and runs few frames per phase.

    python3 perf/reliability.py [--quick] [--out out/perf]
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from perf.reliability_kit import (StreamDriver, case_row, group_rss_mb, kill_stub,  # noqa: E402
                                  try_model_upload, try_shared_memory)
from fluxshard.serving.supervisor import Supervisor, read_status  # noqa: E402
from fluxshard.serving.tritonserver import (TritonServer, find_triton, free_port,  # noqa: E402
                                            process_alive, python_stubs)

# perf/ modules with more rows, each exposing cases(args, log_dir) -> list[dict]
# perf/reliability_*.py: each has cases(args, log_dir) -> rows, and runs alone through main()
CASE_MODULES = ("reliability_limits", "reliability_fuzz", "reliability_soak", "reliability_edge",
                "reliability_scale", "reliability_lossy")
EXTRA_COLUMNS = ("throughput_fps", "latency_mean_ms", "latency_p95_ms")
NOT_BUILT: tuple[str, ...] = ()


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Streams:
    """Streams sending frames in threads; ``answered_more(n)`` waits until each answered n more."""

    def __init__(self, url: str, ids: list[int]):
        self.drivers = [StreamDriver(url, sid, seed=sid).start() for sid in ids]

    def answered_more(self, frames: int, timeout_s: float = 300.0) -> None:
        marks = [d.report.frames_answered + frames for d in self.drivers]
        _wait(lambda: all(d.report.frames_answered >= m for d, m in zip(self.drivers, marks)),
              timeout_s, f"{frames} more answered frames per stream")

    def stop(self):
        return [d.stop() for d in self.drivers]


def supervised_cases(args, log_dir: Path) -> list[dict]:
    """Attacks and faults on one supervised server, with two streams running throughout."""
    rows = []
    server = TritonServer(models=["fluxshard"], log_file=log_dir / "tritonserver.log").start()
    supervisor = Supervisor(server, probe_interval_s=args.probe_interval,
                            failures_before_restart=2, status_file=log_dir / "status.json",
                            log=lambda line: print(line, file=sys.stderr))
    stop = threading.Event()
    loop = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
    loop.start()
    try:
        for case, attack in (("model upload / unload without the secret", try_model_upload),
                             ("shared-memory status / register the backend's region",
                              try_shared_memory)):
            streams = Streams(server.grpc_url, [11, 12])
            streams.answered_more(args.frames)
            before = group_rss_mb(server.process.pid)
            try:
                refusal = attack(server)
                refused = "restricted" in refusal
            except AssertionError as e:
                refusal, refused = str(e), False
            streams.answered_more(args.frames)
            reports = streams.stop()
            after = group_rss_mb(server.process.pid)
            survived = server.is_running() and supervisor.status.restarts == 0
            row = case_row(case, survived, reports, before, after,
                           refused and survived and all(r.unaffected for r in reports),
                           refusal.split(";")[0][:90])
            rows.append(row)

        for case, fault in (("kill -9 of the python-backend stub", lambda: kill_stub(server)),
                            ("kill -9 of tritonserver",
                             lambda: server.kill(whole_group=False))):
            streams = Streams(server.grpc_url, [21, 22])
            streams.answered_more(args.frames)
            before = group_rss_mb(server.process.pid)
            old_pid, restarts = server.process.pid, supervisor.status.restarts
            old_stubs = [s.pid for s in python_stubs() if s.parent_pid == old_pid]
            fault()
            _wait(lambda: supervisor.status.restarts > restarts and supervisor.status.ready,
                  300, "the supervisor's restart")
            streams.answered_more(args.frames)
            reports = streams.stop()
            after = group_rss_mb(server.process.pid)
            leftovers = [p for p in old_stubs + [old_pid] if process_alive(p)]
            row = case_row(case, supervisor.status.ready, reports, before, after,
                           supervisor.status.ready and not leftovers
                           and sum(r.frames_lost for r in reports) == 0,
                           f"restarted by the supervisor "
                           f"({supervisor.status.last_restart_reason[:40]}); "
                           f"{len(leftovers)} old processes left", touched={21, 22})
            rows.append(row)
    finally:
        stop.set()
        loop.join()
        server.stop()
    return rows


def sigterm_case(args, log_dir: Path) -> dict:
    """SIGTERM to `fluxshard serve` with a stream open: the whole group stops, quickly."""
    ports = [str(free_port()) for _ in range(3)]
    status_file = log_dir / "serve-status.json"
    serve = subprocess.Popen(
        [sys.executable, "-m", "fluxshard.cli", "serve", "--http-port", ports[0], "--grpc-port",
         ports[1], "--metrics-port", ports[2], "--status-file", str(status_file), "--log-file",
         str(log_dir / "serve.log"), "--probe-interval", str(args.probe_interval)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: (read_status(status_file) or {}).get("ready") or serve.poll() is not None,
              300, "fluxshard serve to be ready")
        status = read_status(status_file)
        if not status or not status.get("ready"):
            raise RuntimeError(f"fluxshard serve did not start:\n{serve.communicate()[0]}")
        server_pid = status["server_pid"]
        stubs = [s.pid for s in python_stubs() if s.parent_pid == server_pid]
        before = group_rss_mb(server_pid)
        streams = Streams(f"127.0.0.1:{ports[1]}", [31])
        streams.answered_more(args.frames)
        streams.drivers[0]._stop.set()  # the stream stays open on the server
        streams.drivers[0]._thread.join()
        report = streams.drivers[0].report
        t0 = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=120)
        stop_s = time.monotonic() - t0
        streams.drivers[0].client.close()
    finally:
        if serve.poll() is None:
            serve.kill()
    left = [p for p in stubs + [server_pid] if process_alive(p)]
    row = case_row("SIGTERM to fluxshard serve (a stream open)", False, [report], before, 0.0,
                   serve.returncode == 0 and not left,
                   f"stopped in {stop_s:.1f} s, exit code {serve.returncode}, "
                   f"{len(left)} processes left", touched={31})
    row["server_survived"] = "stopped as asked" if not left else False
    return row


def print_table(rows: list[dict]) -> None:
    cols = ["case", "server_survived", "other_streams_unaffected", "frames_lost", "worst_stall_s",
            "rss_before_mb", "rss_after_mb", "passed"]
    # columns some modules add (scale: throughput and latency per stream count)
    cols += [c for c in dict.fromkeys(k for r in rows for k in r)
             if c in EXTRA_COLUMNS and c not in cols]
    print("| " + " | ".join(cols) + " | note |")
    print("|" + " --- |" * (len(cols) + 1))
    for r in rows:
        cells = ["n/a" if r.get(c) is None else str(r.get(c)) for c in cols]
        print("| " + " | ".join(cells) + f" | {r.get('note', '')} |")


def main(argv: list[str] | None = None, modules: tuple[str, ...] | None = None) -> int:
    """All cases, or (``modules``: a perf/reliability_*.py module run alone) only its rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if modules is None else
                                 sys.modules["__main__"].__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI: 1 s probes, few frames per phase")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "perf")
    ap.add_argument("--soak-minutes", type=float, default=None,
                    help="soak length (default 10; 20 s with --quick)")
    ap.add_argument("--soak-streams", type=int, default=None,
                    help="soak streams (default 3; 2 with --quick)")
    args = ap.parse_args(argv)
    args.probe_interval = 1.0 if args.quick else 5.0
    args.frames = 3 if args.quick else 20
    find_triton()  # a missing install fails here with the fix
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "reliability-logs"
    log_dir.mkdir(exist_ok=True)
    t0 = time.monotonic()
    rows = [] if modules else supervised_cases(args, log_dir) + [sigterm_case(args, log_dir)]
    for name in modules or CASE_MODULES:
        rows += importlib.import_module(name).cases(args, log_dir)
    if not modules:
        rows += [{"case": case, "server_survived": None, "other_streams_unaffected": None,
                  "frames_lost": 0, "worst_stall_s": None, "rss_before_mb": None,
                  "rss_after_mb": None, "passed": None, "note": "not built"}
                 for case in NOT_BUILT]
    total_lost = sum(r["frames_lost"] for r in rows)
    report = {"quick": args.quick, "frames_lost": total_lost, "seconds": round(time.monotonic() - t0),
              "rows": rows}
    out = args.out / ("reliability.json" if not modules else
                      f"reliability-{'-'.join(m.removeprefix('reliability_') for m in modules)}.json")
    out.write_text(json.dumps(report, indent=1))
    print_table(rows)
    print(f"\nframes lost: {total_lost}; {report['seconds']} s; {out}")
    failed = [r["case"] for r in rows if r["passed"] is False]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or total_lost else 0


if __name__ == "__main__":
    sys.exit(main())
