"""Accuracy measures, defined once and used by every benchmark (docs/DESIGN.md, "Measures").

* :func:`evaluate_detections`: COCO mAP@0.5 and mAP@0.5:0.95 of per-frame detections against
  ground truth (boxes; masks too when both sides carry them), computed by ``faster-coco-eval``
  (a maintained, pycocotools-compatible C++ implementation).
* :func:`agreement`: the same mAP of FluxShard detections against the dense model's detections
  on the same frames (the dense output plays ground truth).
* :func:`box_agreement`: the share of the dense model's confident boxes (score >= 0.5) that
  another executor also reports on the same frame (IoU >= 0.5, same class), per frame, so it
  pools over any set of frames (a whole clip, a window, the frames late in a refresh cycle).
* :func:`mask_iou` / :func:`matched_mask_iou`: instance-mask IoU for segmentation.

Frames are matched by position: ``predictions[i]`` and ``ground_truth[i]`` describe the same
frame. Either side's items may be :class:`fluxshard.models.Detections`, synthetic
``SceneFrame``s, or mappings with ``boxes`` (N, 4) xyxy pixels, ``classes`` (N,), optional
``scores`` (N,) and ``masks``/``instance_masks`` (N, H, W) bool.

Degenerate cases follow one rule: a frame set with no ground-truth objects scores 1.0 when there
are no predictions either (nothing to find, nothing claimed) and 0.0 when there are any.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as coco_mask

__all__ = ["FrameObjects", "as_frame_objects", "evaluate_detections", "agreement",
           "BoxAgreement", "box_agreement", "box_iou", "mask_iou", "matched_mask_iou"]


@dataclass
class FrameObjects:
    """One frame's objects, normalised: xyxy float64 boxes, int classes, scores, optional masks."""

    boxes: np.ndarray  # (N, 4)
    classes: np.ndarray  # (N,)
    scores: np.ndarray  # (N,); 1.0 for ground truth
    masks: np.ndarray | None = None  # (N, H, W) bool


def _field(obj, *names):
    for name in names:
        if isinstance(obj, Mapping):
            if name in obj and obj[name] is not None:
                return obj[name]
        elif getattr(obj, name, None) is not None:
            return getattr(obj, name)
    return None


def as_frame_objects(obj, where: str = "frame") -> FrameObjects:
    """Normalise a Detections / SceneFrame / mapping into :class:`FrameObjects` (validated)."""
    if isinstance(obj, FrameObjects):
        return obj
    boxes = _field(obj, "boxes")
    classes = _field(obj, "classes")
    if boxes is None or classes is None:
        raise ValueError(f"{where}: needs 'boxes' and 'classes' (got {type(obj).__name__})")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    n = len(boxes)
    if len(classes) != n:
        raise ValueError(f"{where}: {n} boxes but {len(classes)} classes")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes contain NaN or inf")
    if (classes < 0).any():
        raise ValueError(f"{where}: negative class ids")
    scores = _field(obj, "scores")
    scores = np.ones(n) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != n:
        raise ValueError(f"{where}: {n} boxes but {len(scores)} scores")
    masks = _field(obj, "masks", "instance_masks")
    if masks is not None:
        masks = np.asarray(masks).astype(bool, copy=False)
        if masks.ndim != 3 or len(masks) != n:
            raise ValueError(f"{where}: masks must be (N={n}, H, W), got {masks.shape}")
    return FrameObjects(boxes, classes, scores, masks)


