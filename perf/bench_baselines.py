"""FluxShard against the baselines of docs/DESIGN.md ("Baselines"), on the same decoded clips, in
one run.

Per motion level (the truncation profile's held-out clips: still camera, pan, pan + zoom):

| baseline | what runs | uplink |
|---|---|---|
| edge dense | the best dense runner (onnxruntime) on every frame | none |
| cloud dense, JPEG | the same on the JPEG (q90) of every frame | per-frame JPEG |
| cloud dense, H.264 | the same on the decoded stream | the clip's H.264 packets |
| edge similarity cache | SPINN/COACH-like: last result reused while the frame's mean abs difference to the last inferred frame stays under --similarity | none |
| edge delta reuse, no MVs | DeltaCNN-like: the sparse executor with a pixel-aligned cache (zero motion) and truncation | none |
| FluxShard edge | the sparse executor along the edge's data path (codec MVs, residual blocks) | none |
| FluxShard edge + bypass | the same with the dense bypass (`fluxshard run --bypass onnxruntime`) | none |
| FluxShard edge, tiles | the tile executor as the edge's tiles session builds it (`fluxshard run --executor tiles`: onnxruntime crops, adaptive) on the decoded frame with the edge path's field | none |
| FluxShard cloud | the cloud's receive layer + sparse executor | the wire payload (lossless) |
| FluxShard cloud, JPEG tiles | the same, pixels sent as JPEG q90 (`--uplink-codec jpeg`) | the wire payload |
| FluxShard cloud, H.264 | the cloud's decoder + sparse executor on the decoded frame, the decoder's vectors as field (`--uplink-codec h264`) | the edge's x264 packets of the cloud's frames (wire Codec.H264) |
| FluxShard cloud, H.264 pass-through | the same on the camera's own packets (the cloud sees every frame) | the clip's H.264 packets |

Extra fields: ``key_kb`` (the first frame's uplink, a key frame everywhere; JPEG's row is the
per-frame JPEG q90), ``edge_codec_ms`` (H.264 row: the edge's encode + its mirror's decode
per frame, on this process's thread, through the SDK's own uplink) and ``uplink_crf`` (H.264
row: mean quality; it follows --bandwidth-mbps as the SDK's follows its measured link,
``fluxshard.uplink_h264.LinkRate``).

Everything runs in this process on this machine (2 threads). A cloud row's latency is
transfer (uplink bytes / --bandwidth-mbps) + --rtt-ms + its compute time measured here divided
by --cloud-speedup (how much faster the cloud GPU is than this CPU: an assumption, printed).
Accuracy: mAP@0.5 and mAP@0.5:0.95 against ground truth, and agreement (mAP@0.5 of the
baseline's detections against the dense model's detections with score >= --conf on the decoded
frames: what a user of the dense model would have seen). Dispatch between edge and
cloud over a real Triton server is perf/bench_e2e.py.

    python3 perf/bench_baselines.py [--quick] [--frames 30] [--bandwidth-mbps 20] [--h264-crf 23]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxshard.tau import tau_argument  # noqa: E402

BASELINES = ["edge dense", "cloud dense, JPEG", "cloud dense, H.264", "edge similarity cache",
             "edge delta reuse, no MVs", "FluxShard edge", "FluxShard edge + bypass",
             "FluxShard edge, tiles", "FluxShard cloud", "FluxShard cloud, JPEG tiles", "FluxShard cloud, H.264",
             "FluxShard cloud, H.264 pass-through"]
H264_ROWS = ("FluxShard cloud, H.264", "FluxShard cloud, H.264 pass-through")
CLOUD_CODECS = {"FluxShard cloud": "ZLIB", "FluxShard cloud, JPEG tiles": "JPEG"}


def packet_sizes(video: Path) -> list[int]:
    """Bytes of each frame in the H.264 stream (decode order = display order: no B-frames)."""
    import av

    with av.open(str(video)) as container:
        return [p.size for p in container.demux(video=0) if p.size]


def jpeg_roundtrip(image: np.ndarray) -> tuple[np.ndarray, int]:
    """What a cloud receiving per-frame JPEG q90 sees, and the bytes it took."""
    from fluxshard.wire import jpeg_decode, jpeg_encode

    data = jpeg_encode(image, quality=90)
    return jpeg_decode(data, *image.shape[:2]), len(data)


class Timed:
    """Collects (seconds, detections) per frame for one baseline."""

    def __init__(self):
        self.seconds, self.preds, self.bytes, self.reused = [], [], [], []
        self.codec_seconds = []  # the edge's encode + mirror decode (H.264 uplink)
        self.crfs = []  # the quality each frame was coded at (H.264 uplink)

    def add(self, seconds: float, preds, reused: float | None = None, nbytes: int | None = None):
        self.seconds.append(seconds)
        self.preds.append(preds)
        if reused is not None:
            self.reused.append(reused)
        if nbytes is not None:
            self.bytes.append(nbytes)


def run_level(level: str, args, model, best, tmp: Path) -> dict[str, Timed]:
    import torch

    from fluxshard import synth, wire
    from fluxshard.models import postprocess, preprocess
    from fluxshard.endpoint import EndpointPath, Uplink
    from fluxshard.motion import iter_motion
    from fluxshard.receive import ReceiveState
    from fluxshard.sessions import tile_session_factory
    from fluxshard.sparse import SparseExecutor, StreamState

    w, h = args.size
    spec = synth.heldout_spec(level, width=w, height=h, frames=args.frames)
    paths = synth.make_clip(spec, tmp, name=level, progress=False)
    gt = synth.load_ground_truth(paths.ground_truth)
    frames = list(iter_motion(paths.video))
    sizes = packet_sizes(paths.video)

    def detect(out, x):
        if isinstance(out, (list, tuple)) and not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out[0])
        return postprocess(out, x.shape[-2:], (h, w), conf_thres=0.001)[0]

    def dense(image):
        x = preprocess(image)
        t0 = time.perf_counter()
        out = best.run(x)
        return time.perf_counter() - t0, detect(out, x)

    runs = {name: Timed() for name in BASELINES}
    executors = {
        "edge delta reuse, no MVs": SparseExecutor(model, tau=args.tau),
        "FluxShard edge": SparseExecutor(model, tau=args.tau),
        "FluxShard edge + bypass": SparseExecutor(model, tau=args.tau, bypass=best,
                                                   adaptive=True),
        "FluxShard cloud": SparseExecutor(model, tau=args.tau),
        "FluxShard cloud, JPEG tiles": SparseExecutor(model, tau=args.tau),
        **{name: SparseExecutor(model, tau=args.tau) for name in H264_ROWS},
    }
    streams = {name: StreamState() for name in executors}
    # the edge's tiles session (executor and per-stream state), as fluxshard run builds it
    tiles = tile_session_factory(model, threads=args.threads, engine="onnxruntime",
                                 adaptive=True)(0)
    # the paths the SDK ships: the edge's (local) and the cloud's (the wire payload + mirror)
    edge_paths = {"FluxShard edge": EndpointPath(args.tau),
                  "edge delta reuse, no MVs": EndpointPath(args.tau, motion=False)}
    cloud_paths = {name: EndpointPath(args.tau, uplink=Uplink(16, wire.Codec[codec],
                                                              wire.Codec[codec]))
                   for name, codec in CLOUD_CODECS.items()}
    last_inferred, last_preds = None, None
    # the SDK's own uplink (encoder + mirror), so the edge's codec time is what ships
    uplink = Uplink(16, wire.Codec.H264, wire.Codec.H264, args.h264_crf)
    uplink.link_bytes_per_s = args.bandwidth_mbps * 1e6 / 8  # its quality follows the link
    h264_cloud = ReceiveState()

    def sparse(name, image, field, key):
        if name not in args.baselines:  # left out of this run: not computed, not reported
            return 0.0, None, 0.0
        x = preprocess(image)
        t0 = time.perf_counter()
        out, report = executors[name].run(streams[name], x, field, key=key)
        seconds = time.perf_counter() - t0
        return seconds, detect(out, x), 0.0 if report.bypassed else report.cache_hit_rate

    def tiled(image, field, key):
        name = "FluxShard edge, tiles"
        if name not in args.baselines:
            return 0.0, None, 0.0
        x = preprocess(image)
        t0 = time.perf_counter()
        out, report = tiles.tile_executor.run(tiles.state, image, None if key else field,
                                              key=key)
        seconds = time.perf_counter() - t0
        return seconds, detect(out, x), max(0.0, 1.0 - report.crop_area_fraction)

    for mf, size in zip(frames, sizes):
        seconds, preds = dense(mf.image)
        runs["edge dense"].add(seconds, preds)
        runs["cloud dense, H.264"].add(seconds, preds, nbytes=size)
        jpeg, jpeg_size = jpeg_roundtrip(mf.image)
        runs["cloud dense, JPEG"].add(*dense(jpeg), nbytes=jpeg_size)

        # similarity cache: the decision itself is part of its latency
        sim = runs["edge similarity cache"]
        t0 = time.perf_counter()
        similar = last_inferred is not None and float(
            np.abs(mf.image.astype(np.int16) - last_inferred).mean()) / 255.0 < args.similarity
        decide = time.perf_counter() - t0
        seconds = 0.0
        if not similar:
            seconds, last_preds = dense(mf.image)
            last_inferred = mf.image.astype(np.int16)
        sim.add(decide + seconds, last_preds, reused=float(similar))

        # the edge's data path: with codec motion, and DeltaCNN-like without (zero motion)
        for name, path in edge_paths.items():
            step = path.step_decoded(mf)
            runs[name].add(*sparse(name, step.image, step.field, step.key))
            if name == "FluxShard edge":
                runs["FluxShard edge + bypass"].add(
                    *sparse("FluxShard edge + bypass", step.image, step.field, step.key))
                # tiles take the whole decoded frame (the session's full_frame) and the field
                runs["FluxShard edge, tiles"].add(*tiled(mf.image, step.field, step.key))

        # the cloud: what the wire carries, and the executor on the input the cloud rebuilds
        for name, path in cloud_paths.items():
            step = path.step_decoded(mf)
            runs[name].add(*sparse(name, step.image, step.field, step.key),
                           nbytes=len(step.sent.payload))

        # the H.264 uplink: every frame goes to the cloud here, so the edge's encoder sees them all
        t0 = time.perf_counter()
        sent = uplink.encode(mf.image, mf.index, mf.is_key, args.tau)
        codec_seconds = time.perf_counter() - t0
        uplink.commit(sent.mirror)
        payload, key = sent.payload, sent.key
        request = wire.decode_request(payload)
        h264_cloud.apply(request)
        if h264_cloud.digest != sent.mirror.digest:
            raise RuntimeError(f"frame {mf.index}: the edge's mirror decoded other pixels than "
                               "the cloud")
        name = "FluxShard cloud, H.264"
        runs[name].add(*sparse(name, request.frame, request.field, key), nbytes=len(payload))
        runs[name].codec_seconds.append(codec_seconds)
        runs[name].crfs.append(uplink.encoder.crf)
        name = "FluxShard cloud, H.264 pass-through"
        runs[name].add(*sparse(name, mf.image, None if mf.is_key else mf.field, mf.is_key),
                       nbytes=size)
    runs["_truth"] = [dict(boxes=b, classes=k) for b, k in zip(gt.boxes, gt.classes)][:len(frames)]
    return runs


def confident(d, threshold: float):
    """The dense model's detections a user sees (score >= threshold): the reference of agreement."""
    from fluxshard.models.ops import Detections

    keep = d.scores >= threshold
    return Detections(d.boxes[keep], d.scores[keep], d.classes[keep])


