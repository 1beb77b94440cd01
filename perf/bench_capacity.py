"""How many camera streams one server holds, per executor: the capacity table (issue 22).

For each mix of cameras and each executor (``dense``, ``exact``, ``tiles``) one server is
started as the tests start it (``fluxshard.serving.tritonserver.TritonServer`` on the shipped
``fluxshard`` model, its batching as ``model_repository/fluxshard/config.pbtxt`` sets it, with
one instance per core, unless overridden here). Then 1, 2, 3 ... camera streams run against it
at once, each a corpus clip re-encoded as a 640x384 camera stream (``fluxshard.footage``, cached
under ``out/footage``), sent as the SDK's wire payloads of a stream whose every frame goes to
the cloud (key frame, then residual frames at the default tau), at the clip's own frame rate
(``perf.capacity_kit.PacedStream``; starts spread over one frame period). A frame's
latency counts from its capture time, so a server that falls behind shows it. The mixes:

- ``surveillance``: the deployment FluxShard is built for, N fixed cameras; stream k replays
  the corpus's surveillance clip (``vtest``) from frame ``k * STAGGER`` (each camera joins at
  its own point of the scene, with its own key frame);
- ``corpus``: stream k replays corpus clip k of ``--clips`` (cycling): fixed, moving and
  handheld cameras and animations together, the hardest mix for reuse.

A stream count is *held* when no frame is lost (refused, failed or answered from another input),
the p95 latency of every measured frame is under ``--p95-ms`` (250) and every stream is answered
at >= 95% of its frame rate. The first ``WARMUP_S`` seconds (key frames, the engine's first
calls per shape) are sent and checked but not measured; a stream still sending ``BEHIND_S``
after its last frame was due is stopped (not held). The count grows until one is not held.

Models: ``dense`` and ``tiles`` run the real detector, Darknet YOLOv3-tiny
(``weights=yolov3-tiny``); the exact executor refuses Darknet, so ``exact`` runs YOLO11n with the
embedded demo weights (the header's ``models`` says so). ``dense`` runs on the same onnxruntime
engine as the tile executor's crops (``fluxshard.sessions.MapsDenseEngine``).

    python3 perf/bench_capacity.py              # 20 s per count, up to 16 streams, both mixes
    python3 perf/bench_capacity.py --quick      # 5 s per count

Writes out/perf/bench_capacity.json ({"header": ..., "rows": [...]}, a row per mix, executor
and stream count: executor, streams, frames_per_s, p50_ms, p95_ms, frames_lost, cpu_share, held,
mix) and out/perf/bench_capacity.png (p95 latency against streams).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "perf"))

from fluxshard import cli_common  # noqa: E402 (the repository first on the path)

EXECUTORS = ("dense", "exact", "tiles")
# the still cameras FluxShard is built for first (the surveillance camera leads), then the
# moving camera and the animations
DEFAULT_CLIPS = ("vtest", "carphone_pristine", "cup", "box", "tree", "bikes", "bigbuckbunny",
                 "Megamind")
SIZE = (640, 384)  # W, H: the model input
P95_MS = 250.0
RATE_SHARE = 0.95  # a stream answered at this share of its frame rate or more keeps its rate
WARMUP_S = 1.5
BEHIND_S = 10.0  # a stream still sending this long after its last frame was due: not held
SECONDS, QUICK_SECONDS = 20.0, 5.0
CLIP_FRAMES, QUICK_CLIP_FRAMES = 300, 150
MAX_STREAMS = 16
MIXES = ("surveillance", "corpus")
SURVEILLANCE_CLIP = "vtest"
STAGGER = 37  # frames between the surveillance cameras' starting points
WEIGHTS = {"dense": "yolov3-tiny", "tiles": "yolov3-tiny", "exact": ""}
MODELS = {"dense": "yolov3-tiny", "tiles": "yolov3-tiny",
          "exact": "yolo11n, embedded demo weights (the exact executor refuses Darknet)"}
ROW_FIELDS = ("executor", "streams", "frames_per_s", "p50_ms", "p95_ms", "frames_lost",
              "cpu_share", "held", "mix")


class Cameras:
    """The camera stream k of a mix replays (module doc), its payloads at :data:`SIZE`
    (``perf.capacity_kit.ClipPayloads``) built on first use and kept."""

    def __init__(self, mix: str, clips: list[str], frames: int, footage_dir: Path,
                 progress: bool = False):
        if mix not in MIXES:
            raise ValueError(f"unknown mix {mix!r}; choose from {MIXES}")
        self.mix, self.clips, self.frames = mix, list(clips), frames
        self.footage_dir, self.progress = footage_dir, progress
        self.built: dict[str, object] = {}

    def stream(self, k: int) -> tuple[str, object]:
        """(name, payloads) of stream ``k``: ``clip@start`` for a camera joining mid-clip."""
        from fluxshard import footage
        from perf.capacity_kit import clip_payloads

        if self.mix == "surveillance":
            clip, start = SURVEILLANCE_CLIP, (k * STAGGER) % self.frames
        else:
            clip, start = self.clips[k % len(self.clips)], 0
        name = f"{clip}@{start}" if start else clip
        if name not in self.built:
            if self.progress:
                print(f"  payloads of {name} ({self.frames} frames at {SIZE[0]}x{SIZE[1]})",
                      flush=True)
            # long enough for any start (a short clip plays ping-pong)
            video = footage.camera_stream(clip, self.footage_dir, size=SIZE,
                                          frames=2 * self.frames if self.mix == "surveillance"
                                          else self.frames)
            self.built[name] = clip_payloads(video, frames=self.frames, start=start)
        return name, self.built[name]


def cost_breakdown(clip, frames: int) -> dict:
    """What one frame of ``clip`` costs the served dense and tiles executors, in process
    (``SessionManager.handle``, as the server runs it, YOLOv3-tiny, one thread), the two
    alternating frame by frame: thread CPU ms, and where the wall time goes (serving work
    outside the executor, the tile executor's bookkeeping and crop engine, crop area)."""
    import torch

    from fluxshard.models import load_model
    from fluxshard.serving.session import SessionManager
    from fluxshard.sessions import yolo_session_factory

    torch.set_num_threads(1)
    model = load_model(WEIGHTS["tiles"], fused=True)
    managers = {ex: SessionManager(yolo_session_factory(ex, model=model, threads=1,
                                                        dense_engine="onnxruntime"))
                for ex in ("dense", "tiles")}
    seen = {ex: [] for ex in managers}
    for k in range(min(frames, len(clip))):
        for ex in (("dense", "tiles") if k % 2 else ("tiles", "dense")):
            c0 = time.thread_time()
            answer = managers[ex].handle(1, k == 0, False, clip.payloads[k])
            cpu_ms = (time.thread_time() - c0) * 1e3
            st = answer.stats
            stages = getattr(managers[ex].streams[1].session, "last_report", None)
            stages = stages.stages if stages is not None else {}
            if k >= 2:  # after the key frame and the engine's first crop sizes
                seen[ex].append((cpu_ms, st["server_ms"] - st["compute_ms"],
                                 st.get("crop_area_fraction", 1.0),
                                 1e3 * sum(stages.get(x, 0.0) for x in ("warp", "change", "plan")),
                                 1e3 * stages.get("engine", 0.0), st["compute_ms"]))
    out = {}
    for ex, rows in seen.items():
        a = np.array(rows, float).mean(0)
        out[ex] = {"cpu_ms": round(a[0], 1), "serving_ms": round(a[1], 1),
                   "executor_ms": round(a[5], 1), "crop_area": round(a[2], 3)}
        if ex == "tiles":
            out[ex].update(bookkeeping_ms=round(a[3], 1), crop_engine_ms=round(a[4], 1))
    out["tiles_cpu_vs_dense"] = round(out["tiles"]["cpu_ms"] / out["dense"]["cpu_ms"], 3)
    # crops' engine time per unit of area against the dense executor's per unit of area
    out["crop_cost_per_area_vs_dense"] = round(
        out["tiles"]["crop_engine_ms"] / out["tiles"]["crop_area"] / out["dense"]["executor_ms"], 3)
    return out


def run_count(server, cameras: Cameras, streams: int, seconds: float,
              p95_ms: float) -> tuple[dict, dict]:
    """``streams`` paced streams for WARMUP_S + ``seconds`` against ``server``: one row."""
    from perf.capacity_kit import (PacedStream, answered_rate, group_cpu_seconds,
                                   latency_percentiles)
    from fluxshard_client import FluxShardClient

    names, chosen = zip(*(cameras.stream(k) for k in range(streams)))
    paced = [PacedStream(FluxShardClient(server.grpc_url), 1000 * streams + k, clip)
             for k, clip in enumerate(chosen)]
    cpu0, t0 = group_cpu_seconds(server.process.pid), time.monotonic()
    start = t0 + 0.2
    measure_from = start + WARMUP_S
    for k, (stream, clip) in enumerate(zip(paced, chosen)):
        offset = k / streams / clip.fps  # spread over one frame period
        stream.start(math.ceil((WARMUP_S + seconds) * clip.fps), start + offset,
                     measure_from=measure_from + offset)
    # a stream this far behind its camera has failed the count already: stop it there
    deadline = start + WARMUP_S + seconds + BEHIND_S
    reports = [s.join(timeout_s=max(0.0, deadline - time.monotonic())) for s in paced]
    cpu1, t1 = group_cpu_seconds(server.process.pid), time.monotonic()
    for s in paced:
        s.close()
    p50, p95 = latency_percentiles(reports)
    lost = sum(r.frames_lost for r in reports)
    rates = [answered_rate(r) / clip.fps for r, clip in zip(reports, chosen)]
    answered = sum(len(r.dues) for r in reports)
    span = max((d + lat for r in reports for d, lat in zip(r.dues, r.latencies_s)),
               default=measure_from) - measure_from
    behind = any(r.stopped_early for r in reports)
    held = bool(lost == 0 and p95 <= p95_ms and not behind
                and all(rate >= RATE_SHARE for rate in rates))
    row = {"executor": None, "streams": streams,
           "frames_per_s": round(answered / span, 2) if span > 0 else 0.0,
           "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "frames_lost": lost,
           "cpu_share": round((cpu1 - cpu0) / ((t1 - t0) * (os.cpu_count() or 1)), 3),
           "held": held, "mix": cameras.mix}
    errors = [e for r in reports for e in r.errors][:3]
    sent = sum(r.frames_answered for r in reports)
    detail = {"clips": list(names),
              "demand_fps": round(sum(c.fps for c in chosen), 2),
              "worst_rate_share": round(min(rates), 3) if rates else None,
              "fell_behind": behind,
              "batched_streams_mean": _mean_stat(reports, "batched_streams", 1),
              # what one frame costs the server in CPU, whatever share of the machine it got
              "server_cpu_ms_per_frame": round(1e3 * (cpu1 - cpu0) / sent, 1) if sent else None,
              "crop_area_mean": _mean_stat(reports, "crop_area_fraction", 1.0),
              "errors": errors}
    return row, detail


def _mean_stat(reports, name: str, default) -> float | None:
    values = [st.get(name, default) for r in reports for st in r.stats]
    return round(float(np.mean(values)), 2) if values else None


def run_executor(executor: str, cameras: Cameras, args, log_dir: Path):
    """Rows of one executor on one mix: stream counts from 1 up, until one is not held."""
    from perf.capacity_kit import batching_repository
    from fluxshard.serving.tritonserver import DEFAULT_MODEL_REPOSITORY, TritonServer

    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="fluxshard-capacity-") as tmp:
        repository = batching_repository(
            DEFAULT_MODEL_REPOSITORY, Path(tmp) / "repository",
            {"executor": executor, "weights": WEIGHTS[executor]}, batching_overrides(args))
        log = log_dir / f"bench_capacity-{cameras.mix}-{executor}.log"
        with TritonServer(repository, log_file=log, exit_timeout_s=1) as server:
            for streams in range(1, args.max_streams + 1):
                row, detail = run_count(server, cameras, streams, args.seconds, args.p95_ms)
                row["executor"] = executor
                rows.append(row)
                details.append({"mix": cameras.mix, "executor": executor, "streams": streams,
                                **detail})
                print(f"  {cameras.mix} {executor} x{streams}: {row['frames_per_s']} frames/s, "
                      f"p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms, lost "
                      f"{row['frames_lost']}, cpu {row['cpu_share']:.0%} "
                      f"({detail['server_cpu_ms_per_frame']} ms a frame), worst rate "
                      f"{detail['worst_rate_share']}, batched {detail['batched_streams_mean']}"
                      f" -> {'held' if row['held'] else 'NOT held'}", flush=True)
                if not row["held"]:
                    break
    return rows, details


