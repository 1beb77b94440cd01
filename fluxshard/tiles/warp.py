"""Carrying the cached head maps (whole cells with their sub-cell place) and per-block
bookkeeping along a backward motion field
(docs/CONVENTIONS.md, "Motion fields": pixel (x, y) of the current frame came from (x+dx, y+dy)).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

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
    if (hb, wb) != (gh * k, gw * k):
        padded = np.zeros((gh * k, gw * k, 2), np.float32)
        padded[:min(hb, gh * k), :min(wb, gw * k)] = field[:gh * k, :gw * k]
        field = padded
    # INTER_AREA at an integer factor is the exact window mean
    return cv2.resize(field, (gw, gh), interpolation=cv2.INTER_AREA) * (1.0 / stride)


# the 3x3 neighbourhood, the centre first (argmin keeps the first of equal distances)
_NEIGHBOURS = np.array([(0, 0)] + [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                                   if (dy, dx) != (0, 0)], np.int32)


@functools.lru_cache(maxsize=16)
def _cell_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ys, xs


def carry_map(cache: torch.Tensor, offset: np.ndarray, field_grid: np.ndarray
              ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Move a cached map (1, C, H, W) along a field in grid units (H, W, 2) without resampling.

    Each cell's content is tracked with its sub-cell ``offset`` (H, W, 2), x then y: the content
    of cell n lies at n + offset[n]. Every new cell takes the whole content of the old cell
    nearest to where its source lies, and records where that content now is; decoding shifts
    each box by its cell's offset. So logits are never blurred (bilinear resampling every
    frame smears a slowly moving object's class peak until it drops below the threshold) and
    boxes keep their sub-pixel place. Returns (map, offset, miss): miss marks cells whose
    source lies outside the map."""
    _, c, h, w = cache.shape
    if not field_grid.any() and not offset.any():  # nothing moved: the cache as it is
        return cache, offset, np.zeros((h, w), bool)
    ys, xs = _cell_grid(h, w)
    qx = xs + field_grid[..., 0]
    qy = ys + field_grid[..., 1]
    miss = (qx < -0.5) | (qx > w - 0.5) | (qy < -0.5) | (qy > h - 0.5)
    # the old cell whose content lies nearest the source, among the 3x3 around it (its own
    # offset taken into account; a wider or chained search lets offsets run away where
    # neighbouring cells move differently)
    cy = np.floor(qy + 0.5).astype(np.int32)
    cx = np.floor(qx + 0.5).astype(np.int32)
    ty = np.clip(cy[None] + _NEIGHBOURS[:, 0, None, None], 0, h - 1)  # (9, h, w)
    tx = np.clip(cx[None] + _NEIGHBOURS[:, 1, None, None], 0, w - 1)
    flat = (ty * w + tx).reshape(9, -1)
    ex = tx.reshape(9, -1) + offset[..., 0].ravel()[flat] - qx.ravel()
    ey = ty.reshape(9, -1) + offset[..., 1].ravel()[flat] - qy.ravel()
    pick = np.argmin(ex * ex + ey * ey, axis=0)  # first minimum: the centre on ties
    cells = np.arange(h * w)
    index = flat[pick, cells]
    moved = np.stack([ex[pick, cells], ey[pick, cells]], -1).reshape(h, w, 2)
    moved[miss] = 0.0
    index = torch.from_numpy(index.astype(np.int64))
    carried = cache.reshape(c, h * w).index_select(1, index).reshape(1, c, h, w)
    return carried, moved.astype(np.float32), miss


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


ZOOM_DEADBAND = 0.004  # relative scale changes below this are codec noise, not zoom


def scale_carried_boxes(carried: torch.Tensor, field_grid: np.ndarray, anchors_per_cell: int = 1
                        ) -> None:
    """Under zoom a carried cell's box grows or shrinks with the field: a backward field whose
    x component changes by g per cell (its local divergence along x) maps content of width w
    to w / (1 + g). Scales each anchor slot's centre offset and size of ``carried`` (1,
    K*(4 + nc), h, w), in place, from the field in grid units smoothed over 3x3 cells."""
    h, w = field_grid.shape[:2]
    if h < 2 or w < 2:
        return
    gx = cv2.blur(np.gradient(field_grid[..., 0], axis=1), (3, 3))
    gy = cv2.blur(np.gradient(field_grid[..., 1], axis=0), (3, 3))
    zx = 1.0 / np.clip(1.0 + gx, 0.5, 2.0)
    zy = 1.0 / np.clip(1.0 + gy, 0.5, 2.0)
    zx[np.abs(zx - 1.0) < ZOOM_DEADBAND] = 1.0
    zy[np.abs(zy - 1.0) < ZOOM_DEADBAND] = 1.0
    if (zx == 1.0).all() and (zy == 1.0).all():
        return
    per_slot = carried.shape[1] // anchors_per_cell
    tx, ty = torch.from_numpy(zx.astype(np.float32)), torch.from_numpy(zy.astype(np.float32))
    for k in range(anchors_per_cell):
        base = k * per_slot
        carried[0, base + 0] *= tx  # centre offset x, then y, then width, height
        carried[0, base + 1] *= ty
        carried[0, base + 2] *= tx
        carried[0, base + 3] *= ty


def motion_boundaries(field_px: np.ndarray, threshold: float) -> np.ndarray:
    """(h, w) bool: cells whose mean vector (pixels) differs from a 4-neighbour's by more than
    ``threshold``: where content moves apart or one object passes another, a carried cell's
    receptive field mixes both and its value is no longer either's."""
    d = np.asarray(field_px, np.float32)
    out = np.zeros(d.shape[:2], bool)
    dx = np.hypot(*(d[:, 1:] - d[:, :-1]).transpose(2, 0, 1)) > threshold
    dy = np.hypot(*(d[1:] - d[:-1]).transpose(2, 0, 1)) > threshold
    out[:, 1:] |= dx
    out[:, :-1] |= dx
    out[1:] |= dy
    out[:-1] |= dy
    return out
