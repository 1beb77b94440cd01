"""Block matching (v2 paper section 4.1): for each block of the current frame, the displacement
into the previous frame with the least mean absolute difference (SAD / pixels).

Vectorized and hierarchical so large motion stays cheap: a full search on a 1/4-resolution luma
pyramid level, then +-1 pixel refinements at 1/2 and full resolution, each also trying the parent
blocks' neighbours' vectors (helps at object borders) and zero (static content on a moving
background). A tiny penalty on vector length breaks ties on flat content towards small motion.
All candidates of all blocks are evaluated at once with numpy gathers; ``wanted`` restricts the
work to some blocks (the validation fallback needs only the blocks whose codec vector failed).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fluxshard.motion.field import MV_BLOCK, field_shape

MATCH_BLOCK = 8  # pixels per side at every pyramid level (4x4 field blocks come in 2x2 groups)
DEFAULT_RADIUS = 16  # pixels at full resolution
LENGTH_PENALTY = 0.02  # cost units (grey levels) per pixel of vector length


def to_luma(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (H, W) float32 luma (BT.601 weights)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(np.float32)
    if image.ndim == 3 and image.shape[2] == 3:
        return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    raise ValueError(f"expected a (H, W) luma or (H, W, 3) RGB image, got shape {image.shape}")


def _downsample(img: np.ndarray) -> np.ndarray:
    # Four strided slices: several times faster than a reshape-mean on a whole frame.
    return (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2]) * 0.25


def _offsets(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)  # (C, 2) (dy, dx)


class _Level:
    """One pyramid level: block patches of the current frame and window gathers from the previous
    (a sliding-window view, so one index per block and candidate). Source windows are clamped
    into a one-block border."""

    def __init__(self, cur: np.ndarray, prev: np.ndarray, blocks: np.ndarray, block: int):
        self.block = block
        # Edge-replicated border one block wide: border blocks whose source leaves the frame still
        # get a plausible match; sources further out are clamped.
        self.windows = sliding_window_view(np.pad(prev, block, mode="edge"), (block, block))
        self.max_y, self.max_x = prev.shape[0] + block, prev.shape[1] + block
        self.y0, self.x0 = blocks[:, 0] * block + block, blocks[:, 1] * block + block
        grid = cur.reshape(cur.shape[0] // block, block, cur.shape[1] // block, block)
        self.cur = grid[blocks[:, 0], :, blocks[:, 1], :]  # (K, b, b)

    def costs(self, vectors: np.ndarray, penalty: bool = True) -> np.ndarray:
        """vectors (K, C, 2) int (dy, dx) -> mean abs difference (K, C) plus, with ``penalty``,
        the length penalty."""
        sy = np.clip(self.y0[:, None] + vectors[..., 0], 0, self.max_y)
        sx = np.clip(self.x0[:, None] + vectors[..., 1], 0, self.max_x)
        patches = self.windows[sy, sx]  # (K, C, b, b)
        k, c = sy.shape
        n = self.block * self.block
        diff = np.abs(patches - self.cur[:, None]).reshape(k * c, n)
        sad = (diff @ np.full(n, 1 / n, np.float32)).reshape(k, c)  # faster than .mean(-1)
        if not penalty:
            return sad
        return sad + LENGTH_PENALTY * np.sqrt((vectors.astype(np.float32) ** 2).sum(-1))


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
    # Raw costs: the length penalty would pull every fit towards zero (a bias that composition
    # accumulates frame after frame).
    steps = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])
    around = level.costs(best[:, None, :] + steps[None], penalty=False)  # (K, 5)
    best_cost, around = around[:, 0], around[:, 1:]
    offsets = np.zeros(best.shape, np.float32)
    for axis, (minus, plus) in enumerate(((0, 1), (2, 3))):
        cm, cp = around[:, minus], around[:, plus]
        slope = np.maximum(cm, cp) - best_cost
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where(slope > 1e-6, (cm - cp) / (2 * slope), 0.0)
        offsets[:, axis] = np.round(np.clip(delta, -0.5, 0.5) * 4) / 4
    return offsets


def match_blocks(current: np.ndarray, previous: np.ndarray, *, radius: int = DEFAULT_RADIUS,
                 wanted: np.ndarray | None = None,
                 subpixel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Backward motion of ``current`` relative to ``previous`` (both (H, W) luma or (H, W, 3) RGB,
    same size). Returns ``(field, cost)``: the field in the motion-layer layout
    ``(ceil(H/4), ceil(W/4), 2)`` float32 (quarter-pel with ``subpixel``, else integer) and the
    mean abs luma difference per 4x4 block at the chosen integer vector. ``wanted`` ((Hb, Wb) bool on the 4x4 grid) limits the
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
    cur = np.pad(cur, ((0, ph), (0, pw)), mode="edge")
    prev = np.pad(prev, ((0, ph), (0, pw)), mode="edge")
    pyramid = [(cur, prev)]
    for _ in range(levels - 1):
        c, p = pyramid[-1]
        pyramid.append((_downsample(c), _downsample(p)))

    # Which blocks to solve at each level: the ancestors of wanted 4x4 blocks.
    fine_h, fine_w = cur.shape[0] // MATCH_BLOCK, cur.shape[1] // MATCH_BLOCK
    need = np.ones((fine_h, fine_w), bool)
    if wanted is not None:
        wanted = np.asarray(wanted, bool)
        if wanted.shape != (hb, wb):
            raise ValueError(f"wanted mask shape {wanted.shape} != field grid {(hb, wb)}")
        ratio = MATCH_BLOCK // MV_BLOCK
        padded = np.zeros((fine_h * ratio, fine_w * ratio), bool)
        padded[:hb, :wb] = wanted
        need = padded.reshape(fine_h, ratio, fine_w, ratio).any(axis=(1, 3))
    needs = [need]
    for _ in range(levels - 1):
        n = needs[-1]
        needs.append(n.reshape(n.shape[0] // 2, 2, n.shape[1] // 2, 2).any(axis=(1, 3)))

    grid = None  # vectors (dy, dx) of the previous (coarser) level, in that level's pixels
    cost_grid = None
    for level in range(levels - 1, -1, -1):
        c, p = pyramid[level]
        need = needs[level]
        blocks = np.argwhere(need)
        lvl = _Level(c, p, blocks, MATCH_BLOCK)
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
        best = costs.argmin(1)
        rows = np.arange(len(blocks))
        grid = np.zeros(need.shape + (2,), np.int64)
        grid[blocks[:, 0], blocks[:, 1]] = candidates[rows, best]
        cost_grid = np.full(need.shape, np.nan, np.float32)
        cost_grid[blocks[:, 0], blocks[:, 1]] = costs[rows, best]
    vectors = grid.astype(np.float32)
    if subpixel and len(blocks):
        vectors[blocks[:, 0], blocks[:, 1]] += _subpixel_offsets(
            lvl, grid[blocks[:, 0], blocks[:, 1]])
    ratio = MATCH_BLOCK // MV_BLOCK
    field = np.repeat(np.repeat(vectors[..., ::-1], ratio, 0), ratio, 1)[:hb, :wb]
    cost = np.repeat(np.repeat(cost_grid, ratio, 0), ratio, 1)[:hb, :wb]
    field = field.astype(np.float32)
    if wanted is not None:
        field[~wanted] = 0
        cost = np.where(wanted, cost, np.nan).astype(np.float32)
    return np.ascontiguousarray(field), cost
