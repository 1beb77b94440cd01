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
from fluxshard.tiles.kernels import nearest_contents


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
    nearest to where its source lies (among the 3x3 around it, its own offset taken into
    account: a wider or chained search lets offsets run away where neighbouring cells move
    differently), and records where that content now is; decoding shifts each box by its
    cell's offset. So logits are never blurred (bilinear resampling every frame smears a slowly
    moving object's class peak until it drops below the threshold) and boxes keep their
    sub-pixel place. Returns (map, offset, miss): miss marks cells whose source lies outside
    the map. One level of :func:`carry_maps`."""
    return carry_maps([cache], [offset], [field_grid])[0]


@functools.lru_cache(maxsize=16)
def _level_tables(shapes: tuple[tuple[int, int], ...]):
    """Per cell of every level, concatenated: row, column (float32), the level's height and
    width, and the flat index of the level's first cell (cached per grid shapes)."""
    ys, xs, hs, ws, base = [], [], [], [], []
    start = 0
    for h, w in shapes:
        y, x = _cell_grid(h, w)
        ys.append(y.ravel()), xs.append(x.ravel())
        hs.append(np.full(h * w, h, np.int32)), ws.append(np.full(h * w, w, np.int32))
        base.append(np.full(h * w, start, np.int64))
        start += h * w
    return tuple(np.concatenate(a) for a in (ys, xs, hs, ws, base))


def carry_maps(caches: list[torch.Tensor], offsets: list[np.ndarray],
               field_grids: list[np.ndarray]):
    """:func:`carry_map` for every level of the head at once (one nearest-cell search over all
    levels' cells): returns per level (map, offset, miss)."""
    if not any(f.any() for f in field_grids) and not any(o.any() for o in offsets):
        return [(c, o, np.zeros(o.shape[:2], bool)) for c, o in zip(caches, offsets)]
    shapes = tuple(tuple(o.shape[:2]) for o in offsets)
    ys, xs, hs, ws, base = _level_tables(shapes)
    f = np.concatenate([g.reshape(-1, 2) for g in field_grids], dtype=np.float32)
    off = np.concatenate([o.reshape(-1, 2) for o in offsets], dtype=np.float32)
    # only cells that move or hold moved content search; the rest keep their own content (a
    # still camera's background: most of the map)
    n_cells = len(xs)
    index = np.arange(n_cells, dtype=np.int64)
    moved = np.zeros((n_cells, 2), np.float32)
    miss = np.zeros(n_cells, bool)
    # the old cell whose content lies nearest the source, among the 3x3 around it (see
    # carry_map)
    nearest_contents(xs, ys, hs, ws, base, f, off, _NEIGHBOURS, index, moved, miss)
    out, start = [], 0
    for cache, (h, w) in zip(caches, shapes):
        n, c = h * w, cache.shape[1]
        local = torch.from_numpy(index[start:start + n] - start)
        carried = cache.reshape(c, n).index_select(1, local).reshape(1, c, h, w)
        out.append((carried, moved[start:start + n].reshape(h, w, 2),
                    miss[start:start + n].reshape(h, w)))
        start += n
    return out


