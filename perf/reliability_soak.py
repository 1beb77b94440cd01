"""Soak row of perf/reliability.py (issue 14): N streams for M minutes against one real
tritonserver with the ``fluxshard`` model on loopback, the server's memory sampled throughout.

Every stream sends camera frames back to back (a short pause between frames), and every
``churn`` seconds one of them ends and a new stream takes its place, so the run covers what a
long-lived server sees: frames, and sessions opening and closing. Every answer is checked against
the true frame's digest (``StreamDriver`` in perf/reliability_kit.py). The resident
memory of the server's process group (tritonserver and its python-backend stubs,
``group_rss_mb`` in perf/reliability_kit.py) is sampled over time and plotted
(``reliability-soak.png`` in the output folder; the samples in ``reliability-soak.json``).

Flat after warm-up: the first half of the run is warm-up (model caches, allocator arenas,
per-session state reaching its working size); over the second half the least-squares slope of
the resident memory must stay under :data:`FLAT_MB_PER_MIN` (a slower leak takes more than a
day to cost a gigabyte). The quick mode (CI) is too short to tell a slow leak from allocator
noise; it checks that nothing is lost and that memory does not grow by more than
:data:`QUICK_GROWTH_MB` over its second half (a session left behind costs more).

The edge row (issue 21): ``fluxshard run CLIP --loop --dispatch edge --metrics-port PORT`` (and
``--track`` where the command has it) as a process of its own on a synthetic clip played over
and over, for the same minutes; its resident memory sampled (each sample the least of readings
four times a second: a frame's working set comes and goes, a leak raises the floor), its frame
count scraped from the metrics port, and it is stopped with SIGTERM (the outputs must be written). Judged like the
server: flat over the second half (``reliability-soak-edge.png`` / ``.json``).

    python3 perf/reliability.py [--quick] [--soak-minutes M] [--soak-streams N]  # with the rest
    python3 perf/reliability_soak.py [--quick] [--soak-minutes M] [--soak-streams N]  # these rows
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fluxshard.digest_scene import Scene  # noqa: E402
from perf.reliability_kit import StreamDriver, group_rss_mb  # noqa: E402
from fluxshard.serving.tritonserver import TritonServer, free_port  # noqa: E402

DEFAULT_STREAMS, DEFAULT_MINUTES = 3, 10.0
QUICK_STREAMS, QUICK_MINUTES = 2, 1 / 3
FRAME_SIZE = (192, 320)  # H, W: a small camera frame with a few residual blocks per frame
FLAT_MB_PER_MIN = 0.7  # ~1 GB a day
QUICK_GROWTH_MB = 50.0
FIRST_STREAM_ID = 4100
EDGE_CLIP = (640, 384, 90)  # W, H, frames: the demo's clip, played over and over


class _Soak:
    """Streams kept running for a while, one replaced every ``churn_s``; memory sampled."""

    def __init__(self, server: TritonServer, streams: int, sample_s: float, churn_s: float):
        self.server, self.sample_s, self.churn_s = server, sample_s, churn_s
        self.next_id = FIRST_STREAM_ID
        self.running = [self._open() for _ in range(streams)]
        self.ended = []
        self.samples: list[tuple[float, float, int]] = []  # (s since start, RSS MB, frames answered)

    def _open(self) -> StreamDriver:
        driver = StreamDriver(self.server.grpc_url, self.next_id, seed=self.next_id)
        driver.scene = Scene(self.next_id, *FRAME_SIZE)
        self.next_id += 1
        return driver.start(pause_s=0.02)

    def answered(self) -> int:
        return sum(d.report.frames_answered for d in self.running + self.ended)

    def run(self, seconds: float) -> None:
        t0 = time.monotonic()
        next_churn, replace = t0 + self.churn_s, 0
        while True:
            now = time.monotonic()
            self.samples.append((round(now - t0, 2), round(group_rss_mb(self.server.process.pid), 1),
                                 self.answered()))
            if now - t0 >= seconds:
                return
            if now >= next_churn:
                slot = replace % len(self.running)
                self.ended.append(self.running[slot])
                self.running[slot].stop()  # END: the server frees the session
                self.running[slot] = self._open()
                next_churn, replace = next_churn + self.churn_s, replace + 1
            time.sleep(self.sample_s)

    def stop(self) -> list:
        for driver in self.running:
            driver.stop()
        self.ended += self.running
        self.running = []
        return [d.report for d in self.ended]


def slope_mb_per_min(samples) -> float:
    """Least-squares slope of RSS over the second half of the samples, MB per minute."""
    half = samples[len(samples) // 2:]
    if len(half) < 2:
        return 0.0
    t = np.array([s[0] for s in half]) / 60.0
    rss = np.array([s[1] for s in half])
    return float(np.polyfit(t, rss, 1)[0])


def duration(minutes: float) -> str:
    return f"{minutes * 60:.0f} s" if minutes < 2 else f"{minutes:g} min"


def plot(samples, slope: float, path: Path, title: str, what: str,
         after: tuple[float, str] | None = None) -> None:
    """RSS over time with the second half's fit; ``after``: (MB, label) of one last point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s[0] for s in samples]) / 60.0
    rss = np.array([s[1] for s in samples])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, rss, lw=1, label=what)
    half = len(samples) // 2
    if len(samples) - half >= 2:
        fit = np.polyfit(t[half:], rss[half:], 1)
        ax.plot(t[half:], np.polyval(fit, t[half:]), "--", label=f"fit: {slope:+.2f} MB/min")
        ax.axvline(t[half], color="grey", lw=0.8, ls=":")
        ax.text(t[half], ax.get_ylim()[0], " warm-up | judged", va="bottom", fontsize=8,
                color="grey")
    if after is not None:
        ax.plot([t[-1]], [after[0]], "o", ms=4, label=after[1])
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def soak_row(streams: int, minutes: float, quick: bool, out: Path, log_dir: Path) -> dict:
    seconds = minutes * 60.0
    sample_s = 0.5 if quick else 5.0
    churn_s = max(seconds / 4, 5.0) if quick else 60.0
    server = TritonServer(models=["fluxshard"], log_file=log_dir / "tritonserver-soak.log").start()
    try:
        before = group_rss_mb(server.process.pid)
        soak = _Soak(server, streams, sample_s, churn_s)
        try:
            soak.run(seconds)
        finally:
            reports = soak.stop()
        after = group_rss_mb(server.process.pid)
        survived = server.is_running()
    finally:
        server.stop()
    samples = soak.samples
    memory = judge_memory(samples, quick)
    lost = sum(r.frames_lost for r in reports)
    plot(samples, memory["slope"], out / "reliability-soak.png",
         f"soak: {streams} streams x {duration(minutes)}, {FRAME_SIZE[1]}x{FRAME_SIZE[0]}",
         "server process group RSS", (after, "after every stream ended"))
    (out / "reliability-soak.json").write_text(json.dumps(
        {"streams": streams, "minutes": minutes, "frame_size": FRAME_SIZE, "churn_s": churn_s,
         "rss_after_streams_ended_mb": round(after, 1),
         "samples": [{"t_s": t, "rss_mb": r, "frames_answered": n} for t, r, n in samples]},
        indent=0))
    return {"case": f"soak: {streams} streams x {duration(minutes)}, one replaced every "
                    f"{churn_s:g} s",
            "server_survived": survived,
            "other_streams_unaffected": all(r.unaffected for r in reports),
            "frames_lost": lost,
            "worst_stall_s": round(max(r.worst_stall_s for r in reports), 2),
            "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "resyncs": sum(r.resyncs for r in reports),
            "passed": survived and lost == 0 and memory["flat"],
            "note": f"{soak.answered()} frames, {len(reports)} sessions; warm "
                    f"{memory['warm_mb']:.0f} MB; {memory['judged']}; after every stream "
                    f"ended {after:.0f} MB",
            "rss_slope_mb_per_min": round(memory["slope"], 3),
            "rss_second_half_growth_mb": round(memory["growth"], 1),
            "frames_answered": soak.answered()}


