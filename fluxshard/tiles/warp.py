"""Warping the cached head maps and per-block bookkeeping with a backward motion field
(docs/CONVENTIONS.md, "Motion fields": pixel (x, y) of the current frame came from (x+dx, y+dy)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fluxshard.motion.field import MV_BLOCK


def field_on_grid(field: np.ndarray, stride: int, grid: tuple[int, int]) -> np.ndarray:
    """The field in grid units on a stride-``stride`` map of shape ``grid``: the mean vector of
    each stride window divided by the stride. The mean, not one sample of the window (as
    ``field_at_stride`` takes), keeps a smooth field (zoom) centred on the cell. Cells beyond the
    field (bottom/right padding of the frame) get zero motion: the padding is static grey."""
    field = np.asarray(field, np.float32)
    k = stride // MV_BLOCK
    if k < 1 or stride % MV_BLOCK:
        raise ValueError(f"stride must be a multiple of {MV_BLOCK}, got {stride}")
    gh, gw = grid
    hb, wb = field.shape[:2]
    padded = np.zeros((gh * k, gw * k, 2), np.float32)
    padded[:min(hb, gh * k), :min(wb, gw * k)] = field[:gh * k, :gw * k]
    return padded.reshape(gh, k, gw, k, 2).mean(axis=(1, 3)) / stride


def warp_map(cache: torch.Tensor, field_grid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp a cached map (1, C, H, W) by a field in grid units (H, W, 2). Returns the warped map
    and a (H, W) bool miss mask: positions whose source lies outside the map.

    Whole-cell displacements gather exactly (an integer pan shifts the cache bit for bit);
    others sample bilinearly (grid_sample, align_corners=True: cell centres at integer
    coordinates)."""
    _, c, h, w = cache.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    sx = xs + field_grid[..., 0]
    sy = ys + field_grid[..., 1]
    # half a cell of slack at the borders: a sub-pixel source by the edge is still inside
    miss = (sx < -0.5) | (sx > w - 0.5) | (sy < -0.5) | (sy > h - 0.5)
    miss_t = torch.from_numpy(miss)
    if np.all(field_grid == np.round(field_grid)):
        ix = np.clip(sx, 0, w - 1).astype(np.int64)
        iy = np.clip(sy, 0, h - 1).astype(np.int64)
        flat = cache.reshape(c, h * w)
        warped = flat[:, torch.from_numpy(iy * w + ix).reshape(-1)].reshape(1, c, h, w)
        return warped, miss_t
    gx = np.clip(sx, 0, w - 1) * (2.0 / max(w - 1, 1)) - 1.0
    gy = np.clip(sy, 0, h - 1) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.from_numpy(np.stack([gx, gy], -1)[None].astype(np.float32))
    warped = F.grid_sample(cache, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped, miss_t


def warp_blocks(values: np.ndarray, field: np.ndarray, block: int, fill) -> np.ndarray:
    """Carry a per-block array (age, deferred flags) along the field: each block takes the value
    of the block its centre came from (nearest); blocks whose source is outside get ``fill``."""
    hb, wb = values.shape
    k = block // MV_BLOCK
    f = np.asarray(field, np.float32)
    cy = np.minimum(np.arange(hb) * k + k // 2, f.shape[0] - 1)
    cx = np.minimum(np.arange(wb) * k + k // 2, f.shape[1] - 1)
    d = f[cy[:, None], cx[None, :]]  # (hb, wb, 2): vector at each block centre
    sy = np.floor(np.arange(hb)[:, None] + d[..., 1] / block + 0.5).astype(np.int64)
    sx = np.floor(np.arange(wb)[None, :] + d[..., 0] / block + 0.5).astype(np.int64)
    inside = (sy >= 0) & (sy < hb) & (sx >= 0) & (sx < wb)
    out = np.full_like(values, fill)
    out[inside] = values[sy[inside], sx[inside]]
    return out


def project_boxes(boxes: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Move xyxy boxes of the previous frame to the current one: by minus the vector at the
    box centre (a backward field points from the current frame to the previous one, so this is
    approximate where the object moves unlike its surroundings)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes):
        return boxes
    f = np.asarray(field, np.float32)
    cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2 / MV_BLOCK).astype(np.int64), 0, f.shape[1] - 1)
    cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2 / MV_BLOCK).astype(np.int64), 0, f.shape[0] - 1)
    d = f[cy, cx]
    return boxes - np.concatenate([d, d], axis=1)
