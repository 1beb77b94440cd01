"""Validation of codec motion vectors against the previous decoded frame.

A codec vector is only known to mean "came from t-1" for single-reference P-frames. x264 with
several reference frames points some blocks at older frames without exporting which; B-frames
predict from the future or from a past frame that is not t-1; intra blocks carry no vector. So each
4x4 block's vector is checked by motion-compensating the previous frame's luma and comparing:

* a block that matches well in absolute terms (mean abs difference <= ``abs_tol`` grey levels) is
  valid, whatever its vector (flat blocks match under any vector; that is fine for alignment);
* a block that matches badly is replaced by block matching only when block matching finds a
  clearly better source (cost lower by ``rel_gain`` and by ``abs_gain`` levels). If nothing is
  better (occlusion, new content) the codec vector stays: the residual set catches that block.
* blocks with no past-reference vector (intra, future-only) always take block matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.motion.block_matching import DEFAULT_RADIUS, match_blocks
from fluxshard.motion.field import MV_BLOCK, align_image

ABS_TOL = 6.0  # grey levels: codec noise at crf ~18-28 plus quarter-pel rounding on texture
REL_GAIN = 0.6  # block matching must reach below this share of the codec vector's cost
ABS_GAIN = 3.0  # ... and be at least this many grey levels better


@dataclass
class ValidationResult:
    field: np.ndarray  # (Hb, Wb, 2) float32, codec vectors with failed blocks replaced
    replaced: np.ndarray  # (Hb, Wb) bool: blocks that took the block-matching vector
    codec_cost: np.ndarray  # (Hb, Wb) float32 mean abs luma difference of the codec vectors


def block_costs(current_luma: np.ndarray, previous_luma: np.ndarray,
                field: np.ndarray) -> np.ndarray:
    """Mean abs difference per 4x4 block between the current luma and the previous luma
    compensated with ``field`` (integer-rounded, as alignment does). Invalid pixels cost 255."""
    aligned, valid = align_image(previous_luma, field)
    diff = np.abs(aligned.astype(np.int16) - current_luma.astype(np.int16)).astype(np.float32)
    diff[~valid] = 255.0
    h, w = diff.shape
    ph, pw = -h % MV_BLOCK, -w % MV_BLOCK
    if ph or pw:
        diff = np.pad(diff, ((0, ph), (0, pw)), mode="edge")
    hb, wb = diff.shape[0] // MV_BLOCK, diff.shape[1] // MV_BLOCK
    return diff.reshape(hb, MV_BLOCK, wb, MV_BLOCK).mean(axis=(1, 3))


def validate_field(current_luma: np.ndarray, previous_luma: np.ndarray, codec_field: np.ndarray,
                   covered: np.ndarray, *, abs_tol: float = ABS_TOL, rel_gain: float = REL_GAIN,
                   abs_gain: float = ABS_GAIN, radius: int = DEFAULT_RADIUS) -> ValidationResult:
    """Check codec vectors against the previous frame and fall back to block matching where they
    fail (see the module doc). ``covered`` marks blocks that have a past-reference vector."""
    codec_cost = block_costs(current_luma, previous_luma, codec_field)
    suspicious = ~covered | (codec_cost > abs_tol)
    if not suspicious.any():
        return ValidationResult(codec_field, np.zeros(covered.shape, bool), codec_cost)
    matched, _ = match_blocks(current_luma, previous_luma, radius=radius, wanted=suspicious)
    matched_cost = block_costs(current_luma, previous_luma, matched)
    better = (matched_cost < rel_gain * codec_cost) & (matched_cost < codec_cost - abs_gain)
    replaced = ~covered | (suspicious & better)
    field = np.where(replaced[..., None], matched, codec_field).astype(np.float32)
    return ValidationResult(field, replaced, codec_cost)
