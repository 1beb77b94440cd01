"""Training: losses, task-aligned assignment on hand cases, augmentation, deterministic resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxshard.models import build_yolo11
from fluxshard.synth import scene_seed
from fluxshard.train.data import Sample, augment, collate
from fluxshard.train.loss import (DetectionLoss, SegmentationLoss, TaskAlignedAssigner, bbox_iou,
                                  dfl_loss)

torch.set_num_threads(2)

# bound: worst of seeds 0-4 (0.490) plus 0.03, rounded up to 0.01
LOSS_RATIO_BOUND = 0.52


# -- assigner ------------------------------------------------------------------------------------
def grid_anchors(h: int, w: int, stride: float = 8.0) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack((xs, ys), -1).view(-1, 2) * stride


def assign(anchors, pred_boxes, pred_scores, gt_boxes, gt_classes, gt_valid, topk=10):
    assigner = TaskAlignedAssigner(num_classes=pred_scores.shape[-1], topk=topk)
    return assigner(pred_scores[None], pred_boxes[None], anchors, torch.tensor([gt_classes]),
                    torch.tensor([gt_boxes], dtype=torch.float32), torch.tensor([gt_valid]))


def test_assigner_picks_topk_anchors_inside_the_box_and_targets_their_iou():
    anchors = grid_anchors(8, 8)  # 64 anchors, centres 4, 12, ..., 60
    gt = [0.0, 0.0, 40.0, 40.0]  # 5 x 5 = 25 anchor centres inside
    pred_boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).repeat(64, 1)  # IoU 0.25 everywhere...
    best = 2 * 8 + 2  # ...except one anchor that predicts the box exactly
    pred_boxes[best] = torch.tensor(gt)
    scores = torch.full((64, 3), 0.5)
    boxes, target_scores, fg, gt_idx = assign(anchors, pred_boxes, scores, [gt], [1], [True])
    fg = fg[0]
    assert int(fg.sum()) == 10  # topk of the 25 candidates
    inside = ((anchors > 0) & (anchors < 40)).all(1)
    assert not (fg & ~inside).any()
    assert fg[best]
    assert torch.equal(boxes[0][fg], torch.tensor(gt).expand(10, 4))
    # Only class 1 gets a target; the exact anchor gets its IoU (1.0), the others less.
    assert target_scores[0][:, [0, 2]].abs().sum() == 0
    assert target_scores[0][best, 1] == pytest.approx(1.0, abs=1e-4)
    others = fg.clone()
    others[best] = False
    assert (target_scores[0][others, 1] < 0.1).all()


def test_assigner_gives_a_contested_anchor_to_the_box_it_overlaps_most():
    anchors = torch.tensor([[20.0, 20.0]])
    gts = [[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 60.0, 60.0]]
    pred = torch.tensor([[11.0, 11.0, 59.0, 59.0]])  # overlaps the second box far more
    _, scores, fg, gt_idx = assign(anchors, pred, torch.full((1, 2), 0.5), gts, [0, 1],
                                   [True, True])
    assert fg[0, 0] and gt_idx[0, 0] == 1
    assert scores[0, 0, 1] > 0 and scores[0, 0, 0] == 0


def test_assigner_ignores_padding_rows_and_handles_no_boxes():
    anchors = grid_anchors(4, 4)
    pred = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(16, 1)
    _, scores, fg, _ = assign(anchors, pred, torch.full((16, 2), 0.5), [[0.0, 0.0, 32.0, 32.0]],
                              [0], [False])
    assert not fg.any() and scores.sum() == 0
    assigner = TaskAlignedAssigner(num_classes=2)
    _, scores, fg, _ = assigner(torch.rand(1, 16, 2), pred[None], anchors,
                                torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 4),
                                torch.zeros(1, 0, dtype=torch.bool))
    assert not fg.any() and scores.sum() == 0


def test_ciou_and_dfl_on_hand_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert bbox_iou(a, a, ciou=True).item() == pytest.approx(1.0, abs=1e-5)
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # IoU 1/3, centres 5 apart, enclosing diag^2 325
    assert bbox_iou(a, b).item() == pytest.approx(1 / 3, abs=1e-5)
    assert bbox_iou(a, b, ciou=True).item() == pytest.approx(1 / 3 - 25 / 325, abs=1e-4)
    # A target exactly on bin 3 is plain cross-entropy against bin 3.
    logits = torch.randn(1, 4 * 16)
    expected = torch.nn.functional.cross_entropy(logits.view(4, 16), torch.full((4,), 3))
    assert dfl_loss(logits, torch.full((1, 4), 3.0), 16).item() == pytest.approx(expected.item(),
                                                                                  abs=1e-5)


# -- losses on a real model ----------------------------------------------------------------------
def hand_batch(with_masks: bool = False):
    """Two 128x128 images with coloured rectangles and their boxes."""
    images = torch.full((2, 3, 128, 128), 0.45)
    boxes = torch.tensor([[[16.0, 24.0, 64.0, 88.0], [80.0, 8.0, 120.0, 40.0]],
                          [[40.0, 40.0, 104.0, 96.0], [0.0, 0.0, 0.0, 0.0]]])
    classes = torch.tensor([[0, 1], [2, 0]])
    valid = torch.tensor([[True, True], [True, False]])
    masks = torch.zeros(2, 2, 32, 32)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9]])
    for b in range(2):
        for k in range(2):
            if valid[b, k]:
                x1, y1, x2, y2 = boxes[b, k].int().tolist()
                images[b, :, y1:y2, x1:x2] = colours[classes[b, k]].view(3, 1, 1)
                masks[b, k, y1 // 4:y2 // 4, x1 // 4:x2 // 4] = 1
    return images, boxes, classes, valid, (masks if with_masks else None)


def test_detection_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_yolo11("n", "detect", num_classes=3).train()
    criterion = DetectionLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images, boxes, classes, valid, _ = hand_batch()
    losses = []
    for _ in range(8):
        loss, parts = criterion(model(images), boxes, classes, valid)
        assert parts.shape == (3,) and torch.isfinite(parts).all()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(parts.sum()))
    # last/first loss at torch seeds 0-4 (model init; the test keeps seed 0): 0.399 / 0.486 /
    # 0.407 / 0.475 / 0.490 (README "Measured quality")
    assert losses[-1] < LOSS_RATIO_BOUND * losses[0], losses


def test_segmentation_loss_is_finite_and_reaches_the_prototypes():
    torch.manual_seed(0)
    model = build_yolo11("n", "segment", num_classes=3).train()
    images, boxes, classes, valid, masks = hand_batch(with_masks=True)
    loss, parts = SegmentationLoss(model)(model(images), boxes, classes, valid, masks)
    assert parts.shape == (4,) and torch.isfinite(parts).all() and parts[3] > 0
    loss.backward()
    proto_grad = model.head.proto.cv3.conv.weight.grad
    assert proto_grad is not None and proto_grad.abs().sum() > 0


# -- data ----------------------------------------------------------------------------------------
def test_train_and_heldout_seeds_are_disjoint():
    train = {scene_seed("train", i) for i in range(0, 1_000_000, 997)}
    held = {scene_seed("heldout", i) for i in range(0, 1_000_000, 997)}
    assert not train & held
    with pytest.raises(ValueError):
        scene_seed("train", 1_000_000)
    with pytest.raises(ValueError):
        scene_seed("val", 0)


def test_augment_crops_flips_and_drops_mostly_cut_boxes():
    image = np.zeros((64, 96, 3), np.uint8)
    boxes = np.array([[8, 8, 24, 24], [0, 40, 92, 60]], np.float32)
    masks = np.zeros((2, 16, 24), bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:15, 0:23] = True
    sample = Sample(image, boxes, np.array([0, 1]), masks)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = augment(sample, rng, (32, 32), hsv=(0, 0, 0), jpeg=0.0)
        assert out.image.shape == (32, 32, 3) and out.masks.shape[1:] == (8, 8)
        assert len(out.boxes) == len(out.classes) == len(out.masks)
        assert ((out.boxes >= 0) & (out.boxes <= 32)).all()
        for box, mask in zip(out.boxes, out.masks):  # box and mask moved together
            ys, xs = np.nonzero(mask)
            if len(xs):
                assert xs.min() * 4 >= box[0] - 4 and (xs.max() + 1) * 4 <= box[2] + 4
    outs = [augment(sample, np.random.default_rng(s), (32, 32)) for s in range(3)]
    batch = collate(outs)
    assert batch.images.shape == (3, 3, 32, 32) and batch.gt_masks.shape[2:] == (8, 8)
    assert batch.gt_valid.sum(1).tolist() == [len(o.classes) for o in outs]


# -- trainer -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    from fluxshard.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(epochs=2, batch=2, crop=(128, 160), train_scenes=2, frames_per_scene=2,
                      val_scenes=1, val_frames_per_scene=1, warmup_iters=1, val_every=0,
                      progress=False)
    cache = tmp_path / "cache"
    straight = Trainer(cfg, tmp_path / "straight", cache_dir=cache)
    straight.train()

    first = Trainer(cfg, tmp_path / "resumed", cache_dir=cache)
    first.train(epochs=1)
    again = Trainer(cfg, tmp_path / "resumed", cache_dir=cache)
    assert again.resume() and again.epoch == 1
    again.train()

    for name in ("model", "ema"):
        a = (straight.model if name == "model" else straight.ema.ema).state_dict()
        b = (again.model if name == "model" else again.ema.ema).state_dict()
        mismatched = [k for k in a if not torch.equal(a[k], b[k])]
        assert not mismatched, f"{name}: {mismatched[:5]}"
    assert [h["box"] for h in straight.history] == [h["box"] for h in again.history]

    other = Trainer(TrainConfig(**{**cfg.__dict__, "lr": 0.01}), tmp_path / "resumed",
                    cache_dir=cache)
    with pytest.raises(ValueError, match="different setup"):
        other.resume()


@pytest.mark.slow
def test_train_demo_verb_writes_loadable_weights(tmp_path):
    from fluxshard import synth
    from fluxshard.cli import main
    from fluxshard.models import load_model

    assert main(["train-demo", "--quick", "--task", "detect", "--epochs", "1", "--no-progress",
                 "--train-scenes", "4", "--batch", "4", "--val-scenes", "1",
                 "--workdir", str(tmp_path)]) == 0
    model = load_model(tmp_path / "detect" / "weights.pt")
    assert model.task == "detect" and list(model.names.values()) == list(synth.CLASS_NAMES)
    assert model.meta["epochs_done"] == 1 and "map50" in model.meta["history"][-1]
    assert (tmp_path / "detect" / "last.pt").is_file()
