"""Block matching (v2 paper section 4.1): for each block of the current frame, the displacement
into the previous frame with the least mean absolute difference (SAD / pixels).

Vectorized and hierarchical so large motion stays cheap: a full search on a 1/4-resolution luma
pyramid level, then +-1 pixel refinements at 1/2 and full resolution, each also trying the parent
blocks' neighbours' vectors (helps at object borders) and zero (static content on a moving
background). A tiny penalty on vector length breaks ties on flat content towards small motion.
All candidates of all blocks are evaluated at once with numpy gathers; ``wanted`` restricts the
work to some blocks (the validation fallback needs only the blocks whose codec vector failed).

Exact integer arithmetic throughout (integer luma, a pyramid of 2x2 sums, int32 SADs, an integer
length penalty, argmin taking the first of equal costs): the field is the same on every CPU, which
float reductions and BLAS kernels (FMA, AVX-512) do not guarantee.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fluxshard.motion.field import MV_BLOCK, field_shape

MATCH_BLOCK = 8  # pixels per side at every pyramid level (4x4 field blocks come in 2x2 groups)
DEFAULT_RADIUS = 16  # pixels at full resolution
LENGTH_PENALTY = 0.02  # cost units (grey levels of mean abs difference) per pixel of length
# Costs are integers in 1/COST_SCALE of a SAD unit, so the length penalty keeps a fine resolution.
COST_SCALE = 256


def to_luma(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (H, W) int16 luma (BT.601 weights in 8-bit fixed point)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return image.astype(np.int16)
    if image.ndim == 3 and image.shape[2] == 3:
        rgb = image.astype(np.int32)
        y = (77 * rgb[..., 0] + 150 * rgb[..., 1] + 29 * rgb[..., 2] + 128) >> 8
        return y.astype(np.int16)
    raise ValueError(f"expected a (H, W) luma or (H, W, 3) RGB image, got shape {image.shape}")


def _replicate_border(img: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """``np.pad(img, ..., mode="edge")`` (an exact copy; OpenCV's is several times faster)."""
    if not (top or bottom or left or right):
        return img
    return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_REPLICATE)


def _any_2x2(mask: np.ndarray) -> np.ndarray:
    """(2H, 2W) bool -> (H, W): any of each 2x2 group (ORs of strided views)."""
    return mask[0::2, 0::2] | mask[1::2, 0::2] | mask[0::2, 1::2] | mask[1::2, 1::2]


def _downsample(img: np.ndarray) -> np.ndarray:
    # Sum, not mean: stays exact (4x the level's scale; 2 levels of uint8 fit int16).
    # Four strided slices: several times faster than a reshape-sum on a whole frame.
    return img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2]


def _length_penalty(vectors: np.ndarray, level: int, block: int) -> np.ndarray:
    """LENGTH_PENALTY in integer cost units at a level whose pixels sum 4**level full-resolution
    pixels. sqrt and one product are correctly rounded IEEE operations, then rounded to int."""
    length = np.sqrt((vectors.astype(np.int64) ** 2).sum(-1).astype(np.float64))
    per_px = LENGTH_PENALTY * block * block * (4 ** level) * COST_SCALE
    return np.rint(length * per_px).astype(np.int64)


def _offsets(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)  # (C, 2) (dy, dx)


