"""Per-endpoint dispatch state (DESIGN.md steps 2-3): the input the endpoint last ran on (its
input cache) and the motion accumulated from that input to now; the residual block set against
the dispatch threshold; reset when the endpoint runs inference on a frame.

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
    if block % MV_BLOCK == 0:  # invalid pixels found per 4x4 block: no per-pixel mask needed
        invalid = _sources_leave_frame(sy, sx, h, w)
        k = block // MV_BLOCK
    else:
        invalid, k = ~source_validity(field, h, w), block
    if invalid.any():
        ph, pw = -invalid.shape[0] % k, -invalid.shape[1] % k
        invalid = np.pad(invalid, ((0, ph), (0, pw)))
        hr, wr = invalid.shape[0] // k, invalid.shape[1] // k
        worst[invalid.reshape(hr, k, wr, k).any(axis=(1, 3))] = 256
    return ResidualSet(mask=worst > threshold, aligned=aligned, field=field,
                       block_max_diff=worst, block=block, threshold=float(threshold))


class EndpointState:
    """One endpoint's view of a stream: input cache + accumulated field since it last ran."""

    def __init__(self, residual_block: int = RESIDUAL_BLOCK):
        self.residual_block = residual_block
        self.cache: np.ndarray | None = None
        self._bordered: np.ndarray | None = None  # zero_bordered(cache), made on first use
        self._bordered_of: np.ndarray | None = None  # the cache _bordered was made from
        self.field: np.ndarray | None = None
        self.frames_since_reset = 0

    def reset(self, frame: np.ndarray) -> None:
        """The endpoint ran inference on ``frame``: it becomes the cache, motion starts at zero."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        self.cache = np.array(frame, copy=True, order="C")
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

    def residual_at_tau(self, frame: np.ndarray, policy,
                        block: int | None = None) -> tuple[ResidualSet, float]:
        """What a sender's dispatch takes: the accumulated field quantized as the wire carries it
        (what a receiver applies), tau picked by ``policy`` (:class:`fluxshard.tau.TauPolicy`)
        from that field's motion, and the residual set at that tau. -> (set, tau)."""
        from fluxshard.wire import quantize_field

        self._require()
        applied = quantize_field(self.field)
        tau = policy.tau_for(motion_statistic(applied))
        return self.residual(frame, policy.dispatch_threshold(tau), block, field=applied), tau

    def motion_statistic(self) -> float:
        self._require()
        return motion_statistic(self.field)


class EdgePath:
    """The edge's data path for an endpoint that runs on every frame (benchmarks, profiles, tests):
    codec MVs accumulated into its dispatch state, quantized to the wire's quarter-pel as the SDK
    does -> residual blocks at the policy's tau -> the assembled input the executor sees, with the
    field since its last run. ``tau``: a number on the [0, 1] input scale, or a
    :class:`fluxshard.tau.TauPolicy`; :attr:`tau` is the value the last frame used (the executor
    truncates with it). ``motion=False`` ignores the MVs (a pixel-aligned cache: the DeltaCNN-like
    baseline)."""

    def __init__(self, tau, block: int = RESIDUAL_BLOCK, motion: bool = True):
        from fluxshard.tau import TauPolicy

        self.state = EndpointState(block)
        self.policy = TauPolicy.of(tau)
        self.tau = self.policy.tau_for(0.0)
        self.motion = motion

    def step(self, frame) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """One decoded :class:`fluxshard.motion.MotionFrame` -> (assembled input, accumulated
        field or None, key)."""
        if self.state.cache is None or frame.is_key:
            image, field, key = frame.image, None, True
            self.tau = self.policy.tau_for(0.0)
        else:
            self.state.accumulate(frame.field if self.motion else np.zeros_like(frame.field))
            residual, self.tau = self.state.residual_at_tau(frame.image, self.policy)
            image, field, key = residual.assemble(frame.image), residual.field, False
        self.state.reset(image)
        return image, field, key


def edge_inputs(video, tau, **kwargs):
    """(MotionFrame, assembled input, field or None, key) for every frame of ``video`` along
    :class:`EdgePath` at ``tau`` (``kwargs``: its options)."""
    from fluxshard.motion.decode import iter_motion

    path = EdgePath(tau, **kwargs)
    for frame in iter_motion(video):
        yield (frame, *path.step(frame))
