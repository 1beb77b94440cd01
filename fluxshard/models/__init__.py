"""YOLO11 detect/segment in plain PyTorch: building, weights, decoding, NMS, dense baselines."""

from .yolo import SCALES, TASKS, YOLO11, build_yolo11, fuse, is_fused, yolo11_config

__all__ = ["SCALES", "TASKS", "YOLO11", "build_yolo11", "fuse", "is_fused", "yolo11_config"]
from .ops import Detections, non_max_suppression, postprocess, preprocess
from .weights import CheckpointError, load_model, save_checkpoint
from .export import export_onnx

__all__ += ["Detections", "non_max_suppression", "postprocess", "preprocess", "CheckpointError",
            "load_model", "save_checkpoint", "export_onnx"]
