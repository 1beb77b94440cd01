"""What the sparse executor keeps per stream and per frame, below the executor, its rules and its
bypass policy so that each of them imports it and none imports another: :class:`StreamState`
(every cache of one stream), :class:`FrameContext` (what one frame uses while it runs),
:class:`FrameReport` / :class:`LayerStats` (what a frame did), :class:`BypassStats` (the adaptive
bypass's measured latencies), and :class:`FrameWalker`, the part of the executor a mask rule
calls back into.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Protocol

import torch
from torch import nn

from fluxshard.measures import cache_hit_rate

from .rfap import RFAPPlan

# sparse frames measured per probe of the adaptive bypass
PROBE_FRAMES = 3


@dataclass
class BypassStats:
    """One stream's measured latencies, kept across key frames."""

    sparse_ms: float | None = None
    bypass_ms: float | None = None
    sparse_probe_left: int = PROBE_FRAMES  # sparse frames to measure before comparing
    bypassed_since_probe: int = 0


@dataclass
class LayerStats:
    positions: int = 0  # output positions of cached ops in this top-level layer
    computed: int = 0  # of those, positions computed this frame (whole active tiles)
    changed: int = 0  # positions whose value differs from the gathered cache
    # SparseExecutor.clock time; on CUDA host time (kernels may still be queued), frames sync
    seconds: float = 0.0


@dataclass
class FrameReport:
    key: bool
    layers: dict[int, LayerStats] = dc_field(default_factory=dict)
    # fraction of input pixels that differ from the aligned cache; a frame bypassed before the
    # compare (unaligned motion, or adaptive) reports the unaligned share of stride-8 positions
    input_changed: float = 0.0
    seconds: float = 0.0
    bypassed: bool = False  # ran on the dense bypass runner (nothing reused, no layer stats)

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.layers.values())

    @property
    def computed_fraction(self) -> float:
        if self.bypassed:
            return 1.0
        return sum(s.computed for s in self.layers.values()) / max(self.positions, 1)

    @property
    def cache_hit_rate(self) -> float:
        pos = self.positions
        return cache_hit_rate(pos - sum(s.computed for s in self.layers.values()), pos)

    def active_fraction(self) -> dict[int, float]:
        return {i: s.computed / max(s.positions, 1) for i, s in self.layers.items()}


@dataclass
class StreamState:
    """Everything one stream keeps between frames: the input cache and every layer's cache."""

    caches: dict[str, torch.Tensor] = dc_field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    frames_since_key: int = 0
    truncation_skip: dict[str, int] = dc_field(default_factory=dict)  # op -> frames left
    stale: bool = False  # layer caches dropped by a bypassed frame: the next run is a key frame
    # the adaptive bypass's measured latencies (bypass.AdaptiveBypass), kept across key frames
    bypass_stats: BypassStats = dc_field(default_factory=BypassStats)

    def reset(self) -> None:
        self.caches.clear()
        self.truncation_skip.clear()
        self.stale = False

    def abandon(self) -> None:
        """After a frame that failed part way: caches are half updated, so drop them all and
        make the next frame a key frame (as on a fresh stream)."""
        self.reset()
        self.input_shape = None
        self.frames_since_key = 0

    def drop_layer_caches(self) -> None:
        """After a frame that ran elsewhere: only the input cache still matches the stream."""
        self.caches = {"input": self.caches["input"]} if "input" in self.caches else {}
        self.truncation_skip.clear()
        self.stale = True
        self.input_shape = None
        self.frames_since_key = 0


@dataclass
class FrameContext:
    """What one frame of one stream uses while it runs: made by :meth:`SparseExecutor.begin`,
    passed down the walk, dropped when the frame ends. As a context manager it abandons the
    stream's caches when the frame fails (``StreamState.abandon``)."""

    state: StreamState
    frame: torch.Tensor
    plan: RFAPPlan
    report: FrameReport
    tau: float  # this frame's truncation tau
    convs: dict  # TileConv per (op, map size): the executor's tables for this input size
    points: dict  # PointConv per geometry, likewise
    device: torch.device
    started: float  # the executor's clock at the start
    layer: LayerStats | None = None  # the top-level layer being walked

    def __enter__(self) -> FrameContext:
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if error is not None:
            self.state.abandon()
        return False


class FrameWalker(Protocol):
    """What a mask rule (rules.py) calls on the executor walking the model."""

    def module(self, ctx: FrameContext, m: nn.Module, x): ...

    def conv(self, ctx: FrameContext, conv: nn.Conv2d, act: nn.Module, x): ...

    def dense_block(self, ctx: FrameContext, block: nn.Module, x, last_conv: nn.Conv2d | None, *,
                    out_stride: int | None = None): ...
