"""`fluxshard export`: YOLO11 -> ONNX -> the FluxShard graph, in both flavours.

Writes into ``--out`` (default ``out/export``):

* ``fluxshard.onnx``: FluxShard nodes with their local-function bodies (runs in onnxruntime);
* ``fluxshard_trt.onnx``: the same graph without the bodies, for TensorRT with plugins_trt/;
* ``fluxshard_io.json``: what the inputs mean (state pairs, RFAP grids, Cond. 1 geometries) and
  the options the graph was made with.

``--verify N`` runs N frames of a synthetic still-camera clip through the onnxruntime flavour and
the torch executor with the same options and prints how far they are apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None,
                   help="checkpoint, ultralytics .pt or state dict (default: embedded demo detector)")
    p.add_argument("--size", type=int, nargs=2, default=(640, 384), metavar=("W", "H"))
    p.add_argument("--tau", type=float, default=0.0, help="truncation tau (input scale, 0: exact)")
    p.add_argument("--strict-rfap", action="store_true", help="RFAP Cond. 1 at every spatial layer")
    p.add_argument("--tile", type=int, default=0,
                   help="MaskedSparseConv tile edge for the plugins (0: per position)")
    p.add_argument("--out", type=Path, default=Path("out/export"))
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="check N frames of a synthetic clip against the torch executor")


def run(args: argparse.Namespace) -> int:
    import onnx

    from fluxshard.models import load_model

    from .rewrite import rewrite

    w, h = args.size
    if w % 32 or h % 32 or w <= 0 or h <= 0:
        print(f"fluxshard export: --size must be positive multiples of 32, got {w} {h}",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = load_model(args.weights, fused=True)
    graph = rewrite(model, (h, w), tau=args.tau, strict_rfap=args.strict_rfap, tile=args.tile)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(graph.model, args.out / "fluxshard.onnx")
    onnx.save(graph.tensorrt(), args.out / "fluxshard_trt.onnx")
    io = dict(images=[1, 3, h, w], outputs=graph.outputs,
              states=[dict(input=i, output=o, shape=list(s)) for i, o, s in graph.caches],
              grids={str(s): dict(field_index=f"field_index_{s}", invalid=f"invalid_{s}",
                                  shape=[h // s, w // s]) for s in graph.strides},
              cond1={name: dict(input_stride=g[0], kernel=g[1], stride=g[2], pad=g[3])
                     for name, g in graph.cond1.items()},
              options=dict(tau=args.tau, strict_rfap=args.strict_rfap, tile=args.tile,
                           weights=args.weights or "embedded demo detector"))
    (args.out / "fluxshard_io.json").write_text(json.dumps(io, indent=1))
    print(f"{args.out / 'fluxshard.onnx'} (onnxruntime), {args.out / 'fluxshard_trt.onnx'} "
          f"(TensorRT plugins), {args.out / 'fluxshard_io.json'}: {len(graph.caches)} state pairs,"
          f" grids {graph.strides}, {time.perf_counter() - t0:.1f} s")
    if args.verify:
        worst = verify(model, graph, args, args.verify)
        print(f"verify: {args.verify} frames, largest |onnxruntime - torch executor| on the "
              f"decoded output: {worst:.2e}")
    return 0


def verify(model, graph, args, frames: int) -> float:
    """Largest absolute difference of the decoded outputs over ``frames`` frames of a synthetic
    still-camera clip (edge data path), onnxruntime flavour against the torch executor."""
    import numpy as np
    import torch

    from fluxshard import synth
    from fluxshard.models import preprocess
    from fluxshard.motion import edge_inputs
    from fluxshard.sparse import SparseExecutor, StreamState
    from fluxshard.truncation import dispatch_threshold

    from .rewrite import OnnxStream

    w, h = args.size
    onnx_stream = OnnxStream(graph)
    executor = SparseExecutor(model, tau=args.tau, strict_rfap=args.strict_rfap,
                              truncation_probe=0)
    stream, worst = StreamState(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        spec = synth.SceneSpec(width=w, height=h, frames=frames, gop=frames, camera="static")
        video = synth.make_clip(spec, tmp, name="verify", progress=False).video
        for _, image, field, key in edge_inputs(video, dispatch_threshold(args.tau)):
            x = preprocess(image)
            got = onnx_stream.run(x.numpy(), field, key)[0]
            with torch.no_grad():
                want, _ = executor.run(stream, x, field, key=key)
            want = want[0] if isinstance(want, tuple) else want
            worst = max(worst, float(np.abs(got - want.numpy()).max()))
    return worst


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="YOLO11 -> FluxShard ONNX graph (onnxruntime and "
                              "TensorRT flavours)", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
