"""Validation of codec motion vectors against the previous decoded frame.

A codec vector is only known to mean "came from t-1" for single-reference P-frames. x264 with
several reference frames points some blocks at older frames without exporting which; B-frames
predict from the future or from a past frame that is not t-1; intra blocks carry no vector. So each
4x4 block's vector is checked by motion-compensating the previous frame's luma and comparing:

* a block at the noise floor (mean abs difference <= ``noise_floor`` grey levels) is valid,
  whatever its vector (flat blocks match under any vector; that is fine for alignment);
* above it, the vector must match about as well as cheap local alternatives: the vector scaled
  by 1/2..1/4 (it may span several frames), the neighbours' vectors, the previous frame's vector
  there, zero. A clearly better alternative (cost below ``rel_gain`` x and ``abs_gain`` levels
  under) replaces it;
* blocks still above ``abs_tol`` are searched by block matching (vectorized, hierarchical),
  whose vector replaces the current one only when clearly better. If nothing is better
  (occlusion, new content) the vector stays: the residual set catches that block;
* blocks with no past-reference vector (intra, future-only) take the best alternative.

Costs are exact: integer SADs of uint8 luma, divided by 16 (exact in float32), so every
comparison and argmin (first of equal costs) gives the same field on every CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.motion.block_matching import DEFAULT_RADIUS, match_blocks
from numpy.lib.stride_tricks import sliding_window_view

from fluxshard.motion.field import (MV_BLOCK, _block_sources, _sources_leave_frame, _warp,
                                    round_half_away)

NOISE_FLOOR = 1.5  # grey levels (mean abs, 4x4 luma): at or below, a vector is as good as any
ABS_TOL = 8.0  # above this a vector is always re-searched by block matching
REL_GAIN = 0.7  # an alternative must reach below this share of the codec vector's cost ...
ABS_GAIN = 1.0  # ... and be at least this many grey levels better to replace it
TIE_MARGIN = 0.5  # grey levels within which block matching replaces an adopted alternative
MAX_REF = 4  # scaled candidates d/2 .. d/MAX_REF for vectors that span several frames


@dataclass
class ValidationResult:
    field: np.ndarray  # (Hb, Wb, 2) float32, codec vectors with failed blocks replaced
    replaced: np.ndarray  # (Hb, Wb) bool: blocks that took the block-matching vector
    codec_cost: np.ndarray  # (Hb, Wb) float32 mean abs luma difference of the codec vectors


def block_costs(current_luma: np.ndarray, previous_luma: np.ndarray,
                field: np.ndarray) -> np.ndarray:
    """Mean abs difference per 4x4 block between the current luma and the previous luma
    compensated with ``field`` (integer-rounded, as alignment does). Invalid pixels cost 255."""
    h, w = current_luma.shape
    sy, sx = _block_sources(field, h, w)
    aligned = _warp(previous_luma, sy, sx)
    diff = np.maximum(aligned, current_luma) - np.minimum(aligned, current_luma)
    diff = diff.astype(np.int16)  # 16 x 255 fits: integer sums are exact in any order
    leaving = np.argwhere(_sources_leave_frame(sy, sx, h, w))
    if len(leaving):  # per-pixel validity of the few blocks that reach outside the frame
        lin = np.arange(MV_BLOCK)
        by, bx = leaving[:, 0], leaving[:, 1]
        src_y = sy[by, bx][:, None, None] + lin[None, :, None]  # (K, 4, 1)
        src_x = sx[by, bx][:, None, None] + lin[None, None, :]  # (K, 1, 4)
        out = (src_y < 0) | (src_y >= h) | (src_x < 0) | (src_x >= w)  # (K, 4, 4)
        py = np.broadcast_to(by[:, None, None] * MV_BLOCK + lin[None, :, None], out.shape)
        px = np.broadcast_to(bx[:, None, None] * MV_BLOCK + lin[None, None, :], out.shape)
        keep = out & (py < h) & (px < w)  # the last block row/column may overhang the frame
        diff[py[keep], px[keep]] = 255
    ph, pw = -h % MV_BLOCK, -w % MV_BLOCK
    if ph or pw:
        diff = np.pad(diff, ((0, ph), (0, pw)), mode="edge")
    hb, wb = diff.shape[0] // MV_BLOCK, diff.shape[1] // MV_BLOCK
    rows = diff.reshape(hb, MV_BLOCK, wb * MV_BLOCK).sum(axis=1, dtype=np.int16)  # whole rows
    sad = rows.reshape(hb, wb, MV_BLOCK).sum(axis=2, dtype=np.int16)
    return sad.astype(np.float32) / (MV_BLOCK * MV_BLOCK)


def leaves_frame(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """(Hb, Wb) bool: the block's integer-rounded source window is not wholly inside the frame."""
    hb, wb = field.shape[:2]
    disp = round_half_away(field)
    sy = np.arange(hb)[:, None] * MV_BLOCK + disp[..., 1]
    sx = np.arange(wb)[None, :] * MV_BLOCK + disp[..., 0]
    return (sy < 0) | (sy > height - MV_BLOCK) | (sx < 0) | (sx > width - MV_BLOCK)


