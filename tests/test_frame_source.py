"""The SDK for any frame source: bare frames (no motion field given) get their field estimated
against the previous frame (fluxshard.motion.estimate), so frames an application decodes itself
(OpenCV here) reuse work; results carry names, shape, timestamp and masks and convert to
supervision's Detections; the async stream closes with ``async with``."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
import pytest

from fluxshard.motion.estimate import FIELD_ESTIMATORS, FrameMotion, flow_to_field
from fluxshard_client import AsyncFluxShardStream, FluxShardStream, LocalEndpoint
from conftest import load_script

STILL_CLIPS = ("vtest", "cup", "box")  # still cameras of the corpus: people, a hand, a cup
CLIP_SIZE = (384, 288)
CLIP_FRAMES = 24


def opencv_rgb_frames(video) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def still_clips(tmp_path_factory):
    """clip -> its camera stream's frames as OpenCV decodes them (the stream's path is
    ``paths[clip]``)."""
    from fluxshard.footage import camera_stream

    folder = tmp_path_factory.mktemp("footage")
    clips = {}
    for clip in STILL_CLIPS:
        video = camera_stream(clip, folder, size=CLIP_SIZE, frames=CLIP_FRAMES)
        clips[clip] = ClipFrames(opencv_rgb_frames(video))
        clips[clip].path = str(video)
    return clips


class ClipFrames(list):
    """A clip's frames, and its file (sizes the dense engine before the first frame)."""

    path: str


@pytest.fixture(scope="module")
def detector():
    from edge_runtime.run import edge_model

    return edge_model("yolov3-tiny")


# ------------------------------------------------------------------------------ the estimators

@pytest.mark.parametrize("estimator", FIELD_ESTIMATORS)
def test_a_shifted_real_frame_gives_the_backward_shift(still_clips, estimator):
    """Frame t is frame t-1 moved 3 px right and 2 px up: pixel (x, y) of t came from
    (x - 3, y + 2) of t-1, so the field inside the picture is (-3, +2)."""
    previous = still_clips["box"][0]
    current = np.roll(previous, (-2, 3), axis=(0, 1))
    motion = FrameMotion(estimator)
    assert motion.field(previous) is None  # nothing to compare the first frame with
    field = motion.field(current)
    inner = field[4:-4, 4:-4].reshape(-1, 2)
    np.testing.assert_allclose(np.median(inner, 0), (-3, 2), atol=0.25)
    # flat parts of the table give either estimator nothing to lock on to
    assert (np.rint(inner) == (-3, 2)).all(-1).mean() > 0.7


def test_a_bare_frame_after_a_given_one_is_compared_with_it(still_clips):
    """A frame that came with its field (observed) is what the next bare frame is compared
    with, exactly as if both had been bare."""
    first, second = still_clips["cup"][:2]
    bare, mixed = FrameMotion(), FrameMotion()
    bare.field(first)
    mixed.observe(first)
    np.testing.assert_array_equal(mixed.field(second), bare.field(second))


def test_the_block_field_is_each_blocks_mean_flow():
    flow = np.zeros((10, 9, 2), np.float32)  # sides not multiples of 4: edge blocks are partial
    flow[:4, :4] = (1.0, -2.0)
    flow[8:, 8:] = 4.0
    field = flow_to_field(flow)
    assert field.shape == (3, 3, 2)
    assert field[0, 0].tolist() == [1.0, -2.0]
    assert field[0, 1].tolist() == [0.0, 0.0]
    assert field[2, 2].tolist() == [4.0, 4.0]  # the last block repeats its covered pixels


def test_bad_frames_and_estimators_are_refused_clearly(detector):
    with pytest.raises(ValueError, match="estimator must be one of"):
        FrameMotion("lucas_kanade")
    with pytest.raises(ValueError, match=r"frame must be \(H, W, 3\) uint8 RGB"):
        FrameMotion().field(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="estimator must be one of"):
        FluxShardStream(dense_stream(detector).edge, dispatch="edge", motion_estimator="nope")
    with dense_stream(detector) as stream, pytest.raises(ValueError, match="uint8 RGB"):
        stream.process(np.zeros((32, 32, 3), np.float32))


# ------------------------------------------------------------------ bare frames through a stream

def test_bare_frames_are_key_first_and_after_a_size_change_then_estimated(still_clips):
    frames = still_clips["cup"][:3]
    with FluxShardStream(LocalEndpoint(executor="tiles"), dispatch="edge", imgsz=None) as stream:
        results = [stream.process(frame) for frame in frames]
        small = stream.process(np.ascontiguousarray(frames[0][:128, :160]))
        after = stream.process(np.ascontiguousarray(frames[1][:128, :160]))
    assert [r.motion for r in results] == ["key", "estimated", "estimated"]
    assert [r.key for r in results] == [True, False, False]
    assert small.motion == "key" and small.key and after.motion == "estimated"
    assert small.orig_shape == (128, 160)


