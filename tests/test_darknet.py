"""The Darknet family (fluxshard/models/darknet.py) on the real pretrained YOLOv3-tiny: the cfg
parser, the .weights reader, the anchor head's interface, checkpoints, OpenCV 4's outputs as the
golden (scripts/make_darknet_golden.py made tests/data/darknet_yolov3_tiny_golden.npz), the
onnxruntime export, and the verbs (weights fetch, run --executor dense, the exact executor's
refusal).

The weights come from the cache scripts/install.sh fills (`fluxshard weights fetch yolov3-tiny`);
where they are missing the first load fetches them."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxshard.models import load_model, postprocess, save_checkpoint
from fluxshard.models.darknet import (YOLOV3_TINY_ASSET, DarknetError, DarknetMaxPool,
                                      DarknetModel, fetch_yolov3_tiny, load_darknet)
from fluxshard.models.families import family_for_state_dict, family_of
from conftest import load_script

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "darknet_yolov3_tiny_golden.npz"

# OpenCV 4.10 and torch both compute in float32 but in other orders (and OpenCV's BatchNorm eps
# is 1e-6 where ours is Darknet's 1e-5): scores agree to a few 1e-5, boxes (exp of a logit times
# anchors up to 344 px) to a few 1e-2 px at most.
SCORE_ATOL = 2e-4
BOX_ATOL_PX, BOX_RTOL = 0.1, 1e-4


@pytest.fixture(scope="module")
def tiny() -> DarknetModel:
    torch.set_num_threads(1)
    return load_model("yolov3-tiny")


def _golden_script():
    return load_script("scripts/make_darknet_golden.py")


def _tensor(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float().div(255.0)


def _objectness(model: DarknetModel, x: torch.Tensor) -> np.ndarray:
    """Every anchor's objectness in eval-output order (level, slot, cells row-major)."""
    head = model.head
    with torch.no_grad():
        maps = model.raw_maps(x)
    return np.concatenate([m.reshape(head.anchors_per_cell, 5 + head.nc, -1)[:, 4].sigmoid()
                           .reshape(-1).numpy() for m in maps])


# ---------------------------------------------------------------------------- cfg and weights

def test_the_real_cfg_parses_into_darknets_layers(tiny):
    types = [m.type for m in tiny.model]
    assert len(tiny.model) == 25  # the cfg's 24 sections after [net], then the head
    assert types.count("convolutional") == 13 and types.count("maxpool") == 6
    assert types[16] == types[23] == "yolo" and types[-1] == "yolo_head"
    assert tiny.model[17].f == 13  # [route] layers = -4, from layer 17
    assert tiny.model[20].f == [-1, 8]  # [route] layers = -1, 8
    head = tiny.head
    assert head.f == [16, 23] and tiny.save == [8, 13, 16, 23]
    assert head.strides == (32, 16)  # Darknet's order: the coarse level first
    assert head.anchors_per_cell == 3 and head.nc == 80 and head.no == 3 * 85
    assert head.anchor_sizes.tolist() == [[[81, 82], [135, 169], [344, 319]],
                                          [[10, 14], [23, 27], [37, 58]]]
    assert type(tiny.model[0].conv) is torch.nn.Conv2d and tiny.model[0].conv.kernel_size == (3, 3)
    assert tiny.scale == "yolov3-tiny" and tiny.task == "detect" and tiny.nc == 80
    assert sum(p.numel() for p in tiny.parameters()) == 8_852_366  # Darknet's count for tiny


def test_maxpool_keeps_darknets_size_and_takes_the_max_of_the_valid_window():
    x = torch.randn(1, 2, 5, 7)
    same = DarknetMaxPool(size=2, stride=1, padding=1)(x)  # yolov3-tiny's layer 11
    assert same.shape == x.shape
    for r in range(5):
        for c in range(7):
            window = x[..., r:r + 2, c:c + 2]  # right/bottom edges: the valid part only
            assert torch.equal(same[..., r, c], window.amax((-2, -1)))
    halved = DarknetMaxPool(size=2, stride=2, padding=1)(torch.randn(1, 1, 8, 8))
    assert halved.shape[-2:] == (4, 4)


