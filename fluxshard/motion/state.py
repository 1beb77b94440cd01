"""Per-endpoint dispatch state (docs/DESIGN.md, "Per frame, on the edge", steps 2-3): the input the
endpoint last ran on (its input cache) and the motion accumulated from that input to now; the
residual block set against the dispatch threshold; reset when the endpoint runs inference on a
frame.

Thresholds here are uint8 grey levels (``threshold``); users give tau on the [0, 1] input scale
and :class:`fluxshard.tau.TauPolicy` turns it into this threshold (``tau * 255``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.motion.field import (MV_BLOCK, _block_sources, _sources_leave_frame, _warp,
                                    compose_fields, motion_statistic, source_validity,
                                    zero_bordered, zero_field)

RESIDUAL_BLOCK = 16


@dataclass
class ResidualSet:
    mask: np.ndarray  # (ceil(H/b), ceil(W/b)) bool: blocks to send / recompute
    aligned: np.ndarray  # (H, W, 3) uint8: the input cache warped to the current frame
    field: np.ndarray  # (ceil(H/4), ceil(W/4), 2) float32 accumulated motion used
    block_max_diff: np.ndarray  # (ceil(H/b), ceil(W/b)) int16: max |aligned - frame|, 256 if invalid
    block: int
    threshold: float  # grey levels: a block is residual when block_max_diff > threshold
    # the cache ``aligned`` was warped from: a receiver holding this very array rebuilds from
    # ``aligned`` instead of warping it again (fluxshard.endpoint.Uplink)
    reference: np.ndarray | None = None

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def valid(self) -> np.ndarray:
        """(H, W) bool: pixels whose source lies inside the cached frame (computed on demand)."""
        return source_validity(self.field, *self.aligned.shape[:2])

    def pixel_mask(self) -> np.ndarray:
        """(H, W) bool: the pixels of residual blocks."""
        h, w = self.aligned.shape[:2]
        return np.repeat(np.repeat(self.mask, self.block, 0), self.block, 1)[:h, :w]

    def assemble(self, frame: np.ndarray) -> np.ndarray:
        """The input an endpoint runs on: the aligned cache, with the residual blocks taken from
        ``frame`` (what the cloud rebuilds from the uplink payload)."""
        return np.where(self.pixel_mask()[..., None], frame, self.aligned)


def block_max_abs_diff(a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """max |a - b| over each block's pixels and channels, (ceil(H/b), ceil(W/b)) int16."""
    diff = np.maximum(a, b) - np.minimum(a, b)  # uint8, no overflow
    if diff.ndim == 3:  # elementwise over channels: a reduction over a length-3 axis is ~25x slower
        channels = diff
        diff = channels[..., 0]
        for c in range(1, channels.shape[2]):
            diff = np.maximum(diff, channels[..., c])
    h, w = diff.shape
    ph, pw = -h % block, -w % block
    if ph or pw:
        diff = np.pad(diff, ((0, ph), (0, pw)))
    hr, wr = diff.shape[0] // block, diff.shape[1] // block
    # Rows first (elementwise across whole rows), then the short per-block column runs.
    rows = diff.reshape(hr, block, wr * block).max(axis=1)
    return rows.reshape(hr, wr, block).max(axis=2).astype(np.int16)


def invalid_blocks(field: np.ndarray, height: int, width: int,
                   block: int = RESIDUAL_BLOCK) -> np.ndarray:
    """(ceil(H/b), ceil(W/b)) bool: blocks holding a pixel whose source lies outside the
    reference frame. Such pixels have no aligned value, so their blocks must always travel
    (computed from the field alone: no image is warped)."""
    return _invalid_blocks(field, *_block_sources(field, height, width), height, width, block)


