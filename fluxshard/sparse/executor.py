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

Device: the executor runs where the model's weights are (CPU or CUDA); frames must be there too,
and every mask, index table and plan it makes is created on that device.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
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

from .ops import (PointConv, TileConv, channels_last, dilate_mask, masked_point_conv,
                  masked_sparse_conv, mv_gather_, point_weight, rows, window_uniform)
from .rfap import RFAPPlan
from .spec import l1_norm


# A densely computed op whose outputs mostly changed skips truncation for this many frames.
TRUNCATION_PROBE = 4
# Adaptive bypass: sparse frames measured per probe
PROBE_FRAMES = 3
# Index tables (tile and im2col rows) are kept for this many input sizes, least recently used
# dropped: a server fed ever new frame sizes must not grow without bound (~16 MB per size for a
# 640x384 detector).
GEOMETRY_SIZES = 4


class Feat(NamedTuple):
    value: torch.Tensor  # (1, C, H, W)
    changed: torch.Tensor  # (H, W) bool
    stride: int


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
    # adaptive bypass (SparseExecutor.adaptive): measured latencies, kept across key frames
    sparse_ms: float | None = None
    bypass_ms: float | None = None
    sparse_probe_left: int = PROBE_FRAMES  # sparse frames to measure before comparing
    bypassed_since_probe: int = 0

    def reset(self) -> None:
        self.caches.clear()
        self.truncation_skip.clear()
        self.stale = False

    def drop_layer_caches(self) -> None:
        """After a frame that ran elsewhere: only the input cache still matches the stream."""
        self.caches = {"input": self.caches["input"]} if "input" in self.caches else {}
        self.truncation_skip.clear()
        self.stale = True
        self.input_shape = None
        self.frames_since_key = 0


