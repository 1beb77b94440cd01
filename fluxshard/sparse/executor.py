"""The sparse executor: runs a (fused) YOLO11 on a new frame from its per-stream caches.

Every tensor that flows through the model is carried as a :class:`Feat`: its assembled value,
the mask of positions whose value differs from the MV-gathered cache of the same tensor
(``changed``), and its grid stride. The invariant every handler keeps: outside ``changed`` the
value equals the MV-gathered previous value; inside, it was recomputed. Convs recompute the
positions whose receptive field holds a changed input (dilation), that fail RFAP, or that cannot
be gathered; global blocks (SPPF, C2PSA) run densely and the difference to the gathered cache
decides what changed (truncation keeps what moved by no more than tau / ||w||_1).

State is explicit: :class:`StreamState` holds every cache of one stream; the executor and the
model are shared by all streams.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field as dc_field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.models.modules import (C2PSA, SPPF, Bottleneck, C2f, C3, Concat, Conv, Detect,
                                      Segment)
from fluxshard.measures import cache_hit_rate
from fluxshard.models.yolo import YOLO11, fuse, is_fused

from .ops import (TileConv, dilate_mask, masked_pointwise_conv, masked_sparse_conv, mv_gather,
                  window_uniform)
from .rfap import RFAPPlan


class Feat(NamedTuple):
    value: torch.Tensor  # (1, C, H, W)
    changed: torch.Tensor  # (H, W) bool
    stride: int


@dataclass
class LayerStats:
    positions: int = 0  # output positions of cached ops in this top-level layer
    computed: int = 0  # of those, positions computed this frame (whole active tiles)
    changed: int = 0  # positions whose value differs from the gathered cache
    seconds: float = 0.0


@dataclass
class FrameReport:
    key: bool
    layers: dict[int, LayerStats] = dc_field(default_factory=dict)
    input_changed: float = 0.0  # fraction of input pixels that differ from the aligned cache
    seconds: float = 0.0

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.layers.values())

    @property
    def computed_fraction(self) -> float:
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

    def reset(self) -> None:
        self.caches.clear()
        self.input_shape = None
        self.frames_since_key = 0


def _l1_norm(conv: nn.Conv2d) -> float:
    """||w||_1 of the spec: the largest L1 norm of one output channel's kernel."""
    return float(conv.weight.detach().abs().flatten(1).sum(1).max())


