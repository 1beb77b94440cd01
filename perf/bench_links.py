"""Dispatch on shaped links: auto against edge-only and cloud-only, the same frames, in one run.

The cloud tritonserver runs in a network namespace of its own behind a veth pair shaped by `tc`
(tbf) with a fixed round trip added by a delay proxy (fluxshard.serving.netshape); the uplink is
H.264, as `fluxshard run` sends it. Per link (130 / 56 / 25 Mbit/s and a time-varying trace) and
policy: mean and p95 frame latency (frames 1..), uplink kB per frame, the share of frames the
cloud ran, and agreement (mAP@0.5) with the dense model on the same frames. Edge-only does not
use the link: it runs once and is shown beside every link. Needs root (or CAP_NET_ADMIN and
CAP_SYS_ADMIN); refuses clearly otherwise.

    sudo python3 perf/bench_links.py [--quick] [--frames 60] [--size 640 384] [--rtt-ms 20]

Writes out/perf/bench_links.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import run_policy  # noqa: E402

DEFAULT_LINKS = ("130", "56", "25", "trace")
# seconds at each rate; the trace restarts with every policy, so both see the same schedule
DEFAULT_TRACE = "3:130,3:25,3:56,3:10"


def parse_trace(text: str):
    from fluxshard.serving.netshape import RateTrace

    try:
        steps = tuple((float(s), float(r)) for s, r in (step.split(":") for step in
                                                         text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"trace must be SECONDS:MBIT,... got {text!r}") from None
    try:
        return RateTrace(steps)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _interrupt(signum, frame):
    """systemd and kill send SIGTERM: tear the namespace down as for Ctrl-C."""
    raise KeyboardInterrupt


def summarize(link: str, policy: str, results, mean_mbit: float, dense) -> dict:
    from fluxshard.accuracy import agreement

    lat = np.array([r.latency_ms for r in results[1:]] or [results[0].latency_ms])
    up = np.array([r.uplink_bytes for r in results], float)
    return dict(link=link, policy=policy, frames=len(results),
                link_mbit=None if mean_mbit is None else round(mean_mbit, 1),
                mean_ms=float(lat.mean()), p95_ms=float(np.percentile(lat, 95)),
                uplink_kb=float(up.mean() / 1e3),
                cloud_share=float(np.mean([r.endpoint == "cloud" for r in results])),
                agreement=None if dense is None else
                float(agreement(results, dense[:len(results)])["map50"]),
                endpoints="".join(r.endpoint[0].upper() for r in results))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 frames at 320x192")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--size", type=int, nargs=2, default=(640, 384), metavar=("W", "H"))
    p.add_argument("--camera", default="pan", help="synthetic camera: pan, zoom, pan+zoom, static")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round trip the proxy adds")
    p.add_argument("--links", nargs="+", default=list(DEFAULT_LINKS),
                   help="Mbit/s values and/or 'trace'")
    p.add_argument("--trace", type=parse_trace, default=parse_trace(DEFAULT_TRACE),
                   help="the time-varying link: SECONDS:MBIT,... (repeats)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the dense reference")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "perf")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.size = 20, (320, 192)
    for link in args.links:
        if link != "trace" and not (link.replace(".", "", 1).isdigit() and float(link) > 0):
            p.error(f"--links takes Mbit/s values > 0 and 'trace', got {link!r}")

    from fluxshard.serving.netshape import ShapedLink, ShapingUnavailable, check_privileges

    try:
        check_privileges()
    except ShapingUnavailable as e:
        print(f"bench_links: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)

    import torch

    from fluxshard import synth, wire
    from fluxshard.motion import iter_motion
    from fluxshard.sessions import yolo_session_factory

    torch.set_num_threads(1)  # the same thread count as the server's executor
    factory = yolo_session_factory("exact", threads=1)
    h264 = dict(key_codec=wire.Codec.H264, residual_codec=wire.Codec.H264)
    progress = not args.no_progress
    rows = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        spec = synth.SceneSpec(width=args.size[0], height=args.size[1], frames=args.frames,
                               camera=args.camera)
        video = str(synth.make_clip(spec, tmp, name="links", progress=progress).video)
        dense = None
        if not args.no_accuracy:
            session = yolo_session_factory("dense", threads=1)(0)
            dense = [dict(zip(("boxes", "scores", "classes"), (d[:, :4], d[:, 4], d[:, 5])))
                     for d in (session.infer(mf.image, None, None, True)[0]
                               for mf in iter_motion(video, max_frames=args.frames))]
        first = next((float(x) for x in args.links if x != "trace"), args.trace.rate_at(0))
        with ShapedLink(first, rtt_ms=args.rtt_ms) as link:
            link.start_server(models=["fluxshard"])
            stream_ids = iter(range(4000, 5000))

            def run(policy):
                return run_policy(policy, video, link.grpc_url, factory, next(stream_ids), None,
                                  args.frames, progress, **h264)

            t0 = time.monotonic()
            edge = run("edge")
            edge_row = summarize("any", "edge", edge, None, dense)
            print(f"edge: {time.monotonic() - t0:.1f} s", file=sys.stderr)
            for name in args.links:
                for policy in ("cloud", "auto"):
                    if name == "trace":
                        link.follow(args.trace)
                    else:
                        link.set_rate(float(name))
                    t0 = time.monotonic()
                    results = run(policy)
                    t1 = time.monotonic()
                    link.stop_trace()
                    rows.append(summarize(name, policy, results, link.mean_rate_since(t0, t1),
                                          dense))
                    print(f"{name} {policy}: {t1 - t0:.1f} s", file=sys.stderr)
                rows.append({**edge_row, "link": name})  # the edge sends nothing

    print(f"\n{args.frames} frames {args.size[0]}x{args.size[1]} {args.camera} clip, H.264 uplink, "
          f"RTT {args.rtt_ms:.0f} ms; trace {args.trace.steps} s:Mbit/s (repeating)")
    print("| link | policy | Mbit/s (mean) | latency ms mean / p95 | uplink kB/frame | "
          "frames on the cloud | agreement with dense (mAP@0.5) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        agree = "n/a" if r["agreement"] is None else f"{r['agreement']:.3f}"
        mbit = "-" if r["link_mbit"] is None else f"{r['link_mbit']:.0f}"
        print(f"| {r['link']} | {r['policy']} | {mbit} | {r['mean_ms']:.1f} / "
              f"{r['p95_ms']:.1f} | {r['uplink_kb']:.1f} | {r['cloud_share']:.0%} | {agree} |")
    for r in rows:
        if r["policy"] == "auto":
            print(f"auto on {r['link']}: {r['endpoints']} (E edge, C cloud)")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "bench_links.json"
    out.write_text(json.dumps(
        {"frames": args.frames, "size": args.size, "camera": args.camera, "rtt_ms": args.rtt_ms,
         "uplink": "h264", "trace": args.trace.steps, "seconds": round(time.monotonic() - t_start),
         "rows": rows}, indent=1))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
