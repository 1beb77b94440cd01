"""The v2 tile executor (fluxshard.tiles): whole-frame crop = dense, still frames reuse the
cache, integer pans shift it exactly, sub-pixel pans stay within a stated box error, salience
orders misses. Real components: the embedded demo detector, synthetic scenes, H.264 via PyAV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxshard import synth
from fluxshard.models import load_model, postprocess, preprocess
from fluxshard.tiles import TileExecutor, TileStreamState, salience_order
from fluxshard.tiles.crops import (Crop, Halo, boxes_in_part, boxes_to_blocks, halo_area,
                                   outside_share, plan_crops, split_rectangles, take_within_budget,
                                   unify_shapes)
from fluxshard.tiles.executor import run_steps
from fluxshard.tiles.reference import textured_blocks
from fluxshard.tiles.warp import (camera_zoom, carry_map, field_on_grid, motion_boundaries,
                                  textured_motion)

W, H = 320, 192


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)  # shared CPUs: more threads only spin (DEVELOPERS.md)
    return load_model(None, fused=True)


@pytest.fixture(scope="module")
def wide_frame():
    """One rendered scene frame, 64 px wider than the test frames, to cut shifted views from."""
    spec = synth.SceneSpec(width=W + 64, height=H, frames=1, seed=5, camera="static")
    return synth.Scene(spec).render(0).image


def dense_output(model, image):
    x = preprocess(image)
    with torch.inference_mode():
        return model(x)


def boxes_of(output, image, conf=0.25):
    return postprocess(output, (H, W), image.shape[:2], conf_thres=conf)[0]


def test_whole_frame_crop_equals_dense(model, wide_frame):
    frame = np.ascontiguousarray(wide_frame[:, :W])
    # threshold below zero: every block is critical; budget and dense_above 1: they go as crops
    ex = TileExecutor(model, threshold=-1.0, budget=1.0, dense_above=1.0)
    state = TileStreamState()
    ex.run(state, frame, key=True)
    out, report = ex.run(state, frame, np.zeros((H // 4, W // 4, 2), np.float32))
    assert not report.dense and report.crops == 1 and report.crop_area_fraction == 1.0
    dense = dense_output(model, frame)
    # same weights; channels_last vs contiguous convs round differently: box pixels differ by
    # less than 1e-2, class scores by less than 1e-4
    assert torch.allclose(out[:, :4], dense[:, :4], atol=1e-2)
    assert torch.allclose(out[:, 4:], dense[:, 4:], atol=1e-4)


def anchor_index(levels, level, row, col):
    """Index in the head's anchor order (level, then row-major cell) of cell (row, col) of
    ``level``; ``levels`` lists each level's (stride, rows, cols)."""
    start = sum(r * c for _, r, c in levels[:level])
    return start + row * levels[level][2] + col


