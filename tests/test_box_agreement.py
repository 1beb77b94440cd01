"""fluxshard.accuracy.box_agreement on hand-made boxes: which of dense's confident boxes another
executor also reports (IoU >= 0.5, same class), pooled over frames and windows."""

from __future__ import annotations

import numpy as np
import pytest

from fluxshard.accuracy import box_agreement, box_iou


def frame(boxes, classes, scores=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return dict(boxes=boxes, classes=np.asarray(classes, int),
                scores=np.ones(len(boxes)) if scores is None else np.asarray(scores, float))


def test_box_iou_of_hand_made_boxes():
    iou = box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert iou[0] == pytest.approx([1.0, 50 / 150, 0.0])


def test_a_frame_set_agrees_with_itself():
    dense = [frame([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 3], [0.9, 0.6]),
             frame([[5, 5, 25, 25]], [1], [0.7])]
    assert box_agreement(dense, dense).value == 1.0


def test_only_same_class_overlaps_of_half_or_more_count():
    dense = [frame([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0, 0, 0])]
    # a shifted box at IoU 0.6, one at IoU 1/3 (too little), one of another class
    shifted = [0 + 2.5, 0, 10 + 2.5, 10]  # inter 75, union 125 -> 0.6
    far = [25, 0, 35, 10]  # inter 50, union 150 -> 1/3
    preds = [frame([shifted, far, [40, 0, 50, 10]], [0, 0, 2])]
    result = box_agreement(preds, dense)
    assert (result.found.tolist(), result.dense.tolist()) == ([1], [3])
    assert result.value == pytest.approx(1 / 3)


def test_dense_boxes_below_the_score_threshold_are_not_asked_for():
    dense = [frame([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], [0.9, 0.49])]
    preds = [frame([[0, 0, 10, 10]], [0], [0.3])]  # a low-score prediction still counts
    assert box_agreement(preds, dense).value == 1.0


def test_one_prediction_matches_one_dense_box():
    dense = [frame([[0, 0, 10, 10], [0, 0, 10, 11]], [0, 0])]
    preds = [frame([[0, 0, 10, 10]], [0])]
    assert box_agreement(preds, dense).value == 0.5


def test_pooling_counts_boxes_not_frames_and_windows_split_frames():
    dense = [frame([[0, 0, 10, 10]] * 1, [0]),
             frame([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0, 0, 0]),
             frame(np.zeros((0, 4)), [])]
    preds = [frame([[0, 0, 10, 10]], [0]), frame(np.zeros((0, 4)), []),
             frame([[0, 0, 10, 10]], [0])]
    result = box_agreement(preds, dense)
    assert result.value == pytest.approx(1 / 4)  # a mean of per-frame shares would be 1/2
    assert result.windows(2) == [pytest.approx(1 / 4), None]  # nothing to agree on: None
    assert result.over([0]) == 1.0


def test_frame_counts_must_match():
    with pytest.raises(ValueError, match="matched by position"):
        box_agreement([frame([[0, 0, 1, 1]], [0])], [])