class SparseExecutor:
    """Masked sparse inference of a YOLO11 model with per-stream feature caches.

    strict_rfap: enforce Cond. 1 at every spatial layer (exact at tau=0); otherwise only at the
        first spatial layer (v1's practical scope).
    tau: truncation threshold (0 = exact reuse).
    tile: output tile edge of the tile-batched convs.
    dense_above: an op whose active tiles exceed this share of the map runs as one dense call.
    keyframe_interval: force a dense key frame every N frames (None: only when asked).
    grid_snap: relax Cond. 2 to the nearest grid displacement (approximate; see rfap.RFAPPlan).
    """

    def __init__(self, model: YOLO11, *, strict_rfap: bool = False, tau: float = 0.0,
                 tile: int = 8, dense_above: float = 0.6, keyframe_interval: int | None = None,
                 grid_snap: bool = False):
        if strict_rfap and grid_snap:
            raise ValueError("grid_snap relaxes RFAP Cond. 2: it cannot be combined with strict_rfap")
        if not is_fused(model):
            fuse(model)
        self.model = model.eval()
        self.strict_rfap = strict_rfap
        self.tau = float(tau)
        self.tile = tile
        self.dense_above = dense_above
        self.keyframe_interval = keyframe_interval
        self.grid_snap = grid_snap
        self.names = {id(m): n for n, m in model.named_modules()}
        self.norms = {id(m): _l1_norm(m) for m in model.modules() if isinstance(m, nn.Conv2d)}
        self.first_spatial = model.model[0].conv  # Cond. 1 in relaxed mode
        self._plans: dict[tuple, TileConv] = {}

    # ---------------------------------------------------------------- public API
    @torch.no_grad()
    def run(self, state: StreamState, frame: torch.Tensor, field: np.ndarray | None = None, *,
            key: bool = False):
        """Infer one frame. ``frame`` (1, 3, H, W) float in [0, 1] (fluxshard.models.preprocess);
        ``field`` the accumulated motion field from the frame this stream last ran on to this
        one. Returns (the model's eval output, FrameReport)."""
        if frame.ndim != 4 or frame.shape[0] != 1 or frame.shape[1] != 3:
            raise ValueError(f"expected one (1, 3, H, W) frame, got {tuple(frame.shape)}")
        key = (key or state.input_shape != tuple(frame.shape)
               or (self.keyframe_interval is not None
                   and state.frames_since_key + 1 >= self.keyframe_interval))
        if key:
            state.reset()
            field = None
        t0 = time.perf_counter()
        self._state, self._key = state, key
        self._plan = RFAPPlan(field, frame.shape[2], frame.shape[3], grid_snap=self.grid_snap)
        self._report = report = FrameReport(key=key)
        try:
            out = self._walk(self._input(frame))
        except BaseException:
            state.reset()  # caches are half-updated: the next frame must be a key frame
            raise
        state.input_shape = tuple(frame.shape)
        state.frames_since_key = 0 if key else state.frames_since_key + 1
        report.seconds = time.perf_counter() - t0
        del self._state, self._plan, self._report
        return out, report

    # ---------------------------------------------------------------- graph walk
    def _walk(self, x: Feat):
        outputs: list[Feat | None] = []
        for m in self.model.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j]
                                                              for j in m.f]
            self._layer = m.i
            self._report.layers[m.i] = LayerStats()
            t = time.perf_counter()
            x = self._module(m, x)
            self._report.layers[m.i].seconds = time.perf_counter() - t
            outputs.append(x if m.i in self.model.save else None)
        return x

    def _module(self, m: nn.Module, x):
        if isinstance(m, Conv):
            return self._conv(m.conv, m.act, x)
        if isinstance(m, nn.Conv2d):
            return self._conv(m, nn.Identity(), x)
        if isinstance(m, nn.Sequential):
            for sub in m:
                x = self._module(sub, x)
            return x
        if isinstance(m, Bottleneck):
            y = self._module(m.cv2, self._module(m.cv1, x))
            return _add(x, y) if m.add else y
        if isinstance(m, C2f):  # C3k2 too
            y = self._module(m.cv1, x)
            parts = list(_split(y, (m.c, m.c)))
            for block in m.m:
                parts.append(self._module(block, parts[-1]))
            return self._module(m.cv2, _cat(parts))
        if isinstance(m, C3):  # C3k
            a = self._module(m.m, self._module(m.cv1, x))
            return self._module(m.cv3, _cat([a, self._module(m.cv2, x)]))
        if isinstance(m, (SPPF, C2PSA)):
            return self._dense_block(m, x, m.cv2.conv)
        if isinstance(m, nn.Upsample):
            f = int(m.scale_factor)
            return Feat(F.interpolate(x.value, scale_factor=f, mode="nearest"),
                        x.changed.repeat_interleave(f, 0).repeat_interleave(f, 1),
                        x.stride // f)
        if isinstance(m, Concat):
            return _cat(x)
        if isinstance(m, Segment):
            return self._segment(m, x)
        if isinstance(m, Detect):
            return m.decode(self._detect_maps(m, x))
        raise TypeError(f"sparse executor has no rule for {type(m).__name__}")

    def _detect_maps(self, m: Detect, xs: list[Feat]) -> list[torch.Tensor]:
        return [torch.cat((self._module(m.cv2[i], xs[i]).value,
                           self._module(m.cv3[i], xs[i]).value), 1) for i in range(m.nl)]

    def _segment(self, m: Segment, xs: list[Feat]):
        p = self._module(m.proto.cv1, xs[0])
        up = m.proto.upsample  # 2x2 stride-2 transposed conv: output q reads input q // 2 only
        p = self._dense_block(up, p, None, out_stride=p.stride // 2)
        p = self._module(m.proto.cv3, self._module(m.proto.cv2, p)).value
        mc = torch.cat([self._module(m.cv4[i], xs[i]).value.flatten(2) for i in range(m.nl)], 2)
        return torch.cat([m.decode(self._detect_maps(m, xs)), mc], 1), p

    # ---------------------------------------------------------------- the two op kinds
    def _input(self, frame: torch.Tensor) -> Feat:
        """The dispatch layer: which input pixels differ from the aligned input cache."""
        grid = self._plan.grid(1)
        cache = self._state.caches.get("input")
        self._state.caches["input"] = frame
        if cache is None:
            changed = torch.ones(frame.shape[2:], dtype=torch.bool)
        else:
            changed = (frame != mv_gather(cache, grid.index, grid.invalid)).any(1)[0]
            if grid.invalid is not None:
                changed |= grid.invalid
        self._report.input_changed = float(changed.float().mean())
        return Feat(frame, changed, 1)

    def _gathered(self, name: str, stride: int):
        cache = self._state.caches.get(name)
        if cache is None:
            return None, None
        grid = self._plan.grid(stride)
        return mv_gather(cache, grid.index, grid.invalid), grid.invalid

    def _conv(self, conv: nn.Conv2d, act: nn.Module, x: Feat) -> Feat:
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        out_stride = x.stride * s
        name = self.names[id(conv)]
        gathered, invalid = self._gathered(name, out_stride)
        stats = self._report.layers[self._layer]
        threshold = self.tau / self.norms[id(conv)] if (self.tau > 0 and
                                                         isinstance(act, nn.SiLU)) else 0.0
        h, w = x.value.shape[2:]
        key = (name, h, w)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = TileConv(conv, (h, w), self._tile_for(h // s, w // s))
        positions = plan.out_h * plan.out_w
        stats.positions += positions
        if gathered is None:  # key frame: dense
            y = act(conv(x.value))
            changed = torch.ones(plan.out_h, plan.out_w, dtype=torch.bool)
            stats.computed += positions
        elif bool(x.changed.all()):  # everything upstream changed: one dense call, no masks
            fresh = act(conv(x.value))
            if threshold > 0:
                y, changed = _truncate(fresh, gathered, threshold)
            else:  # exact mode: a fully changed input changes (practically) every output
                y, changed = fresh, torch.ones(plan.out_h, plan.out_w, dtype=torch.bool)
            stats.computed += positions
        else:
            recompute = dilate_mask(x.changed, k, s, p)
            if invalid is not None:
                recompute = recompute | invalid
                if k > 1 and (self.strict_rfap or conv is self.first_spatial):
                    vectors = self._plan.grid(x.stride).vectors
                    recompute |= ~window_uniform(vectors, k, s, p)
            pointwise = k == 1 and s == 1 and conv.groups == 1
            if pointwise and float(recompute.float().mean()) <= self.dense_above:
                y, changed, n_points = masked_pointwise_conv(conv, act, x.value, recompute,
                                                             gathered, threshold)
                stats.computed += n_points
                if invalid is not None:
                    changed = changed | invalid
                stats.changed += int(changed.sum())
                self._state.caches[name] = y
                return Feat(y, changed, out_stride)
            active = plan.active_tiles(recompute)
            n_tiles = plan.tiles_y * plan.tiles_x
            if active.numel() > self.dense_above * n_tiles:
                y, changed = _truncate(act(conv(x.value)), gathered, threshold)
                stats.computed += positions
            else:
                y, changed, n_active = masked_sparse_conv(plan, conv, act, x.value, recompute,
                                                          gathered, threshold)
                stats.computed += min(n_active * plan.tile * plan.tile, positions)
            if invalid is not None:
                changed = changed | invalid
        stats.changed += int(changed.sum())
        self._state.caches[name] = y
        return Feat(y, changed, out_stride)

    def _tile_for(self, out_h: int, out_w: int) -> int:
        """Output tile edge for a map: ``tile``, halved on small maps (stride 16/32 at 384x640)
        so that a local change does not activate a sixth of the map."""
        tile = self.tile
        while tile > 2 and min(out_h, out_w) < 4 * tile:
            tile //= 2
        return tile

    def _dense_block(self, block: nn.Module, x: Feat, last_conv: nn.Conv2d | None, *,
                     out_stride: int | None = None) -> Feat:
        """A block whose receptive field is global (or that is cheap): run it densely when any
        input changed; the difference to its gathered cache says which outputs changed."""
        out_stride = x.stride if out_stride is None else out_stride
        name = self.names[id(block)]
        gathered, invalid = self._gathered(name, out_stride)
        stats = self._report.layers[self._layer]
        threshold = self.tau / self.norms[id(last_conv)] if (self.tau > 0 and last_conv is not None) \
            else 0.0
        if gathered is not None and not bool(x.changed.any()):
            y, changed = gathered, torch.zeros(gathered.shape[2:], dtype=torch.bool)
            computed = 0
            if invalid is not None:  # nothing changed at the input, so nothing is invalid here
                changed |= invalid
        else:
            y = block(x.value)
            computed = y.shape[2] * y.shape[3]
            if gathered is None:
                changed = torch.ones(y.shape[2:], dtype=torch.bool)
            else:
                y, changed = _truncate(y, gathered, threshold)
                if invalid is not None:
                    changed |= invalid
        stats.positions += y.shape[2] * y.shape[3]
        stats.computed += computed
        stats.changed += int(changed.sum())
        self._state.caches[name] = y
        return Feat(y, changed, out_stride)


# -------------------------------------------------------------------- mask-carrying elementwise
def _truncate(fresh: torch.Tensor, gathered: torch.Tensor, threshold: float):
    """Positions whose fresh value moved by more than ``threshold`` (any channel) against the
    gathered cache change; the others keep the cached value (threshold 0: exact comparison)."""
    if threshold == 0:
        return fresh, torch.ne(fresh, gathered).any(1)[0]
    changed = (fresh - gathered).abs().amax(1)[0] > threshold
    return torch.where(changed, fresh, gathered), changed


def _add(a: Feat, b: Feat) -> Feat:
    return Feat(a.value + b.value, a.changed | b.changed, a.stride)


def _cat(parts: list[Feat]) -> Feat:
    changed = parts[0].changed
    for p in parts[1:]:
        changed = changed | p.changed
    return Feat(torch.cat([p.value for p in parts], 1), changed, parts[0].stride)


def _split(x: Feat, sizes: tuple[int, ...]):
    return (Feat(v, x.changed, x.stride) for v in x.value.split(sizes, 1))
