"""The v2 tile-batched executor (../shared/DESIGN.md "The tile executor (v2 4.5)").

Per stream it caches the detection head's outputs at strides 8/16/32, decoded relative to each
cell. Each frame it carries them along the motion field (whole cells with their sub-cell place,
``carry_map``), finds the critical blocks (changed against the previous frame warped by the
field, content never seen, deferred before, detections touching those), ranks them by salience,
takes what the budget allows, runs the rest of the frame from the cache, and computes the taken
blocks as crops (with a halo of context) batched per size on a dense engine, writing back each
crop's interior only. Key frames, every ``refresh_interval``-th frame and frames whose crops
would cost more than the whole frame run dense. The output is the model's own eval output, so
``fluxshard.models.postprocess`` applies unchanged.

The result approximates dense inference (crops see a limited context; carried cells keep what
they were computed with); accuracy is measured against dense by perf/bench_executors.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field as dc_field

import cv2
import numpy as np
import torch

from fluxshard.models.ops import PAD_VALUE, padded_shape
from fluxshard.models.yolo import YOLO11
from fluxshard.tiles import crops as C
from fluxshard.tiles.engine import make_engine
from fluxshard.tiles.warp import carry_map, field_on_grid, project_boxes, warp_blocks

STRIDES = (8, 16, 32)


@dataclass
class TileStreamState:
    """Everything one stream keeps between frames (the executor itself holds none)."""

    maps: list[torch.Tensor] | None = None  # decoded head maps relative to each cell (1, 4 + nc, H/s, W/s)
    offsets: list[np.ndarray] | None = None  # per map (H/s, W/s, 2): sub-cell place of each cell's content
    previous: np.ndarray | None = None  # the last frame (H, W, 3) uint8, for the change test
    age: np.ndarray | None = None  # frames since each block was last computed (padded block grid)
    deferred: np.ndarray | None = None  # critical blocks the budget pushed to a later frame
    unseen: np.ndarray | None = None  # share of each block's content never computed (edges)
    boxes: np.ndarray | None = None  # last output's confident boxes (xyxy), for salience
    frames_since_dense: int = 0
    # whole-frame seconds of this stream's tile frames and dense frames (running averages), and
    # frames run dense since tiles were last tried while tiles did not pay on this stream
    tile_frame_seconds: float | None = None
    dense_frame_seconds: float | None = None
    frames_since_probe: int = 0
    frames: int = 0  # frames run on this stream

    def tiles_pay(self) -> bool:
        return (self.tile_frame_seconds is None or self.dense_frame_seconds is None
                or self.tile_frame_seconds < self.dense_frame_seconds)


@dataclass
class TileReport:
    key: bool = False
    dense: bool = False  # the whole frame ran on the engine (key, refresh, or too many misses)
    refresh: bool = False  # ... because the refresh interval was due
    fallback: bool = False  # ... because tile frames took longer than dense ones on this stream
    crops: int = 0
    crop_area_fraction: float = 0.0  # crop pixels run (halo included) / input pixels
    critical_fraction: float = 0.0  # critical blocks / blocks
    deferred_fraction: float = 0.0  # critical blocks left for later by the budget
    refresh_fraction: float = 0.0  # blocks recomputed for freshness (not for change) / blocks
    seconds: float = 0.0
    # seconds per stage: warp (cached maps), change (critical blocks), plan (salience, budget,
    # refresh, crops), engine (crop batches or the dense pass, with the merge), decode (boxes)
    stages: dict = dc_field(default_factory=dict)


class CropLatency:
    """The executor's latency table, measured as it runs (with its clock): the dense pass's time
    and how crop batches' time scales with their area share (crops pay per-call overhead and
    small convolutions run less efficiently, so a share of the area costs more than that share
    of the time). Running averages, so the table follows the machine's load."""

    PRIOR_RATIO = 1.25  # before any crop batch ran: their time per area share against dense
    WEIGHT = 0.2  # running-average weight of a new measurement

    def __init__(self):
        self.dense_seconds: float | None = None
        self.ratio = self.PRIOR_RATIO

    def observe(self, area_share: float, seconds: float) -> None:
        if area_share >= 1.0:
            self.dense_seconds = seconds if self.dense_seconds is None else \
                (1 - self.WEIGHT) * self.dense_seconds + self.WEIGHT * seconds
        elif self.dense_seconds and area_share > 0:
            ratio = seconds / (area_share * self.dense_seconds)
            self.ratio = (1 - self.WEIGHT) * self.ratio + self.WEIGHT * ratio

    def dense_is_cheaper(self, area_share: float) -> bool:
        return area_share * self.ratio >= 1.0


