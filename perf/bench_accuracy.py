"""Dense demo-model accuracy on held-out synthetic clips (H.264 encoded, decoded like deployment).

Clips come from `fluxshard.synth.make_clip` with held-out scene seeds (never used in training),
one or more per camera mode. The dense model runs on every decoded frame at full 640x384; the
table gives mAP@0.5 and mAP@0.5:0.95 against ground truth per camera mode and overall, at the
COCO protocol threshold (conf 0.001) and at the deployment threshold (conf 0.25). Segment
models also get mask mAP and matched mask IoU at the deployment threshold (ground-truth masks
re-rendered from the scene; at conf 0.001 the full-frame masks would not fit in memory).

    python3 perf/bench_accuracy.py                    # embedded detector, 8 clips x 60 frames
    python3 perf/bench_accuracy.py --quick            # 4 clips x 16 frames
    python3 perf/bench_accuracy.py --weights fluxshard/weights/yolo11n-seg-demo.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import torch

from fluxshard import synth
from fluxshard.accuracy import evaluate_detections
from fluxshard.models import load_model, postprocess, preprocess
from fluxshard.train.data import scene_spec

# Held-out scene indices for benchmarks start here, apart from the trainer's validation scenes
# (held-out indices 0, 1, ...), so the benchmark never scores the scenes that steered training.
BENCH_SCENE_OFFSET = 10_000
THRESHOLDS = {"coco (conf 0.001)": 0.001, "deploy (conf 0.25)": 0.25}
MAX_DET = 100  # COCO scores at most 100 detections per image
MASK_MIN_CONF = 0.25  # mask measures only where detections are few enough to keep their masks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="checkpoint (default: embedded demo detector)")
    p.add_argument("--clips-per-camera", type=int, default=2)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 clip per camera mode, 16 frames")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.clips_per_camera, args.frames = 1, 16
    return args


def decoded_frames(video: Path) -> list[np.ndarray]:
    with av.open(str(video)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def held_out_clips(clips_per_camera: int, frames: int):
    """(camera, spec) pairs: held-out seeds, the camera mode forced so every mode is covered."""
    k = 0
    for camera in synth.CAMERAS:
        for _ in range(clips_per_camera):
            spec = scene_spec("heldout", BENCH_SCENE_OFFSET + k, frames)
            spec.camera = camera
            synth.SceneSpec.__post_init__(spec)  # re-validate after the change
            yield camera, spec
            k += 1


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.weights).eval()
    segment = model.task == "segment"
    per_camera: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        for camera, spec in held_out_clips(args.clips_per_camera, args.frames):
            paths = synth.make_clip(spec, tmp)
            frames = decoded_frames(paths.video)
            truth = synth.load_ground_truth(paths.ground_truth)
            scene = synth.Scene(spec) if segment else None
            entry = per_camera.setdefault(camera, {"gt": [], **{k: [] for k in THRESHOLDS}})
            for t, frame in enumerate(frames):
                gt = {"boxes": truth.boxes[t], "classes": truth.classes[t]}
                if segment:
                    gt["masks"] = scene.render(t).instance_masks
                entry["gt"].append(gt)
                x = preprocess(frame)
                out = model(x)
                for name, conf in THRESHOLDS.items():
                    dets = postprocess(out, x.shape[2:], frame.shape[:2], conf_thres=conf,
                                       iou_thres=0.7, max_det=MAX_DET)
                    if segment and conf < MASK_MIN_CONF:
                        for d in dets:  # full-frame masks of hundreds of weak detections
                            d.masks = None  # would not fit in memory: boxes only here
                    entry[name].extend(dets)
    results = {}
    for name, conf in THRESHOLDS.items():
        masks = segment and conf >= MASK_MIN_CONF
        rows = {cam: evaluate_detections(e[name], e["gt"], masks=masks)
                for cam, e in per_camera.items()}
        rows["all"] = evaluate_detections([d for e in per_camera.values() for d in e[name]],
                                          [g for e in per_camera.values() for g in e["gt"]],
                                          masks=masks)
        results[name] = rows
    source = args.weights or "embedded demo weights"
    frames_total = results[next(iter(THRESHOLDS))]["all"]["frames"]
    print(f"# dense {model.scale}-{model.task} ({source}) on {frames_total} decoded held-out "
          f"frames, 640x384, {args.clips_per_camera} clip(s) x {args.frames} frames per camera")
    cols = ["map50", "map50_95"] + (["mask_map50", "mask_map50_95", "mask_iou"] if segment else [])
    print(f"{'threshold':<20} {'camera':<10} {'objects':>8} " + " ".join(f"{c:>13}" for c in cols))
    for name, rows in results.items():
        for cam, r in rows.items():
            print(f"{name:<20} {cam:<10} {r['gt_objects']:>8} "
                  + " ".join(f"{r[c]:>13.3f}" if c in r else f"{'-':>13}" for c in cols))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