def test_the_weights_reader_refuses_files_of_the_wrong_size(tmp_path):
    files = fetch_yolov3_tiny(announce=False)
    cfg, data = files["yolov3-tiny.cfg"], files["yolov3-tiny.weights"].read_bytes()
    cases = {"truncated": (data[:-4000], r"floats after the header, but the cfg's 13 "
                                         r"convolutional layers need 8858734 \(truncated file"),
             "extended": (data + bytes(8), r"but the cfg's 13 convolutional layers need 8858734 "
                                           r"\(extra data"),
             "cut mid-float": (data[:-2], "no whole number of float32 values")}
    for name, (content, message) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / "yolov3-tiny.cfg").write_text(cfg.read_text())
        (folder / "yolov3-tiny.weights").write_bytes(content)
        with pytest.raises(DarknetError, match=message) as refused:
            load_darknet(folder / "yolov3-tiny.cfg")
        assert "\n" not in str(refused.value), name


def test_named_weights_load_coco_names_and_the_cfg_path_loads_the_same_model(tiny):
    assert len(tiny.names) == 80 and tiny.names[0] == "person" and tiny.names[1] == "bicycle"
    assert tiny.names[79] == "toothbrush" and family_of(tiny).name == "Darknet"
    from_cfg = load_model(YOLOV3_TINY_ASSET.path("yolov3-tiny.cfg"))  # coco.names beside it
    assert from_cfg.names == tiny.names
    for a, b in zip(from_cfg.state_dict().values(), tiny.state_dict().values()):
        assert torch.equal(a, b)
    from fluxshard.sessions import load_dense_model

    fused = load_dense_model("yolov3-tiny")
    assert isinstance(fused, DarknetModel) and not any(hasattr(m, "bn") for m in fused.modules())


def test_a_checkpoint_rebuilds_the_darknet_architecture(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "tiny.pt", note="darknet")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "fluxshard-darknet" and ckpt["scale"] == "yolov3-tiny"
    loaded = load_model(path)
    assert isinstance(loaded, DarknetModel) and loaded.names == tiny.names
    assert loaded.cfg == tiny.cfg and loaded.meta == {"note": "darknet"}
    assert family_for_state_dict(tiny.state_dict()).name == "Darknet"
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        expected = copy.deepcopy(tiny).half().float()(x)  # checkpoints hold fp16 tensors
        reloaded = load_model(path)(x)
        from_fused_sd = load_model(load_model(path, fused=True).state_dict())(x)
    torch.testing.assert_close(reloaded, expected)
    torch.testing.assert_close(from_fused_sd, expected, atol=1e-3, rtol=1e-4)  # BN folded


# --------------------------------------------------------------------------- the head interface

