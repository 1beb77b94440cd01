"""The detection head's raw per-level maps (box logits + class logits, before decoding; a
segment head's mask coefficients and prototypes too): the graph every tile-executor engine (torch, onnxruntime, TensorRT) runs, and its ONNX export.

``raw_head_maps`` walks the model like ``YOLO11.forward`` but stops before ``Detect.decode``, so
crops of any size multiple of 32 can be merged into the per-stride output cache.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from fluxshard.models.families import run_layers
from fluxshard.models.yolo import YOLO11


def map_strides(head) -> tuple[int, ...]:
    """Input pixels per cell of each map the head's ``head_maps`` returns: its levels
    (``strides``), and a segment head's prototypes after them (``map_strides``)."""
    return tuple(int(s) for s in getattr(head, "map_strides", head.strides))


def raw_head_maps(model: YOLO11, x: torch.Tensor) -> list[torch.Tensor]:
    """The head's raw maps [(B, C, H/s, W/s) for s in map_strides(model.head)] of ``x``: per
    level ``head.no`` channels (a segment head's mask coefficients appended), then a segment
    head's prototypes."""
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
    """The raw-maps graph's output names, one per head map in the head's order: ``maps<stride>``
    (YOLO11: maps8, maps16, maps32; YOLO11-seg: those and maps4, the prototypes; YOLOv3-tiny:
    maps32, maps16)."""
    return tuple(f"maps{s}" for s in map_strides(model.head))


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
