"""End to end on localhost: uplink bytes per frame of FluxShard against per-frame JPEG (q90, Pillow)
of the same frames, and latency per frame for edge-only, cloud-only and auto dispatch.

    python3 perf/bench_e2e.py [--frames 60] [--size 640 384] [--bandwidth-mbps 20]
                              [--cloud-url HOST:PORT]

Starts a local tritonserver as the cloud unless --cloud-url is given. Prints a table of numbers
measured in one run (the machine is shared: compare the rows, not the absolute values) and writes
out/perf/bench_e2e.png and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_policy(policy, video, url, factory, stream_id, bandwidth_mbps, frames, progress,
               **stream_kwargs):
    """``stream_kwargs``: to ``open_stream`` (e.g. the uplink codecs)."""
    from tqdm import tqdm

    from fluxshard_client import FluxShardClient, FluxShardStream, LocalEndpoint

    with FluxShardClient(url, uplink_mbps=bandwidth_mbps) as client:
        stream = FluxShardStream(LocalEndpoint(factory(stream_id)),
                                 client.open_stream(stream_id, **stream_kwargs), dispatch=policy,
                                 initial_mbps=bandwidth_mbps or 20.0, imgsz=None)
        results = list(tqdm(stream.run(video, max_frames=frames), total=frames, unit="frame",
                            desc=policy, disable=not progress))
        stream.close()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--size", type=int, nargs=2, default=(640, 384), metavar=("W", "H"))
    p.add_argument("--camera", default="pan", help="synthetic camera: pan, zoom, pan+zoom, static")
    p.add_argument("--bandwidth-mbps", type=float, default=None,
                   help="simulated uplink limit (default: none, localhost)")
    p.add_argument("--cloud-url", default=None)
    p.add_argument("--policies", nargs="+", default=["edge", "cloud", "auto"])
    p.add_argument("--out", type=Path, default=Path("out/perf"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from edge_runtime.outputs import jpeg_bytes
    from fluxshard import synth
    from fluxshard.motion import iter_motion
    from fluxshard.sessions import yolo_session_factory
    from fluxshard.serving.tritonserver import TritonServer

    torch.set_num_threads(1)  # the same thread count as the server's executor
    from fluxshard.models.ops import padded_size

    padded_size(*args.size, who="bench_e2e")  # the model input the frames are padded to
    factory = yolo_session_factory("sparse", threads=1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        spec = synth.SceneSpec(width=args.size[0], height=args.size[1], frames=args.frames,
                                camera=args.camera)
        video = str(synth.make_clip(spec, tmp, name="bench", progress=not args.no_progress).video)
        jpeg = [jpeg_bytes(mf.image) for mf in iter_motion(video)]
        url = args.cloud_url or stack.enter_context(TritonServer(models=["fluxshard"])).grpc_url
        runs = {}
        for k, policy in enumerate(args.policies):
            t0 = time.perf_counter()
            runs[policy] = run_policy(policy, video, url, factory, 3000 + k, args.bandwidth_mbps,
                                      args.frames, not args.no_progress)
            print(f"{policy}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    jpeg_mean = float(np.mean(jpeg))
    rows = []
    for policy, results in runs.items():
        lat = np.array([r.latency_ms for r in results])
        steady = lat[1:] if len(lat) > 1 else lat  # frame 0 is a key frame everywhere
        up = np.array([r.uplink_bytes for r in results], float)
        rows.append(dict(policy=policy, edge=sum(r.endpoint == "edge" for r in results),
                         cloud=sum(r.endpoint == "cloud" for r in results),
                         mean_ms=float(steady.mean()), p50_ms=float(np.median(steady)),
                         p90_ms=float(np.percentile(steady, 90)),
                         uplink_kb=float(up.mean() / 1e3),
                         uplink_steady_kb=float(up[1:].mean() / 1e3) if len(up) > 1 else 0.0,
                         cache_hit=float(np.mean([r.cache_hit_rate for r in results[1:]])),
                         residual=float(np.mean([r.residual_fraction for r in results[1:]]))))
    print(f"\n{args.frames} frames {args.size[0]}x{args.size[1]} {args.camera} clip, localhost"
          + (f", uplink limited to {args.bandwidth_mbps} Mbit/s" if args.bandwidth_mbps else "")
          + f"; per-frame JPEG q90: {jpeg_mean / 1e3:.1f} kB/frame")
    print("| policy | edge / cloud frames | latency ms mean / p50 / p90 (frames 1..) | uplink kB/frame "
          "(all / after frame 0) | uplink vs JPEG q90 | cache hit | residual blocks |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['edge']} / {r['cloud']} | {r['mean_ms']:.1f} / "
              f"{r['p50_ms']:.1f} / {r['p90_ms']:.1f} | {r['uplink_kb']:.1f} / "
              f"{r['uplink_steady_kb']:.1f} | {r['uplink_kb'] * 1e3 / jpeg_mean:.3f} | "
              f"{r['cache_hit']:.3f} | {r['residual']:.3f} |")

    for policy, results in runs.items():  # how the dispatcher learned the endpoints' loads
        if policy == "auto" and results:
            last = results[-1].decision
            print(f"auto per frame: {''.join(r.endpoint[0].upper() for r in results)} (E edge, "
                  f"C cloud); load factors at the end: edge {last.edge_load:.2f}, cloud "
                  f"{last.cloud_load:.2f} x the latency tables")

    fig, (ax_lat, ax_up) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for policy, results in runs.items():
        ax_lat.plot([r.index for r in results], [r.latency_ms for r in results], ".-", label=policy)
        ax_up.plot([r.index for r in results], [r.uplink_bytes / 1e3 for r in results], ".-",
                   label=f"FluxShard {policy}")
    ax_up.plot(range(len(jpeg)), [b / 1e3 for b in jpeg], "k--", label="per-frame JPEG q90")
    ax_lat.set(ylabel="latency per frame (ms)", title="end to end on localhost")
    ax_up.set(xlabel="frame", ylabel="uplink kB / frame", yscale="symlog")
    ax_lat.legend(fontsize=8)
    ax_up.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "bench_e2e.png", dpi=100)
    (args.out / "bench_e2e.json").write_text(json.dumps(
        {"frames": args.frames, "size": args.size, "camera": args.camera,
         "bandwidth_mbps": args.bandwidth_mbps,
         "jpeg_q90_kb": jpeg_mean / 1e3, "rows": rows}, indent=1))
    print(f"\nplot: {args.out / 'bench_e2e.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
