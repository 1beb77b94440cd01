"""Predict options with ultralytics' names and defaults (fluxshard.predict, fluxshard.letterbox):
the letterbox geometry and its round trip to source pixels, the motion field mapped with it on a
real 1080p H.264 clip, each NMS option's effect on a real detector's output, the served model's
parameters through a real tritonserver, and `fluxshard run --imgsz` on a 1080p clip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fluxshard import synth
from fluxshard.cli import main
from fluxshard.letterbox import Letterbox
from fluxshard.predict import PredictOptions, imgsz_value


@pytest.mark.parametrize("source_wh,input_wh,gain,left,top", [
    ((1920, 1080), (640, 384), 1 / 3, 0, 12),  # 640x360 padded to 640x384, 12 px each side
    ((1280, 720), (640, 384), 0.5, 0, 12),
    ((720, 1280), (384, 640), 0.5, 12, 0),  # portrait: the width is padded
    ((1000, 700), (640, 448), 0.64, 0, 0),  # 640x448 is a multiple of 32 already
    ((320, 192), (640, 384), 2.0, 0, 0),  # smaller frames scale up, as ultralytics' predict does
])
def test_letterbox_geometry_is_ultralytics_minimal_padding(source_wh, input_wh, gain, left, top):
    box = Letterbox.fit(source_wh[1], source_wh[0], 640)
    assert box.input_hw == (input_wh[1], input_wh[0])
    assert (box.gain, box.left, box.top) == pytest.approx((gain, left, top))
    frame = np.zeros((source_wh[1], source_wh[0], 3), np.uint8)
    assert box.image(frame).shape == (input_wh[1], input_wh[0], 3)


def test_native_is_the_frame_as_it_is():
    box = Letterbox.fit(198, 330, None)
    assert box.identity and box.input_hw == (198, 330)
    assert PredictOptions(imgsz="native").imgsz is None and imgsz_value("640") == 640


@pytest.mark.parametrize("bad", ["650", "0", "-32", "big"])
def test_an_imgsz_off_the_stride_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="imgsz must be"):
        imgsz_value(bad)


def test_boxes_come_back_in_source_pixels_on_a_non_square_source():
    """A bright rectangle drawn in a 1000x700 frame, found again in the letterboxed input, maps
    back onto where it was drawn (within one input pixel's size in the source)."""
    frame = np.zeros((700, 1000, 3), np.uint8)
    x1, y1, x2, y2 = 300, 200, 520, 350
    frame[y1:y2, x1:x2] = 255
    box = Letterbox.fit(700, 1000, 416)  # gain 0.416: 416x291 padded to 416x320
    assert box.input_hw == (320, 416) and box.top == 14
    image = box.image(frame)
    ys, xs = np.nonzero(image[..., 0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.9, 0]], np.float32)
    back = box.rows_to_source(found)[0]
    assert np.abs(back[:4] - [x1, y1, x2, y2]).max() <= 1 / box.gain + 0.5
    assert back[4:].tolist() == pytest.approx([0.9, 0])
    # and the pad round-trips to nothing outside the frame
    edge = box.rows_to_source(np.array([[0, 0, 416, 320, 1, 0]], np.float32))[0]
    assert edge[:4].tolist() == [0, 0, 1000, 700]


