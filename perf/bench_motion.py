"""Motion-layer throughput: decode + motion field + residual set, frames per second, per motion
path and frame size, on one core.

    python3 perf/bench_motion.py [--out out/perf] [--frames 60] [--repeats 2]

Clips come from fluxshard.synth (pan + zoom, 5 objects). Paths measured:
  decode only          PyAV decode + RGB conversion (the floor every path pays)
  codec (trusted)      codec MVs as exported, no validation (x264 ref=1 clips)
  codec (validated)    codec MVs checked against the previous frame, fallback where they fail
  multi-ref validated  x264 ref=4: many vectors point to older frames, fixed by validation
  block matching       HEVC (no exported MVs): hierarchical block matching for every frame
Each path also builds the residual set of one endpoint (reset every 10 frames, tau 40). The
table gives fps (best of --repeats runs) and the ratio to decode only, measured in one run;
a bar plot is written to OUT/bench_motion.png.

A second table splits each motion path at the first size (640x384) into stages, ms per frame
(best of --repeats): decode (no conversion), exact RGB conversion, Y plane, side data
(``to_ndarray``), ``codec_field``, validation (block costs, alternative vectors, candidate costs,
block matching, the rest of ``validate_field``), whole-frame block matching (HEVC) and the
residual set; "overhead" is everything beyond decoding, and beyond decoding + RGB. The JSON rows
of those paths carry ``stages_ms`` and ``overhead_beyond_decode_ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target states

import numpy as np  # noqa: E402

from fluxshard import synth  # noqa: E402
from fluxshard.motion import EndpointState, iter_motion  # noqa: E402
from fluxshard.motion import decode as motion_decode  # noqa: E402
from fluxshard.motion import validation  # noqa: E402
from fluxshard.motion.decode import decode_rgb_only, open_source  # noqa: E402

SIZES = ((640, 384), (1280, 720))
THRESHOLD = 40
RESET_EVERY = 10


def motion_pipeline(video: Path, validate: bool) -> int:
    state = EndpointState()
    n = 0
    for mf in iter_motion(video, validate=validate, threads=1):
        if mf.is_key or state.cache is None:
            state.reset(mf.image)
        else:
            state.accumulate(mf.field)
            state.residual(mf.image, THRESHOLD)
            if state.frames_since_reset >= RESET_EVERY:
                state.reset(mf.image)
        n += 1
    return n


VALIDATION_PARTS = ("block_costs", "alternative_vectors", "match_blocks")
STAGES = ("decode", "rgb", "luma", "side_data", "codec_field", "validation: block costs",
          "validation: alternatives", "validation: candidate costs",
          "validation: block matching", "validation: rest", "block matching (all)", "residual set")


class _StageClock:
    """Per-stage seconds; ``wrap`` times a function wherever the motion layer calls it."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def timed(self, stage, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[stage] += time.perf_counter() - start
        return out

    def wrap(self, stage, fn):
        return lambda *args, **kwargs: self.timed(stage, fn, *args, **kwargs)


def stage_profile(video: Path, validate: bool) -> tuple[int, dict[str, float]]:
    """``iter_motion``'s steps one by one (same calls, same order) plus the residual set:
    (frames, seconds per stage). Validation's parts are timed inside ``validate_field``."""
    clock = _StageClock()
    patched = {name: getattr(validation, name) for name in VALIDATION_PARTS}
    costs_call = validation.CandidateCosts.__call__
    labels = {"block_costs": "validation: block costs",
              "alternative_vectors": "validation: alternatives",
              "match_blocks": "validation: block matching"}
    for name, fn in patched.items():
        setattr(validation, name, clock.wrap(labels[name], fn))
    validation.CandidateCosts.__call__ = lambda self, *a, **k: clock.timed(
        "validation: candidate costs", costs_call, self, *a, **k)
    try:
        frames = _profile_frames(video, validate, clock)
    finally:
        for name, fn in patched.items():
            setattr(validation, name, fn)
        validation.CandidateCosts.__call__ = costs_call
    return frames, clock.seconds


