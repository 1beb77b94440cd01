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
from fluxshard.motion.decode import open_source  # noqa: E402

SIZES = ((640, 384), (1280, 720))
THRESHOLD = 40
RESET_EVERY = 10


def decode_only(video: Path) -> int:
    container, stream = open_source(video)
    stream.codec_context.thread_count = 1
    n = 0
    with container:
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


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
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for width, height in SIZES:
            spec = synth.SceneSpec(width=width, height=height, frames=args.frames,
                                   gop=args.frames, camera="pan+zoom", seed=0)
            single = synth.make_clip(spec, tmp, name=f"x264-{width}")
            multi = synth.make_clip(spec, tmp, ref=4, name=f"x264ref4-{width}")
            hevc = synth.make_clip(spec, tmp, codec="libx265", name=f"hevc-{width}")
            size = f"{width}x{height}"
            jobs += [(size, "decode only (x264)", decode_only, single.video),
                     (size, "codec (trusted)", lambda v: motion_pipeline(v, False), single.video),
                     (size, "codec (validated)", lambda v: motion_pipeline(v, True), single.video),
                     (size, "multi-ref validated", lambda v: motion_pipeline(v, True), multi.video),
                     (size, "decode only (HEVC)", decode_only, hevc.video),
                     (size, "block matching (HEVC)", lambda v: motion_pipeline(v, True),
                      hevc.video)]
        for size, path, fn, video in tqdm(jobs, desc="bench motion", unit="run"):
            rows.append({"size": size, "path": path, "fps": best_fps(fn, video, args.repeats)})

    floor = {(r["size"], r["path"].split("(")[-1]): r["fps"] for r in rows
             if r["path"].startswith("decode only")}
    print(f"\nmotion layer throughput, one core, {args.frames} frames, best of {args.repeats}")
    print(f"{'size':>9} | {'path':<22} | {'fps':>7} | vs decode only")
    print(f"{'-' * 9} | {'-' * 22} | {'-' * 7} | {'-' * 14}")
    for r in rows:
        codec = "HEVC)" if "HEVC" in r["path"] else "x264)"
        r["ratio_to_decode"] = r["fps"] / floor[(r["size"], codec)]
        print(f"{r['size']:>9} | {r['path']:<22} | {r['fps']:7.1f} | {r['ratio_to_decode']:.2f}")
    (args.out / "bench_motion.json").write_text(json.dumps(rows, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(SIZES)
    for i, (w, h) in enumerate(SIZES):
        size = f"{w}x{h}"
        fps = [next(r["fps"] for r in rows if r["size"] == size and r["path"] == p) for p in paths]
        ax.bar(np.arange(len(paths)) + i * width, fps, width, label=size)
    ax.axhline(300, color="grey", linestyle="--", linewidth=1, label="300 fps target")
    ax.set_xticks(np.arange(len(paths)) + width * (len(SIZES) - 1) / 2, paths, rotation=15)
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
