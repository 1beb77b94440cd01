"""The sparse executor: runs a (fused) YOLO11 on a new frame from its per-stream caches.

Every tensor that flows through the model is carried as a :class:`Feat`: its assembled value,
the mask of positions whose value differs from the MV-gathered cache of the same tensor
(``changed``), and its grid stride. The invariant every handler keeps: outside ``changed`` the
value equals the MV-gathered previous value; inside, it was recomputed. Convs recompute the
positions whose receptive field holds a changed input (dilation), that fail RFAP, or that cannot
be gathered; global blocks (SPPF, C2PSA) run densely and the difference to the gathered cache
decides what changed (truncation keeps what moved by no more than tau / ||w||_1).

State is explicit: :class:`StreamState` holds every cache of one stream, :class:`FrameContext`
what one frame uses while it runs (made by ``run`` and passed down the walk); the executor and the
model keep nothing per frame, so streams on threads share one executor without a lock. How a mask
goes through each op type is a rule in rules.py (the ONNX rewrite uses the same rules); the
adaptive dense bypass is a policy around the executor (bypass.py).

Device: the executor runs where the model's weights are (CPU or CUDA); frames must be there too,
and every mask, index table and plan it makes is created on that device.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fluxshard.models.yolo import YOLO11, fuse, is_fused

from .bypass import AdaptiveBypass
from .ops import (PointConv, TileConv, channels_last, dilate_mask, masked_point_conv,
                  masked_sparse_conv, mv_gather_, point_weight, rows, window_uniform)
from .rfap import RFAPPlan
from .rules import Feat, no_rule_error, rule_for_module
from .spec import l1_norm
from .state import PROBE_FRAMES, FrameContext, FrameReport, LayerStats, StreamState

__all__ = ["PROBE_FRAMES", "AdaptiveBypass", "Feat", "FrameContext", "FrameReport", "LayerStats",
           "SparseExecutor", "StreamState"]


# A densely computed op whose outputs mostly changed skips truncation for this many frames.
TRUNCATION_PROBE = 4
# Index tables (tile and im2col rows) are kept for this many input sizes, least recently used
# dropped: a server fed ever new frame sizes must not grow without bound (~16 MB per size for a
# 640x384 detector).
GEOMETRY_SIZES = 4


class SparseExecutor:
    """Masked sparse inference of a YOLO11 model with per-stream feature caches.

    strict_rfap: enforce Cond. 1 at every spatial layer (exact at tau=0); otherwise only at the
        first spatial layer (v1's practical scope).
    tau: truncation threshold (0 = exact reuse).
    tile: output tile edge of the tile-batched convs.
    dense_above: an op whose recompute positions ("point") or active tiles ("tile") exceed this
        share of the map runs as one dense call (0.25: where the sparse path stops paying on 2
        CPU threads, measured by perf/bench_sparse.py).
    bypass, bypass_above, adaptive, probe_interval: with a dense runner ``bypass``, ``run`` goes
        through ``AdaptiveBypass(self, bypass, above=bypass_above, adaptive=adaptive,
        probe_interval=probe_interval)`` (bypass.py: frames with nothing worth reusing, and with
        ``adaptive`` reusable ones while the dense runner measures faster, run dense). None:
        never bypass.
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
        if not isinstance(model, YOLO11):  # its mask rules and graph rewrite know YOLO11's ops
            raise ValueError(f"the exact executor supports YOLO11 only ({type(model).__name__} "
                             "given); use --executor tiles or dense")
        if strict_rfap and grid_snap:
            raise ValueError("grid_snap relaxes RFAP Cond. 2: it cannot be combined with strict_rfap")
        if not is_fused(model):
            fuse(model)
        # channels_last weights like the maps: mkldnn reorders mismatched weights on every call
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.strict_rfap = strict_rfap
        self.tau = float(tau)
        self.tile = tile
        self.dense_above = dense_above
        if conv_mode not in ("point", "tile"):
            raise ValueError(f"conv_mode must be 'point' or 'tile', got {conv_mode!r}")
        self.conv_mode = conv_mode
        self.truncation_probe = truncation_probe
        self.keyframe_interval = keyframe_interval
        self.grid_snap = grid_snap
        self.clock = clock
        self.names = {id(m): n for n, m in model.named_modules()}
        self.norms = {id(m): l1_norm(m.weight) for m in model.modules()
                      if isinstance(m, nn.Conv2d)}
        self.first_spatial = model.model[0].conv  # Cond. 1 in relaxed mode
        for m in model.model:
            if rule_for_module(m) is None:
                raise no_rule_error(m)
        # Tables that depend on the geometry only, shared by every stream and frame (a frame
        # builds what is missing; two streams building the same one at once build equal ones).
        # input (H, W) -> (TileConv per (layer, map size), PointConv per geometry), LRU order
        self._geometries: OrderedDict[tuple[int, int], tuple[dict, dict]] = OrderedDict()
        self._geometries_lock = threading.Lock()
        self._point_weights: dict[int, torch.Tensor] = {}
        self._tables_device = self.device  # device the cached tables were built on
        self.policy = None if bypass is None else AdaptiveBypass(
            self, bypass, above=bypass_above, adaptive=adaptive, probe_interval=probe_interval)

    @property
    def device(self) -> torch.device:
        """Where the executor runs: its model's weights' device."""
        return self.first_spatial.weight.device

    # ---------------------------------------------------------------- public API
    def run(self, state: StreamState, frame: torch.Tensor, field: np.ndarray | None = None, *,
            key: bool = False, tau: float | None = None):
        """Infer one frame. ``frame`` (1, 3, H, W) float in [0, 1] (fluxshard.models.preprocess);
        ``field`` the accumulated motion field from the frame this stream last ran on to this
        one; ``tau`` this frame's truncation tau (``fluxshard.tau``: the one the dispatch layer
        picked the input's residual blocks with; default: the executor's). Returns (the model's
        eval output, FrameReport). With a ``bypass`` runner, through the bypass policy."""
        if self.policy is not None:
            return self.policy.run(state, frame, field, key=key, tau=tau)
        return self.run_sparse(state, frame, field, key=key, tau=tau)

    @torch.no_grad()
    def run_sparse(self, state: StreamState, frame: torch.Tensor,
                   field: np.ndarray | None = None, *, key: bool = False,
                   tau: float | None = None):
        """:meth:`run` without a bypass: every frame on the sparse path."""
        with self.begin(state, frame, field, key=key, tau=tau) as ctx:
            out = self.walk(ctx, self.compare_input(ctx))
        return out, self.end(ctx)

    # ---------------------------------------------------------------- one frame, step by step
    def begin(self, state: StreamState, frame: torch.Tensor, field: np.ndarray | None, *,
              key: bool = False, tau: float | None = None) -> FrameContext:
        """Check the frame, decide whether it is a key frame (then the stream's caches are
        reset) and make its context; then :meth:`compare_input`, :meth:`walk`, :meth:`end`
        (a policy may run the frame elsewhere between them)."""
        if frame.ndim != 4 or frame.shape[0] != 1 or frame.shape[1] != 3:
            raise ValueError(f"expected one (1, 3, H, W) frame, got {tuple(frame.shape)}")
        device = self.device
        if frame.device != device:
            raise ValueError(f"frame is on {frame.device} but the model is on {device}: "
                             "move the frame (fluxshard.models.preprocess(..., device=...))")
        convs, points = self._tables_for(tuple(frame.shape[2:]), device)
        key = (key or state.input_shape != tuple(frame.shape)
               or (self.keyframe_interval is not None
                   and state.frames_since_key + 1 >= self.keyframe_interval))
        if key:
            state.reset()
            field = None
        started = self.clock()
        plan = RFAPPlan(field, frame.shape[2], frame.shape[3], grid_snap=self.grid_snap,
                        device=device)
        return FrameContext(state, frame, plan, FrameReport(key=key),
                            self.tau if tau is None else float(tau), convs, points, device,
                            started)

    def compare_input(self, ctx: FrameContext) -> Feat:
        """The dispatch layer: which input pixels differ from the aligned input cache (compared
        row by row, so the cache is never re-laid out); the frame becomes the input cache."""
        grid = ctx.plan.grid(1)
        frame = channels_last(ctx.frame)
        cache = ctx.state.caches.get("input")
        ctx.state.caches["input"] = frame
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
        ctx.report.input_changed = float(changed.float().mean())
        return Feat(frame, changed, 1)

    def walk(self, ctx: FrameContext, x: Feat):
        """The model on ``x`` (the compared input), op by op by the rules; a stream whose layer
        caches were dropped (a bypassed frame) rebuilds them as a key frame."""
        if not ctx.report.key and ctx.state.stale:
            ctx.state.reset()
            ctx.report.key = True
            ctx.plan = RFAPPlan(None, ctx.frame.shape[2], ctx.frame.shape[3], device=ctx.device)
            x = self.compare_input(ctx)
        outputs: list[Feat | None] = []
        for m in self.model.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j]
                                                              for j in m.f]
            ctx.layer = ctx.report.layers[m.i] = LayerStats()
            t = self.clock()
            x = self.module(ctx, m, x)
            ctx.layer.seconds = self.clock() - t
            outputs.append(x if m.i in self.model.save else None)
        return x

    def end(self, ctx: FrameContext) -> FrameReport:
        """The frame ran (here or elsewhere): the stream moves on; its report, timed."""
        state, report = ctx.state, ctx.report
        state.input_shape = tuple(ctx.frame.shape)
        state.frames_since_key = 0 if report.key else state.frames_since_key + 1
        if ctx.device.type == "cuda":  # the frame's time includes its queued kernels
            torch.cuda.synchronize(ctx.device)
        report.seconds = self.clock() - ctx.started
        return report

    def unaligned(self, ctx: FrameContext) -> float:
        """Share of stride-8 positions (where the heavy layers start) whose motion fails RFAP
        Cond. 2: they are recomputed in every layer from there on, whatever the input holds."""
        invalid = ctx.plan.grid(8).invalid
        return 0.0 if invalid is None else float(invalid.float().mean())

    def _tables_for(self, hw: tuple[int, int], device: torch.device) -> tuple[dict, dict]:
        with self._geometries_lock:
            if device != self._tables_device:  # the model moved: old device's tables are void
                self._geometries.clear()
                self._point_weights.clear()
                self._tables_device = device
            tables = self._geometries.pop(hw, None) or ({}, {})
            self._geometries[hw] = tables  # most recently used last
            while len(self._geometries) > GEOMETRY_SIZES:
                self._geometries.popitem(last=False)
            return tables

    # ---------------------------------------------------------------- the ops (rules.py)
    def module(self, ctx: FrameContext, m: nn.Module, x):
        """``m`` on ``x`` by its op type's mask rule."""
        rule = rule_for_module(m)
        if rule is None:
            raise no_rule_error(m)
        return rule.sparse(self, ctx, m, x)

    def _gathered(self, ctx: FrameContext, cache: torch.Tensor, stride: int):
        """An op's cache MV-gathered in place (this frame's output replaces it) and the grid's
        invalid mask (None: zero motion). Invalid positions keep stale values: every op recomputes
        them and takes the fresh value (``force``), so the spec's zero never needs writing."""
        grid = ctx.plan.grid(stride)
        return mv_gather_(cache, grid, zero_invalid=False), grid.invalid

    def conv(self, ctx: FrameContext, conv: nn.Conv2d, act: nn.Module, x: Feat) -> Feat:
        """A conv (+ activation): recompute where its window reaches a changed input or RFAP
        fails, keep the gathered cache elsewhere."""
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        out_stride = x.stride * s
        name = self.names[id(conv)]
        stats = ctx.layer
        threshold = ctx.tau / self.norms[id(conv)] if (ctx.tau > 0 and
                                                       isinstance(act, nn.SiLU)) else 0.0
        h, w = x.value.shape[2:]
        plan = ctx.convs.get((name, h, w))
        if plan is None:
            plan = ctx.convs[(name, h, w)] = TileConv(conv, (h, w),
                                                        self._tile_for(h // s, w // s),
                                                        device=x.value.device)
        positions = plan.out_h * plan.out_w
        stats.positions += positions
        cache = ctx.state.caches.get(name)
        everything = bool(x.changed.all())
        if cache is None or (everything and threshold == 0):
            # Key frame, or exact mode with every input changed: one dense call, and (practically)
            # every output changes, so the cache is not even gathered.
            y = _dense_conv(conv, act, x)
            changed = torch.ones(plan.out_h, plan.out_w, dtype=torch.bool, device=y.device)
            stats.computed += positions
        else:
            gathered, invalid = self._gathered(ctx, cache, out_stride)
            if everything:  # one dense call; truncation says what changed
                y, changed = self._truncate(ctx, name, _dense_conv(conv, act, x), gathered,
                                            threshold, invalid)
                stats.computed += positions
            else:
                y, changed, computed = self._sparse_conv(ctx, name, conv, act, plan, x,
                                                         gathered, invalid, threshold)
                stats.computed += computed
        stats.changed += int(changed.sum())
        ctx.state.caches[name] = y
        return Feat(y, changed, out_stride)

    def _sparse_conv(self, ctx: FrameContext, name: str, conv: nn.Conv2d, act: nn.Module,
                     plan: TileConv, x: Feat, gathered: torch.Tensor,
                     invalid: torch.Tensor | None, threshold: float):
        """Recompute where the receptive field changed or RFAP fails; (y, changed, computed):
        exactly those positions (``conv_mode`` "point": im2col rows, one matmul) or their whole
        tiles with halo (``conv_mode`` "tile"), or one dense call when that share of the map
        exceeds ``dense_above``."""
        k, s, p = plan.k, plan.s, plan.p
        recompute = dilate_mask(x.changed, k, s, p)
        if invalid is not None:
            recompute = recompute | invalid
            if k > 1 and (self.strict_rfap or conv is self.first_spatial):
                vectors = ctx.plan.grid(x.stride).vectors
                recompute |= ~window_uniform(vectors, k, s, p)
        positions = plan.out_h * plan.out_w
        pointable = conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels
        if pointable and (self.conv_mode == "point" or (k == 1 and s == 1)):
            if int(recompute.sum()) <= self.dense_above * positions:
                return masked_point_conv(self._point_plan(ctx, k, s, p, x.value.shape[2:]),
                                         conv, self._point_weight(conv), act, x.value,
                                         recompute, gathered, threshold, force=invalid)
            active = None
        else:
            active = plan.active_tiles(recompute)
        if active is None or active.numel() > self.dense_above * plan.tiles_y * plan.tiles_x:
            y, changed = self._truncate(ctx, name, _dense_conv(conv, act, x), gathered,
                                        threshold, invalid)
            return y, changed, positions
        y, changed, n_active = masked_sparse_conv(plan, conv, act, x.value, recompute, gathered,
                                                  threshold, force=invalid, active=active)
        return y, changed, min(n_active * plan.tile * plan.tile, positions)

    def _point_plan(self, ctx: FrameContext, k: int, s: int, p: int, hw) -> PointConv:
        key = (k, s, p, *hw)  # tap tables depend on the geometry only: shared by layers
        plan = ctx.points.get(key)
        if plan is None:
            plan = ctx.points[key] = PointConv(k, s, p, tuple(hw), device=ctx.device)
        return plan

    def _point_weight(self, conv: nn.Conv2d) -> torch.Tensor:
        weight = self._point_weights.get(id(conv))
        if weight is None:
            weight = self._point_weights[id(conv)] = point_weight(conv)
        return weight

    def _truncate(self, ctx: FrameContext, name: str, fresh: torch.Tensor, gathered: torch.Tensor,
                  threshold: float, invalid: torch.Tensor | None):
        """Truncation of a densely computed op (:func:`_truncate`), skipped while it does not
        pay: when most outputs of the op changed the last time it was compared, comparing
        again (several passes over the map) would only confirm that its consumers run densely.
        The op then reports every output changed, which is exact (y is the fresh value), and
        compares again after ``truncation_probe`` frames."""
        skip = ctx.state.truncation_skip
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

    def dense_block(self, ctx: FrameContext, block: nn.Module, x: Feat,
                    last_conv: nn.Conv2d | None, *,
                     out_stride: int | None = None) -> Feat:
        """A block whose receptive field is global (or that is cheap): run it densely when any
        input changed; the difference to its gathered cache says which outputs changed."""
        out_stride = x.stride if out_stride is None else out_stride
        name = self.names[id(block)]
        cache = ctx.state.caches.get(name)
        gathered, invalid = (None, None) if cache is None else self._gathered(ctx, cache,
                                                                              out_stride)
        stats = ctx.layer
        threshold = (ctx.tau / self.norms[id(last_conv)]
                     if ctx.tau > 0 and last_conv is not None else 0.0)
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
                y, changed = self._truncate(ctx, name, y, gathered, threshold, invalid)
        stats.positions += y.shape[2] * y.shape[3]
        stats.computed += computed
        stats.changed += int(changed.sum())
        ctx.state.caches[name] = y
        return Feat(y, changed, out_stride)


# -------------------------------------------------------------------- dense op, truncation
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
