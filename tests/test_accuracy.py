"""Accuracy measures (fluxshard.accuracy) on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxshard.accuracy import agreement, evaluate_detections, mask_iou, matched_mask_iou
from fluxshard.models import Detections, postprocess, preprocess
from fluxshard.tau import quantize_tau

GT = [
    {"boxes": [[10, 10, 50, 60], [100, 100, 180, 150]], "classes": [0, 1]},
    {"boxes": [[5, 5, 30, 30]], "classes": [2]},
]


def predictions(shift=(0.0, 0.0), class_offset=0, scores=(0.9, 0.8, 0.7)):
    out, k = [], 0
    for frame in GT:
        boxes = np.asarray(frame["boxes"], float) + np.array([*shift, *shift])
        n = len(boxes)
        out.append(Detections(boxes.astype(np.float32), np.asarray(scores[k:k + n], np.float32),
                              np.asarray(frame["classes"]) + class_offset))
        k += n
    return out


def empty_frames(n):
    return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int64)) for _ in range(n)]


def test_perfect_match_is_one():
    r = evaluate_detections(predictions(), GT)
    assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(1.0)
    assert (r["frames"], r["gt_objects"], r["pred_objects"]) == (2, 3, 3)


def test_boxes_shifted_below_iou_half_score_zero():
    # 25 px shift of a 40x50 box: IoU = 15*25 / (2*40*50 - 15*25) < 0.5; larger boxes overlap less.
    r = evaluate_detections(predictions(shift=(25.0, 25.0)), GT)
    assert r["map50"] == 0.0 and r["map50_95"] == 0.0


def test_small_shift_passes_at_half_but_not_at_strict_thresholds():
    r = evaluate_detections(predictions(shift=(3.0, 0.0)), GT)
    assert r["map50"] == pytest.approx(1.0)
    assert 0.0 < r["map50_95"] < 1.0


def test_class_mismatch_scores_zero():
    r = evaluate_detections(predictions(class_offset=1), GT)
    assert r["map50"] == 0.0


def test_missing_half_of_the_objects_lowers_map():
    preds = predictions()
    preds[0] = Detections(preds[0].boxes[:1], preds[0].scores[:1], preds[0].classes[:1])
    r = evaluate_detections(preds, GT)
    # class 1 has no detection (AP 0), classes 0 and 2 are perfect: mean 2/3.
    assert r["map50"] == pytest.approx(2 / 3, abs=1e-3)


def test_empty_predictions_and_empty_ground_truth():
    assert evaluate_detections(empty_frames(2), GT)["map50"] == 0.0
    assert evaluate_detections(predictions(), empty_frames(2))["map50"] == 0.0
    both_empty = evaluate_detections(empty_frames(2), empty_frames(2))
    assert both_empty["map50"] == 1.0 and both_empty["gt_objects"] == 0


def test_frame_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="matched by position"):
        evaluate_detections(predictions()[:1], GT)


def test_bad_boxes_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_detections([{"boxes": [[0, 0, np.nan, 1]], "classes": [0]}], [GT[1]])


def test_mask_measures_on_hand_made_masks():
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 10:20, 10:20] = True
    masks[1, 30:50, 30:40] = True
    gt = [{"boxes": [[10, 10, 20, 20], [30, 30, 40, 50]], "classes": [0, 1], "masks": masks}]
    half = masks.copy()
    half[1, 40:50] = False  # second instance: half of its pixels -> IoU 0.5
    pred = [{"boxes": gt[0]["boxes"], "classes": [0, 1], "scores": [0.9, 0.8], "masks": half}]
    r = evaluate_detections(pred, gt)
    assert r["map50"] == pytest.approx(1.0)
    assert r["mask_iou"] == pytest.approx(0.75)
    assert 0.0 < r["mask_map50_95"] < 1.0
    np.testing.assert_allclose(mask_iou(half, masks), [[1.0, 0.0], [0.0, 0.5]])


def test_matched_mask_iou_uses_each_prediction_once():
    m = np.zeros((2, 8, 8), bool)
    m[0, :4] = True
    m[1, 4:] = True
    gt = [{"boxes": [[0, 0, 8, 4], [0, 4, 8, 8]], "classes": [0, 0], "masks": m}]
    one = [{"boxes": [[0, 0, 8, 4]], "classes": [0], "scores": [1.0], "masks": m[:1]}]
    assert matched_mask_iou(one, gt) == pytest.approx(0.5)


@torch.no_grad()
def test_agreement_of_two_engines_running_the_same_weights_is_one(tmp_path):
    """The demo detector in eager torch and its ONNX export in onnxruntime: two independent
    computations of the same detections. They differ by float rounding, which moves boxes far
    less than any IoU threshold: bound 0.99 leaves room for rounding only, while a metric that
    ignored what it compares would pass the negative check (other frames' detections)."""
    from fluxshard import synth
    from fluxshard.models import export_onnx, load_model
    from fluxshard.models.export import onnxruntime_session

    model = load_model(None)
    scene = synth.Scene(synth.SceneSpec(width=320, height=192, seed=3, camera="static",
                                        num_objects=6))
    frames = [scene.render(t).image for t in (0, 10)]
    x = preprocess(frames)
    shape = frames[0].shape[:2]
    eager = postprocess(model(x), x.shape[2:], shape, conf_thres=0.25)
    session = onnxruntime_session(export_onnx(model, tmp_path / "demo.onnx", tuple(x.shape[2:])),
                                  threads=1)
    onnx = [postprocess(torch.as_tensor(session.run(None, {"images": x[i:i + 1].numpy()})[0]),
                        x.shape[2:], shape, conf_thres=0.25)[0] for i in range(len(frames))]
    assert all(len(d) > 0 for d in eager)  # detections to agree on in every frame
    same = agreement(onnx, eager)
    assert same["map50"] >= 0.99 and same["map50_95"] >= 0.99, same
    assert agreement(onnx[::-1], eager)["map50"] < 0.5  # each frame against the other's


def test_truncation_profile_writes_table_plot_and_speedups(tmp_path):
    """`fluxshard profile accuracy` end to end on tiny clips with the embedded detector: tau 0 is
    exact reuse, so it keeps the dense mAP and always qualifies; every point carries a speedup
    measured against the best dense runner of the same run."""
    from fluxshard.truncation import TruncationTable, profile_accuracy

    table = profile_accuracy(None, taus=(0.0, 0.06), frames=5, width=192, height=128,
                             strict_rfap=True, out_dir=tmp_path, threads=1, progress=False,
                             bypass=False)  # every frame through the executor: tau 0 is exact
    assert [lv["name"] for lv in table.levels] and len(table.sweep) == 2 * len(table.levels)
    for point in table.sweep:
        assert point["speedup"] > 0 and point["sparse_ms"] > 0 and 0 <= point["cache_hit"] <= 1
        if point["tau"] == 0.0:
            assert point["map50"] == pytest.approx(point["dense_map50"], abs=1e-6)
            assert point["map50_95"] == pytest.approx(point["dense_map50_95"], abs=1e-6)
    assert all(lv["tau"] in (0.0, quantize_tau(0.06)) for lv in table.levels)  # whole grey levels
    assert table.metric == "map50_95"
    assert table.executor["best_dense"] in ("fused_channels_last", "onnxruntime")
    assert (tmp_path / "truncation_profile.png").stat().st_size > 0
    again = TruncationTable.load(tmp_path / "truncation_table.json")
    assert again.tau_for(0.0) == table.levels[0]["tau"] and again.metric == table.metric


def test_choose_tau_keeps_the_chosen_metric():
    """mAP@0.5 admits a tau whose boxes drift (mAP@0.5:0.95 falls 11%); the default metric
    refuses it, and tau 0 qualifies whatever it measures."""
    from fluxshard.truncation import choose_tau

    points = [dict(tau=0.0, map50=0.90, map50_95=0.70), dict(tau=0.25, map50=1.0, map50_95=0.95),
              dict(tau=0.6, map50=0.998, map50_95=0.85)]
    assert choose_tau(points, 1.0, 0.99, "map50") == 0.6
    assert choose_tau(points, 0.952, 0.99, "map50_95") == 0.25
    assert choose_tau(points[:1], 1.0, 0.99, "map50_95") == 0.0