class _Level:
    """One pyramid level: block patches of the current frame and window gathers from the previous
    (a sliding-window view, so one index per block and candidate). Source windows are clamped
    into a one-block border."""

    def __init__(self, cur: np.ndarray, prev: np.ndarray, blocks: np.ndarray, block: int,
                 level: int = 0):
        self.block, self.level = block, level
        # Edge-replicated border one block wide: border blocks whose source leaves the frame still
        # get a plausible match; sources further out are clamped.
        self.windows = sliding_window_view(_replicate_border(prev, block, block, block, block),
                                           (block, block))
        self.max_y, self.max_x = prev.shape[0] + block, prev.shape[1] + block
        self.y0, self.x0 = blocks[:, 0] * block + block, blocks[:, 1] * block + block
        grid = cur.reshape(cur.shape[0] // block, block, cur.shape[1] // block, block)
        self.cur = grid[blocks[:, 0], :, blocks[:, 1], :]  # (K, b, b)

    def sad(self, vectors: np.ndarray) -> np.ndarray:
        """vectors (K, C, 2) int (dy, dx) -> int32 SAD (K, C) in this level's units."""
        sy = np.clip(self.y0[:, None] + vectors[..., 0], 0, self.max_y)
        sx = np.clip(self.x0[:, None] + vectors[..., 1], 0, self.max_x)
        patches = self.windows[sy, sx]  # (K, C, b, b) int16
        k, c = sy.shape
        diff = np.abs(patches - self.cur[:, None]).reshape(k * c, self.block * self.block)
        # einsum's integer sum is exact in any order and faster than .sum(-1) on short rows;
        # level 0 (64 x 255) fits int16, coarser sums need int32.
        if self.level:
            diff = diff.astype(np.int32)
        return np.einsum("ij->i", diff).astype(np.int32).reshape(k, c)

    def costs(self, vectors: np.ndarray) -> np.ndarray:
        """vectors (K, C, 2) int (dy, dx) -> int64 cost (K, C): SAD x COST_SCALE plus the length
        penalty."""
        return self.sad(vectors).astype(np.int64) * COST_SCALE + _length_penalty(
            vectors, self.level, self.block)


def _neighbour_vectors(grid: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """The vectors of the 4 grid neighbours of each block (edge-clamped): (K, 4, 2)."""
    gh, gw = grid.shape[:2]
    out = []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        out.append(grid[np.clip(blocks[:, 0] + dy, 0, gh - 1), np.clip(blocks[:, 1] + dx, 0, gw - 1)])
    return np.stack(out, 1)


def _subpixel_offsets(level: _Level, best: np.ndarray) -> np.ndarray:
    """Quarter-pel refinement per axis by the equiangular (V-shape) fit that suits SAD costs:
    the minimum of two lines of equal slope through the costs at -1, 0, +1. Keeps composed
    fields from drifting by the integer rounding of every frame. (K, 2) (dy, dx) offsets."""
    # Raw SADs: the length penalty would pull every fit towards zero (a bias that composition
    # accumulates frame after frame).
    steps = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])
    around = level.sad(best[:, None, :] + steps[None]).astype(np.int64)  # (K, 5)
    best_cost, around = around[:, 0], around[:, 1:]
    offsets = np.zeros(best.shape, np.float32)
    for axis, (minus, plus) in enumerate(((0, 1), (2, 3))):
        cm, cp = around[:, minus], around[:, plus]
        slope = np.maximum(cm, cp) - best_cost
        # Quarter-pel steps: 4 * (cm - cp) / (2 slope), one correctly rounded division of exact
        # integers, then round half to even.
        with np.errstate(divide="ignore", invalid="ignore"):
            quarters = np.where(slope > 0, np.round(2.0 * (cm - cp) / slope), 0.0)
        offsets[:, axis] = np.clip(quarters, -2, 2) / 4
    return offsets


