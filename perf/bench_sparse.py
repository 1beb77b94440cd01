"""Sparse executor vs the best dense run, measured in one run (ratios, not absolute times).

1. Single convs of YOLO11 shapes: masked conv per position (the executor's default) and
   tile-batched, vs the faster of NCHW / channels_last dense conv, at 5/10/25/50/100% active
   tiles -> executor efficiency (dense time x active fraction / sparse time).
2. Whole model (yolo11n, yolo11s): a cached frame, then a frame whose random 32x32 patches
   changed (share = active fraction), no motion; sparse executor (tau 0, strict RFAP) vs the best
   dense runner (onnxruntime, fused channels_last torch, ...).
3. Synthetic clips at three motion levels (still camera, integer pan, pan+zoom) along the edge's
   data path (codec MVs -> residual blocks -> assembled input): tau=0 strict, tau=0 relaxed and
   relaxed with tau > 0; speedup, cache hit rate, active fraction per layer, and the mask bound:
   the speedup a perfect executor would reach with the same recompute masks (each layer's dense
   time x its computed share), i.e. what sparsity alone permits before executor overhead.
Single convs also report gather_matmul_efficiency: the per-position conv's own work (im2col row
gather + one matmul) against dense, the ceiling of that conv path before its bookkeeping.

    python3 perf/bench_sparse.py            # full (~15 min on 2 cores)
    python3 perf/bench_sparse.py --quick    # yolo11n, short clips (a few minutes)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fluxshard import synth
from fluxshard.measures import executor_efficiency, speedup
from fluxshard.models import build_yolo11, load_model, preprocess
from fluxshard.models.dense import best_dense_runner
from fluxshard.endpoint import edge_inputs as motion_edge_inputs
from fluxshard.sparse import SparseExecutor, StreamState, TileConv, masked_sparse_conv
from fluxshard.sparse.ops import PointConv, masked_point_conv, point_weight

FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.00)
# (in channels, out channels, kernel, stride, input H, input W, groups): YOLO11n/s 3x3 convs at 384x640
CONV_SHAPES = [
    (16, 32, 3, 2, 192, 320, 1),
    (16, 16, 3, 1, 96, 160, 1),
    (32, 32, 3, 1, 96, 160, 1),
    (64, 64, 3, 1, 48, 80, 1),
    (64, 128, 3, 2, 48, 80, 1),
    (128, 128, 3, 1, 24, 40, 1),
    (64, 64, 3, 1, 48, 80, 64),
]


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def bench_convs(shapes, tile: int, runs: int):
    rows = []
    for cin, cout, k, s, h, w, g in tqdm(shapes, desc="single convs"):
        conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, groups=g).eval()
        x = torch.randn(1, cin, h, w)
        conv_cl = torch.nn.Conv2d(cin, cout, k, s, k // 2, groups=g).eval()
        conv_cl.load_state_dict(conv.state_dict())
        conv_cl = conv_cl.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        dense = min(median_ms(lambda: F.silu(conv(x)), runs),
                    median_ms(lambda: F.silu(conv_cl(x_cl)), runs))
        plan = TileConv(conv, (h, w), tile)
        # the executor's layout: channels_last maps, gathered cache written in place
        gathered = torch.zeros(1, cout, plan.out_h, plan.out_w).to(memory_format=torch.channels_last)
        points, weight = PointConv(k, s, k // 2, (h, w)), point_weight(conv)
        gen = torch.Generator().manual_seed(0)
        for frac in FRACTIONS:
            n_tiles = plan.tiles_y * plan.tiles_x
            chosen = torch.randperm(n_tiles, generator=gen)[:max(1, round(frac * n_tiles))]
            tiles = torch.zeros(n_tiles, dtype=torch.bool)
            tiles[chosen] = True
            mask = tiles.view(plan.tiles_y, plan.tiles_x).repeat_interleave(tile, 0) \
                .repeat_interleave(tile, 1)[:plan.out_h, :plan.out_w]
            tiled = median_ms(lambda: masked_sparse_conv(plan, conv, F.silu, x_cl, mask, gathered,
                                                         0.0), runs)
            point = median_ms(lambda: masked_point_conv(points, conv, weight, F.silu, x_cl, mask,
                                                        gathered, 0.0), runs)
            active = float(tiles.float().mean())
            ideal = float("nan")
            if g == 1:  # the per-position conv's own work: its im2col gather and the matmul
                index = mask.flatten().nonzero().squeeze(1)
                taps = points.taps[index].flatten()
                table = x_cl.permute(0, 2, 3, 1).reshape(-1, cin)
                cols = table.index_select(0, taps).view(index.numel(), -1)
                ideal = executor_efficiency(dense, active, median_ms(
                    lambda: table.index_select(0, taps), runs) + median_ms(
                    lambda: torch.addmm(conv.bias, cols, weight), runs))
            rows.append(dict(shape=f"{cin}->{cout} k{k}s{s} g{g} @{h}x{w}", fraction=active,
                             dense_ms=dense, tile_ms=tiled, point_ms=point,
                             tile_efficiency=executor_efficiency(dense, active, tiled),
                             point_efficiency=executor_efficiency(dense, active, point),
                             gather_matmul_efficiency=ideal))
    return rows


def changed_patches(frame: np.ndarray, fraction: float, seed: int, patch: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = frame.copy()
    ph, pw = frame.shape[0] // patch, frame.shape[1] // patch
    chosen = rng.choice(ph * pw, size=max(1, round(fraction * ph * pw)), replace=False)
    for c in chosen:
        y, x = divmod(int(c), pw)
        out[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] = rng.integers(
            0, 256, (patch, patch, 3), dtype=np.uint8)
    return out


@torch.no_grad()
def bench_model(scale: str, imgsz, runs: int, workdir: Path, tile: int):
    model = build_yolo11(scale, "detect", num_classes=4).eval()
    best, medians = best_dense_runner(model, imgsz, runs=runs, workdir=workdir)
    executor = SparseExecutor(build_yolo11(scale, "detect", num_classes=4).eval(),
                              strict_rfap=True, tile=tile)
    base = synth.Scene(synth.SceneSpec(width=imgsz[1], height=imgsz[0], camera="static")).render(0).image
    rows = []
    for frac in tqdm(FRACTIONS, desc=f"yolo11{scale} active fractions"):
        new = changed_patches(base, frac, seed=1)
        x0, x1 = preprocess(base), preprocess(new)
        times, dense_times, reports = [], [], []
        for _ in range(runs):
            stream = StreamState()
            executor.run(stream, x0, None, key=True)
            t0 = time.perf_counter()
            _, rep = executor.run(stream, x1, np.zeros((imgsz[0] // 4, imgsz[1] // 4, 2), np.float32))
            times.append((time.perf_counter() - t0) * 1e3)
            dense_times.append(timed_ms(best.run, x1))  # right after: drift hits both alike
            reports.append(rep)
        sparse, dense = statistics.median(times), statistics.median(dense_times)
        rows.append(dict(model=f"yolo11{scale}", input_changed=reports[-1].input_changed,
                         computed=reports[-1].computed_fraction, sparse_ms=sparse,
                         best_dense=best.name, dense_ms=dense, speedup=speedup(dense, sparse)))
    return rows, medians, best


def timed_ms(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


CLIP_LEVELS = {  # motion level -> SceneSpec overrides
    "still camera": dict(camera="static"),
    "integer pan": dict(camera="pan", pan_angle=0.0, pan_speed=2.0),
    "pan+zoom": dict(camera="pan+zoom"),
}
# (name, strict RFAP, tau on the model-input scale: fluxshard.tau; at tau 0 any changed pixel
# makes its block residual)
CONFIGS = [("tau0 strict", True, 0.0), ("tau0 relaxed", False, 0.0), ("tau0.02 relaxed", False, 0.02),
           ("tau0.06 relaxed", False, 0.06), ("tau0.15 relaxed", False, 0.15)]


def edge_inputs(video: Path, tau: float):
    """(model input, accumulated field or None, key) per frame along the edge's data path: codec
    MVs -> residual blocks at ``tau`` (fluxshard.tau) -> the assembled input the executor sees."""
    return [(preprocess(image), field, key)
            for _, image, field, key in motion_edge_inputs(video, tau)]


@torch.no_grad()
def layer_dense_ms(model, x: torch.Tensor, runs: int) -> dict[int, float]:
    """Median dense time of every top-level layer of a fused channels_last model on ``x``."""
    times: dict[int, list[float]] = {m.i: [] for m in model.model}
    x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(runs + 2):
        outputs, y = [], x
        for m in model.model:
            if m.f != -1:
                y = outputs[m.f] if isinstance(m.f, int) else [y if j == -1 else outputs[j]
                                                              for j in m.f]
            t0 = time.perf_counter()
            y = m(y)
            times[m.i].append((time.perf_counter() - t0) * 1e3)
            outputs.append(y if m.i in model.save else None)
    return {i: statistics.median(t[2:]) for i, t in times.items()}


def mask_bound_speedup(dense_ms: dict[int, float], reports) -> float:
    """Speedup a perfect executor would reach with the same recompute masks: every layer costs
    its dense time x the share of positions it computed (layers without cached ops, concat and
    upsample, in full), against the same layers run densely on the same engine."""
    bound = 0.0
    for i, ms in dense_ms.items():
        stats = [r.layers[i] for r in reports]
        share = (np.mean([s.computed / s.positions for s in stats])
                 if all(s.positions for s in stats) else 1.0)
        bound += ms * share
    return sum(dense_ms.values()) / bound


@torch.no_grad()
def bench_clips(imgsz, frames: int, workdir: Path, best, tile: int):
    """The embedded demo detector (trained weights: truncation acts on real activations); the
    best dense runner ``best`` is timed on every frame right after the executor. ``mask bound``:
    the speedup over the same engine's dense run that the recompute masks alone would allow
    (:func:`mask_bound_speedup`): what sparsity permits, before any executor overhead."""
    model = load_model(None)
    rows, per_layer, dense_layers = [], {}, None
    for level, overrides in CLIP_LEVELS.items():
        spec = synth.SceneSpec(width=imgsz[1], height=imgsz[0], frames=frames, gop=frames, seed=7,
                               **overrides)
        video = synth.make_clip(spec, workdir, name=level.replace(" ", "_").replace("+", "_")).video
        for name, strict, tau in tqdm(CONFIGS, desc=f"clip: {level}"):
            inputs = edge_inputs(video, tau)
            executor = SparseExecutor(model, strict_rfap=strict, tau=tau, tile=tile)
            if dense_layers is None:  # the executor's own fused channels_last model
                dense_layers = layer_dense_ms(executor.model, inputs[0][0], runs=10)
            stream, times, dense_times, hits, changed, layers = StreamState(), [], [], [], [], []
            reports = []
            for x, field, key in inputs:
                t0 = time.perf_counter()
                _, rep = executor.run(stream, x, field, key=key)
                if not key:
                    times.append((time.perf_counter() - t0) * 1e3)
                    dense_times.append(timed_ms(best.run, x))
                    hits.append(rep.cache_hit_rate)
                    changed.append(rep.input_changed)
                    layers.append(rep.active_fraction())
                    reports.append(rep)
            sparse, dense = statistics.median(times), statistics.median(dense_times)
            rows.append(dict(level=level, config=name, input_changed=float(np.mean(changed)),
                             cache_hit=float(np.mean(hits)), sparse_ms=sparse, dense_ms=dense,
                             speedup=speedup(dense, sparse),
                             mask_bound=mask_bound_speedup(dense_layers, reports)))
            per_layer[(level, name)] = {i: float(np.mean([l[i] for l in layers])) for i in layers[0]}
    return rows, per_layer


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values())
              + " |")


def plot(conv_rows, model_rows, per_layer, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for shape in dict.fromkeys(r["shape"] for r in conv_rows):
        rs = [r for r in conv_rows if r["shape"] == shape]
        line, = axes[0].plot([r["fraction"] for r in rs], [r["point_efficiency"] for r in rs],
                             "o-", label=shape)
        axes[0].plot([r["fraction"] for r in rs], [r["tile_efficiency"] for r in rs], "x--",
                     color=line.get_color(), lw=1)
    axes[0].axhline(0.7, color="grey", ls="--", lw=1)
    axes[0].set(xlabel="active tile fraction", ylabel="executor efficiency", xscale="log",
                title="single 3x3 convs, per position (solid) / tiles (dashed); goal 0.7")
    axes[0].legend(fontsize=7)
    for m in dict.fromkeys(r["model"] for r in model_rows):
        rs = [r for r in model_rows if r["model"] == m]
        axes[1].plot([r["input_changed"] for r in rs], [r["speedup"] for r in rs], "o-", label=m)
    axes[1].axhline(1.0, color="grey", ls="--", lw=1)
    axes[1].set(xlabel="input changed fraction", ylabel="speedup vs best dense", xscale="log",
                title="whole model, tau 0, strict RFAP")
    axes[1].legend()
    for (level, name), layers in per_layer.items():
        axes[2].plot(list(layers), list(layers.values()), ".-", label=f"{level} / {name}", lw=1)
    axes[2].set(xlabel="layer index", ylabel="active (computed) fraction",
                title="active fraction per layer on clips")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tile", type=int, default=8)
    p.add_argument("--plot", type=Path, default=Path("out/perf/bench_sparse.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = 5 if args.quick else 15
    scales = ["n"] if args.quick else ["n", "s"]
    frames = 8 if args.quick else 30
    imgsz = (384, 640)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        conv_rows = bench_convs(CONV_SHAPES[:4] if args.quick else CONV_SHAPES, args.tile, runs)
        print_table("single convs: masked sparse vs best dense", conv_rows)
        model_rows, best = [], {}
        for scale in scales:
            rows, medians, best[scale] = bench_model(scale, imgsz, runs, work, args.tile)
            model_rows += rows
            print(f"\ndense yolo11{scale} medians (ms): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
        print_table("whole model: sparse (tau 0, strict) vs best dense (timed after each run)",
                    model_rows)
        clip_rows, per_layer = bench_clips(imgsz, frames, work, best["n"], args.tile)
        print_table(f"clips, yolo11n vs {best['n'].name} (timed on every frame)", clip_rows)
    plot(conv_rows, model_rows, per_layer, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