class CandidateCosts:
    """Mean abs luma difference of chosen 4x4 blocks under candidate vectors, for one frame pair.
    The int16 copies with their borders are made once and shared by every query."""

    def __init__(self, current_luma: np.ndarray, previous_luma: np.ndarray):
        b = MV_BLOCK
        self.height, self.width = previous_luma.shape
        hb, wb = -(-self.height // b), -(-self.width // b)
        # Border of -1024: a source pixel outside the frame costs the 255 maximum.
        prev = np.pad(previous_luma.astype(np.int16), b, constant_values=-1024)
        cur = np.pad(current_luma.astype(np.int16),
                     ((0, hb * b - self.height), (0, wb * b - self.width)), mode="edge")
        self.prev_windows = sliding_window_view(prev, (b, b))
        self.cur_windows = sliding_window_view(cur, (b, b))

    def __call__(self, blocks: np.ndarray, vectors: np.ndarray,
                 evaluate: np.ndarray | None = None) -> np.ndarray:
        """``blocks`` (K, 2) block row, col; ``vectors`` (K, C, 2) (dx, dy) pixels, integer-rounded
        -> (K, C) costs. ``evaluate`` (K, C) bool limits the work to some pairs (others: inf)."""
        b = MV_BLOCK
        k, c = vectors.shape[:2]
        disp = round_half_away(vectors)
        if evaluate is None:
            evaluate = np.ones((k, c), bool)
        rows, cols = np.nonzero(evaluate)
        sy = np.clip(blocks[rows, 0] * b + disp[rows, cols, 1], -b, self.height) + b
        sx = np.clip(blocks[rows, 1] * b + disp[rows, cols, 0], -b, self.width) + b
        windows = self.prev_windows[sy, sx]  # (P, b, b)
        cur_blocks = self.cur_windows[blocks[rows, 0] * b, blocks[rows, 1] * b]  # (P, b, b)
        diff = np.minimum(np.abs(windows - cur_blocks), 255)  # int16
        out = np.full((k, c), np.inf, np.float32)
        # einsum's integer sum (16 x 255 fits int16) is exact, and faster than .sum(-1) here.
        sad = np.einsum("ij->i", diff.reshape(-1, b * b))
        out[rows, cols] = sad.astype(np.float32) / (b * b)
        return out


def candidate_costs(current_luma: np.ndarray, previous_luma: np.ndarray, blocks: np.ndarray,
                    vectors: np.ndarray) -> np.ndarray:
    """One-off :class:`CandidateCosts` query."""
    return CandidateCosts(current_luma, previous_luma)(blocks, vectors)


def alternative_vectors(field: np.ndarray, blocks: np.ndarray, previous_field: np.ndarray | None,
                        max_ref: int = MAX_REF) -> np.ndarray:
    """Cheap local alternatives to the codec vectors of ``blocks`` -> (K, C, 2): the vector scaled
    down as if it spanned 2..max_ref frames (multi-reference streams), the 4 neighbours' vectors
    (object borders inside one macroblock), the previous frame's vector there (constant velocity)
    and zero."""
    hb, wb = field.shape[:2]
    ys, xs = blocks[:, 0], blocks[:, 1]
    own = field[ys, xs]
    alts = [own / k for k in range(2, max_ref + 1)]
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        alts.append(field[np.clip(ys + dy, 0, hb - 1), np.clip(xs + dx, 0, wb - 1)])
    if previous_field is not None:
        alts.append(previous_field[ys, xs])
    alts.append(np.zeros_like(own))
    return np.stack(alts, 1)


def validate_field(current_luma: np.ndarray, previous_luma: np.ndarray, codec_field: np.ndarray,
                   covered: np.ndarray, previous_field: np.ndarray | None = None, *,
                   noise_floor: float = NOISE_FLOOR, abs_tol: float = ABS_TOL,
                   rel_gain: float = REL_GAIN, abs_gain: float = ABS_GAIN,
                   radius: int = DEFAULT_RADIUS, max_ref: int = MAX_REF) -> ValidationResult:
    """Check codec vectors against the previous frame and fall back to cheap alternatives, then
    block matching, where they fail (see the module doc). ``covered`` marks blocks that have a
    past-reference vector; ``previous_field`` (the last frame's final field) supplies the
    constant-velocity candidate."""
    field = np.array(codec_field, np.float32, copy=True)
    codec_cost = block_costs(current_luma, previous_luma, field)
    cost = np.where(covered, codec_cost, np.inf).astype(np.float32)
    replaced = np.zeros(covered.shape, bool)
    costs_of = CandidateCosts(current_luma, previous_luma)

    def adopt(blocks, vectors, new_cost, force):
        old = cost[blocks[:, 0], blocks[:, 1]]
        take = force | ((new_cost < rel_gain * old) & (new_cost < old - abs_gain))
        b = blocks[take]
        field[b[:, 0], b[:, 1]] = vectors[take]
        cost[b[:, 0], b[:, 1]] = new_cost[take]
        replaced[b[:, 0], b[:, 1]] = True
        return take

    inexact = np.zeros(covered.shape, bool)  # took a scaled vector: refine by block matching
    check = np.argwhere(cost > noise_floor)
    if len(check):
        candidates = alternative_vectors(codec_field, check, previous_field, max_ref)
        # Only candidates more than 1 px from the block's own vector are a different motion; a
        # closer one would only trade the codec's sub-pixel vector for a rounding alternative.
        own = codec_field[check[:, 0], check[:, 1]][:, None]
        differs = (np.abs(candidates - own) > 1.0).any(-1)
        costs = costs_of(check, candidates, differs)
        best = costs.argmin(1)
        rows = np.arange(len(check))
        took = adopt(check, candidates[rows, best], costs[rows, best],
                     ~covered[check[:, 0], check[:, 1]])
        scaled = took & (best < max_ref - 1)  # the first candidates are d/2 .. d/max_ref
        inexact[check[scaled, 0], check[scaled, 1]] = True
    # Block matching cannot help where the source lies outside the previous frame (content
    # entering at the border): those blocks are residual anyway.
    # Isolated outliers (a vector to an older frame that happens to fit a smooth block): where
    # the 3x3 median vector is more than 1 px away and fits as well, the smoother field wins.
    padded = np.pad(field, ((1, 1), (1, 1), (0, 0)), mode="edge")
    windows = sliding_window_view(padded, (3, 3), axis=(0, 1))  # (Hb, Wb, 2, 3, 3)
    # A median lies within the window's range: only where the window spreads over more than
    # 1 px can it differ from the block's own vector by more than 1 px (few blocks).
    hb, wb = field.shape[:2]
    hi, lo = field, field
    for dy in range(3):
        for dx in range(3):
            shifted = padded[dy:dy + hb, dx:dx + wb]
            hi, lo = np.maximum(hi, shifted), np.minimum(lo, shifted)
    suspect = np.argwhere(((hi - lo) > 1.0).any(-1))
    median = np.median(windows[suspect[:, 0], suspect[:, 1]], axis=(-2, -1))  # (S, 2)
    far = (np.abs(median - field[suspect[:, 0], suspect[:, 1]]) > 1.0).any(-1)
    odd, median = suspect[far], median[far]
    if len(odd):
        vectors = median
        new_cost = costs_of(odd, vectors[:, None])[:, 0]
        adopt(odd, vectors, new_cost, new_cost <= cost[odd[:, 0], odd[:, 1]] + TIE_MARGIN)
    # Blocks that took a scaled vector are searched too: it is only as exact as its source
    # (d/k divides x264's quarter-pel error by k, and x264's far-reference vectors are rougher),
    # and block matching refines to quarter-pel, which keeps composed fields from drifting.
    alternative = inexact
    search = ((cost > abs_tol) | alternative) & \
        ~(covered & leaves_frame(codec_field, *current_luma.shape))
    if search.any():
        matched, _ = match_blocks(current_luma, previous_luma, radius=radius, wanted=search)
        where = np.argwhere(search)
        vectors = matched[where[:, 0], where[:, 1]]
        new_cost = costs_of(where, vectors[:, None])[:, 0]
        # Where an alternative was taken, block matching wins ties (it is sub-pixel refined).
        tie = alternative[where[:, 0], where[:, 1]] & \
            (new_cost <= cost[where[:, 0], where[:, 1]] + TIE_MARGIN)
        adopt(where, vectors, new_cost, tie)
    return ValidationResult(field, replaced, codec_cost)
