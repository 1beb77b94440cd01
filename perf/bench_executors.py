"""Dense (best engine) vs the exact executor (v1 RFAP) vs the tile executor (v2), on the same
frames in one run, at the three motion levels of the truncation profile (fluxshard.truncation
LEVELS, synthetic clips with ground truth).

The clock covers the whole per-frame edge path after decoding: for the exact executor the
EdgePath step (field accumulation, quantization, residual blocks, assembly), preprocessing and
the executor; for tiles the executor (critical blocks against the warped previous frame, output
warp, crops, decode); for dense preprocessing and the best dense runner. Decoding and codec
motion-vector extraction/validation run before, off the clock, once for all three. The
executors take turns frame by frame, so machine drift hits all alike; speedups are ratios of
medians over the non-key frames of this run.

    python3 perf/bench_executors.py            # 640x384, 60 frames per level
    python3 perf/bench_executors.py --quick    # 640x384, 16 frames per level (a few minutes)

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

from fluxshard import synth
from fluxshard.accuracy import agreement, evaluate_detections
from fluxshard.models import load_model, postprocess, preprocess
from fluxshard.models.dense import best_dense_runner
from fluxshard.motion import EdgePath, iter_motion
from fluxshard.sparse import SparseExecutor, StreamState
from fluxshard.tau import tau_argument
from fluxshard.tiles import TileExecutor, TileStreamState
from fluxshard.truncation import LEVELS

BENCH_SCENE_SEED = 31_000  # scenes apart from training and the profile's held-out ones
EVAL_CONF = 0.001  # mAP wants the full ranked list (as the profile evaluates)
AGREEMENT_CONF = 0.25  # dense boxes taken as truth: the detections a user would see


def as_tensor(out):
    if isinstance(out, (list, tuple)) and not isinstance(out, torch.Tensor):
        out = out[0]
    return torch.from_numpy(out) if isinstance(out, np.ndarray) else out


def run_level(level, overrides, args, model, best, tmp, seed):
    spec = synth.SceneSpec(width=args.width, height=args.height, frames=args.frames,
                           gop=args.frames, seed=seed, **overrides)
    paths = synth.make_clip(spec, tmp, name=level)
    gt = synth.load_ground_truth(paths.ground_truth)
    truths = [dict(boxes=b, classes=k) for b, k in zip(gt.boxes, gt.classes)]
    frames = list(iter_motion(paths.video))  # decode + MVs: off the clock

    exact = SparseExecutor(model, tau=args.tau, bypass=best)
    exact_path, exact_state = EdgePath(args.tau), StreamState()
    tiles = TileExecutor(model, engine=args.tiles_engine, threads=args.threads,
                         threshold=args.threshold, halo=args.halo, budget=args.budget,
                         dense_above=args.dense_above, refresh_interval=args.refresh_interval)
    tiles_state = TileStreamState()

    names = ("dense", "exact", "tiles")
    ms = {n: [] for n in names}
    preds = {n: [] for n in names}
    crop_area, refresh, dense_outputs = [], [], []
    with torch.inference_mode():
        for mf in frames:
            shape = mf.image.shape[:2]
            t0 = time.perf_counter()
            x = preprocess(mf.image)
            dense_out = as_tensor(best.run(x))
            t1 = time.perf_counter()
            dense_outputs.append((mf, dense_out, x))
            image, field, key = exact_path.step(mf)
            xe = preprocess(image)
            exact_out, _ = exact.run(exact_state, xe, field, key=key, tau=exact_path.tau)
            t2 = time.perf_counter()
            tiles_out, report = tiles.run(tiles_state, mf.image,
                                          None if mf.is_key else mf.field, key=mf.is_key)
            t3 = time.perf_counter()
            if not mf.is_key:
                ms["dense"].append(1e3 * (t1 - t0))
                ms["exact"].append(1e3 * (t2 - t1))
                ms["tiles"].append(1e3 * (t3 - t2))
                crop_area.append(report.crop_area_fraction)
                refresh.append(report.refresh_fraction)
            for n, out in zip(names, (dense_out, exact_out, tiles_out)):
                preds[n].append(postprocess(out, x.shape[-2:], shape, conf_thres=EVAL_CONF)[0])
    dense_acc = evaluate_detections(preds["dense"], truths)
    # the dense detections a user would see, as truth for agreement
    dense_seen = [postprocess(out, x.shape[-2:], mf.image.shape[:2], conf_thres=AGREEMENT_CONF)[0]
                  for mf, out, x in dense_outputs]
    dense_ms = float(np.median(ms["dense"]))
    rows = []
    for n in names:
        acc = evaluate_detections(preds[n], truths)
        med = float(np.median(ms[n]))
        rows.append(dict(
            clip=f"synth-{level}-{args.width}x{args.height}-seed{seed}", level=level, executor=n,
            ms_per_frame=med, speedup_vs_best_dense=dense_ms / med,
            map50_ratio=acc["map50"] / dense_acc["map50"] if dense_acc["map50"] else None,
            map5095_ratio=(acc["map50_95"] / dense_acc["map50_95"]
                           if dense_acc["map50_95"] else None),
            agreement=agreement(preds[n], dense_seen)["map50"],
            crop_area_fraction={"dense": 1.0, "exact": None,
                                "tiles": float(np.mean(crop_area))}[n],
            refresh_fraction={"dense": 0.0, "exact": None, "tiles": float(np.mean(refresh))}[n]))
    return rows


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
    p.add_argument("--halo", type=int, default=32, help="tiles: crop halo, pixels (default 32)")
    p.add_argument("--budget", type=float, default=0.45,
                   help="tiles: most crop area share per frame (default 0.45)")
    p.add_argument("--dense-above", type=float, default=0.6,
                   help="tiles: run dense when crops would cover more (default 0.6)")
    p.add_argument("--refresh-interval", type=int, default=30,
                   help="tiles: full dense refresh every K frames (default 30)")
    p.add_argument("--out", type=Path, default=Path("out/perf/bench_executors.json"))
    args = p.parse_args()
    args.frames = 16 if args.quick else 60
    torch.set_num_threads(args.threads)
    model = load_model(None, fused=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        best, medians = best_dense_runner(model, (args.height, args.width), threads=args.threads,
                                          kinds=("fused_channels_last", "onnxruntime"),
                                          workdir=tmp)
        print("dense runners (median ms):", {k: round(v, 1) for k, v in medians.items()},
              "best:", best.name)
        for li, (level, overrides) in enumerate(LEVELS.items()):
            rows += run_level(level, overrides, args, model, best, tmp, BENCH_SCENE_SEED + li)
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