def _shifted_clip(path, width: int, height: int, frames: int, shift: int):
    """H.264 whose left half slides right by ``shift`` px per frame over a still right half."""
    import av

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 8 + 1, (width + frames * shift) // 8 + 1, 3))
    texture = np.repeat(np.repeat(coarse, 8, 0), 8, 1).astype(np.uint8)
    still = texture[:height, -width:].copy()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = synth.x264_options(gop=frames, preset="ultrafast")
        stream.codec_context.thread_count = 1
        for t in range(frames):
            image = still.copy()
            x0 = frames * shift - t * shift  # content moves right: pixel x came from x - shift
            image[:, :width // 2] = texture[:height, x0:x0 + width // 2]
            video_frame = synth.exact_yuv420p_frame(image)
            video_frame.pts = t
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_a_known_shift_at_1080p_maps_to_the_shift_at_imgsz(tmp_path):
    from fluxshard.motion import iter_motion

    video = _shifted_clip(tmp_path / "shift.mp4", 1920, 1080, frames=3, shift=12)
    fields = [mf.field for mf in iter_motion(str(video)) if not mf.is_key]
    assert fields, "the clip has no predicted frames"
    source = fields[-1]
    assert np.median(source[10:-10, 20:200, 0]) == pytest.approx(-12, abs=0.25)  # as encoded
    box = Letterbox.fit(1080, 1920, 640)  # gain 1/3: the shift is 4 px at 640x384
    field = box.field(source)
    assert field.shape == (96, 160, 2)
    assert not field[:3].any() and not field[-3:].any()  # the 12 px pad above and below
    moving, still = field[10:-10, 5:75], field[10:-10, 85:155]  # input x < 300 / x > 340
    assert np.median(moving[..., 0]) == pytest.approx(-4, abs=0.1)
    assert np.mean(np.abs(moving[..., 0] + 4) < 0.5) > 0.8
    assert np.median(still[..., 0]) == 0 and np.median(np.abs(field[10:-10, :, 1])) == 0


def test_the_stream_answers_in_source_pixels_masks_included():
    """A segment model behind a stream at imgsz 320 on a 480x270 frame: boxes, masks and
    orig_shape are the source frame's; the residual mask is on the input's grid."""
    from pathlib import Path

    from fluxshard_client import FluxShardStream, LocalEndpoint

    seg = Path(__file__).resolve().parents[1] / "fluxshard" / "weights" / "yolo11n-seg-demo.pt"
    frame = synth.Scene(synth.SceneSpec(width=480, height=270, seed=3, num_objects=8)).render(
        0).image
    with FluxShardStream(LocalEndpoint(executor="dense", weights=str(seg)), dispatch="edge",
                         imgsz=320, conf=0.05) as stream:
        result = stream.process(frame, is_key=True)
    assert result.letterbox.input_hw == (192, 320) and result.orig_shape == (270, 480)
    assert len(result.detections) and result.masks.shape == (len(result.detections), 270, 480)
    assert result.boxes[:, [0, 2]].max() <= 480 and result.boxes[:, [0, 2]].max() > 320
    assert result.residual_mask.shape == (12, 20)  # 16-pixel blocks of 320x192
    # each mask lies inside its box in source pixels: masks are cropped to the box at the
    # prototypes' resolution (a quarter of the input's) before upsampling, as ultralytics does
    cell = 4 / result.letterbox.gain + 1
    for (x1, y1, x2, y2), mask in zip(result.boxes, result.masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            assert xs.min() >= x1 - cell and xs.max() <= x2 + cell
            assert ys.min() >= y1 - cell and ys.max() <= y2 + cell


# ------------------------------------------------------------------------- each option's effect

@pytest.fixture(scope="module")
def detector_rows():
    """A frame of the synthetic scene and the embedded detector's session for options."""
    from fluxshard.sessions import DenseYoloSession, load_dense_model

    frame = synth.Scene(synth.SceneSpec(width=320, height=192, seed=3, num_objects=8)).render(
        0).image
    model = load_dense_model(None)

    def rows(**options):
        session = DenseYoloSession(model, PredictOptions(imgsz=None, **options))
        return session.infer(frame, None, None, True)[0]

    return rows


def test_conf_keeps_exactly_the_rows_above_it(detector_rows):
    low, high = detector_rows(conf=0.05), detector_rows(conf=0.4)
    assert len(high) < len(low)
    assert (high[:, 4] > 0.4).all()
    np.testing.assert_array_equal(high, low[low[:, 4] > 0.4])


def test_classes_keeps_only_those_classes(detector_rows):
    everything = detector_rows(conf=0.05)
    present = np.unique(everything[:, 5]).astype(int)
    assert len(present) >= 2, "the frame must show several classes for the filter to matter"
    kept = detector_rows(conf=0.05, classes=(int(present[0]),))
    assert len(kept) and (kept[:, 5] == present[0]).all()
    # NMS keeps classes apart, so filtering first gives that class's rows of the unfiltered set
    np.testing.assert_array_equal(kept, everything[everything[:, 5] == present[0]])


def test_max_det_caps_the_rows_highest_scores_first(detector_rows):
    everything = detector_rows(conf=0.01)
    assert len(everything) > 3
    np.testing.assert_array_equal(detector_rows(conf=0.01, max_det=3), everything[:3])


def test_a_lower_iou_suppresses_more_overlap(detector_rows):
    from fluxshard.accuracy import box_iou

    def worst_overlap(rows):
        worst = 0.0
        for k in np.unique(rows[:, 5]):
            b = rows[rows[:, 5] == k, :4].astype(np.float64)
            iou = box_iou(b, b) - np.eye(len(b))
            worst = max(worst, float(iou.max(initial=0.0)))
        return worst

    # NMS compares the boxes before they are clipped to the frame: a clipped pair may overlap
    # a little more than the threshold
    clip = 0.05
    loose, tight = detector_rows(conf=0.001, iou=0.7), detector_rows(conf=0.001, iou=0.3)
    assert len(tight) < len(loose)
    assert 0.3 + clip < worst_overlap(loose) <= 0.7 + clip
    assert worst_overlap(tight) <= 0.3 + clip


def test_the_default_iou_is_ultralytics_07():
    import inspect

    from fluxshard.models.ops import non_max_suppression, postprocess

    assert PredictOptions().iou == 0.7
    for f in (non_max_suppression, postprocess):
        assert inspect.signature(f).parameters["iou_thres"].default == 0.7


def test_options_narrow_rows_another_endpoint_returned():
    rows = np.array([[0, 0, 9, 9, 0.9, 2], [0, 0, 9, 9, 0.8, 1], [5, 5, 9, 9, 0.5, 2],
                     [1, 1, 4, 4, 0.3, 0]], np.float32)
    narrowed = PredictOptions(conf=0.4, classes=(2, 0), max_det=1).narrow(rows)
    np.testing.assert_array_equal(narrowed, rows[:1])


# ----------------------------------------------------------------------------- the served model

@pytest.mark.slow
def test_the_served_model_reads_its_predict_parameters(triton_installed):
    """A tritonserver whose fluxshard model has imgsz 320, conf, classes and max_det set answers
    a 640x384 frame with what a local session of the same options gives, in the frame's pixels."""
    from fluxshard.serving.tritonserver import TritonServer
    from fluxshard.sessions import yolo_session_factory
    from fluxshard_client import FluxShardClient

    frame = synth.Scene(synth.SceneSpec(width=640, height=384, seed=3, num_objects=8)).render(
        0).image
    options = PredictOptions(imgsz=320, conf=0.05, classes=(1, 2), max_det=4)
    local = yolo_session_factory("exact", predict=options)(0).infer(frame, None, None, True)[0]
    unfiltered = yolo_session_factory("exact", predict=PredictOptions(imgsz=320, conf=0.05))(
        0).infer(frame, None, None, True)[0]
    assert len(unfiltered) > len(local) > 0  # the options change the answer
    with TritonServer(models=["fluxshard"], parameters=options.parameters()) as server:
        with FluxShardClient(server.grpc_url) as client:
            stream = client.open_stream(4242)
            result = stream.send(frame, key=True, frame_index=0)
            stream.close()
    assert result.stats["input_hw"] == [192, 320]  # letterboxed on the server
    np.testing.assert_allclose(result.detections, local, atol=1e-4)
    assert set(result.classes.tolist()) <= {1, 2} and len(result.detections) <= 4
    assert result.detections[:, [0, 2]].max() > 320  # in the 640-wide frame's pixels


# ------------------------------------------------------------------------------- fluxshard run

@pytest.mark.slow
def test_run_at_imgsz_640_on_a_1080p_clip(tmp_path, capsys):
    spec = synth.SceneSpec(width=1920, height=1080, frames=4, gop=4, seed=5, num_objects=6,
                           camera="static")
    video = synth.make_clip(spec, tmp_path, name="hd").video
    out = tmp_path / "run"
    code = main(["run", str(video), "--dispatch", "edge", "--imgsz", "640", "--conf", "0.3",
                 "--classes", "0", "2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1920x1080 letterboxed to 640x384" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predict"] == {"imgsz": 640, "conf": 0.3, "iou": 0.7, "classes": [0, 2],
                                  "max_det": 300}
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert len(records) == 4
    boxes = np.array([b for r in records for b in r["boxes"]]).reshape(-1, 4)
    classes = {c for r in records for c in r["classes"]}
    scores = [s for r in records for s in r["scores"]]
    assert len(boxes) and classes <= {0, 2} and min(scores) >= 0.3
    assert boxes[:, [0, 2]].max() > 640 and boxes[:, [0, 2]].max() <= 1920  # source pixels
    assert boxes[:, [1, 3]].max() <= 1080


def test_serve_sets_only_the_predict_parameters_given():
    from fluxshard import cli
    from fluxshard.tools.args import served_predict_parameters

    parser = cli.build_parser(["serve"]).verbs["serve"]
    given = parser.parse_args(["--imgsz", "native", "--conf", "0.3", "--classes", "1", "2"])
    assert served_predict_parameters(given) == {"imgsz": "native", "conf": "0.3",
                                                "classes": "1,2"}
    assert served_predict_parameters(parser.parse_args([])) == {}  # the config's stand
    parsed = PredictOptions.from_parameters(served_predict_parameters(given))
    assert (parsed.imgsz, parsed.conf, parsed.classes, parsed.iou) == (None, 0.3, (1, 2), 0.7)
