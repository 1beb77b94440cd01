"""The v2 tile-batched executor (docs/DESIGN.md, "The tile executor").

Per stream it caches the detection head's outputs at each of its strides, decoded relative to
each cell (``head.relative``: the head interface of fluxshard/models/families.py, anchor-free
YOLO11 and anchor-based Darknet alike; a segment head's mask coefficients ride with their cell,
and its prototypes are one more map, at stride 4, carried and recomputed in the crops like a
level). Each frame it carries them along the motion field (whole
cells with their sub-cell place, ``carry_maps``; under the camera's zoom, fitted to the field,
carried boxes scale with it), finds the critical blocks, ranks them by salience, takes what the budget allows,
runs the rest of the frame from the cache, and computes the taken blocks as crops (with a halo
of context) batched per size on a dense engine, writing back each crop's interior only. Key
frames, every ``refresh_interval``-th frame and frames whose crops would cost more than the whole
frame run dense. The output is the model's own eval output, so ``fluxshard.models.postprocess``
applies unchanged.

Critical blocks (no drift by design): content changed since the cells cached for it were
computed (against the reference those cells saw, carried along the field:
``fluxshard.tiles.reference``), cells whose source left the map (misses: never deferred, never
shown stale), content never seen (a pan's entering edge), motion boundaries (neighbouring cells
moving apart), blocks deferred before, objects a crop found cut at its edge (grown in the next
frame), and whole detected objects touching any of those.

The result approximates dense inference (crops see a limited context; carried cells keep what
they were computed with); accuracy is measured against dense by perf/bench_executors.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field as dc_field

import cv2
import numpy as np
import torch

from fluxshard.models.ops import PAD_VALUE, padded_shape, preprocess
from fluxshard.tiles import crops as C
from fluxshard.tiles import reference as R
from fluxshard.tiles.engine import make_engine
from fluxshard.tiles.raw_maps import map_strides
from fluxshard.tiles.warp import (block_sources, camera_zoom, carry_blocks, carry_maps,
                                  field_on_grid, motion_boundaries, project_boxes,
                                  scale_carried_boxes, textured_motion)

MAX_PROBE_BACKOFF = 16  # a losing stream probes tiles at least every this many probe intervals
STRIDES = (8, 16, 32)  # YOLO11's levels; an executor takes its model head's own (head.strides)


@dataclass
class TileStreamState:
    """Everything one stream keeps between frames (the executor itself holds none)."""

    maps: list[torch.Tensor] | None = None  # per level, relative to each cell (1, K*(4 + nc), H/s, W/s)
    # the eval output of the last dense frame when the dense runner ran it: the cache's maps
    # are taken from it when the next tile frame needs them (a dense frame does no more work)
    dense_output: torch.Tensor | None = None
    offsets: list[np.ndarray] | None = None  # per map (H/s, W/s, 2): sub-cell place of each cell's content
    reference: R.Reference | None = None  # what the cached cells were computed from, carried
    frame_shape: tuple | None = None  # (H, W, 3) of the frames this state holds
    grow: np.ndarray | None = None  # blocks of objects a crop found cut at its edge: next frame
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
    probe_wait: int = 0  # frames between probes now (0: the executor's probe_interval)
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
    # ... because the frame's bookkeeping found its crops would cost more than the whole frame:
    # the stream's tiles cost this frame (the bookkeeping and the dense pass)
    crops_declined: bool = False
    crops: int = 0
    crop_area_fraction: float = 0.0  # crop pixels run (halo included) / input pixels
    critical_fraction: float = 0.0  # critical blocks / blocks
    deferred_fraction: float = 0.0  # critical blocks left for later by the budget
    refresh_fraction: float = 0.0  # blocks recomputed for freshness (not for change) / blocks
    seconds: float = 0.0
    # the blocks (the executor's, on the padded input) whose cells crops recomputed this frame;
    # None on a dense frame (all of them)
    computed: np.ndarray | None = None
    block: int = 16  # the executor's block, the grid of ``computed``
    # seconds per stage: warp (cached maps), change (critical blocks), plan (salience, budget,
    # refresh, crops), engine (crop batches or the dense pass, with the merge), decode (boxes)
    stages: dict = dc_field(default_factory=dict)


NEAR_OBJECT_BLOCKS = 1  # blocks around a projected detection that take the full halo


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
        self.overhead_seconds = 0.0  # a tile frame's bookkeeping (carry, change test, plan)

    def _average(self, last: float | None, new: float) -> float:
        return new if last is None else (1 - self.WEIGHT) * last + self.WEIGHT * new

    def observe(self, area_share: float, seconds: float) -> None:
        if area_share >= 1.0:
            self.dense_seconds = self._average(self.dense_seconds, seconds)
        elif self.dense_seconds and area_share > 0:
            self.ratio = self._average(self.ratio, seconds / (area_share * self.dense_seconds))

    def observe_overhead(self, seconds: float) -> None:
        self.overhead_seconds = self._average(self.overhead_seconds or None, seconds)

    def dense_is_cheaper(self, area_share: float) -> bool:
        """Whether crops covering ``area_share`` of the input, with the frame's bookkeeping,
        would take at least as long as one dense pass."""
        overhead = self.overhead_seconds / self.dense_seconds if self.dense_seconds else 0.0
        return overhead + area_share * self.ratio >= 1.0


class TileExecutor:
    """Tile-batched approximate inference of a detect or segment model (see the module doc).

    threshold: a block is critical when its mean abs difference (grey levels, half resolution)
        against what its cached cells were computed from, carried along the field, exceeds
        this (v2 4.1) at mid-grey and above; darker blocks compare against less
        (``reference.block_thresholds``).
    block: critical block side (pixels, a multiple of 4 dividing 32).
    halo: context added around each crop's interior (pixels; the default measured best on real
        footage with a real detector: borderline boxes need the context, and 16 lost some).
    background_halo: when set, the context of a crop holding no block on or next to a
        detection of the last frame (pixels; None, the default: the ``halo`` everywhere).
        Smaller crops there, but an object not yet found is then looked for with less context:
        16 px lost boxes on real footage that 32 px keeps (docs/executors.md).
    budget: most input area (share, halo included) the crops of one frame may cover; further
        critical blocks are deferred, least salient first (misses and grown objects never are).
    dense_above: when set, the frame runs dense if the crops for every critical block would
        cover more than this share. Unset (the default), the executor's latency table decides
        (``CropLatency``: dense when the crops would take longer than the whole frame).
    refresh_interval: a full dense refresh at the latest every this many frames (K).
    refresh_age / refresh_share: a square of ``refresh_share`` of the blocks around the oldest
        block older than ``refresh_age`` frames is recomputed with the spare budget.
    max_age: a block whose cells were computed this many frames ago is critical (a carried cell
        loses trust with age; None: only the refresh interval bounds it).
    unseen_share: a block whose content came from outside the previous frames (a pan's
        entering edge) is critical once this share of it was never computed.
    boundary: neighbouring cells of the coarsest level whose mean motion differs by more than
        this many pixels lie on a motion boundary (occlusion, objects moving apart): critical.
    boundary_texture: a cell's motion, for the boundaries, is the mean vector of its blocks
        whose grey levels spread (standard deviation, half resolution) more than this at
        mid-grey (less in darker blocks), and of its dark blocks (``reference.textured_blocks``);
        two neighbouring cells with none (flat) have no boundary between them. On bright flat
        content a codec's vectors are noise (any vector matches) and read as boundaries all
        over a plain wall. 0 (the default): every block's vector counts; 3 runs clips with
        plain walls faster but lost borderline boxes on others (docs/executors.md).
    whole_objects: a detection (of the last frame, moved by the field) with any critical block
        is recomputed whole.
    grow_conf: a box scoring above this in any cell of this frame's crops (interior or halo:
        an object entering at a crop's edge is detected, if at all, by a cell the crop only saw
        as context) and reaching past the blocks they computed, is computed whole in the next
        frame (a new object seen in part).
    adaptive: learn the latency table from the executor's own clock as it runs, and let a
        stream whose tile frames take longer than its dense ones (content that changes almost
        everywhere) run dense, trying tiles again every ``probe_interval`` frames. Off, the
        table keeps its prior and outputs depend on the frames alone (reproducible: what
        servers and comparisons want).
    conf: class score above which a cached anchor's box counts as a detection for salience
        and whole objects (below the detector's own threshold: an object near it, carried
        while the content changed a little, is what flips between frames; recomputed whole
        when touched, it follows dense).
    dense_runner: what runs the frames that run dense (key, refresh, fallback, too many
        crops): ``dense_runner(x) -> (eval output, engine name)`` on the (1, 3, H, W) input, with
        ``dense_runner.prepare(input_hw)`` picking its engine ahead (``fluxshard.sessions.
        BestDenseRunners``: the dense executor's own, so a dense frame costs what dense costs).
        The cache's maps are taken from its eval output when the next tile frame needs them, and
        a fallback frame not followed by a probe keeps nothing. None: the crop engine on the
        whole frame.
    """

    def __init__(self, model, *, engine="torch", threshold: float = 8.0, block: int = 16,
                 halo: int = 32, background_halo: int | None = None, budget: float = 0.45,
                 dense_above: float | None = None,
                 refresh_interval: int = 30, refresh_age: int = 10, refresh_share: float = 0.02,
                 max_age: int | None = None, unseen_share: float = 0.25, boundary: float = 8.0,
                 boundary_texture: float = 0.0,
                 whole_objects: bool = True, grow_conf: float = 0.15, adaptive: bool = False,
                 probe_interval: int = 10, conf: float = 0.15, threads: int = 2,
                 clock=time.perf_counter, dense_runner=None):
        if 32 % block or block % 4:
            raise ValueError(f"block must be a multiple of 4 dividing 32, got {block}")
        if not 0 < budget <= 1 or (dense_above is not None and not 0 < dense_above <= 1):
            raise ValueError("budget and dense_above are shares of the frame in (0, 1]")
        if refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {refresh_interval}")
        if max_age is not None and max_age < 1:
            raise ValueError(f"max_age must be >= 1 or None, got {max_age}")
        self.model = model
        self.head = model.head
        self.strides = tuple(int(s) for s in self.head.strides)  # the head's levels
        # every map carried: the levels, then a segment head's prototypes (a stride-4 map,
        # carried and recomputed in crops like a level)
        self.map_strides = map_strides(self.head)
        self.levels = len(self.strides)
        if max(self.strides) > C.SNAP or C.SNAP % max(self.strides):
            raise ValueError(f"head strides {self.strides}: crops snap to {C.SNAP} px, which "
                             "must be a multiple of every stride")
        self.anchors_per_cell = int(getattr(self.head, "anchors_per_cell", 1))
        self.engine = make_engine(model, engine, threads=threads) if isinstance(engine, str) \
            else engine
        self.threshold, self.block, self.halo = float(threshold), block, halo
        self.background_halo = halo if background_halo is None else background_halo
        self.budget, self.dense_above = budget, dense_above
        self.refresh_interval, self.refresh_age = refresh_interval, refresh_age
        self.refresh_share, self.conf, self.max_age = refresh_share, conf, max_age
        self.unseen_share, self.whole_objects = unseen_share, whole_objects
        self.boundary, self.grow_conf = float(boundary), float(grow_conf)
        self.boundary_texture = float(boundary_texture)
        self.adaptive, self.probe_interval = adaptive, probe_interval
        self.clock = clock
        self.dense_runner = dense_runner
        self.latency = CropLatency()

    def prepare(self, input_hw: tuple[int, int]) -> None:
        """Pick the dense runner's engine for model inputs of ``input_hw`` now, not inside the
        first frame's latency."""
        prepare = getattr(self.dense_runner, "prepare", None)
        if prepare is not None:
            prepare(tuple(int(v) for v in input_hw))

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
        # one crop (the whole frame) needs no stacking copy; the layout change on uint8 moves a
        # quarter of the bytes a float one would
        batch = crops[0][None] if len(crops) == 1 else np.stack(crops)
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float().div_(255.0)

    def _assemble(self, maps: list[torch.Tensor], offsets: list[np.ndarray]):
        """The model's eval output from the relative cache: (1, 4 + nc, A), a segment model's
        (1, 4 + nc + nm, A) and its prototypes (1, nm, H/4, W/4). Each box centre is its cell's
        centre plus the cell's sub-cell offset (carry_map) plus its own offset. Anchors in the
        head's order: level, anchor slot, cell (row-major)."""
        k = self.anchors_per_cell
        levels = maps[:self.levels]
        c = levels[0].shape[1] // k
        counts = [k * m.shape[2] * m.shape[3] for m in levels]
        out = torch.empty(c, sum(counts), dtype=levels[0].dtype)
        places = np.empty((sum(counts), 2), np.float32)
        start = 0
        for m, o, n in zip(levels, offsets, counts):
            # one copy per level, straight into place (slot-major, cells row-major)
            out[:, start:start + n].view(c, k, n // k).copy_(m.reshape(k, c, n // k)
                                                             .transpose(0, 1))
            places[start:start + n].reshape(k, n // k, 2)[:] = o.reshape(1, -1, 2)
            start += n
        centres, strides = self.head.anchors_for(levels)  # (A, 2) cells, (A, 1): the model's own
        out[:2] += ((centres + torch.from_numpy(places)) * strides).T
        if len(maps) > self.levels:  # the cache is written in place next frame: a copy
            return out[None], maps[self.levels].clone()
        return out[None]

    def _relative_from_output(self, output, input_hw: tuple[int, int]) -> list[torch.Tensor]:
        """The relative cache (per level (1, K*(4 + nc), H/s, W/s); a segment model's with its
        mask coefficients, then its prototypes) of the model's eval output (1, 4 + nc, A) (a
        segment model's (output, prototypes)) for an ``input_hw`` input: :meth:`_assemble` at
        zero offsets, undone."""
        protos = []
        if isinstance(output, (tuple, list)):
            output, protos = output[0], [output[1].contiguous()]
        k = self.anchors_per_cell
        shapes = [(input_hw[0] // s, input_hw[1] // s) for s in self.strides]
        probes = [output.new_empty((1, 0, h, w)) for h, w in shapes]  # anchors_for reads shapes
        centres, strides = self.head.anchors_for(probes)
        rel = output[0].clone()
        rel[:2] -= (centres * strides).T
        maps, start = [], 0
        c = rel.shape[0]
        for h, w in shapes:
            n = k * h * w
            maps.append(rel[:, start:start + n].reshape(c, k, h * w).transpose(0, 1)
                        .reshape(1, k * c, h, w).contiguous())
            start += n
        if start != rel.shape[1]:
            raise ValueError(f"dense runner output has {rel.shape[1]} anchors, the head's maps "
                             f"of a {input_hw} input {start}")
        return maps + protos

    def _cached_maps(self, state, input_hw) -> list[torch.Tensor]:
        """The cache's maps, taken from the last dense frame's eval output if it has not been."""
        if state.maps is None:
            output, state.dense_output = state.dense_output, None
            state.maps = self._relative_from_output(output, input_hw)
            boxes, scores = self._boxes_above(output, self.conf)
            state.boxes = boxes
        return state.maps

    def _boxes_above(self, output, conf: float) -> tuple[np.ndarray, np.ndarray]:
        """xyxy boxes (N, 4) and best class scores (N,) of the anchors scoring above ``conf``."""
        if isinstance(output, (tuple, list)):  # a segment model's (output, prototypes)
            output = output[0]
        scores = output[0, 4:4 + self.head.nc].amax(0)
        keep = scores > conf
        if not bool(keep.any()):
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        xywh = output[0, :4, keep].T
        xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        return xyxy.numpy().astype(np.float32), scores[keep].numpy()

    def _stage(self, report, name, since):
        now = self.clock()
        report.stages[name] = report.stages.get(name, 0.0) + now - since
        return now

    def _finish(self, state, frame, maps, report, t0, computed: np.ndarray | None,
                seen: np.ndarray | None = None):
        t = self.clock()
        state.maps, state.frame_shape = maps, frame.shape
        out = self._assemble(maps, state.offsets)
        boxes, _ = self._boxes_above(out, self.conf)
        state.boxes = boxes
        state.grow = np.zeros(state.age.shape, bool)
        if computed is not None and seen is not None and len(seen):
            # an object a crop saw (found by a cell of its interior or its halo) lying partly
            # in the blocks computed this frame and reaching past them: a new object seen in
            # part, computed whole next frame (a box wholly in the halo is the crop's edge
            # seen as context, not what changed)
            part = C.boxes_in_part(seen, computed, self.block)
            state.grow = C.boxes_to_blocks(seen[part], state.age.shape, self.block) & ~computed
        self._stage(report, "decode", t)
        return self._timed(state, report, t0, out)

    def _timed(self, state, report, t0, out):
        """The frame's seconds into the report and the stream's running averages."""
        report.seconds = self.clock() - t0
        state.frames += 1
        # the first frame pays the crop engine's warm-up (a dense runner warmed up as it chose
        # its engine)
        if state.frames > 1 or (report.dense and self.dense_runner is not None):
            w = CropLatency.WEIGHT
            name = "dense_frame_seconds" if report.dense and not report.crops_declined \
                else "tile_frame_seconds"
            last = getattr(state, name)
            setattr(state, name, report.seconds if last is None
                    else (1 - w) * last + w * report.seconds)
        return out, report

    def _halo(self, salient: np.ndarray) -> C.Halo:
        """The crops' context this frame: ``halo`` near the projected detections ``salient``,
        ``background_halo`` elsewhere."""
        if self.background_halo == self.halo:
            return C.Halo(self.halo, self.block)
        return C.Halo(self.background_halo, self.block, C.grow(salient, NEAR_OBJECT_BLOCKS),
                      self.halo)

    def _area_estimate(self, blocks: np.ndarray, halo: C.Halo) -> float:
        """The share of the input crops for ``blocks`` will cover: the blocks grown by their
        halo and one block more for the snapping to 32 px (before the crops are planned)."""
        return C.halo_area(blocks, halo.wider(self.block)) / blocks.size

    def _crops_lose(self, critical: np.ndarray, halo: C.Halo) -> bool:
        """Whether crops for every ``critical`` block lose to one dense pass (see _run)."""
        every_area = self._area_estimate(critical, halo)
        return (every_area > self.dense_above if self.dense_above is not None
                else self.latency.dense_is_cheaper(every_area))

    def _crop_objects(self, group: list, outs: list[torch.Tensor]) -> np.ndarray:
        """xyxy boxes (input pixels) of every cell of the crops ``group`` (their relative
        outputs ``outs``, per level) whose best class scores above ``grow_conf``."""
        k = self.anchors_per_cell
        x0 = torch.tensor([c.x0 for c in group], dtype=torch.float32)
        y0 = torch.tensor([c.y0 for c in group], dtype=torch.float32)
        found = []
        for s, out in zip(self.strides, outs):
            b, ch, h, w = out.shape
            cells = out.reshape(b, k, ch // k, h, w)
            hit = cells[:, :, 4:4 + self.head.nc].amax(2) > self.grow_conf  # (b, k, h, w)
            if not bool(hit.any()):
                continue
            bi, ki, ri, ci = hit.nonzero(as_tuple=True)
            box = cells[bi, ki, :4, ri, ci]  # centre offset from the cell's centre, size
            cx = (ci.float() + 0.5) * s + box[:, 0] + x0[bi]
            cy = (ri.float() + 0.5) * s + box[:, 1] + y0[bi]
            found.append(torch.stack([cx - box[:, 2] / 2, cy - box[:, 3] / 2,
                                      cx + box[:, 2] / 2, cy + box[:, 3] / 2], 1))
        if not found:
            return np.zeros((0, 4), np.float32)
        return torch.cat(found).numpy().astype(np.float32)

    def _dense(self, state, frame, padded, grid, report, t0, keep: bool = True, grey=None):
        """The whole frame on the dense runner (or the crop engine). ``keep``: the stream's
        cache becomes this frame's; otherwise (a fallback frame not followed by a probe, which
        gets here only without a dense runner: with one it is :meth:`_fallback`) the stream
        keeps nothing and the frame costs what a dense frame does."""
        t = self.clock()
        if self.dense_runner is not None:
            out, maps = self.dense_runner(self.batch_input([padded]))[0], None
        else:
            (raw,) = yield [self.batch_input([padded])]
            out, maps = None, self.head.relative(raw)
        self._stage(report, "engine", t)
        if self.adaptive:
            self.latency.observe(1.0, report.stages["engine"])
        state.frames_since_dense = 0
        report.dense, report.crop_area_fraction = True, 1.0
        state.frame_shape = frame.shape
        if not keep:
            state.maps = state.dense_output = state.reference = None
            return self._timed(state, report, t0, self._assemble(
                maps, [np.zeros((*m.shape[2:], 2), np.float32) for m in maps]))
        t = self.clock()
        input_hw = padded.shape[:2]
        state.age = np.zeros(grid, np.int32)
        state.offsets = [np.zeros((input_hw[0] // s, input_hw[1] // s, 2), np.float32)
                         for s in self.map_strides]
        state.unseen = np.zeros(grid, np.float32)
        state.deferred = np.zeros(grid, bool)
        state.reference = R.Reference.of(R.grey(padded) if grey is None else grey)
        self._stage(report, "change", t)
        if maps is not None:
            return self._finish(state, frame, maps, report, t0, None)
        state.maps, state.dense_output, state.boxes = None, out, None
        state.grow = np.zeros(grid, bool)
        return self._timed(state, report, t0, out)

    def _falls_back(self, state, frame, field, key: bool) -> bool:
        """Whether this frame runs dense on the dense runner for the stream's fallback and
        keeps nothing (not the frame before a probe, which keeps a cache to carry)."""
        return (self.adaptive and self.dense_runner is not None and not key
                and field is not None and state.frame_shape == frame.shape
                and not state.tiles_pay()
                and state.frames_since_probe + 1 < (state.probe_wait or self.probe_interval))

    def _fallback(self, state, frame, t0):
        """A fallback frame that keeps nothing: the dense session's own steps (preprocess,
        the dense runner) and the stream's counters, nothing more, so that it costs what a
        dense frame costs."""
        state.frames_since_probe += 1
        report = TileReport(dense=True, fallback=True, crop_area_fraction=1.0, block=self.block)
        t = self.clock()
        out = self.dense_runner(preprocess(frame))[0]
        self._stage(report, "engine", t)
        self.latency.observe(1.0, report.stages["engine"])
        state.frames_since_dense = 0
        state.maps = state.dense_output = state.reference = None
        return self._timed(state, report, t0, out)

    # -- one frame -----------------------------------------------------------------------------
    def run(self, state: TileStreamState, frame: np.ndarray, field: np.ndarray | None = None, *,
            key: bool = False):
        """Infer one frame: ``frame`` (H, W, 3) uint8 RGB; ``field`` the backward motion field
        from the frame this stream last ran on (None on a key frame). Returns (the model's
        eval output: (1, 4 + nc, A), a segment model's ((1, 4 + nc + nm, A), prototypes
        (1, nm, H/4, W/4)); TileReport)."""
        frame = np.asarray(frame)
        if self._falls_back(state, frame, field, key):
            return self._fallback(state, frame, self.clock())
        # the cached maps are written in place frame after frame: all under inference mode
        with torch.inference_mode():
            return run_steps(self.steps(state, frame, field, key=key), self.engine)

    def steps(self, state: TileStreamState, frame: np.ndarray, field: np.ndarray | None = None,
              *, key: bool = False):
        """:meth:`run`'s frame as a generator, so a caller can compute several streams' frames
        together (``fluxshard.tiles.batching``): it plans the frame, yields the engine inputs
        the frame needs once (a list of (B, 3, h, w) batches; none when nothing needs
        computing, or when the dense runner runs the frame), is sent the engine's output for
        each, and returns what :meth:`run` returns. Run it under ``torch.inference_mode()``."""
        t0 = self.clock()
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        if self._falls_back(state, frame, field, key):
            return self._fallback(state, frame, t0)
        h, w = frame.shape[:2]
        input_hw = padded_shape(h, w)
        grid = (input_hw[0] // self.block, input_hw[1] // self.block)
        padded = self.padded_frame(frame, input_hw)
        report = TileReport(key=key, block=self.block)
        if key or field is None or state.frame_shape != frame.shape:
            report.key = True
            return (yield from self._dense(state, frame, padded, grid, report, t0))
        if self.adaptive and not state.tiles_pay():
            # this stream's content changes too much for crops to win: dense, trying tiles
            # again after probe_interval frames, twice as long after each probe that lost
            # (a stream where tiles never pay, such as a tiny frame, then costs what dense does:
            # only the frame before a probe keeps a cache for it to carry)
            wait = state.probe_wait or self.probe_interval
            if state.frames_since_probe < wait:
                state.frames_since_probe += 1
                report.fallback = True
                return (yield from self._dense(state, frame, padded, grid, report, t0,
                                   keep=state.frames_since_probe >= wait))
            state.probe_wait = min(2 * wait, MAX_PROBE_BACKOFF * self.probe_interval)
        else:
            state.probe_wait = self.probe_interval
        state.frames_since_probe = 0
        if state.reference is None:  # the last frame kept nothing to carry from
            report.key = True
            return (yield from self._dense(state, frame, padded, grid, report, t0))
        state.frames_since_dense += 1
        if state.frames_since_dense >= self.refresh_interval:
            report.refresh, report.refresh_fraction = True, 1.0
            return (yield from self._dense(state, frame, padded, grid, report, t0))

        t = self.clock()
        # 1. what changed since the cached cells were computed: the reference they saw,
        # carried along the field, against this frame; content never seen (the entering edge
        # of a pan) accumulates until it fills a share of the block (a slow pan recomputes its
        # edge every few frames, not every frame)
        grey = R.grey(padded)
        reference = R.carry(state.reference, field)
        aligned = R.aligned(reference)
        change = R.block_change(grey, aligned, self.block)
        thresholds = R.block_thresholds(aligned, self.threshold, self.block)
        moving = bool(np.any(field))
        sources = block_sources(field, grid, self.block)
        unseen = carry_blocks(state.unseen, sources, 1.0)
        if moving:
            unseen += C.pad_grid(C.outside_share(field, h, w, self.block), grid, 0.0)
        must = (unseen >= self.unseen_share) | state.grow
        critical = must | (change > thresholds)
        critical |= carry_blocks(state.deferred, sources, True)
        age = carry_blocks(state.age, sources, 0) + 1
        if self.max_age is not None:
            critical |= age >= self.max_age
        t = self._stage(report, "change", t)
        # dense when crops for every critical block would cost more than the whole frame (the
        # executor's own latency table), or, when ``dense_above`` is set, cover more than that;
        # their area estimated from the blocks grown by the halo and one block more for the
        # snapping to 32 px, so the crops are planned once, for what is taken. Tried first on
        # the change alone and the full halo everywhere (the detections are not projected yet):
        # a frame that changed too much does not carry the cache it will not use
        if self._crops_lose(critical, C.Halo(self.halo, self.block)):
            report.crops_declined = True
            return (yield from self._dense(state, frame, padded, grid, report, t0, grey=grey))
        t = self.clock()
        # 2. carry the cached outputs; sources outside a map are misses; boxes scale with zoom
        state_maps = self._cached_maps(state, input_hw)
        misses = np.zeros(grid, bool)
        maps, offsets = [], []
        on_grids = [field_on_grid(field, s, tuple(m.shape[2:]))
                    for s, m in zip(self.map_strides, state_maps)]
        carried_levels = carry_maps(state_maps, state.offsets, on_grids)
        zoom = camera_zoom(field)
        for level, (s, m, (carried, o, miss)) in enumerate(zip(self.map_strides, state_maps,
                                                                carried_levels)):
            if zoom is not None and carried is not m and level < self.levels:
                scale_carried_boxes(carried, zoom, self.anchors_per_cell)
            maps.append(carried)
            offsets.append(o)
            if miss.any():
                misses |= _to_blocks(miss, s, self.block, grid)
        t = self._stage(report, "warp", t)
        # 3. misses, motion boundaries and whole objects
        must |= misses
        critical |= misses
        if self.boundary > 0 and moving:
            s, on_grid = max(zip(self.strides, on_grids), key=lambda level: level[0])
            if self.boundary_texture > 0:
                textured = R.textured_blocks(grey, self.boundary_texture, self.block)
                cells, seen = textured_motion(field, textured, s, self.block)
            else:
                cells, seen = on_grid * s, None
            critical |= _to_blocks(motion_boundaries(cells, self.boundary, seen), s,
                                   self.block, grid)
        salient = C.boxes_to_blocks(project_boxes(state.boxes, field), grid, self.block)
        halo = self._halo(salient)
        if self.whole_objects:
            # a detected object with any critical block is recomputed whole: a crop that cuts
            # it sees too little of it to place its box
            critical |= C.touched_regions(salient, critical)
        total = critical.size
        report.critical_fraction = float(critical.mean())
        t = self._stage(report, "change", t)
        if self._crops_lose(critical, halo):
            report.crops_declined = True
            return (yield from self._dense(state, frame, padded, grid, report, t0, grey=grey))
        # 4. salience and budget: what must not be shown stale first, whatever the budget
        budget_blocks = int(self.budget * total)
        if C.halo_area(critical, halo) > budget_blocks:
            order = C.salience_order(critical & ~must, salient, age, change)
            taken = C.take_within_budget(order, grid, halo, budget_blocks, start=must)
        else:
            taken = critical.copy()
        deferred = critical & ~taken
        # 5. freshness: a square around the oldest block rides along while the budget has room
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
            with_refresh = C.take_within_budget(order, grid, halo, budget_blocks, start=taken)
            refreshed = with_refresh & ~taken
            taken = with_refresh
        # 6. crops, batched per size; each crop's interior goes into the carried cache
        plan = C.unify_shapes(C.plan_crops(taken, self.block, halo, input_hw), input_hw)
        t = self._stage(report, "plan", t)
        if self.adaptive:
            self.latency.observe_overhead(sum(report.stages.get(k, 0.0)
                                              for k in ("warp", "change", "plan")))
        by_size: dict[tuple[int, int], list[C.Crop]] = {}
        for crop in plan:
            by_size.setdefault((crop.h, crop.w), []).append(crop)
        area = 0
        computed = np.zeros(grid, bool)
        groups = list(by_size.items())
        batches = [self.batch_input([padded[c.y0:c.y0 + ch, c.x0:c.x0 + cw] for c in group])
                   for (ch, cw), group in groups]
        raws = (yield batches) if batches else []
        seen = []  # boxes any cell of a crop (halo included) scores above grow_conf
        for ((ch, cw), group), raw in zip(groups, raws):
            outs = self.head.relative(raw)
            seen.append(self._crop_objects(group, outs))
            for b, c in enumerate(group):
                iy0, ix0, iy1, ix1 = c.interior
                for s, full, out, offset in zip(self.map_strides, maps, outs, offsets):
                    r0, r1 = iy0 // s, -(-iy1 // s)
                    q0, q1 = ix0 // s, -(-ix1 // s)
                    full[0, :, r0:r1, q0:q1] = out[b, :, r0 - c.y0 // s:r1 - c.y0 // s,
                                                   q0 - c.x0 // s:q1 - c.x0 // s]
                    offset[r0:r1, q0:q1] = 0.0
                computed[iy0 // self.block:-(-iy1 // self.block),
                         ix0 // self.block:-(-ix1 // self.block)] = True
            area += len(group) * ch * cw
        age[computed], unseen[computed] = 0, 0.0
        R.refresh(reference, grey, computed, self.block)
        self._stage(report, "engine", t)
        if area and self.adaptive:
            self.latency.observe(area / (input_hw[0] * input_hw[1]), report.stages["engine"])
        state.age, state.deferred, state.unseen = age, deferred & ~computed, unseen
        state.offsets, state.reference = offsets, reference
        report.crops, report.computed = len(plan), computed
        report.crop_area_fraction = area / (input_hw[0] * input_hw[1])
        report.deferred_fraction = float(state.deferred.mean())
        report.refresh_fraction = float(refreshed.mean())
        return self._finish(state, frame, maps, report, t0, computed,
                            np.concatenate(seen) if seen else None)


def run_steps(steps, engine):
    """Drive one frame's :meth:`TileExecutor.steps` with ``engine``: each batch it yields is
    one engine call, in order. Returns what the steps return."""
    try:
        batches = next(steps)
        while True:
            batches = steps.send([engine(batch) for batch in batches])
    except StopIteration as done:
        return done.value


def _to_blocks(mask: np.ndarray, stride: int, block: int, grid: tuple[int, int]) -> np.ndarray:
    """A stride-``stride`` position mask on the block grid (any position in / over the block)."""
    if stride < block:
        k = block // stride
        return mask.reshape(grid[0], k, grid[1], k).any((1, 3))
    k = stride // block
    return np.repeat(np.repeat(mask, k, 0), k, 1)[:grid[0], :grid[1]]