def summarize(level: str, runs: dict, args) -> list[dict]:
    from fluxshard.accuracy import agreement, evaluate_detections

    truth = runs.pop("_truth")
    runs = {name: r for name, r in runs.items() if name in args.baselines}
    dense_preds = [confident(d, args.conf) for d in runs["edge dense"].preds]
    rows = []
    for name, r in runs.items():
        cloud = name.startswith("cloud") or name in CLOUD_CODECS or name in H264_ROWS
        seconds = np.array(r.seconds[1:])  # frame 0 is a key frame everywhere
        upload = np.array(r.bytes[1:], float) if r.bytes else np.zeros_like(seconds)
        latency = seconds * 1e3
        if cloud:
            latency = (upload * 8 / (args.bandwidth_mbps * 1e6) * 1e3 + args.rtt_ms
                       + latency / args.cloud_speedup)
        acc = evaluate_detections(r.preds, truth)
        rows.append(dict(level=level, baseline=name, latency_ms=float(latency.mean()),
                         p90_ms=float(np.percentile(latency, 90)),
                         compute_ms=float(seconds.mean() * 1e3),
                         uplink_kb=float(upload.mean() / 1e3), map50=acc["map50"],
                         map50_95=acc["map50_95"],
                         agreement=agreement(r.preds, dense_preds)["map50"],
                         reuse=float(np.mean(r.reused[1:])) if r.reused else 0.0,
                         key_kb=float(r.bytes[0] / 1e3) if r.bytes else 0.0,
                         edge_codec_ms=float(np.mean(r.codec_seconds[1:]) * 1e3)
                         if r.codec_seconds else 0.0,
                         uplink_crf=float(np.mean(r.crfs)) if r.crfs else None))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(dict.fromkeys(r["level"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    width = 0.8 / len(levels)
    for k, level in enumerate(levels):
        rs = [r for r in rows if r["level"] == level]
        xs = np.arange(len(rs)) + k * width
        axes[0].bar(xs, [r["latency_ms"] for r in rs], width, label=level)
        axes[1].bar(xs, [r["uplink_kb"] for r in rs], width, label=level)
        axes[2].bar(xs, [r["map50_95"] for r in rs], width, label=level)
    for ax, title in zip(axes, ("latency per frame (ms)", "uplink kB / frame",
                                "mAP@0.5:0.95 vs ground truth")):
        names = [r["baseline"] for r in rows if r["level"] == levels[0]]
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="320x192, 12 frames per level")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--size", type=int, nargs=2, default=(640, 384), metavar=("W", "H"))
    p.add_argument("--tau", type=tau_argument, default=0.15,
                   help="tau on the [0, 1] input scale (fluxshard.tau): FluxShard's and the "
                        "delta reuse's residual blocks and truncation (default: %(default)s)")
    p.add_argument("--conf", type=float, default=0.25,
                   help="dense detections at this score are the reference of agreement")
    p.add_argument("--similarity", type=float, default=0.02,
                   help="similarity cache: reuse while the mean abs difference < this (0-1)")
    p.add_argument("--bandwidth-mbps", type=float, default=20.0)
    p.add_argument("--rtt-ms", type=float, default=5.0)
    p.add_argument("--cloud-speedup", type=float, default=4.0,
                   help="cloud compute = this machine's / this (an assumption)")
    p.add_argument("--h264-crf", type=int, default=None,
                   help="H.264 uplink quality (x264 crf; default fluxshard.uplink_h264's)")
    p.add_argument("--baselines", nargs="+", default=BASELINES, choices=BASELINES,
                   metavar="NAME", help="rows to run (default: all; 'edge dense' always runs, "
                                        "it is the reference of agreement)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("out/perf"))
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.size = 12, (320, 192)
    args.baselines = ["edge dense"] + [b for b in BASELINES
                                       if b in args.baselines and b != "edge dense"]
    if args.h264_crf is None:
        from fluxshard.uplink_h264 import DEFAULT_CRF

        args.h264_crf = DEFAULT_CRF

    import torch
    from tqdm import tqdm

    from fluxshard.models import load_model
    from fluxshard.models.dense import best_dense_runner
    from fluxshard.models.ops import padded_size
    from fluxshard.synth import MOTION_LEVELS

    model_w, model_h = padded_size(*args.size, who="bench_baselines")  # what the model sees
    torch.set_num_threads(args.threads)
    model = load_model(None, fused=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        best, medians = best_dense_runner(model, (model_h, model_w),
                                          threads=args.threads, kinds=("onnxruntime",),
                                          workdir=tmp)
        for level in tqdm(MOTION_LEVELS, desc="motion levels"):
            rows += summarize(level, run_level(level, args, model, best, Path(tmp)),
                              args)
    print(f"\n{args.size[0]}x{args.size[1]}, {args.frames} frames per level, {args.threads} "
          f"threads; cloud rows: uplink {args.bandwidth_mbps} Mbit/s, RTT {args.rtt_ms} ms, "
          f"cloud compute = this machine's / {args.cloud_speedup}; tau {args.tau}")
    keys = ["level", "baseline", "latency_ms", "p90_ms", "compute_ms", "uplink_kb", "map50",
            "map50_95", "agreement", "reuse", "key_kb", "edge_codec_ms", "uplink_crf"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
                                for k in keys) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_baselines.json").write_text(json.dumps(dict(
        options={k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                 for k, v in vars(args).items()}, rows=rows), indent=1))
    plot(rows, args.out / "bench_baselines.png")
    print(f"\nplot: {args.out / 'bench_baselines.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