def _rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    if isinstance(rle.get("counts"), bytes):
        rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _coco_pair(preds: list[FrameObjects], gts: list[FrameObjects], with_masks: bool):
    """Ground-truth and result COCO objects (ids are 1-based: pycocotools treats id 0 as none)."""
    categories = sorted({int(c) for f in (*preds, *gts) for c in f.classes})
    images, gt_anns, dt_anns = [], [], []
    for i, (p, g) in enumerate(zip(preds, gts), start=1):
        if with_masks:
            h, w = (g.masks if g.masks is not None else p.masks).shape[1:]
        else:
            h, w = 1, 1  # unused by box IoU
        images.append({"id": i, "width": int(w), "height": int(h)})
        for k, (box, cls) in enumerate(zip(g.boxes, g.classes)):
            x1, y1, x2, y2 = box
            ann = {"id": len(gt_anns) + 1, "image_id": i, "category_id": int(cls) + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)),
                   "iscrowd": 0}
            if with_masks:
                ann["segmentation"] = _rle(g.masks[k])
                ann["area"] = float(g.masks[k].sum())
            gt_anns.append(ann)
        for k, (box, cls, score) in enumerate(zip(p.boxes, p.classes, p.scores)):
            x1, y1, x2, y2 = box
            ann = {"image_id": i, "category_id": int(cls) + 1, "score": float(score),
                   "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if with_masks:
                ann["segmentation"] = _rle(p.masks[k])
            dt_anns.append(ann)
    quiet = lambda *a, **k: None  # noqa: E731  (the library logs every step otherwise)
    gt = COCO({"images": images, "annotations": gt_anns,
               "categories": [{"id": c + 1, "name": str(c)} for c in categories]},
              print_function=quiet)
    dt = gt.loadRes(dt_anns) if dt_anns else gt.loadRes([])
    dt.print_function = quiet
    return gt, dt, quiet


def _coco_map(preds, gts, iou_type: str) -> tuple[float, float]:
    n_gt = sum(len(g.classes) for g in gts)
    n_pred = sum(len(p.classes) for p in preds)
    if n_gt == 0:
        value = 1.0 if n_pred == 0 else 0.0
        return value, value
    if n_pred == 0:
        return 0.0, 0.0
    gt, dt, quiet = _coco_pair(preds, gts, with_masks=iou_type == "segm")
    ev = COCOeval_faster(gt, dt, iouType=iou_type, print_function=quiet)
    ev.run()
    stats = ev.stats_as_dict
    # -1 marks "no ground truth in any evaluated category": cannot happen here, but never report it.
    return max(stats["AP_50"], 0.0), max(stats["AP_all"], 0.0)


def _normalise(predictions: Sequence, ground_truth: Sequence) -> tuple[list, list]:
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction frames but {len(ground_truth)} "
                         "ground-truth frames; they are matched by position")
    preds = [as_frame_objects(p, f"predictions[{i}]") for i, p in enumerate(predictions)]
    gts = [as_frame_objects(g, f"ground_truth[{i}]") for i, g in enumerate(ground_truth)]
    return preds, gts


def evaluate_detections(predictions: Sequence, ground_truth: Sequence,
                        masks: bool | None = None) -> dict:
    """COCO-style accuracy of per-frame ``predictions`` against ``ground_truth``.

    Returns ``{"map50", "map50_95", "frames", "gt_objects", "pred_objects"}`` and, when
    ``masks`` (default: whenever every frame on both sides carries masks), ``"mask_map50"``,
    ``"mask_map50_95"`` and ``"mask_iou"`` (see :func:`matched_mask_iou`).
    """
    preds, gts = _normalise(predictions, ground_truth)
    have_masks = bool(preds) and all(f.masks is not None for f in (*preds, *gts))
    if masks is None:
        masks = have_masks
    elif masks and not have_masks:
        raise ValueError("masks=True but some frames carry no masks")
    map50, map50_95 = _coco_map(preds, gts, "bbox")
    out = {"map50": map50, "map50_95": map50_95, "frames": len(preds),
           "gt_objects": int(sum(len(g.classes) for g in gts)),
           "pred_objects": int(sum(len(p.classes) for p in preds))}
    if masks:
        for p, g in zip(preds, gts):
            if p.masks.shape[1:] != g.masks.shape[1:]:
                raise ValueError(f"mask sizes differ: predictions {p.masks.shape[1:]}, "
                                 f"ground truth {g.masks.shape[1:]}")
        out["mask_map50"], out["mask_map50_95"] = _coco_map(preds, gts, "segm")
        out["mask_iou"] = matched_mask_iou(preds, gts)
    return out


def agreement(predictions: Sequence, dense: Sequence, masks: bool | None = None) -> dict:
    """Agreement of (e.g. FluxShard) detections with the dense model's detections on the same
    frames: :func:`evaluate_detections` with the dense output as ground truth. A model agrees
    with itself at 1.0."""
    dense_as_gt = []
    for i, d in enumerate(dense):
        f = as_frame_objects(d, f"dense[{i}]")
        dense_as_gt.append(FrameObjects(f.boxes, f.classes, np.ones(len(f.classes)), f.masks))
    return evaluate_detections(predictions, dense_as_gt, masks=masks)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (Na, Nb) of xyxy boxes a (Na, 4) and b (Nb, 4); degenerate boxes give 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass
