"""YOLO11 detect/segment in plain PyTorch: building, weights, decoding, NMS, dense baselines."""

from .yolo import SCALES, TASKS, YOLO11, build_yolo11, fuse, is_fused, yolo11_config

__all__ = ["SCALES", "TASKS", "YOLO11", "build_yolo11", "fuse", "is_fused", "yolo11_config"]
