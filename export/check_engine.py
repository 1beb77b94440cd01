"""The TensorRT engine of ``fluxshard_trt.onnx`` against onnxruntime, frame by frame, as a stream.

``reference`` (here, no GPU): a short synthetic clip with motion runs as one stream through the
onnxruntime flavour (``fluxshard.onnx``, the FluxShard nodes' function bodies) of the same
export; each frame's inputs (``images`` and the RFAP plan, exactly what Triton's client would
send the ``fluxshard_trt`` model) and its ``output0`` go into one ``.npz``.

``run`` (the GPU machine, ``tensorrt`` and torch with CUDA): deserialises the engine with the
plugin library loaded into TensorRT's registry, feeds the same frames, carries the per-layer
caches from each frame's ``cache_out_NNN`` to the next frame's ``cache_in_NNN`` (what the Triton
model's implicit state does; zeros before the first frame) and compares ``output0``: the largest
difference relative to the reference's largest magnitude must stay within ``--tolerance``.

    python3 export/check_engine.py reference --export out/export --frames 4
    python3 export/check_engine.py run --engine model.plan --plugins libfluxshard_trt_plugins.so \\
        --reference out/export/reference.npz --tolerance 1e-4

``serve``: the same frames as one Triton sequence to a running ``fluxshard_trt`` model (Triton
carries the caches as implicit state).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_IN, STATE_OUT = "cache_in_", "cache_out_"


def load_graph(export: Path):
    """The onnxruntime flavour of an export as a ``FluxShardGraph`` (its fluxshard_io.json says
    what the inputs mean)."""
    import onnx

    from fluxshard.graph.rewrite import FluxShardGraph

    io = json.loads((export / "fluxshard_io.json").read_text())
    _, _, h, w = io["images"]
    return FluxShardGraph(
        model=onnx.load(str(export / "fluxshard.onnx")), height=h, width=w,
        caches=[(s["input"], s["output"], tuple(s["shape"])) for s in io["states"]],
        strides=sorted(int(s) for s in io["grids"]),
        cond1={name: (c["input_stride"], c["kernel"], c["stride"], c["pad"])
               for name, c in io["cond1"].items()},
        outputs=list(io["outputs"]), input_name=io["input"])


def write_reference(export: Path, out: Path, frames: int) -> Path:
    """``frames`` frames of a still-camera synthetic clip (moving objects) through onnxruntime: per frame ``k`` the
    arrays ``k/<input name>`` (the model inputs other than the caches) and ``k/output0``."""
    from fluxshard import synth
    from fluxshard.endpoint import edge_inputs
    from fluxshard.graph.rewrite import OnnxStream
    from fluxshard.models import preprocess

    graph = load_graph(export)
    stream = OnnxStream(graph, threads=1)
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = synth.SceneSpec(width=graph.width, height=graph.height, frames=frames,
                               gop=frames, camera="static")
        video = synth.make_clip(spec, tmp, name="reference", progress=False).video
        for k, (_, image, field, key) in enumerate(edge_inputs(video, 0.0)):
            x = preprocess(image).numpy()
            arrays[f"{k}/{graph.input_name}"] = x
            for name, value in graph.feeds(field, key).items():
                arrays[f"{k}/{name}"] = value
            for name, value in zip(graph.outputs, stream.run(x, field, key)):
                arrays[f"{k}/{name}"] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


def reference_frames(path: Path) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    frames: dict[int, dict] = {}
    for key in data.files:
        k, name = key.split("/", 1)
        frames.setdefault(int(k), {})[name] = data[key]
    return [frames[k] for k in sorted(frames)]


def run_engine(engine_path: Path, plugins: Path, reference: Path, tolerance: float) -> bool:
    """The engine as a stream over the reference frames; prints each frame's difference."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    registry = trt.get_plugin_registry()
    if registry.load_library(str(plugins)) is None:
        raise RuntimeError(f"TensorRT could not load the plugin library {plugins}")
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"{engine_path} does not deserialise (plugins missing, or another "
                           "TensorRT version built it)")
    context = engine.create_execution_context()
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
              trt.int32: torch.int32, trt.bool: torch.bool}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    buffers = {n: torch.zeros(tuple(engine.get_tensor_shape(n)),
                              dtype=dtypes[engine.get_tensor_dtype(n)], device="cuda")
               for n in names}  # zeros: the caches before the first frame
    for name, buffer in buffers.items():
        context.set_tensor_address(name, buffer.data_ptr())
    pairs = [(n, STATE_OUT + n.removeprefix(STATE_IN)) for n in names if n.startswith(STATE_IN)]
    stream = torch.cuda.Stream()
    worst = 0.0
    for k, frame in enumerate(reference_frames(reference)):
        for name, value in frame.items():
            if name in buffers and engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffers[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        torch.cuda.synchronize()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"frame {k}: the engine did not run")
        stream.synchronize()
        worst = max(worst, _compare(k, buffers["output0"].float().cpu().numpy(),
                                    frame["output0"]))
        for cache_in, cache_out in pairs:  # Triton's implicit state, by hand
            buffers[cache_in].copy_(buffers[cache_out])
    return _verdict(engine_path.name, worst, tolerance)