def match_blocks(current: np.ndarray, previous: np.ndarray, *, radius: int = DEFAULT_RADIUS,
                 wanted: np.ndarray | None = None,
                 subpixel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Backward motion of ``current`` relative to ``previous`` (both (H, W) luma or (H, W, 3) RGB,
    same size). Returns ``(field, cost)``: the field in the motion-layer layout
    ``(ceil(H/4), ceil(W/4), 2)`` float32 (quarter-pel with ``subpixel``, else integer) and the
    mean abs luma difference (float32, exact: SAD / 64) of the 8x8 match block at the chosen
    integer vector. ``wanted`` ((Hb, Wb) bool on the 4x4 grid) limits the
    search to those blocks; the others get zero vectors and NaN cost."""
    cur, prev = to_luma(current), to_luma(previous)
    if cur.shape != prev.shape:
        raise ValueError(f"frame sizes differ: {cur.shape} vs {prev.shape}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    height, width = cur.shape
    hb, wb = field_shape(height, width)[:2]
    # Levels: the coarsest searches at most +-4 level pixels.
    levels = 1 + max(0, math.ceil(math.log2(max(radius, 4) / 4)))
    unit = MATCH_BLOCK << (levels - 1)  # full-resolution pixels of one coarsest block
    ph, pw = -height % unit, -width % unit
    cur = _replicate_border(cur, 0, ph, 0, pw)
    prev = _replicate_border(prev, 0, ph, 0, pw)
    pyramid = [(cur, prev)]
    for _ in range(levels - 1):
        c, p = pyramid[-1]
        if 255 * 4 ** len(pyramid) > np.iinfo(np.int16).max:  # sums of 4**level pixels
            c, p = c.astype(np.int32), p.astype(np.int32)
        pyramid.append((_downsample(c), _downsample(p)))

    # Which blocks to solve at each level: the ancestors of wanted 4x4 blocks.
    fine_h, fine_w = cur.shape[0] // MATCH_BLOCK, cur.shape[1] // MATCH_BLOCK
    need = np.ones((fine_h, fine_w), bool)
    if wanted is not None:
        wanted = np.asarray(wanted, bool)
        if wanted.shape != (hb, wb):
            raise ValueError(f"wanted mask shape {wanted.shape} != field grid {(hb, wb)}")
        padded = np.zeros((fine_h * 2, fine_w * 2), bool)  # MATCH_BLOCK is 2 MV_BLOCKs
        padded[:hb, :wb] = wanted
        need = _any_2x2(padded)
    needs = [need]
    for _ in range(levels - 1):
        needs.append(_any_2x2(needs[-1]))

    grid = None  # vectors (dy, dx) of the previous (coarser) level, in that level's pixels
    for level in range(levels - 1, -1, -1):
        c, p = pyramid[level]
        need = needs[level]
        blocks = np.argwhere(need)
        lvl = _Level(c, p, blocks, MATCH_BLOCK, level)
        if grid is None:
            r = math.ceil(radius / (1 << level))
            candidates = np.broadcast_to(_offsets(r), (len(blocks), (2 * r + 1) ** 2, 2))
        else:
            parent = blocks // 2
            base = grid[parent[:, 0], parent[:, 1]] * 2  # (K, 2)
            r = 1
            local = base[:, None, :] + _offsets(r)[None]
            neighbours = _neighbour_vectors(grid, parent) * 2
            zero = np.zeros((len(blocks), 1, 2), np.int64)
            candidates = np.concatenate([local, neighbours, zero], 1)
        costs = lvl.costs(candidates)
        best = costs.argmin(1)  # the first of equal costs: exact costs make this reproducible
        rows = np.arange(len(blocks))
        chosen = candidates[rows, best]
        grid = np.zeros(need.shape + (2,), np.int64)
        grid[blocks[:, 0], blocks[:, 1]] = chosen
    cost_grid = np.full(need.shape, np.nan, np.float32)
    if len(blocks):  # level 0 now: take the penalty off again (exact)
        sad = (costs[rows, best] - _length_penalty(chosen, 0, MATCH_BLOCK)) // COST_SCALE
        cost_grid[blocks[:, 0], blocks[:, 1]] = sad / (MATCH_BLOCK * MATCH_BLOCK)
    vectors = grid.astype(np.float32)
    if subpixel and len(blocks):
        vectors[blocks[:, 0], blocks[:, 1]] += _subpixel_offsets(
            lvl, grid[blocks[:, 0], blocks[:, 1]])
    ratio = MATCH_BLOCK // MV_BLOCK
    field = np.repeat(np.repeat(vectors[..., ::-1], ratio, 0), ratio, 1)[:hb, :wb]
    cost = np.repeat(np.repeat(cost_grid, ratio, 0), ratio, 1)[:hb, :wb]
    field = field.astype(np.float32)
    if wanted is not None:
        field = np.where(wanted[..., None], field, np.float32(0))
        cost = np.where(wanted, cost, np.nan).astype(np.float32)
    return np.ascontiguousarray(field), cost