def _profile_frames(video: Path, validate: bool, clock: _StageClock) -> int:
    container, stream = open_source(video)
    ctx = stream.codec_context
    ctx.options = {"flags2": "+export_mvs"}
    ctx.thread_count = 1
    to_rgb = motion_decode.RGBConverter()
    state = EndpointState()
    prev_luma = prev_field = None
    n = 0
    with container:
        frames = container.decode(stream)
        while True:
            try:
                frame = clock.timed("decode", next, frames)
            except StopIteration:
                break
            image = clock.timed("rgb", to_rgb, frame)
            luma = clock.timed("luma", motion_decode._luma, frame)
            key = prev_luma is None or motion_decode._picture_type(frame) == "I"
            field = None
            if not key:
                side = clock.timed("side_data", frame.side_data.get, "MOTION_VECTORS")
                vectors = clock.timed("side_data", side.to_ndarray) if side is not None else None
                if vectors is None or len(vectors) == 0:
                    field = clock.timed("block matching (all)", motion_decode.match_blocks, luma,
                                        prev_luma)[0]
                else:
                    field, covered = clock.timed("codec_field", motion_decode.codec_field,
                                                 vectors, frame.height, frame.width)
                    if validate:
                        before = sum(clock.seconds[s] for s in STAGES if s.startswith("valid"))
                        start = time.perf_counter()
                        field = validation.validate_field(luma, prev_luma, field, covered,
                                                          prev_field).field
                        parts = sum(clock.seconds[s] for s in STAGES if s.startswith("valid"))
                        clock.seconds["validation: rest"] += \
                            time.perf_counter() - start - (parts - before)
            start = time.perf_counter()
            if key or state.cache is None:
                state.reset(image)
            else:
                state.accumulate(field)
                state.residual(image, THRESHOLD)
                if state.frames_since_reset >= RESET_EVERY:
                    state.reset(image)
            clock.seconds["residual set"] += time.perf_counter() - start
            prev_luma, prev_field = luma, (None if key else field)
            n += 1
    return n


def best_stages(video: Path, validate: bool, repeats: int) -> dict[str, float]:
    """ms per frame per stage, from the run with the least total time."""
    best = None
    for _ in range(repeats):
        frames, seconds = stage_profile(video, validate)
        ms = {stage: 1000 * value / frames for stage, value in seconds.items()}
        if best is None or sum(ms.values()) < sum(best.values()):
            best = ms
    return best


