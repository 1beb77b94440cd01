"""Segmentation on the edge: what masks cost and how close the tile executor's are to dense.

The embedded seg demo model (fluxshard/weights/yolo11n-seg-demo.pt) and, for comparison, the
embedded detect demo model run the dense and the tile executor on the same decoded frames of
the synthetic clips at the three motion levels (fluxshard.synth.MOTION_LEVELS), each executor on
the stream `fluxshard run CLIP --executor X --dispatch edge` builds, taking turns frame by frame
(perf/bench_real.py's interleaved runner: machine drift hits both alike). Per (model, clip,
executor): the mean latency and its ratio to dense's (``speedup_mean_vs_dense``; so the seg
rows against the detect rows say what carrying the mask coefficients and the prototypes costs
the tile executor), the crop area, and for the seg model the masks' agreement with dense (IoU of
the segmented area, the union of a frame's masks: mean and worst frame) and their size on the
wire (``fluxshard.wire.encode_masks``, bytes per frame).

    python3 perf/bench_seg.py            # 640x384, 60 frames per clip
    python3 perf/bench_seg.py --quick    # 640x384, 12 frames per clip

Writes out/perf/bench_seg.json: one row per (model, clip, executor).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_real: the interleaved runner

from bench_real import decoded_frames, interleaved  # noqa: E402
from fluxshard import synth  # noqa: E402
from fluxshard.synth import MOTION_LEVELS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {"seg": REPO / "fluxshard" / "weights" / "yolo11n-seg-demo.pt", "detect": None}
EXECUTORS = ("dense", "tiles")
BENCH_SCENE_SEED = 32_000  # scenes apart from training and the profile's held-out ones


def area_ious(runs, reference) -> list[float]:
    """Per frame, IoU of the segmented area with the reference run's (1 when both are empty)."""
    out = []
    for a, b in zip(runs.segmented, reference.segmented):
        union = (a | b).sum()
        out.append(1.0 if union == 0 else float((a & b).sum() / union))
    return out


def run_clip(model_name, model, clip, video, args):
    from edge_runtime.run import edge_only_stream
    from fluxshard.sessions import NATIVE  # the clips' own size, as measured before --imgsz

    streams = {name: edge_only_stream(name, str(video), model, predict=NATIVE)
               for name in EXECUTORS}
    runs, _decode_ms, _ = interleaved(streams, decoded_frames(video, args.frames, False, []),
                                      total=args.frames, desc=f"{model_name} {clip}",
                                      progress=not args.no_progress)
    dense = runs["dense"]
    rows = []
    for name in EXECUTORS:
        r = runs[name]
        row = dict(model=model_name, clip=clip, executor=name, frames=len(r.ms), **r.timing(dense),
                   crop_area_fraction=float(np.mean(r.crop)))
        if r.segmented:
            ious = area_ious(r, dense)
            row.update(mask_area_iou_mean=float(np.mean(ious)), mask_area_iou_min=min(ious),
                       mask_wire_bytes_mean=float(np.mean(r.mask_wire_bytes)),
                       detections_mean=float(np.mean([len(d) for d in r.detections])))
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="12 frames per clip (default 60)")
    p.add_argument("--width", type=int, default=640, help="clip width (default 640)")
    p.add_argument("--height", type=int, default=384, help="clip height (default 384)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("out/perf/bench_seg.json"))
    args = p.parse_args()
    args.frames = 12 if args.quick else 60

    import torch

    from edge_runtime.run import edge_model

    torch.set_num_threads(1)  # what the edge runs with (fluxshard run)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fluxshard-bench-seg-") as tmp:
        clips = []
        for k, (level, overrides) in enumerate(MOTION_LEVELS.items()):
            spec = synth.SceneSpec(width=args.width, height=args.height, frames=args.frames,
                                   gop=args.frames, seed=BENCH_SCENE_SEED + k, **overrides)
            clips.append((level, synth.make_clip(spec, tmp, name=level).video))
        for model_name, weights in MODELS.items():
            model = edge_model(weights)
            for level, video in clips:
                rows.extend(run_clip(model_name, model, level, video, args))
    print(f"{'model':7} {'clip':8} {'executor':8} {'ms':>7} {'x dense':>8} {'crop':>6} "
          f"{'mask IoU mean/min':>18} {'MASKS B/frame':>14}")
    for r in rows:
        masks = (f"{r['mask_area_iou_mean']:.3f} / {r['mask_area_iou_min']:.3f}"
                 if "mask_area_iou_mean" in r else "-")
        wire_bytes = f"{r['mask_wire_bytes_mean']:.0f}" if "mask_wire_bytes_mean" in r else "-"
        print(f"{r['model']:7} {r['clip']:8} {r['executor']:8} {r['ms_mean']:7.1f} "
              f"{r['speedup_mean_vs_dense']:8.2f} {r['crop_area_fraction']:6.2f} {masks:>18} "
              f"{wire_bytes:>14}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"frames": args.frames, "size": [args.width, args.height],
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
