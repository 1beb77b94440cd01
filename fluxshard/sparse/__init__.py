"""Sparse inference: MV-gather of per-layer caches, RFAP recompute masks, tile-batched masked
conv, truncation. One specification (spec.py), executed here in PyTorch on the model's device
(CPU or CUDA)."""

from .bypass import AdaptiveBypass
from .executor import SparseExecutor
from .ops import TileConv, dilate_mask, masked_sparse_conv, mv_gather, window_uniform
from .rfap import GridPlan, RFAPPlan
from .rules import MaskRule, register
from .state import FrameContext, FrameReport, LayerStats, StreamState

__all__ = ["AdaptiveBypass", "FrameContext", "FrameReport", "LayerStats", "SparseExecutor",
           "StreamState", "TileConv", "dilate_mask", "masked_sparse_conv", "mv_gather",
           "window_uniform", "GridPlan", "RFAPPlan", "MaskRule", "register"]
