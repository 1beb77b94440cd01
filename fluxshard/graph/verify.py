"""The checks of `fluxshard export --verify` (fluxshard.tools.export): the rewritten graph against
the dense one through polygraphy on key frames (:func:`verify_polygraphy`), and the onnxruntime
flavour against the torch executor on a stream (:func:`verify`); the class names an ultralytics
export carries (:func:`onnx_class_names`)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def onnx_class_names(model) -> dict[int, str] | None:
    """Class names from an ultralytics export's metadata (``names``: a dict literal)."""
    import ast

    for prop in model.metadata_props:
        if prop.key == "names":
            try:
                names = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None
    return None


# key frames recompute everything: the rewritten graph differs from the dense one only by float
# summation order (fused ops, the MaskedSparseConv body), on outputs of up to the image size
VERIFY_ATOL, VERIFY_RTOL = 1e-3, 1e-4


def polygraphy_command() -> list[str]:
    """The ``polygraphy`` console script of this environment."""
    beside = Path(sys.executable).with_name("polygraphy")
    found = str(beside) if beside.is_file() else shutil.which("polygraphy")
    if found is None:
        raise RuntimeError("polygraphy is not installed (pip install polygraphy)")
    return [found]


def verify_polygraphy(dense_path: Path, graph, folder: Path, frames: int) -> bool:
    """``frames`` frames of a synthetic clip, each a key frame of the rewritten graph (zero
    caches, every grid position invalid) and a plain input of the dense graph, compared by
    ``polygraphy run ... --onnxrt``; prints its commands and report, returns whether it passed.
    The inputs and the dense outputs stay in ``folder`` to rerun the commands."""
    import onnx
    from polygraphy.json import save_json

    from fluxshard import synth
    from fluxshard.models import preprocess

    folder.mkdir(parents=True, exist_ok=True)
    h, w = graph.height, graph.width
    spec = synth.SceneSpec(width=w, height=h, frames=frames, camera="pan")
    scene = synth.Scene(spec)
    images = [preprocess(scene.render(i).image).numpy() for i in range(frames)]
    key = {**graph.initial_caches(), **graph.feeds(None, key=True)}
    save_json([{graph.input_name: x} for x in images], folder / "dense_inputs.json")
    save_json([{graph.input_name: x, **key} for x in images], folder / "fluxshard_inputs.json")
    fluxshard_path = folder / "fluxshard.onnx"
    onnx.save(graph.model, fluxshard_path)
    polygraphy = polygraphy_command()
    reference = [*polygraphy, "run", str(dense_path), "--onnxrt",
                 "--load-inputs", str(folder / "dense_inputs.json"),
                 "--save-outputs", str(folder / "dense_outputs.json")]
    compare = [*polygraphy, "run", str(fluxshard_path), "--onnxrt",
               "--load-inputs", str(folder / "fluxshard_inputs.json"),
               "--load-outputs", str(folder / "dense_outputs.json"),
               "--onnx-outputs", *graph.outputs,
               "--atol", str(VERIFY_ATOL), "--rtol", str(VERIFY_RTOL)]
    for command in (reference, compare):
        print("$ " + shlex.join(["polygraphy", *command[1:]]), flush=True)
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        print(done.stdout, flush=True)
        if done.returncode != 0:
            return False
    return True


def verify(model, graph, args, frames: int) -> float:
    """Largest absolute difference of the decoded outputs over ``frames`` frames of a synthetic
    still-camera clip (edge data path), onnxruntime flavour against the torch executor."""
    import numpy as np
    import torch

    from fluxshard import synth
    from fluxshard.models import preprocess
    from fluxshard.endpoint import edge_inputs
    from fluxshard.sparse import SparseExecutor, StreamState

    from .rewrite import OnnxStream

    w, h = graph.width, graph.height
    onnx_stream = OnnxStream(graph)
    executor = SparseExecutor(model, tau=args.tau, strict_rfap=args.strict_rfap,
                              truncation_probe=0)
    stream, worst = StreamState(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        spec = synth.SceneSpec(width=w, height=h, frames=frames, gop=frames, camera="static")
        video = synth.make_clip(spec, tmp, name="verify", progress=False).video
        for _, image, field, key in edge_inputs(video, args.tau):
            x = preprocess(image)
            got = onnx_stream.run(x.numpy(), field, key)[0]
            with torch.no_grad():
                want, _ = executor.run(stream, x, field, key=key)
            want = want[0] if isinstance(want, tuple) else want
            worst = max(worst, float(np.abs(got - want.numpy()).max()))
    return worst
