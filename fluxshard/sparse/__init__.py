"""Sparse inference: MV-gather of per-layer caches, RFAP recompute masks, tile-batched masked
conv, truncation. One specification (spec.py), executed here in PyTorch on the model's device
(CPU or CUDA)."""

from .executor import FrameReport, LayerStats, SparseExecutor, StreamState
from .ops import TileConv, dilate_mask, masked_sparse_conv, mv_gather, window_uniform
from .rfap import GridPlan, RFAPPlan

__all__ = ["FrameReport", "LayerStats", "SparseExecutor", "StreamState", "TileConv",
           "dilate_mask", "masked_sparse_conv", "mv_gather", "window_uniform", "GridPlan",
           "RFAPPlan"]