class SparseExecutor:
    """Masked sparse inference of a YOLO11 model with per-stream feature caches.

    strict_rfap: enforce Cond. 1 at every spatial layer (exact at tau=0); otherwise only at the
        first spatial layer (v1's practical scope).
    tau: truncation threshold (0 = exact reuse).
    tile: output tile edge of the tile-batched convs.
    dense_above: an op whose recompute positions ("point") or active tiles ("tile") exceed this
        share of the map runs as one dense call (0.25: where the sparse path stops paying on 2
        CPU threads, measured by perf/bench_sparse.py).
    bypass: a dense runner (fluxshard.models.dense.DenseRunner, e.g. onnxruntime, or a callable
        frame -> eval output) for frames whose non-reusable share (stride-8 positions failing
        RFAP Cond. 2, else changed input pixels) exceeds ``bypass_above``:
        nothing there is worth reusing, so the fastest dense engine runs instead and the layer
        caches are dropped (the next frame below the threshold is a key frame). None: never.
    adaptive: with a bypass, also bypass reusable frames while the stream's measured sparse
        latency (EWMA) exceeds the bypass's, re-measuring the sparse path every
        ``probe_interval`` bypassed frames: the endpoint is then never much slower than its
        fastest dense engine.
    conv_mode: "point": a conv computes exactly its recompute positions (im2col rows, one
        matmul); "tile": whole tiles with their halo in one conv call (v2's tile batching).
        "point" measured faster on 2 CPU threads: a conv call on a small batch of tiles costs
        ~85 us of mkldnn setup, more than gathering 9 rows per position. 1x1 convs always run
        per position.
    keyframe_interval: force a dense key frame every N frames (None: only when asked).
    truncation_probe: a densely computed op most of whose outputs changed skips the truncation
        compare for this many frames and reports every output changed, taking the fresh values
        (exact, and cheaper; at tau > 0 it departs from the spec's truncated values, which are
        what the ONNX graph and the plugins compute). 0: always compare, as the spec says.
    grid_snap: relax Cond. 2 to the nearest grid displacement (approximate; see rfap.RFAPPlan).
    clock: seconds for FrameReport / LayerStats and so for the adaptive policy (tests inject a
        deterministic one). On CUDA the frame waits for its kernels before the last reading.
    """

    def __init__(self, model: YOLO11, *, strict_rfap: bool = False, tau: float = 0.0,
                 tile: int = 8, dense_above: float = 0.25, keyframe_interval: int | None = None,
                 grid_snap: bool = False, conv_mode: str = "point", bypass=None,
                 bypass_above: float = 0.5, adaptive: bool = False, probe_interval: int = 30,
                 truncation_probe: int = TRUNCATION_PROBE,
                 clock: Callable[[], float] = time.perf_counter):
        if strict_rfap and grid_snap:
            raise ValueError("grid_snap relaxes RFAP Cond. 2: it cannot be combined with strict_rfap")
        if not is_fused(model):
            fuse(model)
        # channels_last weights like the maps: mkldnn reorders mismatched weights on every call
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.strict_rfap = strict_rfap
        self.tau = float(tau)
        self._tau = self.tau  # this frame's tau (run's argument)
        self.tile = tile
        self.dense_above = dense_above
        if conv_mode not in ("point", "tile"):
            raise ValueError(f"conv_mode must be 'point' or 'tile', got {conv_mode!r}")
        self.conv_mode = conv_mode
        self.bypass = bypass
        self.bypass_above = bypass_above
        self.adaptive = adaptive
        self.probe_interval = probe_interval
        self.truncation_probe = truncation_probe
        self.keyframe_interval = keyframe_interval
        self.grid_snap = grid_snap
        self.clock = clock
        self.names = {id(m): n for n, m in model.named_modules()}
        self.norms = {id(m): l1_norm(m.weight) for m in model.modules()
                      if isinstance(m, nn.Conv2d)}
        self.first_spatial = model.model[0].conv  # Cond. 1 in relaxed mode
        # input (H, W) -> (TileConv per (layer, map size), PointConv per geometry), LRU order
        self._geometries: OrderedDict[tuple[int, int], tuple[dict, dict]] = OrderedDict()
        self._point_weights: dict[int, torch.Tensor] = {}
        self._tables_device = self.device  # device the cached tables were built on

    @property
    def device(self) -> torch.device:
        """Where the executor runs: its model's weights' device."""
        return self.first_spatial.weight.device

    # ---------------------------------------------------------------- public API
    @torch.no_grad()
    def run(self, state: StreamState, frame: torch.Tensor, field: np.ndarray | None = None, *,
            key: bool = False, tau: float | None = None):
        """Infer one frame. ``frame`` (1, 3, H, W) float in [0, 1] (fluxshard.models.preprocess);
        ``field`` the accumulated motion field from the frame this stream last ran on to this
        one; ``tau`` this frame's truncation tau (``fluxshard.tau``: the one the dispatch layer
        picked the input's residual blocks with; default: the executor's). Returns (the model's
        eval output, FrameReport)."""
        if frame.ndim != 4 or frame.shape[0] != 1 or frame.shape[1] != 3:
            raise ValueError(f"expected one (1, 3, H, W) frame, got {tuple(frame.shape)}")
        device = self.device
        if frame.device != device:
            raise ValueError(f"frame is on {frame.device} but the model is on {device}: "
                             "move the frame (fluxshard.models.preprocess(..., device=...))")
        if device != self._tables_device:  # the model moved: tables of the old device are void
            self._geometries.clear()
            self._point_weights.clear()
            self._tables_device = device
        key = (key or state.input_shape != tuple(frame.shape)
               or (self.keyframe_interval is not None
                   and state.frames_since_key + 1 >= self.keyframe_interval))
        if key:
            state.reset()
            field = None
        t0 = self.clock()
        self._tau = self.tau if tau is None else float(tau)
        self._plans, self._points = self._tables_for(tuple(frame.shape[2:]))
        self._state = state
        self._plan = RFAPPlan(field, frame.shape[2], frame.shape[3], grid_snap=self.grid_snap,
                              device=device)
        self._report = report = FrameReport(key=key)
        try:
            bypass = False
            if not key and self.bypass is not None:
                # Cheap tests first: an unaligned frame skips the input compare (which costs
                # most when everything moves) and reports the unaligned share instead.
                unaligned = self._unaligned()
                bypass = unaligned > self.bypass_above or (
                    self.adaptive and self._bypass_is_faster(state))
                if bypass:
                    report.input_changed = unaligned
                    state.caches["input"] = channels_last(frame)
            x = None if bypass else self._input(frame)
            if not bypass and not key and self.bypass is not None:
                bypass = report.input_changed > self.bypass_above
            if bypass:
                out = self._run_bypass(frame)
                report.bypassed = True
                state.drop_layer_caches()
            else:
                if not key and state.stale:  # layer caches were dropped: a key frame rebuilds them
                    state.reset()
                    report.key = key = True
                    self._plan = RFAPPlan(None, frame.shape[2], frame.shape[3], device=device)
                    x = self._input(frame)
                out = self._walk(x)
        except BaseException:
            state.reset()  # caches are half-updated: the next frame must be a key frame
            raise
        state.input_shape = tuple(frame.shape)
        state.frames_since_key = 0 if key else state.frames_since_key + 1
        if device.type == "cuda":  # the frame's time includes its queued kernels
            torch.cuda.synchronize(device)
        report.seconds = self.clock() - t0
        self._record_latency(state, report)
        del self._state, self._plan, self._report, self._plans, self._points
        return out, report

    def _tables_for(self, hw: tuple[int, int]) -> tuple[dict, dict]:
        tables = self._geometries.pop(hw, None) or ({}, {})
        self._geometries[hw] = tables  # most recently used last
        while len(self._geometries) > GEOMETRY_SIZES:
            self._geometries.popitem(last=False)
        return tables

    def _bypass_is_faster(self, state: StreamState) -> bool:
        """Adaptive policy: bypass reusable frames too while this stream's measured sparse
        latency exceeds the bypass's; every ``probe_interval`` bypassed frames, measure the
        sparse path again (a key frame, then ``PROBE_FRAMES`` sparse frames)."""
        if state.sparse_probe_left > 0 or state.sparse_ms is None:
            return False
        if state.bypass_ms is None:
            return True  # measure the bypass once
        if state.bypassed_since_probe >= self.probe_interval:
            state.bypassed_since_probe = 0
            state.sparse_probe_left = PROBE_FRAMES
            return False
        return state.sparse_ms > state.bypass_ms

    @staticmethod
    def _record_latency(state: StreamState, report: FrameReport) -> None:
        ms = report.seconds * 1e3
        if report.bypassed:
            state.bypass_ms = _ewma(state.bypass_ms, ms)
            state.bypassed_since_probe += 1
        elif not report.key:
            state.sparse_ms = _ewma(state.sparse_ms, ms)
            state.sparse_probe_left = max(0, state.sparse_probe_left - 1)

    def _unaligned(self) -> float:
        """Share of stride-8 positions (where the heavy layers start) whose motion fails RFAP
        Cond. 2: they are recomputed in every layer from there on, whatever the input holds."""
        invalid = self._plan.grid(8).invalid
        return 0.0 if invalid is None else float(invalid.float().mean())

    def _run_bypass(self, frame: torch.Tensor):
        """The dense bypass runner's output in the model's eval format (torch tensors)."""
        out = self.bypass.run(frame) if hasattr(self.bypass, "run") else self.bypass(frame)
        if isinstance(out, (list, tuple)):  # onnxruntime: [output0] or [output0, prototypes]
            out = [torch.as_tensor(o, device=frame.device) for o in out]
            return out[0] if len(out) == 1 else tuple(out)
        return out

    # ---------------------------------------------------------------- graph walk
    def _walk(self, x: Feat):
        outputs: list[Feat | None] = []
        for m in self.model.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j]
                                                              for j in m.f]
            self._layer = m.i
            self._report.layers[m.i] = LayerStats()
            t = self.clock()
            x = self._module(m, x)
            self._report.layers[m.i].seconds = self.clock() - t
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
        p = p.clone(memory_format=torch.contiguous_format)  # the cache stays ours
        mc = torch.cat([self._module(m.cv4[i], xs[i]).value.flatten(2) for i in range(m.nl)], 2)
        return torch.cat([m.decode(self._detect_maps(m, xs)), mc], 1), p

    # ---------------------------------------------------------------- the two op kinds
    def _input(self, frame: torch.Tensor) -> Feat:
        """The dispatch layer: which input pixels differ from the aligned input cache (compared
        row by row, so the cache is never re-laid out)."""
        grid = self._plan.grid(1)
        frame = channels_last(frame)
        cache = self._state.caches.get("input")
        self._state.caches["input"] = frame
        h, w = frame.shape[2:]
        if cache is None:
            changed = torch.ones(h, w, dtype=torch.bool, device=frame.device)
        else:
            now, before = rows(frame), rows(cache)
            changed = (now != before).any(1)
            if grid.moved is not None:
                changed[grid.moved] = (now.index_select(0, grid.moved)
                                       != before.index_select(0, grid.source)).any(1)
                changed |= grid.invalid.flatten()
            changed = changed.view(h, w)
        self._report.input_changed = float(changed.float().mean())
        return Feat(frame, changed, 1)

    def _gathered(self, cache: torch.Tensor, stride: int):
        """An op's cache MV-gathered in place (this frame's output replaces it) and the grid's
        invalid mask (None: zero motion). Invalid positions keep stale values: every op recomputes
        them and takes the fresh value (``force``), so the spec's zero never needs writing."""
        grid = self._plan.grid(stride)
        return mv_gather_(cache, grid, zero_invalid=False), grid.invalid

    def _conv(self, conv: nn.Conv2d, act: nn.Module, x: Feat) -> Feat:
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        out_stride = x.stride * s
        name = self.names[id(conv)]
        stats = self._report.layers[self._layer]
        threshold = self._tau / self.norms[id(conv)] if (self._tau > 0 and
                                                         isinstance(act, nn.SiLU)) else 0.0
        h, w = x.value.shape[2:]
        plan = self._plans.get((name, h, w))
        if plan is None:
            plan = self._plans[(name, h, w)] = TileConv(conv, (h, w),
                                                        self._tile_for(h // s, w // s),
                                                        device=x.value.device)
        positions = plan.out_h * plan.out_w
        stats.positions += positions
        cache = self._state.caches.get(name)
        everything = bool(x.changed.all())
        if cache is None or (everything and threshold == 0):
            # Key frame, or exact mode with every input changed: one dense call, and (practically)
            # every output changes, so the cache is not even gathered.
            y = _dense_conv(conv, act, x)
            changed = torch.ones(plan.out_h, plan.out_w, dtype=torch.bool, device=y.device)
            stats.computed += positions
        else:
            gathered, invalid = self._gathered(cache, out_stride)
            if everything:  # one dense call; truncation says what changed
                y, changed = self._truncate(name, _dense_conv(conv, act, x), gathered,
                                            threshold, invalid)
                stats.computed += positions
            else:
                y, changed, computed = self._sparse_conv(name, conv, act, plan, x, gathered,
                                                         invalid, threshold)
                stats.computed += computed
        stats.changed += int(changed.sum())
        self._state.caches[name] = y
        return Feat(y, changed, out_stride)

    def _sparse_conv(self, name: str, conv: nn.Conv2d, act: nn.Module, plan: TileConv, x: Feat,
                     gathered: torch.Tensor, invalid: torch.Tensor | None, threshold: float):
        """Recompute where the receptive field changed or RFAP fails; (y, changed, computed):
        exactly those positions (``conv_mode`` "point": im2col rows, one matmul) or their whole
        tiles with halo (``conv_mode`` "tile"), or one dense call when that share of the map
        exceeds ``dense_above``."""
        k, s, p = plan.k, plan.s, plan.p
        recompute = dilate_mask(x.changed, k, s, p)
        if invalid is not None:
            recompute = recompute | invalid
            if k > 1 and (self.strict_rfap or conv is self.first_spatial):
                vectors = self._plan.grid(x.stride).vectors
                recompute |= ~window_uniform(vectors, k, s, p)
        positions = plan.out_h * plan.out_w
        pointable = conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels
        if pointable and (self.conv_mode == "point" or (k == 1 and s == 1)):
            if int(recompute.sum()) <= self.dense_above * positions:
                return masked_point_conv(self._point_plan(k, s, p, x.value.shape[2:]), conv,
                                         self._point_weight(conv), act, x.value, recompute,
                                         gathered, threshold, force=invalid)
            active = None
        else:
            active = plan.active_tiles(recompute)
        if active is None or active.numel() > self.dense_above * plan.tiles_y * plan.tiles_x:
            y, changed = self._truncate(name, _dense_conv(conv, act, x), gathered, threshold,
                                        invalid)
            return y, changed, positions
        y, changed, n_active = masked_sparse_conv(plan, conv, act, x.value, recompute, gathered,
                                                  threshold, force=invalid, active=active)
        return y, changed, min(n_active * plan.tile * plan.tile, positions)

    def _point_plan(self, k: int, s: int, p: int, hw) -> PointConv:
        key = (k, s, p, *hw)  # tap tables depend on the geometry only: shared by layers
        plan = self._points.get(key)
        if plan is None:
            plan = self._points[key] = PointConv(k, s, p, tuple(hw), device=self.device)
        return plan

    def _point_weight(self, conv: nn.Conv2d) -> torch.Tensor:
        weight = self._point_weights.get(id(conv))
        if weight is None:
            weight = self._point_weights[id(conv)] = point_weight(conv)
        return weight

    def _truncate(self, name: str, fresh: torch.Tensor, gathered: torch.Tensor,
                  threshold: float, invalid: torch.Tensor | None):
        """Truncation of a densely computed op (:func:`_truncate`), skipped while it does not
        pay: when most outputs of the op changed the last time it was compared, comparing
        again (several passes over the map) would only confirm that its consumers run densely.
        The op then reports every output changed, which is exact (y is the fresh value), and
        compares again after ``truncation_probe`` frames."""
        skip = self._state.truncation_skip
        left = skip.get(name, 0)
        if left > 0:
            skip[name] = left - 1
            return fresh, torch.ones(fresh.shape[2:], dtype=torch.bool, device=fresh.device)
        y, changed = _truncate(fresh, gathered, threshold, invalid)
        if float(changed.float().mean()) > self.dense_above:
            skip[name] = self.truncation_probe
        return y, changed

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
        cache = self._state.caches.get(name)
        gathered, invalid = (None, None) if cache is None else self._gathered(cache, out_stride)
        stats = self._report.layers[self._layer]
        threshold = (self._tau / self.norms[id(last_conv)]
                     if self._tau > 0 and last_conv is not None else 0.0)
        if gathered is not None and not bool(x.changed.any()):
            y, changed = gathered, torch.zeros(gathered.shape[2:], dtype=torch.bool,
                                               device=gathered.device)
            computed = 0
            if invalid is not None:  # nothing changed at the input, so nothing is invalid here
                changed |= invalid
        else:
            # contiguous in (attention views its input), executor layout out
            y = channels_last(block(x.value.contiguous()))
            computed = y.shape[2] * y.shape[3]
            if gathered is None:
                changed = torch.ones(y.shape[2:], dtype=torch.bool, device=y.device)
            else:
                y, changed = self._truncate(name, y, gathered, threshold, invalid)
        stats.positions += y.shape[2] * y.shape[3]
        stats.computed += computed
        stats.changed += int(changed.sum())
        self._state.caches[name] = y
        return Feat(y, changed, out_stride)


# -------------------------------------------------------------------- mask-carrying elementwise
def _dense_conv(conv: nn.Conv2d, act: nn.Module, x: Feat) -> torch.Tensor:
    """The op on the whole map, in the executor's layout."""
    return channels_last(act(conv(x.value)))


def _truncate(fresh: torch.Tensor, gathered: torch.Tensor, threshold: float,
              force: torch.Tensor | None = None):
    """Positions whose fresh value moved by more than ``threshold`` (any channel) against the
    gathered cache change, and so do ``force`` positions (invalid gathers); the others keep the
    cached value (threshold 0: exact comparison, y is simply ``fresh``)."""
    if threshold == 0:
        changed = torch.ne(fresh, gathered).any(1)[0]
        return fresh, changed if force is None else changed | force
    changed = (fresh - gathered).abs().amax(1)[0] > threshold
    if force is not None:
        changed |= force
    return channels_last(torch.where(changed, fresh, gathered)), changed


def _ewma(old: float | None, new: float, alpha: float = 0.3) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


def _add(a: Feat, b: Feat) -> Feat:
    return Feat(a.value + b.value, a.changed | b.changed, a.stride)


def _cat(parts: list[Feat]) -> Feat:
    changed = parts[0].changed
    for p in parts[1:]:
        changed = changed | p.changed
    return Feat(torch.cat([p.value for p in parts], 1), changed, parts[0].stride)


def _split(x: Feat, sizes: tuple[int, ...]):
    return (Feat(v, x.changed, x.stride) for v in x.value.split(sizes, 1))
