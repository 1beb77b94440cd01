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

Costs are exact: integer SADs of uint8 luma (OpenCV's absdiff, integer byte sums), divided by 16
(exact in float32), so every comparison and argmin (first of equal costs) gives the same field on
every CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fluxshard.motion.block_matching import DEFAULT_RADIUS, match_blocks
from fluxshard.motion.field import (MV_BLOCK, _block_sources, _gather_blocks, _sources_leave_frame,
                                    round_half_away, zero_bordered)

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


def _as_luma(image: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected (H, W) uint8 luma, got {image.dtype} {image.shape}")
    return image


_LOW_BYTES = np.uint64(0x00FF00FF00FF00FF)
_LANE_SUM = np.uint64(0x0001000100010001)  # multiplying adds all four 16-bit lanes into the top


def _sums_of_16_bytes(rows: np.ndarray) -> np.ndarray:
    """(P, 16) uint8 -> (P,) uint64 row sums, exact: 16-bit lanes of at most 4 x 255 each."""
    words = rows.view(np.uint64)  # (P, 2)
    lanes = (words & _LOW_BYTES) + ((words >> np.uint64(8)) & _LOW_BYTES)
    return ((lanes[:, 0] + lanes[:, 1]) * _LANE_SUM) >> np.uint64(48)


def _block_byte_sums(diff: np.ndarray) -> np.ndarray:
    """(Hb*4, Wb*4) uint8 -> (Hb, Wb) int: the sum of every 4x4 block. Each block row is one
    uint32 word; byte lanes are summed in 16-bit lanes that cannot overflow (4 rows x 510)."""
    hb, wb = diff.shape[0] // MV_BLOCK, diff.shape[1] // MV_BLOCK
    words = np.ascontiguousarray(diff).view(np.uint32).reshape(hb, MV_BLOCK, wb)
    pairs = (words & 0x00FF00FF) + ((words >> 8) & 0x00FF00FF)
    rows = pairs[:, 0] + pairs[:, 1] + pairs[:, 2] + pairs[:, 3]
    return (rows & 0xFFFF) + (rows >> 16)


def block_costs(current_luma: np.ndarray, previous_luma: np.ndarray, field: np.ndarray,
                previous_bordered: np.ndarray | None = None) -> np.ndarray:
    """Mean abs difference per 4x4 block between the current luma and the previous luma
    compensated with ``field`` (integer-rounded, as alignment does). Invalid pixels cost 255.
    ``previous_bordered``: :func:`fluxshard.motion.field.zero_bordered` of the previous luma when
    the caller has it."""
    current_luma, previous_luma = _as_luma(current_luma), _as_luma(previous_luma)
    h, w = current_luma.shape
    sy, sx = _block_sources(field, h, w)
    hb, wb = sy.shape
    # The block grid laid out as an image, without cropping the last partial block row/column.
    aligned = _gather_blocks(previous_luma, sy, sx, previous_bordered)
    whole = (h % MV_BLOCK == 0) and (w % MV_BLOCK == 0)
    if whole:
        diff = cv2.absdiff(aligned, current_luma)
    else:
        diff = cv2.absdiff(np.ascontiguousarray(aligned[:h, :w]), current_luma)
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
    if not whole:  # a partial block repeats the frame's last row/column
        diff = cv2.copyMakeBorder(diff, 0, hb * MV_BLOCK - h, 0, wb * MV_BLOCK - w,
                                  cv2.BORDER_REPLICATE)
    return _block_byte_sums(diff).astype(np.float32) / (MV_BLOCK * MV_BLOCK)


def leaves_frame(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """(Hb, Wb) bool: the block's integer-rounded source window is not wholly inside the frame."""
    hb, wb = field.shape[:2]
    disp = round_half_away(field)
    sy = np.arange(hb)[:, None] * MV_BLOCK + disp[..., 1]
    sx = np.arange(wb)[None, :] * MV_BLOCK + disp[..., 0]
    return (sy < 0) | (sy > height - MV_BLOCK) | (sx < 0) | (sx > width - MV_BLOCK)


def _row_words(image: np.ndarray) -> np.ndarray:
    """A C-contiguous uint8 image as a flat uint32 array whose element ``y * row + x`` holds the 4
    pixels (y, x..x+3): one gather reads one block row."""
    return np.ndarray((image.size - 3,), np.uint32, image, 0, (1,))


class CandidateCosts:
    """Mean abs luma difference of chosen 4x4 blocks under candidate vectors, for one frame pair.
    The bordered previous luma and the current blocks' rows are made once and shared by every
    query; a block row is gathered as one uint32 word."""

    def __init__(self, current_luma: np.ndarray, previous_luma: np.ndarray):
        b = MV_BLOCK
        current_luma, previous_luma = _as_luma(current_luma), _as_luma(previous_luma)
        self.height, self.width = previous_luma.shape
        hb, wb = -(-self.height // b), -(-self.width // b)
        self.grid_width = wb
        self.previous_bordered = zero_bordered(previous_luma)
        # 255 where a source pixel lies outside the frame: such a pixel costs the 255 maximum.
        outside = np.full(self.previous_bordered.shape, 255, np.uint8)
        outside[b:-b, b:-b] = 0
        self._outside_words = _row_words(outside)
        self._previous_words = _row_words(self.previous_bordered)
        self._row = self.previous_bordered.shape[1]
        self._row_offsets = np.arange(b, dtype=np.int32) * self._row
        cur = current_luma
        if cur.shape != (hb * b, wb * b):
            cur = cv2.copyMakeBorder(cur, 0, hb * b - self.height, 0, wb * b - self.width,
                                     cv2.BORDER_REPLICATE)
        # (Hb * Wb, 4): the 4 row words of every current block, by flat block index.
        self._current_blocks = np.ascontiguousarray(
            cur.view(np.uint32).reshape(hb, b, wb).transpose(0, 2, 1)).reshape(hb * wb, b)

    def __call__(self, blocks: np.ndarray, vectors: np.ndarray,
                 evaluate: np.ndarray | None = None) -> np.ndarray:
        """``blocks`` (K, 2) block row, col; ``vectors`` (K, C, 2) (dx, dy) pixels, integer-rounded
        -> (K, C) costs. ``evaluate`` (K, C) bool limits the work to some pairs (others: inf)."""
        b = MV_BLOCK
        k, c = vectors.shape[:2]
        out = np.full((k, c), np.inf, np.float32)
        if evaluate is None:
            evaluate = np.ones((k, c), bool)
        blocks = np.asarray(blocks).astype(np.int32, copy=False)
        by = np.broadcast_to(blocks[:, :1], (k, c))[evaluate]
        bx = np.broadcast_to(blocks[:, 1:], (k, c))[evaluate]
        if not len(by):
            return out
        disp = round_half_away(vectors[evaluate]).astype(np.int32)  # (P, 2)
        sy = np.clip(by * b + disp[:, 1], -b, self.height)
        sx = np.clip(bx * b + disp[:, 0], -b, self.width)
        at = ((sy + b) * self._row + (sx + b))[:, None] + self._row_offsets  # (P, 4) row words
        source = self._previous_words[at]
        current = self._current_blocks[by * self.grid_width + bx]
        diff = cv2.absdiff(source.view(np.uint8), current.view(np.uint8))  # (P, 16) exact
        leaves = (sy < 0) | (sy > self.height - b) | (sx < 0) | (sx > self.width - b)
        if leaves.any():
            diff[leaves] |= self._outside_words[at[leaves]].view(np.uint8)
        out[evaluate] = _sums_of_16_bytes(diff).astype(np.float32) / (b * b)
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
    field = np.ascontiguousarray(field, np.float32)
    hb, wb = field.shape[:2]
    ys, xs = blocks[:, 0], blocks[:, 1]
    count = (max_ref - 1) + 4 + (previous_field is not None) + 1
    alts = np.zeros((len(blocks), count, 2), np.float32)  # the last one stays zero
    # (dx, dy) pairs move as single 8-byte items through flat block indices.
    vectors = field.view(np.uint64).reshape(-1)
    pairs = alts.view(np.uint64)[..., 0]  # (K, C)
    flat = ys * wb + xs
    own = field.reshape(-1, 2)[flat]
    for i, k in enumerate(range(2, max_ref + 1)):
        np.divide(own, k, out=alts[:, i])
    j = max_ref - 1
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        if dy:
            at = flat + np.where((ys + dy >= 0) & (ys + dy < hb), dy * wb, 0)
        else:
            at = flat + np.where((xs + dx >= 0) & (xs + dx < wb), dx, 0)
        pairs[:, j] = vectors[at]
        j += 1
    if previous_field is not None:
        previous = np.ascontiguousarray(previous_field, np.float32)
        pairs[:, j] = previous.view(np.uint64).reshape(-1)[flat]
    return alts


# Median of 9 by a fixed exchange network (Paeth; N. Devillard, "Fast median search"): min/max
# only, so the result is one of the inputs, exactly as numpy's median of an odd count.
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
            (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _median9(values: np.ndarray) -> np.ndarray:
    """(N, 9) -> (N,) median of each row (finite values without signed zeros: then every
    input that compares equal is the same number)."""
    p = [np.ascontiguousarray(values[:, i]) for i in range(9)]
    for i, j in _MEDIAN9:
        p[i], p[j] = np.minimum(p[i], p[j]), np.maximum(p[i], p[j])
    return p[4]


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
    costs_of = CandidateCosts(current_luma, previous_luma)
    codec_cost = block_costs(current_luma, previous_luma, field, costs_of.previous_bordered)
    cost = np.where(covered, codec_cost, np.inf).astype(np.float32)
    replaced = np.zeros(covered.shape, bool)

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
        far_axes = np.abs(candidates - own) > 1.0
        differs = far_axes[..., 0] | far_axes[..., 1]  # faster than any() over a length-2 axis
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
    spread = (hi - lo) > 1.0
    suspect = np.argwhere(spread[..., 0] | spread[..., 1])
    around = windows[suspect[:, 0], suspect[:, 1]].reshape(-1, 9)  # (S * 2, 9)
    if np.isfinite(field).all() and not (np.signbit(field) & (field == 0)).any():
        median = _median9(around).reshape(-1, 2)  # (S, 2)
    else:
        median = np.median(around, axis=-1).reshape(-1, 2)
    far_axes = np.abs(median - field[suspect[:, 0], suspect[:, 1]]) > 1.0
    far = far_axes[:, 0] | far_axes[:, 1]
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