class BoxAgreement:
    """Per frame: how many of dense's confident boxes there were (``dense``) and how many the
    other executor also reported (``found``). Pool over frames with :meth:`over`."""

    found: np.ndarray  # (F,) int
    dense: np.ndarray  # (F,) int

    def over(self, frames=slice(None)) -> float | None:
        """found / dense pooled over ``frames`` (a slice, indices or a bool mask); None when
        dense had no confident box there (nothing to agree on)."""
        total = int(self.dense[frames].sum())
        return int(self.found[frames].sum()) / total if total else None

    @property
    def value(self) -> float | None:
        return self.over()

    def windows(self, size: int) -> list[float | None]:
        """Agreement per consecutive window of ``size`` frames (the last may be shorter)."""
        return [self.over(slice(start, start + size)) for start in range(0, len(self.dense), size)]


def box_agreement(predictions: Sequence, dense: Sequence, min_score: float = 0.5,
                  min_iou: float = 0.5) -> BoxAgreement:
    """Which of the dense model's boxes with score >= ``min_score`` the ``predictions`` on the
    same frames also report: a prediction of the same class with IoU >= ``min_iou``, each
    prediction matched once (greedy, highest IoU first). Predictions count whatever their score
    (they are what the executor reports). A model agrees with itself at 1.0."""
    if len(predictions) != len(dense):
        raise ValueError(f"{len(predictions)} prediction frames but {len(dense)} dense frames; "
                         "they are matched by position")
    found = np.zeros(len(dense), np.int64)
    count = np.zeros(len(dense), np.int64)
    for i, (p, d) in enumerate(zip(predictions, dense)):
        p = as_frame_objects(p, f"predictions[{i}]")
        d = as_frame_objects(d, f"dense[{i}]")
        confident = d.scores >= min_score
        ref_boxes, ref_classes = d.boxes[confident], d.classes[confident]
        count[i] = len(ref_classes)
        if not len(ref_classes) or not len(p.classes):
            continue
        iou = box_iou(ref_boxes, p.boxes)
        iou[ref_classes[:, None] != p.classes[None, :]] = 0.0
        pairs = np.argwhere(iou >= min_iou)
        ref_taken = np.zeros(len(ref_classes), bool)
        pred_taken = np.zeros(len(p.classes), bool)
        for r, c in pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]:
            if not ref_taken[r] and not pred_taken[c]:
                ref_taken[r] = pred_taken[c] = True
        found[i] = int(ref_taken.sum())
    return BoxAgreement(found, count)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (Na, Nb) of boolean instance masks a (Na, H, W) and b (Nb, H, W).
    Two empty masks have IoU 0."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mask_iou: mask sizes differ, {a.shape[1:]} vs {b.shape[1:]}")
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def matched_mask_iou(predictions: Sequence, ground_truth: Sequence) -> float:
    """Mean over ground-truth instances of the IoU with their matched prediction (greedy by
    score, same class, each prediction used once; an unmatched instance counts 0). 1.0 when
    there are no ground-truth instances and no predictions, 0.0 when only predictions."""
    preds, gts = _normalise(predictions, ground_truth)
    total, count, n_pred = 0.0, 0, 0
    for p, g in zip(preds, gts):
        n_pred += len(p.classes)
        count += len(g.classes)
        if not len(g.classes) or not len(p.classes):
            continue
        if p.masks is None or g.masks is None:
            raise ValueError("matched_mask_iou: every frame needs masks on both sides")
        ious = mask_iou(p.masks, g.masks)
        ious[p.classes[:, None] != g.classes[None, :]] = 0.0
        taken = np.zeros(len(g.classes), dtype=bool)
        for k in np.argsort(-p.scores, kind="stable"):
            row = np.where(taken, -1.0, ious[k])
            j = int(row.argmax())
            if row[j] > 0:
                taken[j] = True
                total += float(row[j])
    if count == 0:
        return 1.0 if n_pred == 0 else 0.0
    return total / count
