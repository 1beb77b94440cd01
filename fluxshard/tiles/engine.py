"""Dense engines that return the detection head's raw per-level maps (box DFL logits + class
logits, before decoding; a segment head's mask coefficients and prototypes too; raw_maps.py) for a batch of equally sized inputs: what the tile executor
runs its crop batches and full-frame refreshes on.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from fluxshard.models.export import onnxruntime_session
from fluxshard.models.yolo import YOLO11, fuse, is_fused

from .raw_maps import export_raw_maps_onnx, raw_head_maps

ENGINE_KINDS = ("torch", "onnxruntime", "tensorrt")


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
        if model.task != "detect":
            raise ValueError("the tensorrt crop engine serves detect heads only; run a "
                             f"{model.task} model's tiles on torch or onnxruntime")
        if engine_path is None:
            raise ValueError("the tensorrt engine needs engine_path (scripts/build_tiles_trt.sh)")
        return TensorRTMapsEngine(engine_path, channels=model.head.no)
    if kind == "torch":
        return TorchMapsEngine(model)
    if kind == "onnxruntime":
        return OnnxMapsEngine(model, threads=threads, workdir=workdir)
    raise ValueError(f"unknown engine kind {kind!r}; choose from {ENGINE_KINDS}")