def test_a_crop_inside_the_frame_writes_back_what_dense_gives_on_its_pixels(model, wide_frame):
    """One crop, away from the origin and smaller than the frame: each interior cell the crop
    wrote back holds what the dense model gives on the crop's own pixels, at the crop's place
    in the frame (boxes moved by its offset). Bound as for the whole-frame crop (channels_last
    against contiguous convs): box pixels within 1e-2, class scores within 1e-4; a write-back
    one cell off moves boxes by whole strides."""
    a = np.ascontiguousarray(wide_frame[:, :W])
    b = a.copy()
    y0, y1, x0, x1 = 48, 144, 96, 224  # a change in the middle of the frame
    b[y0:y1, x0:x1] = wide_frame[y0:y1, x0 + 32:x1 + 32]
    # whole_objects off: the crop covers the change only, not the objects it touches; a halo
    # small enough for the crop to stay off the edges of this small frame
    ex = TileExecutor(model, budget=1.0, dense_above=1.0, whole_objects=False, halo=16)
    state = TileStreamState()
    ex.run(state, a, key=True)
    batches = []
    engine = ex.engine
    ex.engine = lambda x: batches.append(x.clone()) or engine(x)
    out, report = ex.run(state, b, np.zeros((H // 4, W // 4, 2), np.float32))
    assert not report.dense and report.crops == 1 and len(batches) == 1
    crop_h, crop_w = batches[0].shape[2:]
    # where the crop was cut: the one place in the frame whose pixels it holds
    pixels = torch.from_numpy(b).permute(2, 0, 1).float().div(255.0)
    places = [(cy, cx) for cy in range(0, H - crop_h + 1, 8) for cx in range(0, W - crop_w + 1, 8)
              if torch.equal(pixels[:, cy:cy + crop_h, cx:cx + crop_w], batches[0][0])]
    assert len(places) == 1
    cy, cx = places[0]
    assert cy > 0 and cx > 0 and crop_h < H and crop_w < W
    assert 0.0 < report.crop_area_fraction < 1.0
    interior = state.age == 0  # blocks computed this frame: the crop's interior
    rows, cols = np.nonzero(interior)
    assert rows.min() > 0 and cols.min() > 0  # inside, not along the frame's edge
    dense = dense_output(model, np.ascontiguousarray(b[cy:cy + crop_h, cx:cx + crop_w]))
    frame_levels = [(s, H // s, W // s) for s in ex.strides]
    crop_levels = [(s, crop_h // s, crop_w // s) for s in ex.strides]
    ours, theirs = [], []
    for level, (s, _, _) in enumerate(frame_levels):
        for r in range(rows.min() * ex.block // s, (rows.max() + 1) * ex.block // s):
            for q in range(cols.min() * ex.block // s, (cols.max() + 1) * ex.block // s):
                ours.append(anchor_index(frame_levels, level, r, q))
                theirs.append(anchor_index(crop_levels, level, r - cy // s, q - cx // s))
    written, expected = out[0][:, ours], dense[0][:, theirs].clone()
    expected[0] += cx  # box centres from the crop's frame to the whole frame's
    expected[1] += cy
    assert torch.allclose(written[:4], expected[:4], atol=1e-2)
    assert torch.allclose(written[4:], expected[4:], atol=1e-4)


def test_still_frame_reuses_everything(model, wide_frame):
    frame = np.ascontiguousarray(wide_frame[:, :W])
    ex = TileExecutor(model)
    state = TileStreamState()
    first, _ = ex.run(state, frame, key=True)
    calls = []
    engine = ex.engine
    ex.engine = lambda x: calls.append(x.shape) or engine(x)
    out, report = ex.run(state, frame.copy(), np.zeros((H // 4, W // 4, 2), np.float32))
    assert calls == [] and report.crops == 0 and not report.dense
    assert report.crop_area_fraction == 0.0 and report.critical_fraction == 0.0
    assert torch.equal(out, first)


def test_integer_pan_shifts_cache_exactly(model, wide_frame):
    a = np.ascontiguousarray(wide_frame[:, :W])
    b = np.ascontiguousarray(wide_frame[:, 32:W + 32])  # camera moved 32 px right
    field = np.zeros((H // 4, W // 4, 2), np.float32)
    field[..., 0] = 32.0  # pixel x of b came from x + 32 of a
    ex = TileExecutor(model, budget=1.0, dense_above=1.0)
    state = TileStreamState()
    first, _ = ex.run(state, a, key=True)
    cached_a = [m.clone() for m in state.maps]
    out, report = ex.run(state, b, field)
    assert not report.dense and report.crops >= 1  # the entering strip on the right
    for s, before, after in zip((8, 16, 32), cached_a, state.maps):
        keep = (W - 32 - ex.halo - 32) // s  # columns whose interior nobody recomputed
        assert torch.equal(after[..., :keep], before[..., 32 // s:32 // s + keep])
    # boxes left of the recomputed strip: the first frame's, moved 32 px left, exactly
    moved = boxes_of(first, a)
    assert len(moved) and (moved.boxes[:, 2] < W - 32 - ex.halo - 64).any()  # something to check
    inside = moved.boxes[:, 2] < W - 32 - ex.halo - 32 - 32
    got = boxes_of(out, b)
    for box, score in zip(moved.boxes[inside] - [32, 0, 32, 0], moved.scores[inside]):
        if box[0] < 0:
            continue
        hit = np.all(np.abs(got.boxes - box) < 1e-4, axis=1) & (np.abs(got.scores - score) < 1e-6)
        assert hit.any(), (box, got.boxes)


def test_carried_cells_move_whole_and_keep_their_subcell_place():
    # a quarter-cell pan per frame: cells are never resampled (no blur of a logit peak), each
    # records where its content lies, and a cell moves once the content is nearer the next one
    ramp = torch.arange(12, dtype=torch.float32).repeat(8, 1)[None, None]  # (1, 1, 8, 12)
    field = np.zeros((8 * 8, 12 * 8, 2), np.float32)  # at stride 32 (8 blocks of 4 px per cell)
    field[..., 0] = 8.0  # 8 px = a quarter of a 32-px cell: content moves left
    grid_field = field_on_grid(field, 32, (8, 12))
    offset = np.zeros((8, 12, 2), np.float32)
    cache = ramp
    for frame in range(1, 5):
        cache, offset, miss = carry_map(cache, offset, grid_field)
        # the content that started at cell v (value v) now lies at v - frame / 4, and the cell
        # holding it says so: cell p + its offset
        cells = torch.arange(10, dtype=torch.float32)
        place = cells + torch.from_numpy(offset[0, :10, 0])
        assert torch.allclose(place, cache[0, 0, 0, :10] - frame / 4, atol=1e-5)
    assert set(np.unique(cache[0, 0].numpy())) <= set(range(12))  # whole cells, never mixed
    assert np.abs(offset[:, :10]).max() <= 0.5 + 1e-6  # the last column borders the unseen
    assert not miss[:, :11].any()


def _iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_subpixel_pan_box_error(model, tmp_path):
    """A 1.5 px/frame pan (H.264, codec field): with change-misses switched off (only
    out-of-frame blocks are recomputed) the warped cache's boxes stay close to dense ones."""
    from fluxshard.motion import iter_motion

    spec = synth.SceneSpec(width=W, height=H, frames=10, gop=10, seed=7, camera="pan",
                           pan_speed=1.5, pan_angle=0.0, object_speed=0.0)
    video = synth.make_clip(spec, tmp_path, name="subpixel").video
    ex = TileExecutor(model, threshold=255.0, budget=1.0, dense_above=1.0, refresh_interval=1000,
                      refresh_share=0.0)
    state = TileStreamState()
    ious = []
    for mf in iter_motion(video, validate=False):
        out, report = ex.run(state, mf.image, None if mf.is_key else mf.field, key=mf.is_key)
        if mf.is_key:
            continue
        assert not report.dense
        got = boxes_of(out, mf.image)
        ref = boxes_of(dense_output(model, mf.image), mf.image)
        inner = (ref.boxes[:, 0] > 64) & (ref.boxes[:, 2] < W - 64)  # away from recomputed edges
        if inner.any() and len(got):
            ious.extend(_iou(ref.boxes[inner], got.boxes).max(1))
    assert ious, "the scene should hold objects away from the frame edges"
    # after 9 frames of carried cells the dense boxes keep close matches. Median IoU over scene
    # seeds 0-4 (seed 2 has no box away from the edges; the test keeps seed 7): worst 0.868.
    # bound: worst minus 0.03, rounded down to 0.01 (the minimum is no statistic: one seed loses a box)
    assert float(np.median(ious)) >= 0.83, ious


def test_salience_orders_misses():
    misses = np.zeros((3, 4), bool)
    misses[0, 0] = misses[0, 3] = misses[2, 1] = misses[2, 2] = True
    salient = np.zeros_like(misses)
    salient[2, 2] = True
    age = np.zeros((3, 4), np.int32)
    age[0, 3] = 5
    change = np.zeros((3, 4), np.float32)
    change[2, 1] = 50.0
    order = salience_order(misses, salient, age, change)
    # salient first; then the oldest; then the most changed; then the rest
    assert [divmod(int(i), 4) for i in order] == [(2, 2), (0, 3), (2, 1), (0, 0)]
    # a budget of one block (no halo) takes the most salient and defers the rest
    taken = take_within_budget(order, misses.shape, Halo(0, 16), 1)
    assert taken.sum() == 1 and taken[2, 2]


def test_crops_snap_bucket_and_hold_interior():
    selected = np.zeros((H // 16, W // 16), bool)
    selected[3, 5] = selected[3, 6] = True  # one merged pair
    selected[10, 18] = True  # alone, by the bottom-right corner
    crops = plan_crops(selected, 16, 32, (H, W))
    assert len(crops) == 2
    for c in crops:
        assert c.y0 % 32 == 0 and c.x0 % 32 == 0 and c.y0 + c.h <= H and c.x0 + c.w <= W
        iy0, ix0, iy1, ix1 = c.interior
        assert c.y0 <= iy0 and iy1 <= c.y0 + c.h and c.x0 <= ix0 and ix1 <= c.x0 + c.w


def test_crops_near_a_detection_take_the_full_halo_and_the_rest_the_background_halo():
    grid = (384 // 16, 640 // 16)
    selected = np.zeros(grid, bool)
    selected[6, 6] = True  # a changed block on a detected object
    selected[6, 30] = True  # one in the background, far from it
    near = np.zeros(grid, bool)
    near[4:9, 4:9] = True  # the object's blocks
    halo = Halo(16, 16, near, 64)
    crops = sorted(plan_crops(selected, 16, halo, (384, 640)), key=lambda c: c.x0)
    assert len(crops) == 2 and [c.interior for c in crops] == [(96, 96, 112, 112),
                                                              (96, 480, 112, 496)]
    on_object, background = crops
    # the interior grown by the halo and snapped out to 32 px: 64 px reach [32, 176) -> 160
    assert (on_object.h, on_object.w) == (160, 160)
    assert (background.h, background.w) == (64, 64)  # 16 px: [80, 128) -> [64, 128)
    # the area estimate grows each block by its own halo
    assert halo_area(selected, halo) == 9 * 9 + 3 * 3
    # without the near mask (or with the same halo near objects) it is the plain halo
    assert plan_crops(selected, 16, Halo(16, 16, near, 16), (384, 640)) == \
        plan_crops(selected, 16, 16, (384, 640))


def test_the_executor_takes_the_full_halo_next_to_last_frames_detections(model):
    salient = np.zeros((H // 16, W // 16), bool)
    salient[5, 5] = True  # a detection's block
    plain = TileExecutor(model)._halo(salient)  # background_halo unset: one halo everywhere
    assert plain.near is None and plain.pixels == 32
    halo = TileExecutor(model, background_halo=16)._halo(salient)
    assert (halo.pixels, halo.near_pixels) == (16, 32)
    assert halo.near[4:7, 4:7].all() and halo.near.sum() == 9  # the block and one around it


def test_rectangles_cut_rings_and_strips_apart():
    ring = np.zeros((24, 40), bool)
    ring[:4], ring[-3:], ring[:, :3], ring[:, -3:] = True, True, True, True
    rects = split_rectangles(ring)
    # four bands, not the whole frame: each rectangle full, together covering the ring
    assert len(rects) == 4
    covered = np.zeros_like(ring)
    for r0, c0, r1, c1 in rects:
        assert ring[r0:r1, c0:c1].all()
        covered[r0:r1, c0:c1] = True
    assert np.array_equal(covered, ring)
    # an L-shaped edge strip and an object far from it: three pieces, none of them the frame
    mask = np.zeros((24, 40), bool)
    mask[0, :], mask[:, 0], mask[10:14, 20:26] = True, True, True
    rects = split_rectangles(mask)
    assert len(rects) == 3 and (10, 20, 14, 26) in rects
    covered = np.zeros_like(mask)
    for r0, c0, r1, c1 in rects:
        assert mask[r0:r1, c0:c1].all()
        covered[r0:r1, c0:c1] = True
    assert np.array_equal(covered, mask)
    assert split_rectangles(np.ones((6, 9), bool)) == [(0, 0, 6, 9)]


def test_boxes_mark_the_blocks_they_overlap():
    rng = np.random.default_rng(0)
    boxes = rng.random((30, 4)).astype(np.float32) * 700 - 30
    boxes[:, 2:] = boxes[:, :2] + rng.random((30, 2)) * 200
    expected = np.zeros((24, 40), bool)
    for x1, y1, x2, y2 in boxes:
        c0, r0 = max(int(x1 // 16), 0), max(int(y1 // 16), 0)
        expected[r0:int(np.ceil(y2 / 16)), c0:int(np.ceil(x2 / 16))] = True
    assert np.array_equal(boxes_to_blocks(boxes, (24, 40), 16), expected)


def test_entering_edge_share_follows_the_vectors():
    field = np.zeros((96, 160, 2), np.float32)
    field[..., 0], field[..., 1] = -1.5, 2.0  # content enters from the left and the bottom
    share = outside_share(field, 384, 640, 16)
    assert share[0, 0] == 1.5 / 16 and share[5, 1:].max() == 0.0
    assert share[-1, 5] == 2.0 / 16  # the bottom row: 2 of 16 pixel rows came from outside


@pytest.mark.parametrize("size", [(384, 640), (380, 636)])  # a frame the field overhangs too
def test_a_field_whose_sources_all_lie_inside_has_no_entering_share(size):
    """A field that brings nothing in (every source inside the frame) gives the block grid and
    zeros; one vector pointing out changes that."""
    height, width = size
    rng = np.random.default_rng(3)
    field = rng.uniform(-3, 3, (96, 160, 2)).astype(np.float32)
    field[:2], field[-2:], field[:, :2], field[:, -2:] = 0, 0, 0, 0  # nothing crosses an edge
    share = outside_share(field, height, width, 16)
    assert share.shape == (24, 40) and share.dtype == np.float32
    overhang = (160 * 4 > width) or (96 * 4 > height)
    assert (share.any() == overhang)
    field[0, 0] = (-1.0, 0.0)  # one column of one 4x4 motion block: 1/4 of 1/16 of the block
    assert outside_share(field, height, width, 16)[0, 0] == pytest.approx(1.0 / 64)


class SteppedClock:
    """A clock the engine advances: crops cost ``per_call`` plus their area share of
    ``dense`` seconds; nothing else takes time. Decisions made on it are deterministic."""

    def __init__(self, engine, dense: float, per_call: float, frame_pixels: int):
        self.now, self.engine = 0.0, engine
        self.dense, self.per_call, self.frame_pixels = dense, per_call, frame_pixels

    def __call__(self):
        return self.now

    def run(self, x):
        share = x.shape[0] * x.shape[2] * x.shape[3] / self.frame_pixels
        self.now += self.dense if share >= 1 else self.per_call + share * self.dense
        return self.engine(x)


def test_dense_or_crops_follows_the_measured_latency(model, wide_frame):
    a = np.ascontiguousarray(wide_frame[:, :W])
    b = a.copy()
    b[64:128, 64:160] = 255 - b[64:128, 64:160]  # one changed region: a few crops
    still = np.zeros((H // 4, W // 4, 2), np.float32)
    for per_call, dense_expected in ((0.0, False), (10.0, True)):
        # no growth of objects seen in part: only the latency rule decides here
        ex = TileExecutor(model, adaptive=True, grow_conf=1.0)
        clock = SteppedClock(ex.engine, dense=1.0, per_call=per_call, frame_pixels=H * W)
        ex.engine, ex.clock = clock.run, clock
        state = TileStreamState()
        ex.run(state, a, key=True)  # measures the dense pass
        reports = [ex.run(state, f, still)[1] for f in (b, a, b, a)]
        # cheap calls: crops every time; calls dearer than a frame: after the first crops
        # measured so, the executor runs the frame dense
        assert [r.dense for r in reports][1:] == [dense_expected] * 3, reports
        assert not reports[0].dense


def test_a_stream_whose_tiles_do_not_pay_runs_dense_and_probes(model, wide_frame):
    a = np.ascontiguousarray(wide_frame[:, :W])
    b = a.copy()
    b[64:128, 64:160] = 255 - b[64:128, 64:160]
    still = np.zeros((H // 4, W // 4, 2), np.float32)
    # dense_above fixes the per-frame dense-or-crops rule, so only the per-stream fallback acts
    ex = TileExecutor(model, refresh_interval=3, adaptive=True, probe_interval=2, dense_above=1.0)
    # every clock reading costs time: a tile frame reads it at every stage, so it takes longer
    # than a dense frame however small its crops
    clock = SteppedClock(ex.engine, dense=1.0, per_call=0.0, frame_pixels=H * W)
    ticking = lambda: clock.__setattr__("now", clock.now + 0.5) or clock.now  # noqa: E731
    ex.engine, ex.clock = clock.run, ticking
    state = TileStreamState()
    ex.run(state, a, key=True)
    reports = [ex.run(state, f, still)[1] for f in (b, a, b, a, b, a, b, a)]
    kinds = ["refresh" if r.refresh else "fallback" if r.fallback else "dense" if r.dense
             else "tiles" for r in reports]
    # tiles, tiles, then the refresh measures dense: tiles no longer pay, so two frames dense,
    # a probe with tiles, two dense again ...
    assert kinds[:3] == ["tiles", "tiles", "refresh"], kinds
    assert kinds[3:5] == ["fallback", "fallback"] and kinds[5] in ("tiles", "refresh"), kinds
    assert state.tile_frame_seconds > state.dense_frame_seconds
    # the probe lost: the next wait is twice as long
    assert state.probe_wait == 4


class DenseRunner:
    """The model on whole frames as the tile executor's ``dense_runner`` (the protocol of
    fluxshard.sessions.BestDenseRunners), counting its calls and the sizes it prepared."""

    def __init__(self, model):
        self.model, self.calls, self.prepared = model, 0, []

    def prepare(self, input_hw):
        self.prepared.append(tuple(input_hw))

    def __call__(self, x):
        self.calls += 1
        with torch.inference_mode():
            return self.model(x), "torch"


class CountingEngine:
    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def __call__(self, x):
        self.calls += 1
        return self.engine(x)


def test_dense_frames_run_the_dense_runner_and_tile_frames_carry_from_its_output(model,
                                                                                 wide_frame):
    """A dense frame is the dense runner's output as it is (no crop engine, no decode); the tile
    frame after it carries the cache taken from that output and gives what the crop engine's
    own dense pass would have led to."""
    a = np.ascontiguousarray(wide_frame[:, :W])
    b = a.copy()
    b[64:128, 64:160] = 255 - b[64:128, 64:160]
    still = np.zeros((H // 4, W // 4, 2), np.float32)
    runner = DenseRunner(model)
    with_runner = TileExecutor(model, dense_runner=runner, dense_above=1.0)
    with_runner.engine = CountingEngine(with_runner.engine)
    with_runner.prepare((H, W))
    assert runner.prepared == [(H, W)]
    plain = TileExecutor(model, engine=with_runner.engine.engine, dense_above=1.0)
    s1, s2 = TileStreamState(), TileStreamState()
    out1, report = with_runner.run(s1, a, key=True)
    out2, _ = plain.run(s2, a, key=True)
    assert report.dense and runner.calls == 1 and with_runner.engine.calls == 0
    assert torch.equal(out1, dense_output(model, a))
    assert s1.maps is None and s1.dense_output is not None  # taken when a tile frame needs it
    out1, report = with_runner.run(s1, b, still)
    out2, _ = plain.run(s2, b, still)
    assert not report.dense and with_runner.engine.calls >= 1 and runner.calls == 1
    # the dense runner (contiguous convs) and the crop engine (channels_last) round differently
    assert torch.allclose(out1[:, :4], out2[:, :4], atol=1e-2)
    assert torch.allclose(out1[:, 4:], out2[:, 4:], atol=1e-4)


def test_fallback_frames_cost_what_dense_costs(model, wide_frame):
    """While tiles do not pay on a stream, its fallback frames run the dense runner and nothing
    else (no change test, no cache), except the frame before a probe, which keeps the cache the
    probe carries."""
    a = np.ascontiguousarray(wide_frame[:, :W])
    b = a.copy()
    b[64:128, 64:160] = 255 - b[64:128, 64:160]
    still = np.zeros((H // 4, W // 4, 2), np.float32)
    runner = DenseRunner(model)
    ex = TileExecutor(model, refresh_interval=100, adaptive=True, probe_interval=3,
                      dense_above=1.0, dense_runner=runner)
    clock = SteppedClock(ex.engine, dense=1.0, per_call=0.0, frame_pixels=H * W)
    ticking = lambda: clock.__setattr__("now", clock.now + 0.5) or clock.now  # noqa: E731
    ex.engine, ex.clock = clock.run, ticking
    state = TileStreamState()
    ex.run(state, a, key=True)
    ex.run(state, b, still)  # the first tile frame: measured slower than the key frame
    ex.run(state, a, key=True)  # a dense frame measured after it
    reports, kept, outs = [], [], []
    for f in (b, a, b, a):
        out, report = ex.run(state, f, still)
        reports.append(report)
        outs.append(out)
        kept.append(state.reference is not None)
    assert [r.fallback for r in reports] == [True, True, True, False], reports
    assert kept == [False, False, True, True]  # only the frame before the probe keeps a cache
    assert all(set(r.stages) == {"engine"} for r in reports[:2]), [r.stages for r in reports]
    assert torch.equal(outs[0], dense_output(model, b))
    assert torch.equal(outs[1], dense_output(model, a))
    assert not reports[3].dense  # the probe runs tiles


def test_a_fallback_frame_is_the_same_through_run_and_through_steps(model, wide_frame):
    """The server computes streams' frames as steps (fluxshard.tiles.batching): a fallback
    frame there is the frame ``run`` gives, with the same stream state after it."""
    a = np.ascontiguousarray(wide_frame[:, :W])
    still = np.zeros((H // 4, W // 4, 2), np.float32)
    results = []
    for through_steps in (False, True):
        ex = TileExecutor(model, adaptive=True, probe_interval=4, dense_runner=DenseRunner(model))
        state = TileStreamState()
        ex.run(state, a, key=True)
        state.tile_frame_seconds, state.dense_frame_seconds = 2.0, 1.0  # tiles do not pay
        if through_steps:
            with torch.inference_mode():
                out, report = run_steps(ex.steps(state, a, still), ex.engine)
        else:
            out, report = ex.run(state, a, still)
        assert report.fallback and set(report.stages) == {"engine"}
        results.append((out, state.frames_since_probe, state.frames, state.reference))
    (out1, *rest1), (out2, *rest2) = results
    assert torch.equal(out1, out2) and rest1 == rest2 == [1, 2, None]


def test_dense_when_the_frames_bookkeeping_outweighs_its_crops(model, wide_frame):
    """The per-frame rule counts the bookkeeping: with a clock on which every stage takes half
    a dense pass, even a small crop loses to one dense pass."""
    a = np.ascontiguousarray(wide_frame[:, :W])
    b = a.copy()
    b[64:128, 64:160] = 255 - b[64:128, 64:160]
    still = np.zeros((H // 4, W // 4, 2), np.float32)
    ex = TileExecutor(model, refresh_interval=100, adaptive=True)
    clock = SteppedClock(ex.engine, dense=1.0, per_call=0.0, frame_pixels=H * W)
    ticking = lambda: clock.__setattr__("now", clock.now + 0.5) or clock.now  # noqa: E731
    ex.engine, ex.clock = clock.run, ticking
    state = TileStreamState()
    ex.run(state, a, key=True)
    first, second = (ex.run(state, f, still)[1] for f in (b, a))
    assert not first.dense and first.crop_area_fraction <= 0.5  # nothing learned yet: crops
    assert second.dense and not second.fallback  # the bookkeeping measured: one dense pass


def test_boxes_in_part_overlap_the_blocks_and_reach_past_them():
    blocks = np.zeros((8, 8), bool)
    blocks[2:4, 2:4] = True  # pixels 32..64 with 16-px blocks
    boxes = np.array([[40, 40, 56, 56],  # inside the blocks only
                      [40, 40, 100, 56],  # partly inside, reaching right
                      [80, 80, 120, 120]], np.float32)  # elsewhere
    assert boxes_in_part(boxes, blocks, 16).tolist() == [False, True, False]


def test_objects_a_crop_sees_in_its_halo_are_placed_in_the_frame(model):
    """Every cell of a crop, halo included, whose best class scores above grow_conf gives its
    box in frame pixels: the cell's centre plus its offset, moved by the crop's place."""
    ex = TileExecutor(model, grow_conf=0.5)
    k, per = ex.anchors_per_cell, 4 + ex.head.nc
    crop = Crop(y0=32, x0=64, h=64, w=96, interior=(64, 96, 80, 128))
    outs = []
    for s in ex.strides:
        out = torch.zeros(1, k * per, 64 // s, 96 // s)
        outs.append(out)
    s = ex.strides[0]
    # one cell of the first level, in the crop's halo (its first row and column): a 20x10 box
    # centred 2 px right of and 3 px below the cell's centre
    outs[0][0, 0:4, 0, 0] = torch.tensor([2.0, 3.0, 20.0, 10.0])
    outs[0][0, per - 1, 0, 0] = 0.9  # the last class
    boxes = ex._crop_objects([crop], outs)
    cx, cy = 64 + s / 2 + 2, 32 + s / 2 + 3
    assert boxes.tolist() == [[cx - 10, cy - 5, cx + 10, cy + 5]]


def test_crops_grow_to_one_shape_when_it_is_cheap():
    selected = np.zeros((24, 40), bool)
    selected[3:6, 5:8] = True  # two crops of different shapes, close in size
    selected[15:19, 25:27] = True
    crops = plan_crops(selected, 16, 16, (384, 640))
    assert len({(c.h, c.w) for c in crops}) == 2
    unified = unify_shapes(crops, (384, 640))
    assert len({(c.h, c.w) for c in unified}) == 1  # one batched call
    for before, after in zip(crops, unified):
        iy0, ix0, iy1, ix1 = after.interior
        assert after.interior == before.interior
        assert after.y0 <= iy0 and iy1 <= after.y0 + after.h <= 384
        assert after.x0 <= ix0 and ix1 <= after.x0 + after.w <= 640
    # a small crop beside a large one would more than double its pixels: left alone
    selected[:] = False
    selected[0:20, 0:30] = True
    selected[22, 38] = True
    crops = plan_crops(selected, 16, 16, (384, 640))
    assert unify_shapes(crops, (384, 640)) == crops


def test_camera_zoom_is_fitted_over_the_field_and_refused_for_objects_and_pans():
    """A zoom about any centre, with noise, is found with its scale; a pan, an object moving on
    a still background and a field of noise are no zoom (scaling boxes there would shrink them)."""
    rng = np.random.default_rng(5)
    ys, xs = np.mgrid[0:96, 0:160].astype(np.float32) * 4
    for step, centre in ((1.02, (320, 192)), (0.97, (100, 300))):
        # backward: pixel p came from centre + (p - centre) / step
        field = np.stack([(xs - centre[0]) * (1 / step - 1), (ys - centre[1]) * (1 / step - 1)], -1)
        field += rng.normal(0, 0.3, field.shape)
        zx, zy = camera_zoom(field.astype(np.float32))
        assert zx == pytest.approx(step, abs=2e-3) and zy == pytest.approx(step, abs=2e-3)
    pan = np.broadcast_to(np.float32([2.5, -1.0]), (96, 160, 2))
    still_with_object = np.zeros((96, 160, 2), np.float32)
    still_with_object[30:60, 40:90] = (-4.0, 0.0)
    noise = rng.normal(0, 2, (96, 160, 2)).astype(np.float32)
    for field in (pan, still_with_object, noise):
        assert camera_zoom(field) is None


def macroblock_noise(rng, blocks_shape, size):
    """(h, w, 2) vectors uniform in [-size, size] pixels, one per 16-px macroblock (4x4 motion
    blocks), as an encoder picks them on a plain wall."""
    h, w = blocks_shape
    noise = rng.uniform(-size, size, (-(-h // 4), -(-w // 4), 2)).astype(np.float32)
    return np.repeat(np.repeat(noise, 4, 0), 4, 1)[:h, :w]


def test_motion_boundaries_lie_where_textured_content_moves_apart():
    """Textured content: the left 128 px move 12 px, the rest of the texture stands still; the
    right 128 px are a plain wall whose vectors are noise (an encoder's pick among equally good
    matches). Boundaries lie where the texture moves apart and none between two cells of the
    wall (the one next to the texture may pair with it); counting every block's vector, the
    wall's noise reads as boundaries all over it."""
    rng = np.random.default_rng(3)
    grey = np.full((H // 2, W // 2), 128, np.uint8)
    grey[:, :96] = rng.integers(40, 220, (H // 2, 96))
    field = np.zeros((H // 4, W // 4, 2), np.float32)
    field[:, :32] = (12.0, 0.0)
    field[:, 48:] = macroblock_noise(rng, (H // 4, W // 4 - 48), 20)
    textured = textured_blocks(grey, 3.0, 16)
    assert textured[:, :12].all() and not textured[:, 12:].any()
    cells, seen = textured_motion(field, textured, 32, 16)
    assert seen[:, :6].all() and not seen[:, 6:].any()
    boundaries = motion_boundaries(cells, 8.0, seen)
    assert boundaries[:, 3:5].all()
    assert not boundaries[:, :3].any() and not boundaries[:, 7:].any()
    every_vector = motion_boundaries(field_on_grid(field, 32, (H // 32, W // 32)) * 32, 8.0)
    assert every_vector[:, 7:].any()


def test_texture_counts_for_less_in_the_dark_and_dark_blocks_are_never_flat():
    """The same spread of grey levels is texture in a dimmer block and flat at mid-grey (as the
    change test's thresholds: the detector sees the frame normalised); a dark block is never
    flat (objects the detector finds in a dim scene read as flat at half resolution)."""
    rng = np.random.default_rng(4)
    spread = rng.permutation(np.resize([-3, -2, 2, 3], 128)).reshape(8, 16)  # deviation 2.55
    dim = (80 + spread).astype(np.uint8)
    mid = (128 + spread).astype(np.uint8)
    assert textured_blocks(dim, 3.0, 16).all()
    assert not textured_blocks(mid, 3.0, 16).any()
    assert textured_blocks(mid, 1.5, 16).all()
    assert textured_blocks(np.full((8, 16), 40, np.uint8), 3.0, 16).all()
    assert not textured_blocks(np.full((8, 16), 90, np.uint8), 3.0, 16).any()


def test_a_plain_wall_with_noisy_vectors_is_not_recomputed(model):
    """A still frame whose plain half carries noise vectors (as an encoder gives on a wall): no
    block is critical. Taking every block's vector as the cells' motion, the noise makes
    motion boundaries there and the executor recomputes them."""
    rng = np.random.default_rng(6)
    frame = np.full((H, W, 3), 128, np.uint8)
    frame[:, :W // 2] = rng.integers(40, 220, (H, W // 2, 1))
    field = np.zeros((H // 4, W // 4, 2), np.float32)
    # interior blocks of the wall only: no source outside the frame (an entering edge)
    field[8:-8, W // 8 + 8:-8] = macroblock_noise(rng, (H // 4 - 16, W // 8 - 16), 12)
    for texture, critical in ((3.0, False), (0.0, True)):
        ex, state = TileExecutor(model, boundary_texture=texture), TileStreamState()
        ex.run(state, frame, key=True)
        _, report = ex.run(state, frame.copy(), field)
        assert (report.critical_fraction > 0) == critical, (texture, report.critical_fraction)