@pytest.mark.slow
def test_bare_opencv_frames_reuse_work_and_agree_with_dense(still_clips, detector):
    """OpenCV-decoded frames of still real cameras fed bare (``process(frame)``) to the tile
    executor: it recomputes well under the whole frame and reports what dense reports. Without
    estimated fields every frame would be a key frame (recomputed share 1). Measured at this
    size: 0.23-0.53 per clip (0.22-0.61 at 320x240, 36 frames); agreement 0.99-1.0."""
    from fluxshard.accuracy import box_agreement

    shares, tiles_boxes, dense_boxes = {}, [], []
    for clip in STILL_CLIPS:
        frames = still_clips[clip]
        tiles, dense = tiles_stream(detector), dense_stream(detector)
        with tiles, dense:
            for frame in frames:
                result = tiles.process(frame)
                if result.index:
                    assert result.motion == "estimated"
                    shares.setdefault(clip, []).append(result.stats["recomputed_fraction"])
                tiles_boxes.append(_boxes(result))
                dense_boxes.append(_boxes(dense.process(frame)))
    means = {clip: float(np.mean(v)) for clip, v in shares.items()}
    assert max(means.values()) < 0.75 and np.mean(list(means.values())) < 0.6, means
    agreement = box_agreement(tiles_boxes, dense_boxes)  # pooled: box and cup have few people
    assert agreement.dense.sum() > 50 and agreement.value > 0.9, agreement.value


@pytest.mark.slow
def test_bare_frames_at_the_default_imgsz_reuse_work_in_source_pixels(still_clips, detector):
    """The default stream letterboxes each frame to the model's input size first, so a bare
    frame's field is estimated there; results come back in the frame's own pixels. Measured on
    these 384x288 frames (letterboxed to 640): vtest 0.29, cup 0.26, box 0.10 recomputed."""
    from fluxshard.sessions import yolo_session_factory

    frames = still_clips["vtest"]
    session = yolo_session_factory("tiles", model=detector, threads=1,
                                   tile_engine="onnxruntime")(0)
    with FluxShardStream(LocalEndpoint(session), dispatch="edge") as stream:
        results = [stream.process(frame) for frame in frames]
    assert [r.motion for r in results[1:]] == ["estimated"] * (len(frames) - 1)
    assert all(r.orig_shape == (CLIP_SIZE[1], CLIP_SIZE[0]) for r in results)
    boxes = np.concatenate([r.boxes for r in results])
    assert len(boxes) and boxes[:, [0, 2]].max() <= CLIP_SIZE[0] + 1
    assert boxes[:, [1, 3]].max() <= CLIP_SIZE[1] + 1
    recomputed = np.mean([r.stats["recomputed_fraction"] for r in results[1:]])
    assert recomputed < 0.6, recomputed


def dense_stream(detector) -> FluxShardStream:
    """Dense on every frame, in torch (no engine pick): the reference."""
    from fluxshard.sessions import yolo_session_factory

    return FluxShardStream(LocalEndpoint(yolo_session_factory("dense", model=detector)(0)),
                           dispatch="edge", imgsz=None)


def tiles_stream(detector) -> FluxShardStream:
    """The tile executor as the edge builds it, but not adaptive: what it recomputes then
    depends on the frames alone, not on how fast this machine ran them."""
    from fluxshard.sessions import yolo_session_factory

    session = yolo_session_factory("tiles", model=detector, threads=1,
                                   tile_engine="onnxruntime")(0)
    return FluxShardStream(LocalEndpoint(session), dispatch="edge", imgsz=None)


def _boxes(result) -> dict:
    return dict(boxes=result.boxes, scores=result.scores, classes=result.classes)


# ---------------------------------------------------------------------------------- results

def test_results_carry_names_shape_timestamp_and_no_masks_for_a_detector(still_clips,
                                                                         detector):
    frames = still_clips["vtest"][:2]
    with tiles_stream(detector) as stream:
        results = [stream.process(f, timestamp=10.0 + i / 25) for i, f in enumerate(frames)]
    assert stream.names == detector.names and results[0].names == detector.names
    assert results[0].names[0] == "person"  # COCO's, from the cfg's coco.names
    assert [r.timestamp for r in results] == [10.0, 10.04]
    assert all(r.orig_shape == (CLIP_SIZE[1], CLIP_SIZE[0]) for r in results)
    assert all(r.masks is None for r in results)
    assert results[1].class_names == [detector.names[k] for k in results[1].classes]


def test_names_given_to_the_stream_win_and_run_carries_the_containers_time(synth_clips):
    paths, _ = synth_clips("pan")
    names = {0: "thing"}
    with FluxShardStream(LocalEndpoint(executor="dense"), dispatch="edge", names=names,
                         imgsz=None) as stream:
        results = list(stream.run(str(paths.video), max_frames=3))
    assert all(r.names == names for r in results)
    times = [r.timestamp for r in results]
    assert times[0] == 0.0 and times[1] > 0 and times == sorted(times)


