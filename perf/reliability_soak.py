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

    python3 perf/reliability.py [--quick] [--soak-minutes M] [--soak-streams N]  # with the rest
    python3 perf/reliability_soak.py [--quick] [--minutes M] [--streams N]        # this row alone
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fluxshard.digest_scene import Scene  # noqa: E402
from perf.reliability_kit import StreamDriver, group_rss_mb  # noqa: E402
from fluxshard.serving.tritonserver import TritonServer  # noqa: E402

DEFAULT_STREAMS, DEFAULT_MINUTES = 3, 10.0
QUICK_STREAMS, QUICK_MINUTES = 2, 1 / 3
FRAME_SIZE = (192, 320)  # H, W: a small camera frame with a few residual blocks per frame
FLAT_MB_PER_MIN = 0.7  # ~1 GB a day
QUICK_GROWTH_MB = 50.0
FIRST_STREAM_ID = 4100


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


def plot(samples, after_mb: float, streams: int, minutes: float, slope: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s[0] for s in samples]) / 60.0
    rss = np.array([s[1] for s in samples])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, rss, lw=1, label="server process group RSS")
    half = len(samples) // 2
    if len(samples) - half >= 2:
        fit = np.polyfit(t[half:], rss[half:], 1)
        ax.plot(t[half:], np.polyval(fit, t[half:]), "--", label=f"fit: {slope:+.2f} MB/min")
        ax.axvline(t[half], color="grey", lw=0.8, ls=":")
        ax.text(t[half], ax.get_ylim()[0], " warm-up | judged", va="bottom", fontsize=8,
                color="grey")
    ax.plot([t[-1]], [after_mb], "o", ms=4, label="after every stream ended")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax.set_title(f"soak: {streams} streams x {duration(minutes)}, {FRAME_SIZE[1]}x{FRAME_SIZE[0]}")
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
    slope = slope_mb_per_min(samples)
    half = samples[len(samples) // 2:]
    growth = half[-1][1] - half[0][1]
    lost = sum(r.frames_lost for r in reports)
    flat = growth <= QUICK_GROWTH_MB if quick else slope <= FLAT_MB_PER_MIN
    plot(samples, after, streams, minutes, slope, out / "reliability-soak.png")
    (out / "reliability-soak.json").write_text(json.dumps(
        {"streams": streams, "minutes": minutes, "frame_size": FRAME_SIZE, "churn_s": churn_s,
         "rss_after_streams_ended_mb": round(after, 1),
         "samples": [{"t_s": t, "rss_mb": r, "frames_answered": n} for t, r, n in samples]},
        indent=0))
    judged = (f"second-half growth {growth:+.1f} MB (quick: <= {QUICK_GROWTH_MB:g})" if quick
              else f"slope {slope:+.2f} MB/min over the second half (flat: <= {FLAT_MB_PER_MIN})")
    return {"case": f"soak: {streams} streams x {duration(minutes)}, one replaced every "
                    f"{churn_s:g} s",
            "server_survived": survived,
            "other_streams_unaffected": all(r.unaffected for r in reports),
            "frames_lost": lost,
            "worst_stall_s": round(max(r.worst_stall_s for r in reports), 2),
            "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "resyncs": sum(r.resyncs for r in reports),
            "passed": survived and lost == 0 and flat,
            "note": f"{soak.answered()} frames, {len(reports)} sessions; warm "
                    f"{half[0][1]:.0f} MB; {judged}; after every stream ended {after:.0f} MB",
            "rss_slope_mb_per_min": round(slope, 3), "rss_second_half_growth_mb": round(growth, 1),
            "frames_answered": soak.answered()}


def cases(args, log_dir: Path) -> list[dict]:
    """One soak row: ``args.soak_streams`` streams for ``args.soak_minutes`` (the quick mode's
    2 x 20 s when ``args.quick`` and neither is given)."""
    quick = bool(getattr(args, "quick", False))
    streams = getattr(args, "soak_streams", None) or (QUICK_STREAMS if quick else DEFAULT_STREAMS)
    minutes = getattr(args, "soak_minutes", None) or (QUICK_MINUTES if quick else DEFAULT_MINUTES)
    out = Path(getattr(args, "out", log_dir.parent))
    return [soak_row(int(streams), float(minutes), quick, out, log_dir)]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    import reliability

    return reliability.main(argv, modules=("reliability_soak",))


if __name__ == "__main__":
    sys.exit(main())
