"""What the cached cells were computed from, carried along the motion field.

The tile executor's change test compares each frame with this reference, not with the previous
frame: content that changes a little every frame (a slow fade, a slowly entering object, light)
never differs much from one frame to the next, yet it drifts away from what the cached cells
saw, so only the difference against what they saw accumulates to the threshold. Noise does not
accumulate: the reference is the picture itself, not a running sum of differences.

The reference is grey at half resolution (the change test needs the block means of the
difference, and half resolution keeps codec noise and sub-pixel misalignment of fine texture
from reading as change, at a quarter of the cost). It moves by whole pixels per motion block and
keeps each block's sub-pixel remainder apart (``offset``), like the cached cells keep their
sub-cell place: warping it bilinearly every frame would blur a moving reference further each
frame until texture read as change. Comparing samples it once, bilinearly, at that remainder.
Backward fields as everywhere (docs/CONVENTIONS.md, "Motion fields").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from fluxshard.motion.field import MV_BLOCK
from fluxshard.tiles.kernels import composed_moves

SCALE = 2  # input pixels per reference pixel
CELL = MV_BLOCK // SCALE  # reference pixels per motion block


def grey(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB, H and W even -> (H/2, W/2) uint8 grey (area mean)."""
    g = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    return cv2.resize(g, (g.shape[1] // SCALE, g.shape[0] // SCALE), interpolation=cv2.INTER_AREA)


@dataclass
class Reference:
    """The mosaic the cached cells were computed from, in the current frame's place.

    image: (H/2, W/2) uint8 grey. offset: (H/4, W/4, 2) float32 per motion block, x then y, in
    reference pixels: the content for block n lies at n + offset[n] in ``image``."""

    image: np.ndarray
    offset: np.ndarray

    @classmethod
    def of(cls, grey_image: np.ndarray) -> "Reference":
        h, w = grey_image.shape
        return cls(grey_image.copy(), np.zeros((h // CELL, w // CELL, 2), np.float32))

    @property
    def blocks_shape(self) -> tuple[int, int]:
        return self.offset.shape[:2]


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> np.ndarray:
    """(h, w, 2) float32: each pixel's own (x, y), the identity map of a float remap."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), -1)
    grid.flags.writeable = False
    return grid


@functools.lru_cache(maxsize=8)
def _pixel_places(h: int, w: int) -> np.ndarray:
    """(h, w, 2) int16: each pixel's own (x, y), the identity map of an integer remap."""
    return np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).astype(np.int16)


def block_sums(image: np.ndarray, side: int) -> np.ndarray:
    """Sums of uint8 ``image`` over each ``side`` x ``side`` square, (H/side, W/side) int32,
    exact (an integral image: the numpy block reduction is many times slower)."""
    return _square_sums(cv2.integral(image), side)


def _square_sums(ii: np.ndarray, side: int) -> np.ndarray:
    """Sums over each ``side`` x ``side`` square from the integral image ``ii``."""
    return (ii[side::side, side::side] - ii[:-side:side, side::side]
            - ii[side::side, :-side:side] + ii[:-side:side, :-side:side])


def field_on_blocks(field: np.ndarray, blocks_shape: tuple[int, int]) -> np.ndarray:
    """The field (per motion block, input pixels) cut or zero-padded to ``blocks_shape`` (the
    padded input's block grid: the padding is static grey), in reference pixels."""
    field = np.asarray(field, np.float32)
    hb, wb = blocks_shape
    if field.shape[:2] != (hb, wb):
        padded = np.zeros((hb, wb, 2), np.float32)
        fh, fw = min(field.shape[0], hb), min(field.shape[1], wb)
        padded[:fh, :fw] = field[:fh, :fw]
        field = padded
    return field * (1.0 / SCALE)


def _per_pixel(block_values: np.ndarray) -> np.ndarray:
    """(hb, wb, 2) per block -> (hb*CELL, wb*CELL, 2) per reference pixel (each block's value)."""
    hb, wb = block_values.shape[:2]
    return cv2.resize(block_values, (wb * CELL, hb * CELL), interpolation=cv2.INTER_NEAREST)


def carry(ref: Reference, field: np.ndarray) -> Reference:
    """``ref`` moved to the current frame by the backward ``field`` (motion blocks, input
    pixels): each block takes the content whose source its vector points at, whole pixels
    moved, the sub-pixel remainder kept in ``offset`` (composed with the remainder the source
    block had)."""
    d = field_on_blocks(field, ref.blocks_shape)
    if not d.any():
        return ref
    hb, wb = ref.blocks_shape
    # the remainder of the block the source lands on travels with its content
    whole = np.empty((hb, wb, 2), np.int16)
    remainder = np.empty((hb, wb, 2), np.float32)
    composed_moves(np.ascontiguousarray(d), np.ascontiguousarray(ref.offset), CELL, whole,
                   remainder)
    h, w = ref.image.shape
    # whole pixels: an integer remap (no float maps of the image's size)
    shift = cv2.resize(whole, (wb * CELL, hb * CELL), interpolation=cv2.INTER_NEAREST)
    image = cv2.remap(ref.image, _pixel_places(h, w) + shift, None, cv2.INTER_NEAREST,
                      borderMode=cv2.BORDER_REPLICATE)
    return Reference(image, remainder)


def aligned(ref: Reference) -> np.ndarray:
    """The reference sampled at each block's sub-pixel place: (H/2, W/2) uint8, comparable
    pixel by pixel with the current frame's :func:`grey`."""
    if not ref.offset.any():
        return ref.image
    h, w = ref.image.shape
    places = _per_pixel(ref.offset)
    places += _pixel_grid(h, w)
    return cv2.remap(ref.image, places, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def block_change(current: np.ndarray, reference: np.ndarray, block: int) -> np.ndarray:
    """Mean |current - reference| in grey levels over each ``block``-pixel (input pixels) block
    of the half-resolution images, (H/block, W/block) float32. Integer sums: no float copy of
    the image."""
    side = block // SCALE
    sums = block_sums(cv2.absdiff(current, reference), side)
    return sums.astype(np.float32) * (1.0 / (side * side))


def refresh(ref: Reference, current: np.ndarray, blocks: np.ndarray, block: int) -> None:
    """The cells of ``blocks`` (a ``block``-pixel grid) were computed from ``current``: their
    reference becomes it, in place."""
    if not blocks.any():
        return
    mask = np.ascontiguousarray(blocks).view(np.uint8)
    h, w = ref.image.shape
    pixels = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST).view(bool)
    np.copyto(ref.image, current, where=pixels)
    hb, wb = ref.offset.shape[:2]
    cells = cv2.resize(mask, (wb, hb), interpolation=cv2.INTER_NEAREST).view(bool)
    ref.offset[cells] = 0.0


DARK_FLOOR = 0.4  # a black block's change threshold, as a share of a mid-grey block's


def _dimmed(threshold: float, brightness: np.ndarray) -> np.ndarray:
    """``threshold`` at mid-grey and above (``brightness``: block means / 128), lower in darker
    blocks (down to ``DARK_FLOOR`` of it for black, linearly): content in the dark differs by
    fewer grey levels for the same change to the detector, which sees the frame normalised."""
    return threshold * np.clip(DARK_FLOOR + (1 - DARK_FLOOR) * brightness, DARK_FLOOR, 1.0)


def block_thresholds(reference: np.ndarray, threshold: float, block: int) -> np.ndarray:
    """Each ``block``'s change threshold: ``threshold`` at mid-grey and above, lower in darker
    blocks (:func:`_dimmed`)."""
    side = block // SCALE
    brightness = block_sums(reference, side).astype(np.float32) * (1.0 / (side * side * 128.0))
    return _dimmed(threshold, brightness)


FLAT_ABOVE = 64  # mean grey level: darker blocks never count as flat


def textured_blocks(current: np.ndarray, spread: float, block: int) -> np.ndarray:
    """(H/block, W/block) bool: the ``block``s (input pixels) of the half-resolution ``current``
    whose motion a codec's vectors can tell: their grey levels spread (standard deviation) more
    than ``spread`` at mid-grey, less in darker blocks (:func:`_dimmed`), or they are darker
    than ``FLAT_ABOVE``. On bright flat content (a wall, the sky) every vector matches equally
    well and the encoder's choice is noise; in the dark, objects the detector finds read as flat
    at half resolution (a person entering a dim scene), so dark blocks keep their vectors."""
    side = block // SCALE
    sums, squares = cv2.integral2(current, sdepth=cv2.CV_32S, sqdepth=cv2.CV_64F)
    n = float(side * side)
    mean = _square_sums(sums, side) * (1.0 / n)
    variance = _square_sums(squares, side) * (1.0 / n) - mean * mean
    return (variance > _dimmed(spread, mean * (1.0 / 128.0)) ** 2) | (mean < FLAT_ABOVE)
