"""YOLO11 detect/segment in plain PyTorch: building, weights, decoding, NMS, dense baselines.
Model families register in ``families``; importing a family's module registers it."""

from .export import export_onnx
from .families import ModelFamily, family_named, register_family
from .ops import Detections, non_max_suppression, postprocess, preprocess
from .weights import CheckpointError, load_model, save_checkpoint
from .yolo import (SCALES, TASKS, YOLO11, LayerSpec, build_yolo11, describe_layers, fuse, is_fused,
                   yolo11_config)
from .darknet import DarknetModel, load_darknet  # registers the Darknet family after YOLO11

__all__ = ["SCALES", "TASKS", "YOLO11", "LayerSpec", "build_yolo11", "describe_layers", "fuse",
           "is_fused", "yolo11_config", "Detections", "non_max_suppression", "postprocess",
           "preprocess", "CheckpointError", "load_model", "save_checkpoint", "export_onnx",
           "ModelFamily", "family_named", "register_family", "DarknetModel", "load_darknet"]