def test_the_eval_output_is_the_relative_maps_assembled_cell_by_cell(tiny):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 160)  # non-square: rows and columns must not be swapped
    head = tiny.head
    with torch.no_grad():
        out = tiny(x)
        rel = head.relative(tiny.raw_maps(x))
    k, c = head.anchors_per_cell, 4 + head.nc
    expected, centres_expected, strides_expected = [], [], []
    for level, (r, s) in enumerate(zip(rel, head.strides)):
        b, channels, h, w = r.shape
        assert channels == k * c and (h, w) == (96 // s, 160 // s)
        for slot in range(k):
            part = r[:, slot * c:(slot + 1) * c].reshape(b, c, h * w)
            rows, cols = np.divmod(np.arange(h * w), w)
            centre = torch.tensor(np.stack([cols + 0.5, rows + 0.5]), dtype=torch.float32)
            part = part.clone()
            part[:, :2] += centre * s
            expected.append(part)
            centres_expected.append(centre.t())
            strides_expected.append(torch.full((h * w, 1), float(s)))
    torch.testing.assert_close(out, torch.cat(expected, 2), atol=1e-4, rtol=1e-6)
    centres, strides = head.anchors_for(tiny.raw_maps(x[:1]))
    assert torch.equal(centres, torch.cat(centres_expected))
    assert torch.equal(strides, torch.cat(strides_expected))


# ------------------------------------------------------------------------------ OpenCV golden

@pytest.fixture(scope="module")
def golden():
    data = np.load(GOLDEN)
    return data, json.loads(str(data["info"]))


def _golden_output(data, k: int, anchors: int, nc: int) -> torch.Tensor:
    """OpenCV's rows above the floor as an eval output (1, 4 + nc, A); other anchors score 0."""
    out = np.zeros((4 + nc, anchors), np.float32)
    rows = data[f"rows{k}"]
    out[:4, data[f"index{k}"]] = rows[:, :4].T
    out[4:, data[f"index{k}"]] = rows[:, 5:].T
    return torch.from_numpy(out)[None]


def test_torch_matches_opencv4s_darknet_importer_on_real_frames(tiny, golden):
    data, info = golden
    make = _golden_script()
    worst = {"objectness": 0.0, "scores": 0.0, "boxes": 0.0}
    for k, case in enumerate(info["cases"]):
        frame = make.golden_frame(case["clip"], case["index"], case["width"], case["height"])
        assert make.frame_digest(frame) == case["sha256"], (
            f"case {k}: the decoded, resized frame is not the pixels OpenCV saw (PyAV/swscale "
            "changed?): regenerate the golden with scripts/make_darknet_golden.py")
        x = _tensor(frame)
        with torch.no_grad():
            ours = tiny(x)[0].t().numpy()
        objectness = _objectness(tiny, x)
        index, rows = data[f"index{k}"], data[f"rows{k}"]
        assert len(objectness) == len(data[f"objectness{k}"]) == len(ours)
        np.testing.assert_allclose(objectness, data[f"objectness{k}"], rtol=0, atol=SCORE_ATOL)
        np.testing.assert_allclose(ours[index, 4:], rows[:, 5:], rtol=0, atol=SCORE_ATOL)
        np.testing.assert_allclose(ours[index, :4], rows[:, :4], rtol=BOX_RTOL, atol=BOX_ATOL_PX)
        worst["objectness"] = max(worst["objectness"],
                                  float(np.abs(objectness - data[f"objectness{k}"]).max()))
        worst["scores"] = max(worst["scores"], float(np.abs(ours[index, 4:] - rows[:, 5:]).max()))
        worst["boxes"] = max(worst["boxes"], float(np.abs(ours[index, :4] - rows[:, :4]).max()))
        # after NMS (class-wise), the same detections
        theirs = postprocess(_golden_output(data, k, len(ours), tiny.nc), x.shape[-2:])[0]
        mine = postprocess(torch.from_numpy(ours.T.copy())[None], x.shape[-2:])[0]
        assert len(theirs) >= 1, f"case {k}: OpenCV finds nothing above 0.25 here"
        assert mine.classes.tolist() == theirs.classes.tolist(), k
        np.testing.assert_allclose(mine.scores, theirs.scores, rtol=0, atol=SCORE_ATOL)
        np.testing.assert_allclose(mine.boxes, theirs.boxes, rtol=BOX_RTOL, atol=BOX_ATOL_PX)
    print(f"largest |torch - OpenCV 4|: {worst}")


def test_the_onnxruntime_export_matches_torch_on_a_real_frame(tiny, golden, tmp_path):
    from fluxshard.models.export import export_onnx, onnxruntime_session

    _data, info = golden
    case = info["cases"][1]  # 640x384
    frame = _golden_script().golden_frame(case["clip"], case["index"], case["width"],
                                          case["height"])
    x = _tensor(frame)
    session = onnxruntime_session(export_onnx(tiny, tmp_path / "tiny.onnx",
                                              (case["height"], case["width"])), threads=1)
    ort = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = tiny(x).numpy()
    # same float32 ops, other kernels: a few ulps of the logits, scaled by exp for the sizes
    np.testing.assert_allclose(ort[:, 4:], ref[:, 4:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ort[:, :4], ref[:, :4], rtol=1e-5, atol=5e-3)


# ------------------------------------------------------------------------------------- verbs

def _cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fluxshard.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def test_weights_fetch_prints_the_pinned_files():
    done = _cli("weights", "fetch", "yolov3-tiny")
    assert done.returncode == 0, done.stderr
    listed = {}
    for line in done.stdout.splitlines():
        if line.startswith("yolov3-tiny: "):
            path, digest = line.removeprefix("yolov3-tiny: ").split("  sha256 ")
            listed[Path(path).name] = (Path(path), digest)
    assert sorted(listed) == sorted(f.name for f in YOLOV3_TINY_ASSET.files)
    for pinned in YOLOV3_TINY_ASSET.files:
        path, digest = listed[pinned.name]
        assert digest == pinned.sha256
        assert hashlib.sha256(path.read_bytes()).hexdigest() == pinned.sha256
    listing = _cli("weights", "list")
    assert listing.returncode == 0 and "yolov3-tiny  Darknet" in listing.stdout
    assert "[cached]" in listing.stdout


def test_the_exact_executor_and_export_refuse_darknet_in_one_line(tiny, tmp_path, capsys):
    from fluxshard.cli import main
    from fluxshard.sessions import yolo_session_factory

    with pytest.raises(ValueError, match=r"^the exact executor supports YOLO11 only "
                                         r"\(DarknetModel given\); use --executor tiles or "
                                         r"dense$"):
        yolo_session_factory("exact", model=tiny)
    assert main(["export", "--weights", "yolov3-tiny", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("fluxshard export: yolov3-tiny is a darknet-yolov3-tiny-detect model; the "
                   "exact executor's graph supports YOLO11 only (the dense ONNX: "
                   "fluxshard.models.export_onnx)")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_fluxshard_run_dense_finds_the_person_in_a_real_clip(tmp_path):
    from fluxshard.footage import camera_stream

    video = camera_stream("carphone_pristine", tmp_path / "clip", frames=10)
    done = _cli("run", str(video), "--imgsz", "native",
                "--weights", "yolov3-tiny", "--executor", "dense",
                "--dispatch", "edge", "--frames", "10", "--out", str(tmp_path / "out"),
                "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    frames = [json.loads(line) for line in
              (tmp_path / "out" / "detections.jsonl").read_text().splitlines()]
    assert len(frames) == 10 and all(f["executor"] == "dense" for f in frames)
    # a man talking in a car, filling the frame: a person in every frame, scored near 0.95
    with_person = [f for f in frames
                   if any(n == "person" and s >= 0.5 for n, s in zip(f["names"], f["scores"]))]
    assert len(with_person) >= 8, [list(zip(f["names"], f["scores"])) for f in frames]
    refused = _cli("run", str(video), "--imgsz", "native",
                   "--weights", "yolov3-tiny", "--executor", "exact",
                   "--dispatch", "edge", "--frames", "2", "--out", str(tmp_path / "exact"),
                   "--no-progress")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "fluxshard run: the exact executor supports YOLO11 only (DarknetModel given); use "
        "--executor tiles or dense")


def test_fluxshard_run_with_yolov3_tiny_and_no_executor_runs_tiles_on_a_real_clip(tmp_path):
    """`fluxshard run VIDEO --weights yolov3-tiny`: the exact executor cannot run Darknet, so
    the edge's default for it is the tile executor, and the person is found as densely."""
    from fluxshard.footage import camera_stream

    video = camera_stream("carphone_pristine", tmp_path / "clip", frames=10)
    done = _cli("run", str(video), "--imgsz", "native",
                "--weights", "yolov3-tiny", "--dispatch", "edge",
                "--frames", "10", "--out", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["executor"] == "tiles"
    frames = [json.loads(line) for line in
              (tmp_path / "out" / "detections.jsonl").read_text().splitlines()]
    with_person = [f for f in frames
                   if any(n == "person" and s >= 0.5 for n, s in zip(f["names"], f["scores"]))]
    assert len(with_person) >= 8, [list(zip(f["names"], f["scores"])) for f in frames]


@pytest.mark.slow
def test_the_served_model_takes_named_weights(triton_installed, tmp_path):
    """`fluxshard run --dispatch cloud` starts a local tritonserver whose fluxshard model gets
    weights=yolov3-tiny and runs it on its default executor, tiles."""
    from fluxshard.footage import camera_stream

    video = camera_stream("carphone_pristine", tmp_path / "clip", frames=5)
    done = _cli("run", str(video), "--imgsz", "native",
                "--weights", "yolov3-tiny", "--executor", "dense",
                "--dispatch", "cloud", "--frames", "5", "--out", str(tmp_path / "out"),
                "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    frames = [json.loads(line) for line in
              (tmp_path / "out" / "detections.jsonl").read_text().splitlines()]
    assert [f["endpoint"] for f in frames] == ["cloud"] * 5
    with_person = [f for f in frames
                   if any(n == "person" and s >= 0.5 for n, s in zip(f["names"], f["scores"]))]
    assert len(with_person) >= 4, [list(zip(f["names"], f["scores"])) for f in frames]


def test_profile_latency_measures_a_darknet_edge_without_the_exact_executor():
    """`fluxshard profile latency --weights yolov3-tiny`: the exact executor cannot run Darknet,
    so its table is the dense one (measured), the tile and dense tables are measured, and the
    profile says what stood in."""
    from fluxshard.tools.profile import profile_latency

    profile = profile_latency(width=160, height=96, fractions=(0, 0.5, 1), repeats=1,
                              cloud=False, weights="yolov3-tiny", progress=False,
                              executors=("tiles",))
    assert set(profile.edge_executors) == {"tiles", "dense"}
    dense_ms = profile.edge_executors["dense"].ms[0]
    assert dense_ms > 0 and profile.edge.ms == [dense_ms] * 3
    assert any("exact left out" in note for note in profile.meta["edge_executor_notes"])