def block_sources(field: np.ndarray, grid: tuple[int, int], block: int):
    """Where each ``block``-pixel block's content came from (the block its centre's vector
    points at): (rows, cols, inside) for :func:`carry_blocks`, computed once per frame for
    every per-block array."""
    hb, wb = grid
    k = block // MV_BLOCK
    f = np.asarray(field, np.float32)
    cy = np.minimum(np.arange(hb) * k + k // 2, f.shape[0] - 1)
    cx = np.minimum(np.arange(wb) * k + k // 2, f.shape[1] - 1)
    d = f[cy[:, None], cx[None, :]]  # (hb, wb, 2): vector at each block centre
    sy = np.floor(np.arange(hb)[:, None] + d[..., 1] / block + 0.5).astype(np.int64)
    sx = np.floor(np.arange(wb)[None, :] + d[..., 0] / block + 0.5).astype(np.int64)
    inside = (sy >= 0) & (sy < hb) & (sx >= 0) & (sx < wb)
    return sy[inside], sx[inside], inside


def carry_blocks(values: np.ndarray, sources, fill) -> np.ndarray:
    """A per-block array (age, deferred flags) carried to the current frame: each block takes
    the value of its source block (:func:`block_sources`); blocks whose source is outside get
    ``fill``."""
    sy, sx, inside = sources
    out = np.full_like(values, fill)
    out[inside] = values[sy, sx]
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


ZOOM_DEADBAND = 0.002  # relative scale changes below this are codec noise, not zoom
ZOOM_MIN_FIT = 0.5  # share of the field's variance a zoom must explain to count as one


def camera_zoom(field: np.ndarray) -> tuple[float, float] | None:
    """The camera's zoom between two frames from the backward field (motion blocks, pixels),
    as the scale (x, y) content grew by, or None when the field is no zoom. A zoom by z about
    any centre makes each component linear in position with slope 1/z - 1; fitted over the
    whole field (a zoom is the camera's, field-wide), and taken only where that line explains
    most of the component's variance: the edges of a moving object have steep local slopes
    that are no zoom, and scaling the boxes there would shrink them."""
    f = np.asarray(field, np.float32)
    hb, wb = f.shape[:2]
    if hb < 4 or wb < 4 or not f.any():
        return None
    # per component: its mean at each position along its axis, and its spread over the whole
    # field; the fitted line's residual is that spread less what the line explains
    scales = []
    for axis in (0, 1):  # x (component 0) varies along columns, y (component 1) along rows
        values = f[..., axis].copy()
        along = values.mean(axis=axis)  # one mean per column (x) or row (y)
        values -= values.mean()
        total = float(np.dot(values.ravel(), values.ravel()))
        pos = np.arange(len(along), dtype=np.float32) * MV_BLOCK
        pos -= pos.mean()
        spread = float(np.dot(pos, pos))
        slope = float(np.dot(pos, along)) / spread
        residual = total - values.shape[axis] * slope * slope * spread
        if total <= 0 or residual > (1 - ZOOM_MIN_FIT) * total or abs(slope) < ZOOM_DEADBAND:
            return None
        scales.append(1.0 / (1.0 + slope))
    zx, zy = scales
    return (zx, zy) if 0.5 <= zx <= 2 and 0.5 <= zy <= 2 else None


def scale_carried_boxes(carried: torch.Tensor, zoom: tuple[float, float],
                        anchors_per_cell: int = 1) -> None:
    """Under zoom a carried cell's box grows with the content: scale each anchor slot's centre
    offset and size of ``carried`` (1, K*(4 + nc), h, w) by ``zoom`` (:func:`camera_zoom`), in
    place."""
    zx, zy = zoom
    per_slot = carried.shape[1] // anchors_per_cell
    for k in range(anchors_per_cell):
        base = k * per_slot
        carried[0, base:base + 4:2] *= zx  # centre offset x and width
        carried[0, base + 1:base + 4:2] *= zy  # centre offset y and height


def textured_motion(field: np.ndarray, textured: np.ndarray, stride: int,
                    block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell of a stride-``stride`` map: the mean vector (pixels) of its textured
    ``block``-pixel blocks (``textured``: the padded input's block grid), and whether it has
    any (a flat cell: the mean of all its blocks). A flat block's vector is the encoder's
    arbitrary pick among equally good matches, so only textured blocks say how a cell's content
    moves."""
    k = stride // block
    gh, gw = textured.shape[0] // k, textured.shape[1] // k
    vectors = field_on_grid(field, block, textured.shape) * float(block)
    weights = textured.astype(np.float32)
    seen = weights.reshape(gh, k, gw, k).any((1, 3))
    weights[~np.repeat(np.repeat(seen, k, 0), k, 1)] = 1.0
    sums = (vectors * weights[..., None]).reshape(gh, k, gw, k, 2).sum((1, 3))
    return sums / weights.reshape(gh, k, gw, k).sum((1, 3))[..., None], seen


def motion_boundaries(field_px: np.ndarray, threshold: float,
                      seen: np.ndarray | None = None) -> np.ndarray:
    """(h, w) bool: cells whose mean vector (pixels) differs from a 4-neighbour's by more than
    ``threshold``: where content moves apart or one object passes another, a carried cell's
    receptive field mixes both and its value is no longer either's. ``seen`` (h, w): a pair
    counts only where the motion of one of its cells at least was seen (``textured_motion``):
    two flat neighbours' vectors are both noise."""
    d = np.asarray(field_px, np.float32)
    out = np.zeros(d.shape[:2], bool)
    dx = np.hypot(*(d[:, 1:] - d[:, :-1]).transpose(2, 0, 1)) > threshold
    dy = np.hypot(*(d[1:] - d[:-1]).transpose(2, 0, 1)) > threshold
    if seen is not None:
        dx &= seen[:, 1:] | seen[:, :-1]
        dy &= seen[1:] | seen[:-1]
    out[:, 1:] |= dx
    out[:, :-1] |= dx
    out[1:] |= dy
    out[:-1] |= dy
    return out
