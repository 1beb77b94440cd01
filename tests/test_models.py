"""YOLO11 models: architecture fidelity to ultralytics, fusing, decoding, NMS, weights, ONNX."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fluxshard.models import (CheckpointError, Detections, build_yolo11, describe_layers,
                              export_onnx, fuse, is_fused, load_model, non_max_suppression,
                              postprocess, preprocess, save_checkpoint)
from fluxshard.models.modules import C3k, Conv
from fluxshard.models.ops import nms
from fluxshard.models.weights import infer_architecture

torch.set_num_threads(2)
H, W = 128, 192  # small input (multiple of 32) keeps the tests fast


def num_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics so fusing is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture(scope="module")
def yolo_n():
    torch.manual_seed(0)
    m = build_yolo11("n", "detect")
    randomize_bn(m)
    return m.eval()


@pytest.fixture(scope="module")
def yolo_n_seg():
    torch.manual_seed(1)
    m = build_yolo11("n", "segment")
    randomize_bn(m, seed=1)
    return m.eval()


# --- architecture -------------------------------------------------------------------------------

@pytest.mark.parametrize("scale,task,expected", [
    ("n", "detect", 2_624_080),  # ultralytics: "YOLO11n summary: ... 2,624,080 parameters"
    ("n", "segment", 2_876_848),  # ultralytics: yolo11n-seg 2,876,848
    ("s", "detect", 9_458_752),  # ultralytics: yolo11s 9,458,752
])
def test_parameter_counts_match_ultralytics(scale, task, expected):
    assert num_params(build_yolo11(scale, task)) == expected


def test_larger_scales_use_c3k_blocks_and_max_channels():
    m = build_yolo11("m")
    assert isinstance(m.model[2].m[0], C3k)  # c3k forced on for m/l/x
    assert not isinstance(build_yolo11("s").model[2].m[0], C3k)
    assert m.model[7].conv.out_channels == 512  # 1024 capped by max_channels=512 at width 1.0
    assert len(build_yolo11("l").model[2].m) == 2 and len(m.model[2].m) == 1  # depth 1.0 vs 0.5


def test_ultralytics_key_names_and_shapes(yolo_n):
    sd = yolo_n.state_dict()
    known = {  # hardcoded from an ultralytics yolo11n.pt state dict
        "model.0.conv.weight": (16, 3, 3, 3),
        "model.0.bn.running_mean": (16,),
        "model.2.cv1.conv.weight": (32, 32, 1, 1),
        "model.2.m.0.cv1.conv.weight": (8, 16, 3, 3),
        "model.9.cv2.conv.weight": (256, 512, 1, 1),
        "model.10.m.0.attn.qkv.conv.weight": (256, 128, 1, 1),
        "model.10.m.0.attn.pe.conv.weight": (128, 1, 3, 3),
        "model.10.m.0.ffn.0.conv.weight": (256, 128, 1, 1),
        "model.22.m.0.m.0.cv1.conv.weight": (64, 64, 3, 3),
        "model.23.cv2.0.0.conv.weight": (64, 64, 3, 3),
        "model.23.cv2.0.2.weight": (64, 64, 1, 1),
        "model.23.cv3.0.0.0.conv.weight": (64, 1, 3, 3),
        "model.23.cv3.2.2.bias": (80,),
        "model.23.dfl.conv.weight": (1, 16, 1, 1),
    }
    for key, shape in known.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 499


def test_layer_graph_attributes(yolo_n):
    layers = list(yolo_n.model)
    assert [m.i for m in layers] == list(range(24))
    assert layers[0].f == -1 and layers[12].f == [-1, 6] and layers[23].f == [16, 19, 22]
    assert layers[23].type == "Detect" and layers[10].type == "C2PSA" and layers[11].type == "nn.Upsample"
    assert yolo_n.save == [4, 6, 10, 13, 16, 19, 22]
    assert yolo_n.stride.tolist() == [8.0, 16.0, 32.0]
    assert yolo_n.task == "detect" and yolo_n.scale == "n" and len(yolo_n.names) == 80
    assert yolo_n.yaml["head"][-1][2] == "Detect"
    for m in yolo_n.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.eps == 1e-3  # ultralytics BN eps, needed for pretrained weights


def test_describe_layers_reports_shapes_and_strides(yolo_n):
    specs = describe_layers(yolo_n, (H, W))
    assert [s.stride for s in specs[:11]] == [2, 4, 4, 8, 8, 16, 16, 32, 32, 32, 32]
    assert specs[16].out_shape == (64, H // 8, W // 8) and specs[22].out_shape == (256, H // 32, W // 32)
    assert specs[12].f == [-1, 6] and specs[23].stride is None
    assert sum(s.params for s in specs) == 2_624_080
    assert not yolo_n.training  # mode restored


def test_bias_init_priors():
    m = build_yolo11("n", num_classes=3)
    for level, s in enumerate((8, 16, 32)):
        assert torch.all(m.model[23].cv2[level][-1].bias == 1.0)
        assert torch.allclose(m.model[23].cv3[level][-1].bias,
                              torch.tensor(math.log(5 / 3 / (640 / s) ** 2)))


# --- forward shapes -----------------------------------------------------------------------------

def test_detect_train_and_eval_shapes():
    m = build_yolo11("n", num_classes=5).train()
    out = m(torch.rand(2, 3, H, W))
    assert [tuple(o.shape) for o in out] == [(2, 69, H // s, W // s) for s in (8, 16, 32)]
    m.eval()
    with torch.no_grad():
        y = m(torch.rand(2, 3, H, W))
    anchors = sum((H // s) * (W // s) for s in (8, 16, 32))
    assert y.shape == (2, 4 + 5, anchors)
    assert 0 <= y[:, 4:].min() and y[:, 4:].max() <= 1  # sigmoid scores


def test_segment_train_and_eval_shapes():
    m = build_yolo11("n", "segment", num_classes=2).train()
    maps, coeffs, protos = m(torch.rand(1, 3, H, W))
    anchors = sum((H // s) * (W // s) for s in (8, 16, 32))
    assert [tuple(o.shape) for o in maps] == [(1, 66, H // s, W // s) for s in (8, 16, 32)]
    assert coeffs.shape == (1, 32, anchors) and protos.shape == (1, 32, H // 4, W // 4)
    m.eval()
    with torch.no_grad():
        y, p = m(torch.rand(1, 3, H, W))
    assert y.shape == (1, 4 + 2 + 32, anchors) and p.shape == (1, 32, H // 4, W // 4)


def test_eval_boxes_are_centered_on_anchor_grid():
    """With zero box logits the DFL expectation is 7.5 bins each side: 15*stride wide boxes
    centred on each anchor, in input pixels."""
    m = build_yolo11("n", num_classes=1).eval()
    head = m.model[23]
    maps = [torch.zeros(1, head.no, H // s, W // s) for s in (8, 16, 32)]
    y = head.decode(maps)
    first = y[0, :4, 0].tolist()  # level 0, anchor (0, 0): centre (4, 4), size 15*8
    assert first == pytest.approx([4.0, 4.0, 120.0, 120.0])
    last = y[0, :4, -1].tolist()  # level 2, last anchor
    assert last == pytest.approx([W - 16.0, H - 16.0, 480.0, 480.0])


def test_bad_input_shapes_raise(yolo_n):
    with pytest.raises(ValueError, match="multiples of 32"):
        yolo_n(torch.rand(1, 3, 100, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        yolo_n(torch.rand(3, 128, 128))
    with pytest.raises(ValueError, match="scale"):
        build_yolo11("q")
    with pytest.raises(ValueError, match="task"):
        build_yolo11("n", "pose")


# --- fusing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["detect", "segment"])
def test_fuse_preserves_outputs(task, yolo_n, yolo_n_seg):
    model = yolo_n if task == "detect" else yolo_n_seg
    x = torch.rand(1, 3, H, W)
    with torch.no_grad():
        ref = model(x)
        fused = fuse(copy.deepcopy(model))
        assert is_fused(fused) and not is_fused(model)
        out = fused(x)
        fused_cl = fused.to(memory_format=torch.channels_last)
        out_cl = fused_cl(x.contiguous(memory_format=torch.channels_last))
    refs = [ref] if task == "detect" else list(ref)
    outs = [out] if task == "detect" else list(out)
    outs_cl = [out_cl] if task == "detect" else list(out_cl)
    for r, o, c in zip(refs, outs, outs_cl):
        torch.testing.assert_close(o, r, atol=2e-3, rtol=1e-4)  # boxes in pixels
        torch.testing.assert_close(c, r, atol=2e-3, rtol=1e-4)


def test_fuse_changes_conv_modules_in_place(yolo_n):
    m = fuse(copy.deepcopy(yolo_n))
    conv = m.model[0]
    assert isinstance(conv, Conv) and not hasattr(conv, "bn") and conv.conv.bias is not None


# --- preprocess / NMS / postprocess -------------------------------------------------------------

def test_preprocess_pads_bottom_right_without_resizing():
    frame = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    x = preprocess(frame)
    assert x.shape == (1, 3, 128, 160) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, :, :100, :150].permute(1, 2, 0).numpy(), frame / 255.0, atol=1e-6)
    assert torch.allclose(x[0, :, 100:, :], torch.tensor(114 / 255.0))
    assert torch.allclose(x[0, :, :, 150:], torch.tensor(114 / 255.0))
    assert preprocess([frame, frame]).shape == (2, 3, 128, 160)
    assert preprocess(np.zeros((384, 640, 3), np.uint8)).shape == (1, 3, 384, 640)


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32),
                                 [np.zeros((10, 10, 3), np.uint8), np.zeros((12, 10, 3), np.uint8)]])
def test_preprocess_rejects_bad_frames(bad):
    with pytest.raises(ValueError):
        preprocess(bad)


def make_preds(rows: list[tuple], nc: int = 3) -> torch.Tensor:
    """rows of (cx, cy, w, h, cls, score) -> eval-output (1, 4 + nc, A)."""
    p = torch.zeros(1, 4 + nc, len(rows))
    for a, (cx, cy, w, h, c, s) in enumerate(rows):
        p[0, :4, a] = torch.tensor([cx, cy, w, h])
        p[0, 4 + c, a] = s
    return p


def test_nms_suppresses_overlaps_within_class_only():
    preds = make_preds([
        (50, 50, 40, 40, 0, 0.9),
        (52, 52, 40, 40, 0, 0.8),  # IoU ~0.82 with the first, same class: suppressed
        (52, 52, 40, 40, 1, 0.7),  # same place, other class: kept
        (200, 200, 20, 20, 0, 0.6),  # far away: kept
        (300, 300, 20, 20, 2, 0.1),  # below conf: dropped
    ])
    (det,) = non_max_suppression(preds, conf_thres=0.25, iou_thres=0.45)
    assert det[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert det[:, 5].tolist() == [0, 1, 0]
    assert det[0, :4].tolist() == pytest.approx([30, 30, 70, 70])
    (agn,) = non_max_suppression(preds, agnostic=True)
    assert agn[:, 4].tolist() == pytest.approx([0.9, 0.6])
    (only1,) = non_max_suppression(preds, classes=[1])
    assert only1[:, 5].tolist() == [1]


def test_nms_is_greedy_not_transitive():
    """A suppresses B, B would suppress C but is gone, and C barely overlaps A: C survives."""
    boxes = torch.tensor([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.3).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    assert nms(boxes, scores, 0.3, max_keep=1).tolist() == [0]
    assert nms(boxes[:0], scores[:0], 0.5).numel() == 0


def test_nms_matches_bruteforce_reference():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(300, 2, generator=g) * 200
    wh = torch.rand(300, 2, generator=g) * 60 + 5
    boxes = torch.cat((xy, xy + wh), 1)
    scores = torch.rand(300, generator=g)
    keep = nms(boxes, scores, 0.5).tolist()
    order = scores.argsort(descending=True).tolist()
    ref, alive = [], set(order)

    def iou(a, b):
        lt = torch.maximum(a[:2], b[:2]); rb = torch.minimum(a[2:], b[2:])
        inter = (rb - lt).clamp(min=0).prod()
        return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)

    for i in order:
        if i in alive:
            ref.append(i)
            alive -= {j for j in alive if j != i and iou(boxes[i], boxes[j]) > 0.5}
            alive.discard(i)
    assert keep == ref


def test_nms_max_det_and_bad_input():
    preds = make_preds([(20 * k + 10, 10, 5, 5, 0, 0.5 + k / 100) for k in range(20)])
    (det,) = non_max_suppression(preds, max_det=7)
    assert len(det) == 7 and det[0, 4] == pytest.approx(0.69)
    with pytest.raises(ValueError):
        non_max_suppression(torch.zeros(1, 4, 10))


def test_postprocess_clips_to_frame_and_types():
    preds = make_preds([(95, 10, 20, 20, 2, 0.9), (30, 30, 10, 10, 1, 0.8)])
    (d,) = postprocess(preds, input_shape=(128, 128), orig_shape=(100, 100))
    assert isinstance(d, Detections) and len(d) == 2 and d.masks is None
    assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float32 and d.classes.dtype == np.int64
    np.testing.assert_allclose(d.boxes[0], [85, 0, 100, 20])  # clipped right and top
    assert d.classes.tolist() == [2, 1]
    with pytest.raises(ValueError, match="padded"):
        postprocess(preds, input_shape=(128, 128), orig_shape=(200, 100))


def test_postprocess_segment_masks_follow_prototypes():
    """One prototype is 1 everywhere: the mask of a box with coefficient +10 on it is the box,
    cropped at prototype resolution (stride 4) and then bilinearly upsampled, as ultralytics does:
    the edge blurs by up to half a prototype cell (2 px) around the box."""
    nc, nm = 2, 32
    preds = torch.zeros(1, 4 + nc + nm, 1)
    preds[0, :4, 0] = torch.tensor([40.0, 32.0, 32.0, 24.0])  # xyxy 24,20,56,44
    preds[0, 4, 0] = 0.9
    preds[0, 6, 0] = 10.0
    protos = torch.full((1, nm, 16, 24), -1.0)
    protos[0, 0] = 1.0
    (d,) = postprocess((preds, protos), input_shape=(64, 96), orig_shape=(60, 90))
    assert d.masks.shape == (1, 60, 90) and d.masks.dtype == bool
    ys, xs = np.nonzero(d.masks[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (22, 57, 18, 45)
    assert d.masks[0, 18:46, 22:58].all()
    empty = postprocess((torch.zeros(1, 4 + nc + nm, 5), protos), (64, 96))[0]
    assert len(empty) == 0 and empty.masks.shape == (0, 64, 96)


def test_end_to_end_random_model_runs(yolo_n_seg):
    frame = np.random.default_rng(1).integers(0, 256, (120, 180, 3), dtype=np.uint8)
    x = preprocess(frame)
    with torch.no_grad():
        out = yolo_n_seg(x)
    dets = postprocess(out, x.shape[2:], frame.shape, conf_thres=0.0, max_det=10)
    assert len(dets[0]) <= 10 and dets[0].masks.shape[1:] == (120, 180)
    assert (dets[0].boxes[:, 2] <= 180).all() and (dets[0].boxes[:, 3] <= 120).all()


# --- weights ------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path, yolo_n_seg):
    path = save_checkpoint(yolo_n_seg, tmp_path / "ck.pt", epochs=3, note="test")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "fluxshard-yolo11" and raw["scale"] == "n" and raw["task"] == "segment"
    assert raw["state_dict"]["model.0.conv.weight"].dtype == torch.float16
    loaded = load_model(path)
    assert loaded.task == "segment" and loaded.meta == {"epochs": 3, "note": "test"}
    assert not loaded.training
    for k, v in yolo_n_seg.state_dict().items():
        expected = v.half().float() if v.is_floating_point() else v
        assert torch.equal(loaded.state_dict()[k], expected), k


def test_load_plain_and_ultralytics_style_state_dicts(tmp_path):
    src = build_yolo11("s", num_classes=7)
    sd = src.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    m = load_model(tmp_path / "plain.pt")
    assert (m.scale, m.task, m.nc) == ("s", "detect", 7)
    assert torch.equal(m.state_dict()["model.23.cv3.1.2.bias"], sd["model.23.cv3.1.2.bias"])
    names = {i: f"thing{i}" for i in range(7)}
    torch.save({"model": sd, "names": names, "epoch": 5}, tmp_path / "ul.pt")
    m = load_model(tmp_path / "ul.pt", fused=True)
    assert m.names == names and is_fused(m)
    assert load_model(sd).nc == 7  # a dict works as the source too
    assert load_model(src).nc == 7  # and so does a module with ultralytics key names


def test_load_fused_state_dict(yolo_n):
    fused = fuse(copy.deepcopy(yolo_n))
    loaded = load_model(fused.state_dict())
    assert is_fused(loaded)
    x = torch.rand(1, 3, H, W)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x))


def test_infer_architecture_distinguishes_m_and_l():
    m_sd = {k: v for k, v in build_yolo11("m").state_dict().items() if k.startswith("model.2.")}
    l_sd = {k: v for k, v in build_yolo11("l").state_dict().items() if k.startswith("model.2.")}
    head = {"model.23.cv3.0.2.weight": torch.zeros(80, 1, 1, 1)}
    m_sd["model.0.conv.weight"] = l_sd["model.0.conv.weight"] = torch.zeros(64, 3, 3, 3)
    assert infer_architecture({**m_sd, **head})[0] == "m"
    assert infer_architecture({**l_sd, **head})[0] == "l"


def test_bad_checkpoints_raise_clear_errors(tmp_path, yolo_n):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(garbage)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a YOLO11"):
        load_model(tmp_path / "other.pt")
    sd = yolo_n.state_dict()
    sd["model.4.cv1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    del sd["model.6.cv2.bn.bias"]
    with pytest.raises(CheckpointError, match="1 missing.*1 shape mismatches"):
        load_model(sd)
    with pytest.raises(CheckpointError, match="fused"):
        save_checkpoint(fuse(copy.deepcopy(yolo_n)), tmp_path / "fused.pt")


def test_default_weights_missing_is_a_clear_error(monkeypatch, tmp_path):
    import fluxshard.models.weights as weights
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS", tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="embedded default"):
        load_model(None)


# --- ONNX ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["detect", "segment"])
def test_onnx_export_matches_torch(tmp_path, task, yolo_n, yolo_n_seg):
    from fluxshard.models.export import onnxruntime_session
    model = yolo_n if task == "detect" else yolo_n_seg
    path = export_onnx(model, tmp_path / "m.onnx", imgsz=(H, W))
    session = onnxruntime_session(path)
    x = torch.rand(1, 3, H, W)
    with torch.no_grad():
        ref = model(x)
    refs = [ref] if task == "detect" else list(ref)
    outs = session.run(None, {"images": x.numpy()})
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-4, atol=1e-4)  # boxes in pixels: rtol
    assert model.training is False and not is_fused(model)  # caller's model untouched


def test_dense_runners_agree(tmp_path, yolo_n):
    from fluxshard.models.dense import RUNNER_KINDS, dense_runners
    runners = dense_runners(yolo_n, (H, W), workdir=tmp_path)
    assert [r.name for r in runners] == list(RUNNER_KINDS)
    x = torch.rand(1, 3, H, W)
    with torch.no_grad():
        ref = yolo_n(x).numpy()
    for r in runners:
        out = r.run(x)
        out = out[0] if isinstance(out, list) else out.numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=2e-3, err_msg=r.name)