def test_to_supervision_round_trips_boxes_scores_classes_names_and_masks(still_clips,
                                                                         detector):
    import supervision as sv

    with dense_stream(detector) as stream:
        result = stream.process(still_clips["vtest"][0])
        empty = stream.process(np.zeros((64, 64, 3), np.uint8))
    assert len(result.detections), "vtest's first frame has people"
    converted = result.to_supervision()
    assert isinstance(converted, sv.Detections) and len(converted) == len(result.detections)
    np.testing.assert_array_equal(converted.xyxy, result.boxes)
    np.testing.assert_array_equal(converted.confidence, result.scores)
    np.testing.assert_array_equal(converted.class_id, result.classes)
    assert list(converted.data["class_name"]) == result.class_names
    assert converted.mask is None and converted.tracker_id is None
    # a segmentation result's masks travel as supervision's (N, H, W) bool masks
    h, w = result.orig_shape
    masks = np.zeros((len(result.detections), h, w), bool)
    masks[:, :10, :10] = True
    result.masks = masks
    np.testing.assert_array_equal(result.to_supervision().mask, masks)
    assert len(empty.detections) == 0 and len(empty.to_supervision()) == 0


def test_a_segment_models_masks_reach_the_results_and_supervision():
    """The embedded seg demo model on bare synthetic frames through the tile executor: each
    result has one (H, W) mask per detection, in the frame's pixels, and supervision gets them."""
    from pathlib import Path

    from fluxshard import synth
    from fluxshard.models import load_model
    from fluxshard.sessions import yolo_session_factory

    weights = Path(__file__).resolve().parents[1] / "fluxshard" / "weights" / "yolo11n-seg-demo.pt"
    model = load_model(weights, fused=True)
    scene = synth.Scene(synth.SceneSpec(width=320, height=192, frames=3, seed=3, camera="static",
                                        num_objects=5))
    session = yolo_session_factory("tiles", model=model, threads=1, tile_engine="onnxruntime")(0)
    with FluxShardStream(LocalEndpoint(session), dispatch="edge", imgsz=None) as stream:
        results = [stream.process(scene.render(t).image) for t in range(3)]
    assert results[-1].motion == "estimated"
    assert sum(len(r.detections) for r in results) > 0
    for r in results:
        assert r.masks is not None and r.masks.dtype == bool
        assert r.masks.shape == (len(r.detections), 192, 320)
        converted = r.to_supervision()
        np.testing.assert_array_equal(converted.mask, r.masks)


# ----------------------------------------------------------------------------- closing

def test_async_with_closes_the_stream_and_releases_its_caches(still_clips):
    frames = still_clips["cup"][:2]
    edge = LocalEndpoint(executor="tiles")

    async def main():
        async with AsyncFluxShardStream(edge, dispatch="edge", imgsz=None) as stream:
            results = [await stream.process(frame) for frame in frames]
            assert stream.states["edge"].cache is not None
        return stream, results

    stream, results = asyncio.run(main())
    assert results[1].motion == "estimated"
    assert stream.states["edge"].cache is None  # the frame it held is released
    assert stream.core.motion.field(frames[0]) is None  # and the last frame the estimate kept


def test_async_with_ends_the_cloud_stream(tritonserver, still_clips):
    from fluxshard_client import AsyncFluxShardClient

    frames = still_clips["cup"][:2]

    async def main():
        async with AsyncFluxShardClient(tritonserver.grpc_url) as client:
            cloud = client.open_stream(7301)
            async with AsyncFluxShardStream(LocalEndpoint(executor="dense"), cloud,
                                            dispatch="cloud", imgsz=None) as stream:
                results = [await stream.process(frame) for frame in frames]
            assert cloud.core.closed  # the server was told the stream ended
            async with client.open_stream(7302) as other:
                await other.send(frames[0], key=True)
            assert other.core.closed
        return results

    results = asyncio.run(main())
    assert [r.endpoint for r in results] == ["cloud", "cloud"]
    assert results[1].motion == "estimated" and not results[1].key


# --------------------------------------------------------------------------------- the bench

def test_bench_frame_source_writes_a_row_per_clip_and_stream(tmp_path):
    """perf/bench_frame_source.py on a few frames of the smallest clip: every stream ran every
    frame, the bare ones estimated every inter frame, dense agrees with itself. No timing is
    asserted."""
    import json

    bench = load_script("perf/bench_frame_source.py")
    frames = 6
    assert bench.main(["--clips", "carphone_pristine", "--frames", str(frames), "--weights",
                       "demo", "--footage-dir", str(tmp_path / "footage"), "--out",
                       str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "bench_frame_source.json").read_text())
    rows = {r["stream"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "codec"] + [f"bare_{e}" for e in FIELD_ESTIMATORS]
    assert all(set(r) == set(bench.ROW_FIELDS) and r["frames"] == frames for r in rows.values())
    assert rows["dense"]["speedup_vs_dense"] == 1.0 and rows["dense"]["agreement"] in (1.0, None)
    assert all(rows[f"bare_{e}"]["estimated_frames"] == frames - 1 for e in FIELD_ESTIMATORS)
    assert rows["codec"]["estimated_frames"] == 0
    assert 0.0 <= rows["bare_dis"]["field_agreement"] <= 1.0