def _invalid_blocks(field, sy, sx, height: int, width: int, block: int) -> np.ndarray:
    if block % MV_BLOCK == 0:  # invalid pixels found per 4x4 block: no per-pixel mask needed
        invalid = _sources_leave_frame(sy, sx, height, width)
        k = block // MV_BLOCK
    else:
        invalid, k = ~source_validity(field, height, width), block
    ph, pw = -invalid.shape[0] % k, -invalid.shape[1] % k
    invalid = np.pad(invalid, ((0, ph), (0, pw)))
    hr, wr = invalid.shape[0] // k, invalid.shape[1] // k
    return invalid.reshape(hr, k, wr, k).any(axis=(1, 3))


def residual_blocks(cache: np.ndarray, frame: np.ndarray, field: np.ndarray, threshold: float,
                    block: int = RESIDUAL_BLOCK, *,
                    bordered_cache: np.ndarray | None = None) -> ResidualSet:
    """Align ``cache`` with ``field`` and mark the blocks where it differs from ``frame`` by more
    than ``threshold`` grey levels or that hold an invalid (out-of-cache) pixel (docs/CONVENTIONS.md).
    ``bordered_cache``: ``zero_bordered(cache)``, when the caller keeps it between frames."""
    if block < 1:
        raise ValueError(f"residual block must be >= 1, got {block}")
    if cache.shape != frame.shape:
        raise ValueError(f"cache {cache.shape} and frame {frame.shape} differ in size")
    h, w = frame.shape[:2]
    sy, sx = _block_sources(field, h, w)
    aligned = _warp(cache, sy, sx, bordered_cache)
    worst = block_max_abs_diff(aligned, frame, block)
    worst[_invalid_blocks(field, sy, sx, h, w, block)] = 256
    return ResidualSet(mask=worst > threshold, aligned=aligned, field=field,
                       block_max_diff=worst, block=block, threshold=float(threshold),
                       reference=cache)


class EndpointState:
    """One endpoint's view of a stream: input cache + accumulated field since it last ran."""

    def __init__(self, residual_block: int = RESIDUAL_BLOCK):
        self.residual_block = residual_block
        self.cache: np.ndarray | None = None
        self._bordered: np.ndarray | None = None  # zero_bordered(cache), made on first use
        self._bordered_of: np.ndarray | None = None  # the cache _bordered was made from
        self.field: np.ndarray | None = None
        self.frames_since_reset = 0

    def reset(self, frame: np.ndarray, copy: bool = True) -> None:
        """The endpoint ran inference on ``frame``: it becomes the cache, motion starts at zero.
        ``copy=False``: keep ``frame`` itself (an array nobody writes to, such as a mirror's)."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        self.cache = np.array(frame, copy=True, order="C") if copy else frame
        self.field = zero_field(*frame.shape[:2])
        self.frames_since_reset = 0

    def _require(self) -> None:
        if self.cache is None:
            raise RuntimeError("EndpointState has no cache yet: reset(frame) on a key frame first")

    def accumulate(self, field: np.ndarray) -> None:
        """Add one frame's motion (frame t -> t-1) by composition."""
        self._require()
        field = np.asarray(field, np.float32)
        if field.shape != self.field.shape:
            raise ValueError(f"motion field shape {field.shape} != accumulated {self.field.shape}")
        self.field = compose_fields(self.field, field)
        self.frames_since_reset += 1

    def residual(self, frame: np.ndarray, threshold: float, block: int | None = None,
                 field: np.ndarray | None = None) -> ResidualSet:
        """The residual set of ``frame`` at ``threshold`` grey levels, aligned with ``field``
        (default: the accumulated field; senders pass it quantized as the wire carries it)."""
        self._require()
        if self._bordered is None or self._bordered_of is not self.cache:
            # every residual until the next reset warps this cache: border it once
            self._bordered, self._bordered_of = zero_bordered(self.cache), self.cache
        field = self.field if field is None else field
        return residual_blocks(self.cache, np.asarray(frame), field, threshold,
                               block or self.residual_block, bordered_cache=self._bordered)

    def motion_statistic(self) -> float:
        self._require()
        return motion_statistic(self.field)
