"""Critical blocks (v2 4.1), salience order and budget (4.2-4.3), crops (4.5).

Blocks are ``block``-pixel squares on the padded frame grid (the model input's size, a multiple
of 32). A crop is a rectangle of whole 32-px cells: its ``interior`` (the blocks it was made
for) is written back into the output cache, the rest is halo (context) and is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fluxshard.motion.field import warp

SNAP = 32  # the model's largest stride: crops on this grid keep every level's cells aligned
BUCKETS = (64, 128, 192, 256, 384, 512, 640, 768, 1024)  # crop sides, pixels


def block_mean_abs_diff(a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """Mean |a - b| over each block's pixels and channels, (ceil(H/b), ceil(W/b)) float32;
    blocks cut by the frame edge average the pixels they have."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).sum(axis=2, dtype=np.int32)
    h, w = diff.shape
    ph, pw = -h % block, -w % block
    counts = np.pad(np.ones((h, w), np.int32), ((0, ph), (0, pw)))
    diff = np.pad(diff, ((0, ph), (0, pw)))
    hr, wr = diff.shape[0] // block, diff.shape[1] // block
    sums = diff.reshape(hr, block, wr, block).sum(axis=(1, 3))
    n = counts.reshape(hr, block, wr, block).sum(axis=(1, 3)) * a.shape[2]
    return (sums / np.maximum(n, 1)).astype(np.float32)


def changed_blocks(frame: np.ndarray, previous: np.ndarray, field: np.ndarray, block: int
                   ) -> np.ndarray:
    """v2 4.1: each block's mean |frame - previous warped by the field| in grey levels (invalid,
    out-of-frame sources read as 0, so they differ by the frame's own brightness)."""
    return block_mean_abs_diff(frame, warp(previous, field), block)


def pad_grid(mask: np.ndarray, shape: tuple[int, int], fill=False) -> np.ndarray:
    """A frame-size block grid on the padded input's grid (the padding is static grey)."""
    out = np.full(shape, fill, dtype=mask.dtype)
    out[:mask.shape[0], :mask.shape[1]] = mask[:shape[0], :shape[1]]
    return out


def boxes_to_blocks(boxes: np.ndarray, grid: tuple[int, int], block: int) -> np.ndarray:
    """(grid) bool: blocks overlapping any xyxy box."""
    out = np.zeros(grid, bool)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float32).reshape(-1, 4):
        c0, r0 = max(int(x1 // block), 0), max(int(y1 // block), 0)
        c1, r1 = int(np.ceil(x2 / block)), int(np.ceil(y2 / block))
        if c1 > c0 and r1 > r0:
            out[r0:r1, c0:c1] = True
    return out


def salience_order(misses: np.ndarray, salient: np.ndarray, age: np.ndarray,
                   change: np.ndarray) -> np.ndarray:
    """Flat indices of the missed blocks, most urgent first: blocks overlapping the projected
    previous detections first, then older blocks, then larger change (v2 4.2)."""
    idx = np.flatnonzero(misses)
    keys = (-change.ravel()[idx], -age.ravel()[idx], ~salient.ravel()[idx])
    return idx[np.lexsort(keys)]  # lexsort: the last key is the primary one


def halo_area(mask: np.ndarray, halo_blocks: int) -> int:
    """Blocks covered by ``mask`` grown by the halo: the area crops for it will cover, roughly
    (before snapping and bucketing)."""
    if halo_blocks <= 0:
        return int(mask.sum())
    grown = ndimage.binary_dilation(mask, np.ones((2 * halo_blocks + 1,) * 2, bool))
    return int(grown.sum())


def take_within_budget(order: np.ndarray, grid: tuple[int, int], halo_blocks: int,
                       budget_blocks: int, start: np.ndarray | None = None) -> np.ndarray:
    """Take blocks in ``order`` while the halo-grown union stays within ``budget_blocks``;
    ``start``: blocks already taken. Returns the taken mask (the rest are deferred)."""
    taken = np.zeros(grid, bool) if start is None else start.copy()
    grown = np.zeros(grid, bool)
    if taken.any():
        grown = ndimage.binary_dilation(taken, np.ones((2 * halo_blocks + 1,) * 2, bool)) \
            if halo_blocks > 0 else taken.copy()
    used = int(grown.sum())
    h, w = grid
    for flat in order:
        r, c = divmod(int(flat), w)
        r0, r1 = max(r - halo_blocks, 0), min(r + halo_blocks + 1, h)
        c0, c1 = max(c - halo_blocks, 0), min(c + halo_blocks + 1, w)
        new = int((~grown[r0:r1, c0:c1]).sum())
        if used + new > budget_blocks:
            continue  # a block elsewhere may still fit (its halo may overlap what is taken)
        grown[r0:r1, c0:c1] = True
        used += new
        taken[r, c] = True
    return taken


@dataclass(frozen=True)
class Crop:
    y0: int  # crop rectangle in input pixels (multiples of 32; height/width one of BUCKETS
    x0: int  # or the whole input side)
    h: int
    w: int
    interior: tuple[int, int, int, int]  # (y0, x0, y1, x1) pixels: written back to the cache


def _bucket(side: int, limit: int) -> int:
    for b in BUCKETS:
        if b >= side:
            return min(b, limit)
    return limit


def _place(lo: int, hi: int, size: int, limit: int) -> int:
    """Start of a ``size`` window covering [lo, hi) as centred as the frame allows, on the grid."""
    start = (lo + hi - size) // 2
    start = max(0, min(start, limit - size))
    return start // SNAP * SNAP if start + size <= limit else 0


def plan_crops(selected: np.ndarray, block: int, halo: int, input_hw: tuple[int, int]
               ) -> list[Crop]:
    """Merge selected blocks into rectangles (connected components of the blocks grown by the
    halo, so neighbours whose contexts touch share one crop), grow by the halo, snap to 32 px,
    bucket each side to a few sizes and clamp into the frame."""
    H, W = input_hw
    if not selected.any():
        return []
    halo_blocks = -(-halo // block)
    grown = (ndimage.binary_dilation(selected, np.ones((2 * halo_blocks + 1,) * 2, bool))
             if halo_blocks else selected)
    labels, n = ndimage.label(grown)
    crops = []
    for sl in ndimage.find_objects(labels):
        inner = selected[sl] & (labels[sl] > 0)
        rows = np.flatnonzero(inner.any(1)) + sl[0].start
        cols = np.flatnonzero(inner.any(0)) + sl[1].start
        iy0, iy1 = rows[0] * block, min((rows[-1] + 1) * block, H)
        ix0, ix1 = cols[0] * block, min((cols[-1] + 1) * block, W)
        y0 = max(iy0 - halo, 0) // SNAP * SNAP
        x0 = max(ix0 - halo, 0) // SNAP * SNAP
        y1 = min(-(-(iy1 + halo) // SNAP) * SNAP, H)
        x1 = min(-(-(ix1 + halo) // SNAP) * SNAP, W)
        h, w = _bucket(y1 - y0, H), _bucket(x1 - x0, W)
        cy, cx = _place(y0, y1, h, H), _place(x0, x1, w, W)
        # the snapped window must still hold the interior; grow to the next bucket if not
        while cy > iy0 or cy + h < iy1:
            h = _bucket(h + SNAP, H)
            cy = _place(y0, y1, h, H)
        while cx > ix0 or cx + w < ix1:
            w = _bucket(w + SNAP, W)
            cx = _place(x0, x1, w, W)
        crops.append(Crop(cy, cx, h, w, (iy0, ix0, iy1, ix1)))
    return crops