def _compare(k: int, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.abs(got.astype(np.float32) - want).max()) / max(1.0, float(np.abs(want).max()))
    print(f"frame {k}: output0 largest difference {diff:.2e} of the reference's magnitude")
    return diff


def _verdict(what: str, worst: float, tolerance: float) -> bool:
    ok = worst <= tolerance
    print(f"{what}: worst {worst:.2e} (tolerance {tolerance:.0e}): {'ok' if ok else 'FAILED'}")
    return ok


def serve_check(url: str, reference: Path, tolerance: float, model: str = "fluxshard_trt",
                sequence_id: int = 4242) -> bool:
    """The reference frames as one sequence to the served model (gRPC): Triton carries the
    caches as implicit state, so each answer must match the stream's reference."""
    import tritonclient.grpc as grpcclient

    frames = reference_frames(reference)
    worst = 0.0
    with grpcclient.InferenceServerClient(url) as client:
        config = client.get_model_config(model).config
        names = [i.name for i in config.input]
        for k, frame in enumerate(frames):
            inputs = []
            for name in names:
                value = np.ascontiguousarray(frame[name])
                tensor = grpcclient.InferInput(name, list(value.shape),
                                               "BOOL" if value.dtype == np.bool_ else
                                               {np.dtype(np.float32): "FP32",
                                                np.dtype(np.int64): "INT64"}[value.dtype])
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            result = client.infer(model, inputs, sequence_id=sequence_id, sequence_start=k == 0,
                                  sequence_end=k == len(frames) - 1,
                                  outputs=[grpcclient.InferRequestedOutput("output0")])
            worst = max(worst, _compare(k, result.as_numpy("output0"), frame["output0"]))
    return _verdict(f"{model} served at {url}", worst, tolerance)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    ref = sub.add_parser("reference", help="onnxruntime reference frames (no GPU)")
    ref.add_argument("--export", type=Path, required=True,
                     help="a `fluxshard export` folder (fluxshard.onnx, fluxshard_io.json)")
    ref.add_argument("--frames", type=int, default=4)
    ref.add_argument("--out", type=Path, default=None, help="default: EXPORT/reference.npz")
    run = sub.add_parser("run", help="the engine against the reference (GPU)")
    run.add_argument("--engine", type=Path, required=True)
    run.add_argument("--plugins", type=Path, required=True,
                     help="libfluxshard_trt_plugins.so (scripts/build_plugins.sh)")
    run.add_argument("--reference", type=Path, required=True)
    run.add_argument("--tolerance", type=float, default=1e-4,
                     help="largest output0 difference over the reference's largest magnitude")
    serve = sub.add_parser("serve", help="the served Triton model against the reference")
    serve.add_argument("--url", default="127.0.0.1:8001", help="tritonserver gRPC address")
    serve.add_argument("--reference", type=Path, required=True)
    serve.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    if args.verb == "serve":
        return 0 if serve_check(args.url, args.reference, args.tolerance) else 1
    if args.verb == "reference":
        for name in ("fluxshard.onnx", "fluxshard_io.json"):
            if not (args.export / name).is_file():
                ap.error(f"{args.export / name} not found: run `fluxshard export --out "
                         f"{args.export}` first")
        print(write_reference(args.export, args.out or args.export / "reference.npz",
                              args.frames))
        return 0
    for path in (args.engine, args.plugins, args.reference):
        if not path.is_file():
            ap.error(f"{path} not found")
    return 0 if run_engine(args.engine, args.plugins, args.reference, args.tolerance) else 1


if __name__ == "__main__":
    sys.exit(main())