class TileExecutor:
    """Tile-batched approximate inference of a YOLO11 detect model (see the module doc).

    threshold: a block is critical when its mean abs difference (grey levels) against the
        previous frame warped by the field exceeds this (v2 4.1).
    block: critical block side (pixels, a multiple of 4 dividing 32).
    halo: context added around each crop's interior (pixels).
    budget: most input area (share, halo included) the crops of one frame may cover; further
        critical blocks are deferred, least salient first.
    dense_above: when set, the frame runs dense if the crops for every critical block would
        cover more than this share. Unset (the default), the executor's latency table decides
        (``CropLatency``: dense when the crops would take longer than the whole frame).
    refresh_interval: a full dense refresh at the latest every this many frames (K).
    refresh_age / refresh_share: a square of ``refresh_share`` of the blocks around the oldest
        block older than ``refresh_age`` frames is recomputed with the spare budget.
    unseen_share: a block whose content came from outside the previous frames (a pan's
        entering edge) is critical once this share of it was never computed.
    whole_objects: a detection (of the last frame, moved by the field) with any critical block
        is recomputed whole.
    adaptive: learn the latency table from the executor's own clock as it runs, and let a
        stream whose tile frames take longer than its dense ones (content that changes almost
        everywhere) run dense, trying tiles again every ``probe_interval`` frames. Off, the
        table keeps its prior and outputs depend on the frames alone (reproducible: what
        servers and comparisons want).
    conf: class score above which a cached anchor's box counts as a detection for salience.
    """

    def __init__(self, model: YOLO11, *, engine="torch", threshold: float = 8.0, block: int = 16,
                 halo: int = 16, budget: float = 0.45, dense_above: float | None = None,
                 refresh_interval: int = 30, refresh_age: int = 10, refresh_share: float = 0.02,
                 unseen_share: float = 0.25, whole_objects: bool = True, adaptive: bool = False,
                 probe_interval: int = 10, conf: float = 0.25, threads: int = 2, clock=time.perf_counter):
        if 32 % block or block % 4:
            raise ValueError(f"block must be a multiple of 4 dividing 32, got {block}")
        if not 0 < budget <= 1 or (dense_above is not None and not 0 < dense_above <= 1):
            raise ValueError("budget and dense_above are shares of the frame in (0, 1]")
        if refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {refresh_interval}")
        if model.task != "detect":
            raise NotImplementedError("the tile executor handles detect models only so far")
        self.model = model
        self.head = model.head
        self.engine = make_engine(model, engine, threads=threads) if isinstance(engine, str) \
            else engine
        self.threshold, self.block, self.halo = float(threshold), block, halo
        self.budget, self.dense_above = budget, dense_above
        self.refresh_interval, self.refresh_age = refresh_interval, refresh_age
        self.refresh_share, self.conf = refresh_share, conf
        self.unseen_share, self.whole_objects = unseen_share, whole_objects
        self.adaptive, self.probe_interval = adaptive, probe_interval
        self.clock = clock
        self.latency = CropLatency()

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def padded_frame(frame: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
        """(H', W', 3) uint8: the frame padded bottom/right with grey (as preprocess)."""
        h, w = frame.shape[:2]
        if (h, w) == tuple(input_hw):
            return frame
        return cv2.copyMakeBorder(np.ascontiguousarray(frame), 0, input_hw[0] - h, 0,
                                  input_hw[1] - w, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)

    @staticmethod
    def batch_input(crops: list[np.ndarray]) -> torch.Tensor:
        """Equally sized uint8 (h, w, 3) crops -> the engine's (B, 3, h, w) float in [0, 1]."""
        batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
        return batch.float().div_(255.0).contiguous()

    def _relative(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw head maps (B, 4*reg_max + nc, h, w) -> decoded per cell, relative to the cell:
        (B, 4 + nc, h, w) with the box centre's offset from the cell's anchor and the box size in
        pixels, and sigmoid class scores. What the cache holds: a cell's values stay right
        wherever the cell is carried, and only computed cells are ever decoded."""
        head, out = self.head, []
        for m, s in zip(maps, STRIDES):
            b, _, h, w = m.shape
            box, cls = m.reshape(b, head.no, h * w).split((head.reg_max * 4, head.nc), 1)
            lt, rb = head.dfl(box).chunk(2, 1)
            rel = torch.cat(((rb - lt) * (s / 2), (lt + rb) * s, cls.sigmoid()), 1)
            out.append(rel.reshape(b, 4 + head.nc, h, w))
        return out

    def _assemble(self, maps: list[torch.Tensor], offsets: list[np.ndarray]) -> torch.Tensor:
        """The model's eval output (1, 4 + nc, A) from the relative cache: each box centre is
        its cell's anchor plus the cell's sub-cell offset (carry_map) plus its own offset."""
        channels = maps[0].shape[1]
        out = torch.cat([m.reshape(channels, -1) for m in maps], 1)
        anchors, strides = self.head.anchors_for(maps)  # (A, 2) cells, (A, 1): the model's own
        places = anchors + torch.from_numpy(np.concatenate([o.reshape(-1, 2) for o in offsets]))
        out[:2] += (places * strides).T
        return out[None]

    def _confident_boxes(self, output: torch.Tensor) -> np.ndarray:
        scores = output[0, 4:].amax(0)
        keep = scores > self.conf
        if not bool(keep.any()):
            return np.zeros((0, 4), np.float32)
        xywh = output[0, :4, keep].T
        xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        return xyxy.numpy().astype(np.float32)

    def _stage(self, report, name, since):
        now = self.clock()
        report.stages[name] = report.stages.get(name, 0.0) + now - since
        return now

    def _finish(self, state, frame, maps, report, t0):
        t = self.clock()
        state.maps, state.previous = maps, np.array(frame, copy=True)
        out = self._assemble(maps, state.offsets)
        state.boxes = self._confident_boxes(out)
        self._stage(report, "decode", t)
        report.seconds = self.clock() - t0
        state.frames += 1
        if state.frames > 1:  # the first frame pays the engine's warm-up
            w = CropLatency.WEIGHT
            name = "dense_frame_seconds" if report.dense else "tile_frame_seconds"
            last = getattr(state, name)
            setattr(state, name, report.seconds if last is None
                    else (1 - w) * last + w * report.seconds)
        return out, report

    def _dense(self, state, frame, padded, grid, report, t0):
        t = self.clock()
        maps = self._relative(self.engine(self.batch_input([padded])))
        self._stage(report, "engine", t)
        if self.adaptive:
            self.latency.observe(1.0, report.stages["engine"])
        state.age = np.zeros(grid, np.int32)
        state.offsets = [np.zeros((*m.shape[2:], 2), np.float32) for m in maps]
        state.unseen = np.zeros(grid, np.float32)
        state.deferred = np.zeros(grid, bool)
        state.frames_since_dense = 0
        report.dense, report.crop_area_fraction = True, 1.0
        return self._finish(state, frame, maps, report, t0)

    # -- one frame -----------------------------------------------------------------------------
    def run(self, state: TileStreamState, frame: np.ndarray, field: np.ndarray | None = None, *,
            key: bool = False):
        """Infer one frame: ``frame`` (H, W, 3) uint8 RGB; ``field`` the backward motion field
        from the frame this stream last ran on (None on a key frame). Returns (eval output
        (1, 4 + nc, A), TileReport)."""
        # the cached maps are written in place frame after frame: all under inference mode
        with torch.inference_mode():
            return self._run(state, frame, field, key)

    def _run(self, state, frame, field, key):
        t0 = self.clock()
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        h, w = frame.shape[:2]
        input_hw = padded_shape(h, w)
        grid = (input_hw[0] // self.block, input_hw[1] // self.block)
        padded = self.padded_frame(frame, input_hw)
        report = TileReport(key=key)
        if (key or field is None or state.maps is None or state.previous is None
                or state.previous.shape != frame.shape):
            report.key = True
            return self._dense(state, frame, padded, grid, report, t0)
        state.frames_since_dense += 1
        if state.frames_since_dense >= self.refresh_interval:
            report.refresh, report.refresh_fraction = True, 1.0
            return self._dense(state, frame, padded, grid, report, t0)
        if (self.adaptive and not state.tiles_pay()
                and state.frames_since_probe < self.probe_interval):
            # this stream's content changes too much for crops to win: dense, trying tiles
            # again every probe_interval frames
            state.frames_since_probe += 1
            report.fallback = True
            return self._dense(state, frame, padded, grid, report, t0)
        state.frames_since_probe = 0

        t = self.clock()
        # 1. warp the cached outputs; sources outside a map are misses
        misses = np.zeros(grid, bool)
        maps, offsets = [], []
        for s, m, o in zip(STRIDES, state.maps, state.offsets):
            carried, o, miss = carry_map(m, o, field_on_grid(field, s, tuple(m.shape[2:])))
            maps.append(carried)
            offsets.append(o)
            if miss.any():
                misses |= _to_blocks(miss, s, self.block, grid)
        t = self._stage(report, "warp", t)
        # 2. critical blocks: changed, invalid, out of the map, deferred before
        change, outside = C.changed_blocks(frame, state.previous, field, self.block)
        change = C.pad_grid(change, grid, 0.0)
        # content never seen (the entering edge of a pan) accumulates until it fills a share
        # of the block: a slow pan recomputes its edge every few frames, not every frame
        unseen = warp_blocks(state.unseen, field, self.block, 1.0) + C.pad_grid(outside, grid, 0.0)
        misses |= unseen >= self.unseen_share
        misses |= change > self.threshold
        misses |= warp_blocks(state.deferred, field, self.block, True)
        salient = C.boxes_to_blocks(project_boxes(state.boxes, field), grid, self.block)
        if self.whole_objects:
            # a detected object with any critical block is recomputed whole: a crop that cuts
            # it sees too little of it to place its box
            misses |= C.touched_regions(salient, misses)
        age = warp_blocks(state.age, field, self.block, 0) + 1
        total = misses.size
        report.critical_fraction = float(misses.mean())
        halo_blocks = -(-self.halo // self.block)
        t = self._stage(report, "change", t)
        # dense when crops for every critical block would cost more than the whole frame (the
        # executor's own latency table), or, when ``dense_above`` is set, cover more than that
        every = C.plan_crops(misses, self.block, self.halo, input_hw)
        every_area = sum(c.h * c.w for c in every) / (input_hw[0] * input_hw[1])
        if (every_area > self.dense_above if self.dense_above is not None
                else self.latency.dense_is_cheaper(every_area)):
            return self._dense(state, frame, padded, grid, report, t0)
        # 3. salience and budget
        budget_blocks = int(self.budget * total)
        order = C.salience_order(misses, salient, age, change)
        if C.halo_area(misses, halo_blocks) > budget_blocks:
            taken = C.take_within_budget(order, grid, halo_blocks, budget_blocks)
        else:
            taken = misses.copy()
        deferred = misses & ~taken
        # 4. freshness: a square around the oldest block rides along while the budget has room
        # (one compact crop; scattered old blocks would each pay a whole halo)
        stale = (age >= self.refresh_age) & ~taken
        refreshed = np.zeros(grid, bool)
        if stale.any() and self.refresh_share > 0:
            side = max(1, int(round(np.sqrt(self.refresh_share * total))))
            r, c = np.unravel_index(int(np.argmax(np.where(stale, age, -1))), grid)
            r0 = min(max(r - side // 2, 0), max(grid[0] - side, 0))
            c0 = min(max(c - side // 2, 0), max(grid[1] - side, 0))
            region = np.zeros(grid, bool)
            region[r0:r0 + side, c0:c0 + side] = True
            order = np.flatnonzero(region & ~taken)
            with_refresh = C.take_within_budget(order, grid, halo_blocks, budget_blocks, start=taken)
            refreshed = with_refresh & ~taken
            taken = with_refresh
        # 5. crops, batched per size; each crop's interior goes into the warped cache
        plan = every if np.array_equal(taken, misses) else \
            C.plan_crops(taken, self.block, self.halo, input_hw)
        plan = C.unify_shapes(plan, input_hw)
        t = self._stage(report, "plan", t)
        by_size: dict[tuple[int, int], list[C.Crop]] = {}
        for crop in plan:
            by_size.setdefault((crop.h, crop.w), []).append(crop)
        area = 0
        for (ch, cw), group in by_size.items():
            batch = self.batch_input([padded[c.y0:c.y0 + ch, c.x0:c.x0 + cw] for c in group])
            outs = self._relative(self.engine(batch))
            for b, c in enumerate(group):
                iy0, ix0, iy1, ix1 = c.interior
                for s, full, out, offset in zip(STRIDES, maps, outs, offsets):
                    r0, r1 = iy0 // s, -(-iy1 // s)
                    q0, q1 = ix0 // s, -(-ix1 // s)
                    full[0, :, r0:r1, q0:q1] = out[b, :, r0 - c.y0 // s:r1 - c.y0 // s,
                                                   q0 - c.x0 // s:q1 - c.x0 // s]
                    offset[r0:r1, q0:q1] = 0.0
                done = (slice(iy0 // self.block, -(-iy1 // self.block)),
                        slice(ix0 // self.block, -(-ix1 // self.block)))
                age[done], unseen[done] = 0, 0.0
            area += len(group) * ch * cw
        self._stage(report, "engine", t)
        if area and self.adaptive:
            self.latency.observe(area / (input_hw[0] * input_hw[1]), report.stages["engine"])
        state.age, state.deferred, state.unseen = age, deferred, unseen
        state.offsets = offsets
        report.crops = len(plan)
        report.crop_area_fraction = area / (input_hw[0] * input_hw[1])
        report.deferred_fraction = float(deferred.mean())
        report.refresh_fraction = float(refreshed.mean())
        return self._finish(state, frame, maps, report, t0)


def _to_blocks(mask: np.ndarray, stride: int, block: int, grid: tuple[int, int]) -> np.ndarray:
    """A stride-``stride`` position mask on the block grid (any position in / over the block)."""
    if stride < block:
        k = block // stride
        return mask.reshape(grid[0], k, grid[1], k).any((1, 3))
    k = stride // block
    return np.repeat(np.repeat(mask, k, 0), k, 1)[:grid[0], :grid[1]]
