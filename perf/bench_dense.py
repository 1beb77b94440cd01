"""Dense YOLO11 latency on this machine: eager torch, BN-fused, fused + channels_last, onnxruntime.

Batch 1, random weights (latency does not depend on them). Runners are timed round-robin in one
run so machine noise hits each alike; the table gives the median ms and the ratio to the fastest
runner of the same model. Writes a bar plot.

    python3 perf/bench_dense.py                 # yolo11n + yolo11s, 384x640, 2 threads, 30 runs
    python3 perf/bench_dense.py --quick         # yolo11n only, 5 runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from fluxshard.models import build_yolo11
from fluxshard.models.dense import RUNNER_KINDS, dense_runners, time_runners


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", nargs="+", default=["n", "s"], choices=list("nsmlx"))
    p.add_argument("--task", default="detect", choices=["detect", "segment"])
    p.add_argument("--imgsz", nargs=2, type=int, default=[384, 640], metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--kinds", nargs="+", default=list(RUNNER_KINDS), choices=list(RUNNER_KINDS))
    p.add_argument("--quick", action="store_true", help="yolo11n only, 5 runs, 2 warm-up")
    p.add_argument("--plot", type=Path, default=Path("out/perf/bench_dense.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.scales, args.runs, args.warmup = ["n"], 5, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    imgsz = tuple(args.imgsz)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dense-") as workdir:
        for scale in args.scales:
            torch.manual_seed(0)
            model = build_yolo11(scale, args.task).eval()
            runners = dense_runners(model, imgsz, kinds=tuple(args.kinds), threads=args.threads,
                                    workdir=workdir)
            x = torch.rand(1, 3, *imgsz)
            results[f"yolo11{scale}"] = time_runners(runners, x, warmup=args.warmup, runs=args.runs)

    print(f"dense YOLO11-{args.task} {imgsz[0]}x{imgsz[1]}, batch 1, {args.threads} threads, "
          f"median of {args.runs} runs")
    print(f"{'model':<9} {'runner':<22} {'ms':>8} {'x fastest':>10}")
    for model_name, medians in results.items():
        fastest = min(medians.values())
        for name, ms in sorted(medians.items(), key=lambda kv: kv[1]):
            print(f"{model_name:<9} {name:<22} {ms:8.1f} {ms / fastest:10.2f}")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.5), squeeze=False)
    for ax, (model_name, medians) in zip(axes[0], results.items()):
        names = list(medians)
        ax.bar(range(len(names)), [medians[n] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_ylabel("median ms / frame")
        ax.set_title(f"{model_name} {imgsz[0]}x{imgsz[1]}, {args.threads} threads")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
