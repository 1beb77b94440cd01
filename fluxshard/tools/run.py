"""`fluxshard run VIDEO|--demo`: the edge process. Decodes the stream with its motion fields,
dispatches every frame to the in-process sparse executor (edge) or the Triton `fluxshard` model
(cloud), and writes detections.jsonl, annotated.mp4, report.png and summary.json into --out.

--executor picks what the edge runs: exact (the sparse executor on residual-assembled inputs),
tiles (the v2 tile executor on onnxruntime: whole decoded frames with the motion accumulated since
the edge last ran) or dense (the fastest dense engine on every frame). The
dispatcher uses that executor's latency table.

With --demo it synthesizes the default clip and, unless --cloud-url is given, starts a local
tritonserver as the cloud. --bandwidth-mbps simulates an uplink of that rate (each payload waits
bytes / rate before it is sent), so the dispatcher has a link to adapt to on localhost.

On a live source (an RTSP/HTTP/... URL, or a file with --loop) memory stays bounded and only
detections.jsonl and summary.json are written unless --save-video / --save-report ask for more;
Ctrl-C (or SIGTERM) ends the stream and writes them. --metrics-port serves Prometheus metrics
(docs/metrics.md).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from edge_runtime.run import DEFAULT_EXECUTOR, DEMO_SIZE, UPLINK_CODECS
from fluxshard import cli_common
from fluxshard.tools import args as shared


def add_run_arguments(p: argparse.ArgumentParser, demo_default: bool = False,
                      out_default: str = "out/run") -> None:
    """`fluxshard run`'s options (``demo_default``: `fluxshard demo`'s, without VIDEO and
    --demo)."""
    if not demo_default:
        p.add_argument("video", nargs="?", type=cli_common.video_source,
                       help="video file or URL (RTSP, HTTP, ...)")
        p.add_argument("--demo", action="store_true",
                       help="synthesize the default clip and run on it")
    p.add_argument("--out", type=cli_common.output_folder, default=Path(out_default),
                   help="output folder (created once the inputs are checked)")
    shared.add_cloud_url(p)
    p.add_argument("--dispatch", choices=("auto", "edge", "cloud", "alternate"), default="auto",
                   help="auto: per-frame latency estimate; edge/cloud: force; alternate: in turn")
    p.add_argument("--fallback", choices=("none", "edge"), default="none",
                   help="--dispatch cloud when the cloud cannot be reached: none stops with an "
                        "error (exit 1); edge runs those frames on the edge and the summary says "
                        "so. auto and alternate always fall back to the edge")
    p.add_argument("--bandwidth-mbps", type=cli_common.positive_float, default=None,
                   help="simulate an uplink limited to this rate (Mbit/s)")
    p.add_argument("--deadline-ms", type=cli_common.positive_float, default=None,
                   help="a cloud frame not answered within this is abandoned and run on the "
                        "edge (default: derived per frame from the edge's latency table and the "
                        "cloud's estimate, at least 500 ms; --dispatch cloud --fallback none: no "
                        "deadline)")
    shared.add_cloud_connection(p)
    shared.add_tau(p, table=True)
    p.add_argument("--latency-profile", type=cli_common.existing_file, default=None,
                   help="latency tables (fluxshard profile latency; default "
                        "out/profile/latency.json when present, else built in)")
    shared.add_weights(p)
    shared.add_predict(p)
    shared.add_executor(p, default=None,
                        help="edge executor: tiles (v2 tile executor on onnxruntime, the "
                             "fastest), exact (sparse executor, reuse exact on the assembled "
                             "input; YOLO11 only: the reference) or dense (fastest dense engine "
                             f"every frame); default: {DEFAULT_EXECUTOR} on detect and seg models")
    p.add_argument("--tiles-table", type=cli_common.existing_file, default=None,
                   help="--executor tiles: the tiles table (fluxshard profile accuracy --executor "
                        "tiles): the tile executor's knobs per motion level, picked per frame by "
                        "the motion since the edge last ran (default: the executor's defaults)")
    p.add_argument("--bypass", default="none",
                   choices=("none", "onnxruntime", "fused_channels_last"),
                   help="edge: dense engine for frames with nothing to reuse, and for reusable "
                        "ones while it measures faster (default none)")
    p.add_argument("--uplink-codec", choices=UPLINK_CODECS, default="h264",
                   help="what the cloud gets: h264 (default: an x264 encoder per cloud stream fed "
                        "the cloud's frames; the cloud detects on the decoded frames), lossless "
                        "residual tiles (zlib) or jpeg tiles (quality 90)")
    p.add_argument("--uplink-quality", type=shared.uplink_quality, default=None, metavar="CRF",
                   help="h264 uplink: the x264 crf when the link has room (lower is better and "
                        "larger; default fluxshard.uplink_h264.DEFAULT_CRF); on a slower link "
                        "the quality follows the measured bandwidth")
    p.add_argument("--margin-ms", type=cli_common.nonnegative_float, default=2.0,
                   help="eps: within this margin prefer the cloud")
    p.add_argument("--frames", type=cli_common.positive_int, default=None,
                   help="process at most this many frames (--demo: the clip length, default 90)")
    shared.add_size(p, default=DEMO_SIZE, help="--demo clip size (default 640 384)")
    p.add_argument("--camera", default="static", choices=("static", "pan", "zoom", "pan+zoom"),
                   help="--demo camera (default static: a fixed camera with moving objects, the "
                        "common edge deployment; a sub-pixel pan reuses little, see README)")
    p.add_argument("--loop", action="store_true",
                   help="play VIDEO over and over: an endless (live) source")
    p.add_argument("--save-video", action=argparse.BooleanOptionalAction, default=None,
                   help="write annotated.mp4 (default: on a file yes, on a live source no)")
    p.add_argument("--save-report", action=argparse.BooleanOptionalAction, default=None,
                   help="write report.png with its per-frame JPEG baseline (default: on a file "
                        "yes, on a live source no; it plots the last 18000 frames)")
    p.add_argument("--track", action="store_true",
                   help="track ids (supervision's ByteTrack) in detections.jsonl and on the "
                        "annotated video's labels")
    p.add_argument("--metrics-port", type=metrics_port, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://ADDRESS:PORT/metrics while the run "
                        "goes (0: a free port, printed)")
    p.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDRESS",
                   help="where --metrics-port listens (default 127.0.0.1: this machine only; "
                        "0.0.0.0 lets a Prometheus elsewhere scrape)")
    shared.add_no_progress(p)


def metrics_port(text: str) -> int:
    """A TCP port, 0 to 65535 (argparse type)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return port


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a service manager's stop) ends the stream like a Ctrl-C: outputs written."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only it takes signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a video (or --demo) through edge/cloud dispatch",
                              description=cli_common.describe(__doc__))
    add_run_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from edge_runtime.run import run

    demo = getattr(args, "demo", True)
    video = getattr(args, "video", None)
    if demo == bool(video):
        raise cli_common.UsageError("give a VIDEO or --demo (not both)")
    detections = Path(args.out) / "detections.jsonl"
    try:
        # a run that fails before its first frame leaves no files behind; frames already
        # written (a Ctrl-C, a cloud lost mid-way) stay
        with _sigterm_as_interrupt(), cli_common.clean_up_on_failure(
                args.out, keep=lambda: detections.is_file() and detections.stat().st_size > 0):
            summary = run(video, out=args.out, demo=demo, cloud_url=args.cloud_url,
                          dispatch=args.dispatch, bandwidth_mbps=args.bandwidth_mbps,
                          tau=args.tau, tau_table=args.tau_table,
                          latency_profile=args.latency_profile, margin_ms=args.margin_ms,
                          frames=args.frames, size=tuple(args.size), camera=args.camera,
                          bypass=args.bypass, uplink_codec=args.uplink_codec,
                          uplink_quality=args.uplink_quality,
                          progress=not args.no_progress, fallback=args.fallback,
                          weights=args.weights, executor=args.executor,
                          tiles_table=args.tiles_table, deadline_ms=args.deadline_ms,
                          tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                          auth_header=args.auth_header, loop=args.loop,
                          save_video=args.save_video, save_report=args.save_report,
                          metrics_port=args.metrics_port,
                          metrics_address=args.metrics_address, track=args.track,
                          predict=shared.predict_options(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"fluxshard run: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    if summary.get("error"):
        print(f"fluxshard run: the stream broke off after {summary['frames']} frames: "
              f"{summary['error']}", file=sys.stderr)
        return 1
    if summary.get("stopped") and summary.get("source") != "live":
        print(f"fluxshard run: stopped ({summary['stopped']}) after {summary['frames']} frames",
              file=sys.stderr)
        return 130
    return 0


def print_summary(s: dict) -> None:
    def ms(stat):
        return "-" if not stat else f"{stat['mean']:.1f} / {stat['p90']:.1f}"

    print(f"\n{s['frames']} frames of {s['video']} (dispatch {s['dispatch']}, edge executor "
          f"{s.get('executor', DEFAULT_EXECUTOR)}, {s['wall_s']} s)")
    print("| endpoint | frames | key frames | latency ms mean / p90 |\n|---|---|---|---|")
    for name, e in s["endpoints"].items():
        print(f"| {name} | {e['frames']} | {e['key_frames']} | {ms(e['latency_ms'])} |")
    print(f"| all | {s['frames']} | | {ms(s['latency_ms'])} |")
    jpeg = s["jpeg_q90_bytes_total"]  # None: no report, no per-frame JPEG baseline
    against = (f" vs per-frame JPEG q90 {jpeg / 1e3:.1f} kB (x{s['uplink_vs_jpeg']})"
               if jpeg is not None else "")
    print(f"uplink {s['uplink_bytes_total'] / 1e3:.1f} kB{against}; cache hit rate "
          f"{s['cache_hit_rate_mean']}; residual block fraction {s['residual_fraction_mean']}; "
          f"uplink estimate {s['bandwidth_estimate_mbps']} Mbit/s")
    if s.get("crop_area_fraction_mean") is not None:
        print(f"tiles: mean crop area {s['crop_area_fraction_mean']} of the input on the edge's "
              "frames (halo included; key frames and dense refreshes count 1)")
    if s.get("edge_fallback_frames"):
        how = " (--fallback edge)" if s.get("fallback") == "edge" else ""
        print(f"cloud unreachable: {s['edge_fallback_frames']} of {s['frames']} frames ran on "
              f"the edge instead{how}")
    print("outputs: " + ", ".join(s["outputs"].values()))
