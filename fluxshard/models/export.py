"""ONNX export of the dense YOLO11 (the onnxruntime dense baseline)."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch

from .yolo import YOLO11


def export_onnx(model: YOLO11, path: str | os.PathLike, imgsz: tuple[int, int] = (384, 640),
                opset: int = 17, batch: int = 1) -> Path:
    """Export the eval-mode model with a static input ``images`` (batch, 3, *imgsz).

    Outputs: ``output0`` (B, 4 + nc [+ 32], A) decoded as in eval forward, and for segment models
    ``output1``, the prototypes. The caller's model is left untouched (a copy is exported).
    """
    h, w = imgsz
    if h % 32 or w % 32:
        raise ValueError(f"imgsz must be multiples of 32, got {imgsz}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).float().cpu().eval()
    x = torch.zeros(batch, 3, h, w)
    outputs = ["output0", "output1"] if m.task == "segment" else ["output0"]
    with torch.no_grad(), warnings.catch_warnings():
        # Shape checks and anchor grids become constants: intended, the input shape is static.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter notice
        # The TorchScript exporter: the dynamo one needs onnxscript, which we do not ship.
        torch.onnx.export(m, (x,), str(path), input_names=["images"], output_names=outputs,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    return path


def onnxruntime_session(path: str | os.PathLike, threads: int = 2):
    """An onnxruntime CPU session with all graph optimizations and ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle ORT workers otherwise spin for a while after each run, stealing the (shared, few) cores
    # from whatever runs next, e.g. the torch runner timed right after it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