def best_fps(fn, video: Path, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        frames = fn(video)
        best = max(best, frames / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/perf"))
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=[f"{w}x{h}" for w, h in SIZES],
                        help="frame sizes WxH (default: %(default)s); stages use the first")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        stage_jobs = []
        for width, height in sizes:
            spec = synth.SceneSpec(width=width, height=height, frames=args.frames,
                                   gop=args.frames, camera="pan+zoom", seed=0)
            single = synth.make_clip(spec, tmp, name=f"x264-{width}")
            multi = synth.make_clip(spec, tmp, ref=4, name=f"x264ref4-{width}")
            hevc = synth.make_clip(spec, tmp, codec="libx265", name=f"hevc-{width}")
            size = f"{width}x{height}"
            jobs += [(size, "decode only (x264)", decode_rgb_only, single.video),
                     (size, "codec (trusted)", lambda v: motion_pipeline(v, False), single.video),
                     (size, "codec (validated)", lambda v: motion_pipeline(v, True), single.video),
                     (size, "multi-ref validated", lambda v: motion_pipeline(v, True), multi.video),
                     (size, "decode only (HEVC)", decode_rgb_only, hevc.video),
                     (size, "block matching (HEVC)", lambda v: motion_pipeline(v, True),
                      hevc.video)]
            if not stage_jobs:
                stage_jobs = [(size, "codec (trusted)", single.video, False),
                              (size, "codec (validated)", single.video, True),
                              (size, "multi-ref validated", multi.video, True),
                              (size, "block matching (HEVC)", hevc.video, True)]
        for size, path, fn, video in tqdm(jobs, desc="bench motion", unit="run"):
            rows.append({"size": size, "path": path, "fps": best_fps(fn, video, args.repeats)})
        stages = {}
        for size, path, video, validate in tqdm(stage_jobs, desc="stages", unit="run"):
            stages[path] = best_stages(video, validate, args.repeats)

    floor = {(r["size"], r["path"].split("(")[-1]): r["fps"] for r in rows
             if r["path"].startswith("decode only")}
    print(f"\nmotion layer throughput, one core, {args.frames} frames, best of {args.repeats}")
    print(f"{'size':>9} | {'path':<22} | {'fps':>7} | vs decode only")
    print(f"{'-' * 9} | {'-' * 22} | {'-' * 7} | {'-' * 14}")
    for r in rows:
        codec = "HEVC)" if "HEVC" in r["path"] else "x264)"
        r["ratio_to_decode"] = r["fps"] / floor[(r["size"], codec)]
        print(f"{r['size']:>9} | {r['path']:<22} | {r['fps']:7.1f} | {r['ratio_to_decode']:.2f}")
    stage_size = stage_jobs[0][0]
    print(f"\nstages at {stage_size}, ms per frame (best of {args.repeats}); overhead = beyond "
          "decoding (and beyond decoding + RGB)")
    paths = list(stages)
    print(f"{'stage':<28} | " + " | ".join(f"{p:>21}" for p in paths))
    print(f"{'-' * 28} | " + " | ".join("-" * 21 for _ in paths))
    for stage in STAGES:
        if any(stages[p][stage] > 0 for p in paths):
            print(f"{stage:<28} | " + " | ".join(f"{stages[p][stage]:21.2f}" for p in paths))
    overhead = {p: {"beyond_decode": sum(ms.values()) - ms["decode"],
                    "beyond_decode_rgb": sum(ms.values()) - ms["decode"] - ms["rgb"],
                    "beyond_decode_without_residual_set":
                        sum(ms.values()) - ms["decode"] - ms["residual set"]}
                for p, ms in stages.items()}
    for key, label in (("beyond_decode", "overhead beyond decode"),
                       ("beyond_decode_rgb", "  ... beyond decode + RGB"),
                       ("beyond_decode_without_residual_set", "  ... without residual set")):
        print(f"{label:<28} | " + " | ".join(f"{overhead[p][key]:21.2f}" for p in paths))
    for r in rows:
        if r["size"] == stage_size and r["path"] in stages:
            r["stages_ms"] = stages[r["path"]]
            r["overhead_beyond_decode_ms"] = overhead[r["path"]]["beyond_decode"]
            r["overhead_beyond_decode_rgb_ms"] = overhead[r["path"]]["beyond_decode_rgb"]
            r["overhead_beyond_decode_without_residual_set_ms"] = \
                overhead[r["path"]]["beyond_decode_without_residual_set"]
    (args.out / "bench_motion.json").write_text(json.dumps(rows, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(sizes)
    for i, (w, h) in enumerate(sizes):
        size = f"{w}x{h}"
        fps = [next(r["fps"] for r in rows if r["size"] == size and r["path"] == p) for p in paths]
        ax.bar(np.arange(len(paths)) + i * width, fps, width, label=size)
    ax.axhline(300, color="grey", linestyle="--", linewidth=1, label="300 fps target")
    ax.set_xticks(np.arange(len(paths)) + width * (len(sizes) - 1) / 2, paths, rotation=15)
    ax.set_ylabel("frames / s (one core)")
    ax.set_yscale("log")
    ax.set_title("decode + motion field + residual set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "bench_motion.png", dpi=100)
    print(f"plot: {args.out / 'bench_motion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