def judge_memory(samples, quick: bool) -> dict:
    """Flat after warm-up (the module doc): the second half's slope, or its growth in quick
    mode. ``samples``: (s, RSS MB, ...) in time order."""
    slope = slope_mb_per_min(samples)
    half = samples[len(samples) // 2:]
    growth = half[-1][1] - half[0][1]
    judged = (f"second-half growth {growth:+.1f} MB (quick: <= {QUICK_GROWTH_MB:g})" if quick
              else f"slope {slope:+.2f} MB/min over the second half (flat: <= {FLAT_MB_PER_MIN})")
    return {"slope": slope, "growth": growth, "warm_mb": half[0][1], "judged": judged,
            "flat": growth <= QUICK_GROWTH_MB if quick else slope <= FLAT_MB_PER_MIN}


def _edge_frames(url: str) -> int | None:
    """The edge's frame count from its metrics port (None: not answering yet)."""
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return int(sum(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples if s.name == "fluxshard_frames_total"))


def _floor_rss_mb(pgid: int, seconds: float, every_s: float = 0.25) -> float:
    """The least resident memory read over ``seconds``: a frame's working set comes and goes
    within the frame, the floor under it is what a leak raises."""
    readings = []
    end = time.monotonic() + seconds
    while True:
        readings.append(group_rss_mb(pgid))
        if time.monotonic() >= end:
            return min(readings)
        time.sleep(every_s)


def _run_has_option(option: str) -> bool:
    """Whether `fluxshard run` takes ``option`` (--track comes with the SDK's tracking)."""
    done = subprocess.run([sys.executable, "-m", "fluxshard.cli", "run", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=_edge_env())
    return option in done.stdout


def _edge_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def edge_soak_row(minutes: float, quick: bool, out: Path, log_dir: Path) -> dict:
    """`fluxshard run --loop` on a synthetic clip for ``minutes``, its memory sampled."""
    from fluxshard import synth

    width, height, frames = EDGE_CLIP
    clip = synth.make_clip(synth.SceneSpec(width=width, height=height, frames=frames,
                                           camera="static"), log_dir, name="soak-edge",
                           progress=False).video
    port, run_out = free_port(), log_dir / "soak-edge-run"
    extra = ["--track"] if _run_has_option("--track") else []
    command = [sys.executable, "-m", "fluxshard.cli", "run", str(clip), "--loop", "--dispatch",
               "edge", "--metrics-port", str(port), "--out", str(run_out), "--no-progress",
               *extra]
    url = f"http://127.0.0.1:{port}/metrics"
    seconds, sample_s = minutes * 60.0, 0.5 if quick else 5.0
    samples: list[tuple[float, float, int]] = []  # (s since the first frame, RSS MB, frames)
    with open(log_dir / "soak-edge.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=_edge_env(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300  # the model loads before the first frame
            while not _edge_frames(url) and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            t0 = time.monotonic()
            while process.poll() is None:
                rss = _floor_rss_mb(process.pid, sample_s)
                now = time.monotonic()
                samples.append((round(now - t0, 2), round(rss, 1), _edge_frames(url) or 0))
                if now - t0 >= seconds:
                    break
        finally:
            survived = process.poll() is None
            process.send_signal(signal.SIGTERM)  # ends the stream: the outputs are written
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    summary_file = run_out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    stopped_cleanly = process.returncode == 0 and summary.get("stopped") == "interrupted"
    what = f"soak edge: fluxshard run {' '.join(['--loop', *extra])} x {duration(minutes)}, " \
           f"{width}x{height}"
    row = {"case": what,
           "server_survived": survived, "other_streams_unaffected": None, "frames_lost": 0,
           "worst_stall_s": None, "rss_before_mb": None, "rss_after_mb": None,
           "frames_answered": samples[-1][2] if samples else 0}
    if len(samples) < 4:
        return {**row, "passed": False,
                "note": f"the edge ran too few frames to sample (see {log_dir / 'soak-edge.log'})"}
    memory = judge_memory(samples, quick)
    plot(samples, memory["slope"], out / "reliability-soak-edge.png", what, "edge process RSS")
    (out / "reliability-soak-edge.json").write_text(json.dumps(
        {"minutes": minutes, "clip": {"width": width, "height": height, "frames": frames},
         "command": command[3:], "summary_frames": summary.get("frames"),
         "samples": [{"t_s": t, "rss_mb": r, "frames": n} for t, r, n in samples]}, indent=0))
    return {**row, "rss_before_mb": samples[0][1], "rss_after_mb": samples[-1][1],
            "passed": survived and stopped_cleanly and memory["flat"],
            "note": f"{samples[-1][2]} frames; warm {memory['warm_mb']:.0f} MB; "
                    f"{memory['judged']}; "
                    + ("stopped by SIGTERM with its outputs written" if stopped_cleanly else
                       f"did not stop cleanly (exit {process.returncode})"),
            "rss_slope_mb_per_min": round(memory["slope"], 3),
            "rss_second_half_growth_mb": round(memory["growth"], 1)}


def cases(args, log_dir: Path) -> list[dict]:
    """The server's soak row, ``args.soak_streams`` streams for ``args.soak_minutes`` (the quick
    mode's 2 x 20 s when ``args.quick`` and neither is given), and the edge's for as long."""
    quick = bool(getattr(args, "quick", False))
    streams = getattr(args, "soak_streams", None) or (QUICK_STREAMS if quick else DEFAULT_STREAMS)
    minutes = getattr(args, "soak_minutes", None) or (QUICK_MINUTES if quick else DEFAULT_MINUTES)
    out = Path(getattr(args, "out", log_dir.parent))
    return [soak_row(int(streams), float(minutes), quick, out, log_dir),
            edge_soak_row(float(minutes), quick, out, log_dir)]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    import reliability

    return reliability.main(argv, modules=("reliability_soak",))


if __name__ == "__main__":
    sys.exit(main())
