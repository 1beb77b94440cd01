"""Dense engines that return the detection head's raw per-level maps (box DFL logits + class
logits, before decoding) for a batch of equally sized inputs: what the tile executor runs its
crop batches and full-frame refreshes on.

``raw_head_maps`` walks the model like ``YOLO11.forward`` but stops before ``Detect.decode``, so
crops of any size multiple of 32 can be merged into the per-stride output cache.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from fluxshard.models.export import onnxruntime_session
from fluxshard.models.families import run_layers
from fluxshard.models.yolo import YOLO11, fuse, is_fused

ENGINE_KINDS = ("torch", "onnxruntime", "tensorrt")


def raw_head_maps(model: YOLO11, x: torch.Tensor) -> list[torch.Tensor]:
    """The head's raw maps [(B, head.no, H/s, W/s) for s in head.strides] of ``x``."""
    if model.task != "detect":
        raise NotImplementedError("the tile executor caches detect heads only (seg: not built yet)")
    # the head's maps in its own level order (model.head.strides)
    return run_layers(model, x, raw_head=True)


class _RawMaps(nn.Module):
    """Export wrapper: the raw maps as graph outputs."""

    def __init__(self, model: YOLO11):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(raw_head_maps(self.model, x))


RAW_MAP_OUTPUTS = ("maps8", "maps16", "maps32")  # YOLO11's (raw_map_outputs(model) in general)


def raw_map_outputs(model) -> tuple[str, ...]:
    """The raw-maps graph's output names, one per head level in the head's order: ``maps<stride>``
    (YOLO11: maps8, maps16, maps32; YOLOv3-tiny: maps32, maps16)."""
    return tuple(f"maps{int(s)}" for s in model.head.strides)


def export_raw_maps_onnx(model: YOLO11, path: str | Path) -> Path:
    """The model up to the head's raw maps as ONNX (opset 17) with a dynamic batch, height and
    width: input ``images`` (B, 3, H, W), outputs ``raw_map_outputs(model)``. One file serves
    every crop bucket on onnxruntime and is what TensorRT builds its crop-bucket profiles from."""
    path = Path(path)
    m = _RawMaps(copy.deepcopy(model).float().cpu().eval())
    outputs = raw_map_outputs(model)
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({o: {0: "batch", 2: f"h_{o}", 3: f"w_{o}"} for o in outputs})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices about shape checks: shapes are dynamic
        torch.onnx.export(m, (torch.zeros(1, 3, 128, 128),), str(path), input_names=["images"],
                          output_names=list(outputs), dynamic_axes=dynamic,
                          opset_version=17, dynamo=False, do_constant_folding=True)
    return path


class TorchMapsEngine:
    """BN-fused, channels_last torch (the fastest torch dense runner here)."""

    name = "torch"

    def __init__(self, model: YOLO11):
        m = copy.deepcopy(model).float().cpu().eval()
        if not is_fused(m):
            fuse(m)
        self.model = m.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            maps = raw_head_maps(self.model, x.contiguous(memory_format=torch.channels_last))
        return [m.contiguous() for m in maps]


class OnnxMapsEngine:
    """onnxruntime with a dynamic batch and input size (one session serves every crop bucket)."""

    name = "onnxruntime"

    def __init__(self, model: YOLO11, threads: int = 2, workdir: str | Path | None = None):
        if workdir is None:  # the session keeps the graph in memory: the file need not outlive it
            with tempfile.TemporaryDirectory(prefix="fluxshard-tiles-") as tmp:
                self._build(model, threads, Path(tmp))
            self.path = None
        else:
            self._build(model, threads, Path(workdir))

    def _build(self, model: YOLO11, threads: int, wd: Path) -> None:
        self.path = export_raw_maps_onnx(model, wd / f"{type(model).__name__.lower()}-{model.scale}-raw-maps-dynamic.onnx")
        self.session = onnxruntime_session(self.path, threads=threads)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.session.run(None, {"images": x.detach().cpu().contiguous().numpy()})
        return [torch.from_numpy(o) for o in outs]


def make_engine(model: YOLO11, kind: str = "torch", threads: int = 2,
                workdir: str | Path | None = None, engine_path: str | Path | None = None):
    if kind == "tensorrt":  # imported here: CPU machines never import tensorrt
        from fluxshard.tiles.tensorrt_engine import TensorRTMapsEngine
        if engine_path is None:
            raise ValueError("the tensorrt engine needs engine_path (scripts/build_tiles_trt.sh)")
        return TensorRTMapsEngine(engine_path, channels=model.head.no)
    if kind == "torch":
        return TorchMapsEngine(model)
    if kind == "onnxruntime":
        return OnnxMapsEngine(model, threads=threads, workdir=workdir)
    raise ValueError(f"unknown engine kind {kind!r}; choose from {ENGINE_KINDS}")