def batching_overrides(args) -> dict:
    """The sequence-batching fields given on the command line (the shipped config's otherwise)."""
    fields = {"instance_count": args.instances, "max_batch_size": args.max_batch_size,
              "max_candidate_sequences": args.candidates,
              "max_queue_delay_microseconds": args.queue_delay_us,
              "preferred_batch_size": args.preferred_batch_size}
    return {k: v for k, v in fields.items() if v is not None}


def shipped_batching() -> dict:
    """The batching fields of model_repository/fluxshard/config.pbtxt."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from fluxshard.serving.tritonserver import DEFAULT_MODEL_REPOSITORY

    config = text_format.Parse((DEFAULT_MODEL_REPOSITORY / "fluxshard" / "config.pbtxt")
                               .read_text(), model_config_pb2.ModelConfig())
    oldest = config.sequence_batching.oldest
    return {"max_batch_size": config.max_batch_size,
            "instance_count": sum(g.count for g in config.instance_group),
            "max_candidate_sequences": oldest.max_candidate_sequences,
            "preferred_batch_size": list(oldest.preferred_batch_size),
            "max_queue_delay_microseconds": oldest.max_queue_delay_microseconds}


def held_counts(rows: list[dict]) -> dict:
    """Mix -> executor -> the most streams it held (0 when not even one)."""
    out: dict = {}
    for row in rows:
        mine = out.setdefault(row["mix"], {})
        mine.setdefault(row["executor"], 0)
        if row["held"]:
            mine[row["executor"]] = max(mine[row["executor"]], row["streams"])
    return out


def plot(rows: list[dict], p95_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {"dense": "tab:blue", "exact": "tab:green", "tiles": "tab:orange"}
    styles = {"surveillance": "o-", "corpus": "s--"}
    for mix, executor in dict.fromkeys((r["mix"], r["executor"]) for r in rows):
        mine = [r for r in rows if r["executor"] == executor and r["mix"] == mix]
        ax.plot([r["streams"] for r in mine], [r["p95_ms"] for r in mine], styles.get(mix, "o-"),
                color=colors.get(executor),
                label=f"{mix}: {executor} ({MODELS[executor].split(',')[0]})")
        for r in mine:
            if not r["held"]:
                ax.plot(r["streams"], r["p95_ms"], "x", ms=10, color=colors.get(executor))
    ax.axhline(p95_ms, color="grey", ls="--", lw=1, label=f"p95 bound {p95_ms:.0f} ms")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("camera streams on one server")
    ax.set_ylabel("p95 latency from capture (ms)")
    ax.set_title(f"capacity at {SIZE[0]}x{SIZE[1]} (x: not held)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def instances_line(instances: int) -> str:
    return f"{instances} model instance(s) on {os.cpu_count()} core(s)"


def print_table(rows: list[dict]) -> None:
    print("\n| " + " | ".join(ROW_FIELDS) + " |")
    print("|" + "---|" * len(ROW_FIELDS))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in ROW_FIELDS) + " |")
    print("\nmodels: " + "; ".join(f"{k}: {v}" for k, v in MODELS.items()))


def main(argv: list[str] | None = None) -> int:
    from bench_real import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_SECONDS:g} s per stream count, {QUICK_CLIP_FRAMES}-frame clips")
    ap.add_argument("--executors", nargs="+", choices=EXECUTORS, default=list(EXECUTORS))
    ap.add_argument("--mix", nargs="+", choices=MIXES, default=list(MIXES),
                    help="which mixes of cameras (module doc; default both)")
    ap.add_argument("--clips", nargs="+", default=list(DEFAULT_CLIPS),
                    help="the corpus mix's clips: stream k plays clip k (in this order, cycling)")
    ap.add_argument("--max-streams", type=cli_common.positive_int, default=MAX_STREAMS)
    ap.add_argument("--seconds", type=float, default=None,
                    help=f"measured seconds per stream count (default {SECONDS:g}, "
                         f"--quick {QUICK_SECONDS:g})")
    ap.add_argument("--p95-ms", type=float, default=P95_MS)
    ap.add_argument("--clip-frames", type=cli_common.positive_int, default=None,
                    help=f"frames of each camera stream before it starts over (default "
                         f"{CLIP_FRAMES}, --quick {QUICK_CLIP_FRAMES})")
    ap.add_argument("--instances", type=cli_common.positive_int, default=None,
                    help="instances of the model (default: one per core, each on one thread, "
                         "as docs/capacity.md sizes a server)")
    ap.add_argument("--max-batch-size", type=cli_common.positive_int, default=None)
    ap.add_argument("--candidates", type=cli_common.positive_int, default=None,
                    help="override max_candidate_sequences")
    ap.add_argument("--queue-delay-us", type=int, default=None,
                    help="override max_queue_delay_microseconds")
    ap.add_argument("--preferred-batch-size", type=cli_common.positive_int, nargs="+",
                    default=None)
    ap.add_argument("--breakdown", type=cli_common.positive_int, default=None, metavar="FRAMES",
                    help="also measure, in process, what a frame of the first clip costs dense "
                         "and tiles and where it goes (this many frames)")
    ap.add_argument("--footage-dir", type=Path, default=REPO_ROOT / "out" / "footage")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "perf")
    args = ap.parse_args(argv)
    if args.seconds is None:
        args.seconds = QUICK_SECONDS if args.quick else SECONDS
    if args.seconds <= 0:
        ap.error("--seconds must be > 0")

    if args.instances is None:
        args.instances = os.cpu_count() or 1

    from fluxshard.footage import corpus_entry

    names = [corpus_entry(c).stem for c in args.clips]  # a clear error for an unknown clip
    frames = args.clip_frames or (QUICK_CLIP_FRAMES if args.quick else CLIP_FRAMES)
    args.out.mkdir(parents=True, exist_ok=True)
    mixes = {mix: Cameras(mix, names, frames, args.footage_dir, progress=True)
             for mix in args.mix}
    breakdown = None
    if args.breakdown:
        first = next(iter(mixes.values()))
        name, clip = first.stream(0)
        breakdown = {"clip": name, "frames": args.breakdown,
                     **cost_breakdown(clip, args.breakdown)}
        print(f"cost of a {name} frame, in process: {json.dumps(breakdown)}", flush=True)
    rows, details = [], []
    for mix, cameras in mixes.items():
        for executor in args.executors:
            print(f"{mix} mix, {executor}: model {MODELS[executor]}", flush=True)
            r, d = run_executor(executor, cameras, args, args.out)
            rows += r
            details += d
    held = held_counts(rows)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "quick": args.quick, "seconds_per_count": args.seconds,
              "warmup_s": WARMUP_S, "input": f"{SIZE[0]}x{SIZE[1]}", "p95_bound_ms": args.p95_ms,
              "rate_share": RATE_SHARE, "clip_frames": frames,
              "mixes": {mix: [{"clip": n, "fps": round(c.fps, 3)}
                              for n, c in cameras.built.items()]
                        for mix, cameras in mixes.items()},
              "models": {k: MODELS[k] for k in args.executors},
              "batching": {**shipped_batching(), **batching_overrides(args)},
              "held_streams": held, "cost_breakdown": breakdown, "details": details}
    # server CPU a frame costs at one stream: what bounds the streams a CPU-bound server holds
    header["cpu_ms_per_frame_one_stream"] = {
        mix: {d["executor"]: d["server_cpu_ms_per_frame"] for d in details
              if d["streams"] == 1 and d["mix"] == mix} for mix in mixes}
    header["tiles_vs_dense"], header["tiles_cpu_per_frame_vs_dense"] = {}, {}
    for mix, counts in held.items():
        if "dense" in counts and "tiles" in counts:
            header["tiles_vs_dense"][mix] = (None if counts["dense"] == 0
                                             else round(counts["tiles"] / counts["dense"], 2))
            cost = header["cpu_ms_per_frame_one_stream"][mix]
            if cost.get("dense") and cost.get("tiles"):
                header["tiles_cpu_per_frame_vs_dense"][mix] = round(cost["tiles"] / cost["dense"],
                                                                    3)
    (args.out / "bench_capacity.json").write_text(json.dumps({"header": header, "rows": rows},
                                                             indent=1))
    plot(rows, args.p95_ms, args.out / "bench_capacity.png")
    print_table(rows)
    print(f"\n{instances_line(args.instances)}; most streams held (p95 <= {args.p95_ms:g} ms, "
          "none lost, every stream at its frame rate):")
    for mix, counts in held.items():
        line = f"  {mix}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        if mix in header["tiles_vs_dense"]:
            line += f"; tiles / dense, streams held: {header['tiles_vs_dense'][mix]}"
        if mix in header["tiles_cpu_per_frame_vs_dense"]:
            line += (f"; server CPU per frame at one stream, tiles / dense: "
                     f"{header['tiles_cpu_per_frame_vs_dense'][mix]}")
        print(line)
    print(f"wrote {args.out / 'bench_capacity.json'} and {args.out / 'bench_capacity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
