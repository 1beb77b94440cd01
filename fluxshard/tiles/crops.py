"""Critical blocks (v2 4.1), salience order and budget (4.2-4.3), crops (4.5).

Blocks are ``block``-pixel squares on the padded frame grid (the model input's size, a multiple
of 32). A crop is a rectangle of whole 32-px cells: its ``interior`` (the blocks it was made
for) is written back into the output cache, the rest is halo (context) and is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np
from fluxshard.motion.field import MV_BLOCK
from fluxshard.tiles.kernels import mark_rectangles, outside_shares

SNAP = 32  # the model's largest stride: crops on this grid keep every level's cells aligned
# crop sides, pixels: every 32 up to 256 (small crops: padding would cost more than a call),
# coarser above (large crops are few; fewer shapes batch better)
BUCKETS = (64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024)
UNIFY_GROWTH = 1.4  # crops grow to one shape (one batched call) while the area grows this much at most
MIN_FILL = 0.6  # a crop rectangle this full of needed blocks is not worth cutting further


def outside_share(field: np.ndarray, height: int, width: int, block: int) -> np.ndarray:
    """Per ``block``: the share of its pixels whose source (pixel + vector) lies outside the
    previous frame, from each 4x4 motion block's vector (the share of its columns and rows
    that fall outside); blocks cut by the field's edge average the motion blocks they have."""
    field = np.ascontiguousarray(field, np.float32)
    k = block // MV_BLOCK
    share = np.empty((-(-field.shape[0] // k), -(-field.shape[1] // k)), np.float32)
    outside_shares(field, height, width, MV_BLOCK, k, share)
    return share


def pad_grid(mask: np.ndarray, shape: tuple[int, int], fill=False) -> np.ndarray:
    """A frame-size block grid on the padded input's grid (the padding is static grey)."""
    out = np.full(shape, fill, dtype=mask.dtype)
    out[:mask.shape[0], :mask.shape[1]] = mask[:shape[0], :shape[1]]
    return out


def boxes_to_blocks(boxes: np.ndarray, grid: tuple[int, int], block: int) -> np.ndarray:
    """(grid) bool: blocks overlapping any xyxy box."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    mask = np.zeros(grid, bool)
    mark_rectangles(*_block_ranges(boxes, grid, block), mask)
    return mask


def _block_ranges(boxes: np.ndarray, grid: tuple[int, int], block: int):
    """Each xyxy box's block rows and columns [r0, r1) x [c0, c1), clipped to ``grid``."""
    h, w = grid
    c0 = np.clip(np.floor(boxes[:, 0] / block), 0, w).astype(np.int64)
    r0 = np.clip(np.floor(boxes[:, 1] / block), 0, h).astype(np.int64)
    c1 = np.clip(np.ceil(boxes[:, 2] / block), 0, w).astype(np.int64)
    r1 = np.clip(np.ceil(boxes[:, 3] / block), 0, h).astype(np.int64)
    return r0, c0, r1, c1


def boxes_in_part(boxes: np.ndarray, blocks: np.ndarray, block: int) -> np.ndarray:
    """(N,) bool: which xyxy boxes overlap ``blocks`` and reach past them (a summed-area
    count of the set blocks under every box at once)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    r0, c0, r1, c1 = _block_ranges(boxes, blocks.shape, block)
    sat = np.zeros((blocks.shape[0] + 1, blocks.shape[1] + 1), np.int64)
    sat[1:, 1:] = blocks.cumsum(0).cumsum(1)
    inside = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return (inside > 0) & (inside < (r1 - r0) * (c1 - c0))


def touched_regions(regions: np.ndarray, touch: np.ndarray) -> np.ndarray:
    """The connected regions (4-connected) of ``regions`` that share a cell with ``touch``."""
    count, labels = cv2.connectedComponents(np.ascontiguousarray(regions).view(np.uint8),
                                            connectivity=4)
    hit = np.zeros(count, bool)
    hit[labels[touch & regions]] = True
    hit[0] = False
    return hit[labels]


def grow(mask: np.ndarray, blocks: int) -> np.ndarray:
    """``mask`` grown by ``blocks`` cells in every direction (a square dilation)."""
    if blocks <= 0:
        return mask
    grown = cv2.dilate(np.ascontiguousarray(mask).view(np.uint8),
                       np.ones((2 * blocks + 1,) * 2, np.uint8))
    return grown.view(bool)


@dataclass(frozen=True)
class Halo:
    """The context crops add around the blocks they are for: ``pixels`` around every block and
    ``near_pixels`` around the blocks of ``near`` (blocks on or next to a detected object:
    whether its box is found again depends on more of its surroundings than whether plain
    background changed). A crop that holds any block of ``near`` takes ``near_pixels``."""

    pixels: int
    block: int
    near: np.ndarray | None = None
    near_pixels: int | None = None

    def __post_init__(self):
        if self.near is not None and self.near_pixels in (None, self.pixels):
            object.__setattr__(self, "near", None)

    def blocks(self, pixels: int) -> int:
        return -(-pixels // self.block)

    def around(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` grown by its halo (on the block grid)."""
        if self.near is None:
            return grow(mask, self.blocks(self.pixels))
        near = mask & self.near
        return grow(mask & ~near, self.blocks(self.pixels)) | grow(near, self.blocks(self.near_pixels))

    def wider(self, pixels: int) -> "Halo":
        """This halo with ``pixels`` more everywhere."""
        return replace(self, pixels=self.pixels + pixels,
                       near_pixels=None if self.near is None else self.near_pixels + pixels)

    def pixels_for(self, mask: np.ndarray, r0: int, c0: int, r1: int, c1: int) -> int:
        """The halo of a crop whose interior is ``mask``'s [r0, r1) x [c0, c1)."""
        if self.near is not None and (mask[r0:r1, c0:c1] & self.near[r0:r1, c0:c1]).any():
            return self.near_pixels
        return self.pixels


def salience_order(misses: np.ndarray, salient: np.ndarray, age: np.ndarray,
                   change: np.ndarray) -> np.ndarray:
    """Flat indices of the missed blocks, most urgent first: blocks overlapping the projected
    previous detections first, then older blocks, then larger change (v2 4.2)."""
    idx = np.flatnonzero(misses)
    keys = (-change.ravel()[idx], -age.ravel()[idx], ~salient.ravel()[idx])
    return idx[np.lexsort(keys)]  # lexsort: the last key is the primary one


def halo_area(mask: np.ndarray, halo: Halo) -> int:
    """Blocks covered by ``mask`` grown by the halo: the area crops for it will cover, roughly
    (before snapping and bucketing)."""
    return int(np.count_nonzero(halo.around(mask)))


def take_within_budget(order: np.ndarray, grid: tuple[int, int], halo: Halo,
                       budget_blocks: int, start: np.ndarray | None = None) -> np.ndarray:
    """The longest prefix of ``order`` whose blocks, with ``start`` (blocks already taken),
    grown by the halo stay within ``budget_blocks``: the taken mask (the rest are deferred).
    The grown area only rises along the order, so the prefix is found by bisection (a few
    dilations of the small block grid, not one step per block)."""
    base = np.zeros(grid, bool) if start is None else start.copy()

    def with_prefix(k: int) -> np.ndarray:
        taken = base.copy()
        taken.flat[order[:k]] = True
        return taken

    if halo_area(with_prefix(len(order)), halo) <= budget_blocks:
        return with_prefix(len(order))
    lo, hi = 0, len(order)  # with_prefix(lo) fits (or is the start alone), with_prefix(hi) not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if halo_area(with_prefix(mid), halo) <= budget_blocks:
            lo = mid
        else:
            hi = mid
    return with_prefix(lo)


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


def _tight(mask: np.ndarray, r0: int, c0: int, r1: int, c1: int):
    """The bounding box of ``mask``'s set cells inside [r0, r1) x [c0, c1), or None."""
    sub = mask[r0:r1, c0:c1]
    rows, cols = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
    if not len(rows):
        return None
    return r0 + rows[0], c0 + cols[0], r0 + rows[-1] + 1, c0 + cols[-1] + 1


def _cut_costs(m: np.ndarray):
    """For every cut between rows k-1 and k of ``m`` that leaves set cells on both sides: the
    cost (summed bounding-box area, then minus the fuller part's fill and size, for ties) and
    k. Vectorized over the cuts: bounding boxes come from running ORs from either end."""
    n, w = m.shape
    if n < 2:
        return []
    rows = m.any(1)
    idx = np.arange(n)
    last_above = np.maximum.accumulate(np.where(rows, idx, -1))  # [k]: last set row <= k
    first_below = np.minimum.accumulate(np.where(rows, idx, n)[::-1])[::-1]  # first set row >= k
    top, bottom = int(np.argmax(rows)), n - 1 - int(np.argmax(rows[::-1]))
    cols_top = np.logical_or.accumulate(m, axis=0)[:-1]  # cut k: columns set in rows < k
    cols_bot = np.logical_or.accumulate(m[::-1], axis=0)[::-1][1:]  # ... in rows >= k
    k = np.arange(1, n)
    ok = (last_above[:-1] >= 0) & (first_below[1:] < n)
    width = lambda c: w - np.argmax(c[:, ::-1], axis=1) - np.argmax(c, axis=1)  # noqa: E731
    a_area = (last_above[:-1] - top + 1) * width(cols_top)
    b_area = (bottom - first_below[1:] + 1) * width(cols_bot)
    count = np.cumsum(m.sum(1))
    a_n, b_n = count[:-1], count[-1] - count[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        a_fill, b_fill = a_n / a_area, b_n / b_area
    a_wins = (a_fill > b_fill) | ((a_fill == b_fill) & (a_area >= b_area))
    fill = np.where(a_wins, a_fill, b_fill)
    size = np.where(a_wins, a_area, b_area)
    return [((int(a_area[i] + b_area[i]), -float(fill[i]), -int(size[i])), int(k[i]))
            for i in np.flatnonzero(ok)]


def split_rectangles(mask: np.ndarray, min_fill: float = MIN_FILL) -> list[tuple[int, int, int, int]]:
    """Cover ``mask``'s set cells with rectangles (r0, c0, r1, c1) each filled at least
    ``min_fill`` or a single row/column: a rectangle that is too empty (an L-shaped edge strip
    and an object far apart, a ring along the borders) is cut where the two parts' bounding
    boxes add up to the least area (the fuller part on ties), recursively. A mask whose bounding
    box is too empty is first taken apart into its connected parts (one cheap pass instead of
    many cuts when blocks are scattered)."""
    whole = _tight(mask, 0, 0, *mask.shape)
    if whole is None:
        return []
    r0, c0, r1, c1 = whole
    if mask[r0:r1, c0:c1].sum() >= min_fill * (r1 - r0) * (c1 - c0):
        return [tuple(int(v) for v in whole)]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                               connectivity=8)
    out = []
    for k in range(1, count):
        x, y, w, h, _ = stats[k]
        part = labels[y:y + h, x:x + w] == k
        out.extend((a + y, b + x, c + y, d + x) for a, b, c, d in _cut(part, min_fill))
    return _merge_aligned(out)


def _cut(mask: np.ndarray, min_fill: float) -> list[tuple[int, int, int, int]]:
    out = []
    stack = [b for b in [_tight(mask, 0, 0, *mask.shape)] if b is not None]
    while stack:
        r0, c0, r1, c1 = stack.pop()
        area = (r1 - r0) * (c1 - c0)
        if mask[r0:r1, c0:c1].sum() >= min_fill * area or r1 - r0 == 1 or c1 - c0 == 1:
            out.append((r0, c0, r1, c1))
            continue
        best, parts = None, None
        sub = mask[r0:r1, c0:c1]
        for axis in (0, 1):
            m = sub if axis == 0 else sub.T  # cut between rows of m
            for cost, cut in _cut_costs(m):
                if best is None or cost < best:
                    best = cost
                    if axis == 0:
                        parts = (_tight(mask, r0, c0, r0 + cut, c1), _tight(mask, r0 + cut, c0, r1, c1))
                    else:
                        parts = (_tight(mask, r0, c0, r1, c0 + cut), _tight(mask, r0, c0 + cut, r1, c1))
        if parts is None:
            out.append((r0, c0, r1, c1))
        else:
            stack.extend(parts)
    return out


def _merge_aligned(rects: list) -> list:
    """Join rectangles that share a whole side (their union is their sum): one crop, not two."""
    rects = [tuple(int(v) for v in r) for r in rects]
    merged = True
    while merged:
        merged = False
        for i in range(len(rects)):
            for j in range(i + 1, len(rects)):
                a, b = rects[i], rects[j]
                u = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                area = lambda q: (q[2] - q[0]) * (q[3] - q[1])  # noqa: E731
                if area(u) == area(a) + area(b):
                    rects[i] = u
                    del rects[j]
                    merged = True
                    break
            if merged:
                break
    return rects


def plan_crops(selected: np.ndarray, block: int, halo: "int | Halo",
               input_hw: tuple[int, int]) -> list[Crop]:
    """Cover the selected blocks with crops: the blocks grown by the halo (pixels, or a
    :class:`Halo`; so neighbours whose contexts touch share a crop) are cut into well-filled
    rectangles (``split_rectangles``); each rectangle's selected blocks are its interior, which
    grows by its halo, snaps to 32 px, is bucketed to a few sizes and clamped into the frame."""
    H, W = input_hw
    if not selected.any():
        return []
    if not isinstance(halo, Halo):
        halo = Halo(halo, block)
    crops = []
    for rect in split_rectangles(halo.around(selected)):
        inner = _tight(selected, *rect)
        if inner is None:
            continue
        r0, c0, r1, c1 = inner
        pad = halo.pixels_for(selected, r0, c0, r1, c1)
        iy0, iy1 = r0 * block, min(r1 * block, H)
        ix0, ix1 = c0 * block, min(c1 * block, W)
        y0 = max(iy0 - pad, 0) // SNAP * SNAP
        x0 = max(ix0 - pad, 0) // SNAP * SNAP
        y1 = min(-(-(iy1 + pad) // SNAP) * SNAP, H)
        x1 = min(-(-(ix1 + pad) // SNAP) * SNAP, W)
        h, w = _bucket(y1 - y0, H), _bucket(x1 - x0, W)
        cy, cx = _place(y0, y1, h, H), _place(x0, x1, w, W)
        # the snapped window must still hold the interior; grow to the next bucket if not
        while cy > iy0 or cy + h < iy1:
            h = _bucket(h + SNAP, H)
            cy = _place(y0, y1, h, H)
        while cx > ix0 or cx + w < ix1:
            w = _bucket(w + SNAP, W)
            cx = _place(x0, x1, w, W)
        crops.append(Crop(int(cy), int(cx), int(h), int(w),
                          (int(iy0), int(ix0), int(iy1), int(ix1))))
    return crops


def unify_shapes(crops: list[Crop], input_hw: tuple[int, int],
                 max_growth: float = UNIFY_GROWTH) -> list[Crop]:
    """Grow a frame's crops to one shape (the largest height and width among them) when that
    costs at most ``max_growth`` times their area: one batched call runs faster than a call per
    shape even with the extra pixels (which only add context around each interior)."""
    shapes = {(c.h, c.w) for c in crops}
    if len(shapes) <= 1:
        return crops
    H, W = input_hw
    h, w = max(c.h for c in crops), max(c.w for c in crops)
    if len(crops) * h * w > max_growth * sum(c.h * c.w for c in crops):
        return crops
    return [Crop(_place(c.y0, c.y0 + c.h, h, H), _place(c.x0, c.x0 + c.w, w, W), h, w, c.interior)
            for c in crops]
