"""`fluxshard export`: YOLO11 -> ONNX -> the FluxShard graph, in both flavours.

The dense graph is exported from ``--weights`` (our checkpoints, ultralytics state dicts and
checkpoint dicts), or taken as it is from ``--onnx`` (e.g. ultralytics' ``yolo export
format=onnx``, or ours); the global blocks (SPPF, C2PSA) are found by their pattern. A size that is
not a multiple of 32 is padded up to the next one.

Writes into ``--out`` (default ``out/export``):

* ``fluxshard.onnx``: FluxShard nodes with their local-function bodies (runs in onnxruntime);
* ``fluxshard_trt.onnx``: the same graph without the bodies, for TensorRT with plugins_trt/;
* ``dense.onnx`` (from ``--weights``): the dense graph that was rewritten;
* ``fluxshard_io.json``: what the inputs mean (state pairs, RFAP grids, Cond. 1 geometries) and
  the options the graph was made with.

``--verify N`` compares the rewritten graph with the dense one through polygraphy (``polygraphy
run ... --onnxrt``, its comparison report printed) on N frames of a synthetic clip, each fed as a
key frame; where the weights are known (``--weights``, or the embedded detector when no ``--onnx``
is given) it also runs those N frames as one stream through the onnxruntime flavour and the torch
executor with the same options and prints how far they are apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fluxshard import cli_common
from fluxshard.tools import args as shared


def add_arguments(p: argparse.ArgumentParser) -> None:
    shared.add_weights(p, help=f"{shared.WEIGHTS_SOURCES}; with "
                               "--onnx: the weights it was exported from, for the torch check of "
                               "--verify (default: embedded demo detector, unless --onnx)")
    p.add_argument("--onnx", type=cli_common.existing_file, default=None, metavar="MODEL.onnx",
                   help="rewrite this dense YOLO ONNX graph (e.g. ultralytics `yolo export "
                        "format=onnx`) instead of exporting --weights")
    shared.add_size(p, type=cli_common.positive_int, default=None,
                    help="input size the graph is made for, padded up to multiples of 32 "
                         "(default: 640 384, or the --onnx graph's fixed input size)")
    shared.add_tau(p, default=0.0,
                   help="tau on the [0, 1] input scale (fluxshard.tau), baked into the graph's "
                        "truncation; 0 is exact (default: %(default)s)")
    p.add_argument("--strict-rfap", action="store_true", help="RFAP Cond. 1 at every spatial layer")
    p.add_argument("--tile", type=cli_common.nonnegative_int, default=0,
                   help="MaskedSparseConv tile edge for the plugins (0: per position)")
    p.add_argument("--out", type=cli_common.output_folder, default=Path("out/export"),
                   help="folder for the two graphs and fluxshard_io.json")
    p.add_argument("--verify", type=cli_common.nonnegative_int, default=0, metavar="N",
                   help="compare N key frames of a synthetic clip with the dense graph through "
                        "polygraphy, and N frames as a stream with the torch executor where the "
                        "weights are known (default: %(default)s, no check)")


def run(args: argparse.Namespace) -> int:
    import onnx

    from fluxshard.models import YOLO11, export_onnx, load_model
    from fluxshard.models.families import family_of
    from fluxshard.models.ops import padded_size

    from fluxshard.graph.verify import onnx_class_names, verify, verify_polygraphy
    from fluxshard.graph.rewrite import input_size, rewrite_onnx

    size = args.size
    if size is None and args.onnx is not None:
        fixed = input_size(args.onnx)
        size = None if fixed is None else (fixed[1], fixed[0])
        if size is None:
            raise cli_common.UsageError(f"{args.onnx} has a dynamic input size: give --size W H")
    w, h = padded_size(*(size or (640, 384)), who="fluxshard export")
    t0 = time.perf_counter()
    # the torch model, where the weights are known: the source, or the --verify reference
    model = (load_model(args.weights, fused=True) if args.onnx is None or args.weights
             else None)
    if model is not None and not isinstance(model, YOLO11):
        raise ValueError(f"{args.weights} is a {family_of(model).tag(model.scale, model.task)} "
                         "model; the exact executor's graph supports YOLO11 only (the dense "
                         "ONNX: fluxshard.models.export_onnx)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.onnx is not None:
        dense_path = Path(args.onnx)
        graph = rewrite_onnx(dense_path, (h, w), tau=args.tau, strict_rfap=args.strict_rfap,
                             tile=args.tile)
        names = onnx_class_names(onnx.load(str(dense_path), load_external_data=False))
    else:
        dense_path = export_onnx(model, args.out / "dense.onnx", (h, w))
        graph = rewrite_onnx(dense_path, (h, w), tau=args.tau, strict_rfap=args.strict_rfap,
                             tile=args.tile)
        names = dict(model.names)
    if model is not None and names is None:
        names = dict(model.names)
    onnx.save(graph.model, args.out / "fluxshard.onnx")
    onnx.save(graph.tensorrt(), args.out / "fluxshard_trt.onnx")
    io = dict(images=[1, 3, h, w], input=graph.input_name, outputs=graph.outputs,
              names={str(k): v for k, v in names.items()} if names else None,
              global_blocks=[dict(kind=k, first_node=n) for k, n in graph.global_blocks],
              states=[dict(input=i, output=o, shape=list(s)) for i, o, s in graph.caches],
              grids={str(s): dict(field_index=f"field_index_{s}", invalid=f"invalid_{s}",
                                  shape=[h // s, w // s]) for s in graph.strides},
              cond1={name: dict(input_stride=g[0], kernel=g[1], stride=g[2], pad=g[3])
                     for name, g in graph.cond1.items()},
              options=dict(tau=args.tau, strict_rfap=args.strict_rfap, tile=args.tile,
                           onnx=str(args.onnx) if args.onnx else None,
                           weights=args.weights or ("embedded demo detector" if model else None)))
    (args.out / "fluxshard_io.json").write_text(json.dumps(io, indent=1))
    print(f"{args.out / 'fluxshard.onnx'} (onnxruntime), {args.out / 'fluxshard_trt.onnx'} "
          f"(TensorRT plugins), {args.out / 'fluxshard_io.json'}: {len(graph.caches)} state pairs,"
          f" grids {graph.strides}, {time.perf_counter() - t0:.1f} s")
    blocks = ", ".join(f"{k} at {n}" for k, n in graph.global_blocks) or "none found"
    print(f"global blocks (run densely): {blocks}")
    if args.verify:
        passed = verify_polygraphy(dense_path, graph, args.out / "verify", args.verify)
        if model is not None:
            worst = verify(model, graph, args, args.verify)
            print(f"verify: {args.verify} frames, largest |onnxruntime - torch executor| on the "
                  f"decoded output: {worst:.2e}")
        else:
            print("verify: no torch weights given (--weights): the stream check against the "
                  "torch executor is skipped")
        if not passed:
            print("fluxshard export: the rewritten graph does not match the dense one on key "
                  "frames (polygraphy report above)", file=sys.stderr)
            return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="YOLO11 -> FluxShard ONNX graph (onnxruntime and "
                              "TensorRT flavours)", description=cli_common.describe(__doc__))
    add_arguments(p)
    p.set_defaults(func=run)
