"""YOLO11 training losses, written to match how ultralytics trains YOLO11.

Detection: task-aligned assignment (TAL, TOOD) of anchors to ground-truth boxes, then
  * box loss: 1 - CIoU between decoded and target boxes, weighted by the assigned score;
  * DFL: distribution focal loss on the 16-bin (left, top, right, bottom) distance distributions;
  * class loss: BCE against IoU-aware soft targets (assigned score), normalised by their sum.
Segmentation adds per-instance mask BCE on prototype x coefficient masks, cropped to the box and
normalised by box area.

Targets are padded per image: ``gt_boxes`` (B, M, 4) xyxy in input pixels, ``gt_classes`` (B, M)
and ``gt_valid`` (B, M) bool marking real rows (M = most boxes in any image of the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.models.modules import make_anchors
from fluxshard.models.ops import crop_mask

EPS = 1e-9


@dataclass(frozen=True)
class LossGains:
    """ultralytics default hyper-parameters (``box``, ``cls``, ``dfl``)."""

    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5


def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, ciou: bool = False,
             eps: float = 1e-7) -> torch.Tensor:
    """IoU (or Complete IoU) of xyxy boxes, elementwise over broadcast leading dims; (..., 1)."""
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.chunk(4, -1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.chunk(4, -1)
    w1, h1 = b1_x2 - b1_x1, (b1_y2 - b1_y1).clamp(eps)
    w2, h2 = b2_x2 - b2_x1, (b2_y2 - b2_y1).clamp(eps)
    inter = ((b1_x2.minimum(b2_x2) - b1_x1.maximum(b2_x1)).clamp(0)
             * (b1_y2.minimum(b2_y2) - b1_y1.maximum(b2_y1)).clamp(0))
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not ciou:
        return iou
    # CIoU = IoU - (centre distance^2 / enclosing diagonal^2 + v * alpha), Zheng et al. 2020.
    cw = b1_x2.maximum(b2_x2) - b1_x1.minimum(b2_x1)
    ch = b1_y2.maximum(b2_y2) - b1_y1.minimum(b2_y1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2).pow(2) + (b2_y1 + b2_y2 - b1_y1 - b1_y2).pow(2)) / 4
    v = (4 / math.pi ** 2) * ((w2 / h2).atan() - (w1 / h1).atan()).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def bbox2dist(anchor_points: torch.Tensor, boxes: torch.Tensor, reg_max: int) -> torch.Tensor:
    """xyxy boxes -> (left, top, right, bottom) distances from the anchor, clamped to the bins."""
    x1y1, x2y2 = boxes.chunk(2, -1)
    return torch.cat((anchor_points - x1y1, x2y2 - anchor_points), -1).clamp_(0, reg_max - 0.01)


def dist2xyxy(anchor_points: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    lt, rb = distance.chunk(2, -1)
    return torch.cat((anchor_points - lt, anchor_points + rb), -1)


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    half = x[..., 2:4] / 2
    return torch.cat((x[..., :2] - half, x[..., :2] + half), -1)


class TaskAlignedAssigner(nn.Module):
    """Task-aligned assignment (TOOD, as in ultralytics YOLOv8/11).

    For each ground-truth box, anchors whose centre lies inside it are scored by
    ``score^alpha * IoU^beta`` (score: predicted probability of the box's class); the ``topk`` best
    become positives. An anchor claimed by several boxes goes to the one it overlaps most. Targets
    are the box and a one-hot class scaled by the normalised alignment metric, so an anchor's
    class target is its IoU-aware quality rather than 1.
    """

    def __init__(self, num_classes: int, topk: int = 10, alpha: float = 0.5, beta: float = 6.0,
                 eps: float = EPS):
        super().__init__()
        self.num_classes, self.topk, self.alpha, self.beta, self.eps = num_classes, topk, alpha, beta, eps

    @torch.no_grad()
    def forward(self, pred_scores: torch.Tensor, pred_boxes: torch.Tensor,
                anchor_points: torch.Tensor, gt_classes: torch.Tensor, gt_boxes: torch.Tensor,
                gt_valid: torch.Tensor):
        """pred_scores (B, A, C) probabilities; pred_boxes (B, A, 4) xyxy; anchor_points (A, 2);
        gt_classes (B, M) int; gt_boxes (B, M, 4) xyxy; gt_valid (B, M) bool; all in one unit
        (input pixels).

        Returns target_boxes (B, A, 4), target_scores (B, A, C), fg_mask (B, A) bool and
        target_gt_idx (B, A) (the assigned row of the ground truth, meaningful where fg_mask).
        """
        b, a, c = pred_scores.shape
        m = gt_boxes.shape[1]
        if m == 0:
            return (torch.zeros_like(pred_boxes), torch.zeros_like(pred_scores),
                    torch.zeros(b, a, dtype=torch.bool, device=pred_scores.device),
                    torch.zeros(b, a, dtype=torch.long, device=pred_scores.device))
        valid = gt_valid.bool()
        gt_classes = gt_classes.long().clamp(0, c - 1)
        # (B, M, A): anchor centre strictly inside the box (and the row is a real box).
        lt, rb = gt_boxes[:, :, None, :2], gt_boxes[:, :, None, 2:]
        deltas = torch.cat((anchor_points[None, None] - lt, rb - anchor_points[None, None]), -1)
        in_gts = (deltas.amin(-1) > self.eps) & valid[:, :, None]

        # Alignment metric score^alpha * IoU^beta on candidate anchors only.
        batch_idx = torch.arange(b, device=pred_scores.device)[:, None].expand(b, m)
        cls_scores = pred_scores[batch_idx, :, gt_classes]  # (B, M, A)
        overlaps = bbox_iou(gt_boxes[:, :, None], pred_boxes[:, None], ciou=True)[..., 0].clamp_(0)
        overlaps = overlaps * in_gts
        align = cls_scores.pow(self.alpha) * overlaps.pow(self.beta) * in_gts

        # Top-k anchors per box by alignment (ties and zeros still count: ultralytics behaviour).
        topk_idx = align.topk(min(self.topk, a), dim=-1).indices  # (B, M, k)
        is_topk = torch.zeros_like(align, dtype=torch.bool).scatter_(-1, topk_idx, True)
        mask_pos = (is_topk & in_gts).float()  # (B, M, A)

        # An anchor claimed by several boxes keeps only the box it overlaps most.
        fg_count = mask_pos.sum(1)  # (B, A)
        if fg_count.max() > 1:
            multi = (fg_count > 1)[:, None].expand(-1, m, -1)
            best = torch.zeros_like(mask_pos).scatter_(1, overlaps.argmax(1, keepdim=True), 1.0)
            mask_pos = torch.where(multi, best, mask_pos)
            fg_count = mask_pos.sum(1)
        fg_mask = fg_count > 0
        target_gt_idx = mask_pos.argmax(1)  # (B, A)

        flat_idx = target_gt_idx + torch.arange(b, device=pred_scores.device)[:, None] * m
        target_classes = gt_classes.flatten()[flat_idx]  # (B, A)
        target_boxes = gt_boxes.reshape(-1, 4)[flat_idx]  # (B, A, 4)
        target_scores = F.one_hot(target_classes, c).to(pred_scores.dtype)
        target_scores = target_scores * fg_mask[..., None]

        # Normalise each box's metric so its best anchor gets that anchor's IoU (TOOD Eq. 9).
        align = align * mask_pos
        best_align = align.amax(-1, keepdim=True)  # (B, M, 1)
        best_overlap = (overlaps * mask_pos).amax(-1, keepdim=True)
        norm = (align * best_overlap / (best_align + self.eps)).amax(1)  # (B, A)
        return target_boxes, target_scores * norm[..., None], fg_mask, target_gt_idx


def dfl_loss(pred_dist: torch.Tensor, target: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Distribution focal loss: cross-entropy to the two bins around each continuous target
    distance, weighted by proximity. pred_dist (N, 4 * reg_max) logits, target (N, 4); (N, 1)."""
    target = target.clamp(0, reg_max - 1 - 0.01)
    left = target.long()
    w_left = (left + 1) - target
    logits = pred_dist.reshape(-1, reg_max)
    ce_left = F.cross_entropy(logits, left.reshape(-1), reduction="none").view(left.shape)
    ce_right = F.cross_entropy(logits, (left + 1).reshape(-1), reduction="none").view(left.shape)
    return (ce_left * w_left + ce_right * (1 - w_left)).mean(-1, keepdim=True)


class DetectionLoss:
    """YOLO11 detection loss for a model's training outputs (list of (B, 4*reg_max + nc, h, w))."""

    def __init__(self, model: nn.Module, gains: LossGains = LossGains(), topk: int = 10):
        head = model.head if hasattr(model, "head") else model.model[-1]
        self.nc, self.reg_max = head.nc, head.reg_max
        self.strides = [float(s) for s in head.stride.tolist()]
        if not all(self.strides):
            raise ValueError("model head has no strides set")
        self.gains = gains
        self.assigner = TaskAlignedAssigner(self.nc, topk=topk, alpha=0.5, beta=6.0)

    def _flatten(self, maps: list[torch.Tensor]):
        b = maps[0].shape[0]
        x = torch.cat([m.reshape(b, self.reg_max * 4 + self.nc, -1) for m in maps], 2)
        pred_dist, pred_logits = x.split((self.reg_max * 4, self.nc), 1)
        anchors, stride_col = make_anchors([tuple(m.shape[2:]) for m in maps], self.strides,
                                           maps[0].dtype, maps[0].device)
        return (pred_dist.permute(0, 2, 1).contiguous(), pred_logits.permute(0, 2, 1).contiguous(),
                anchors, stride_col)

    def _decode(self, anchors: torch.Tensor, pred_dist: torch.Tensor) -> torch.Tensor:
        """DFL expectation per side -> xyxy in grid units of each anchor's level."""
        b, a, _ = pred_dist.shape
        proj = torch.arange(self.reg_max, dtype=pred_dist.dtype, device=pred_dist.device)
        dist = pred_dist.view(b, a, 4, self.reg_max).softmax(3) @ proj
        return dist2xyxy(anchors, dist)

    def _box_losses(self, pred_dist, pred_boxes, anchors, target_boxes, target_scores,
                    score_sum, fg):
        weight = target_scores.sum(-1)[fg][:, None]
        iou = bbox_iou(pred_boxes[fg], target_boxes[fg], ciou=True)
        loss_box = ((1.0 - iou) * weight).sum() / score_sum
        target_ltrb = bbox2dist(anchors, target_boxes, self.reg_max - 1)
        loss_dfl = (dfl_loss(pred_dist[fg], target_ltrb[fg], self.reg_max) * weight).sum() / score_sum
        return loss_box, loss_dfl

    def assign(self, maps, gt_boxes, gt_classes, gt_valid):
        pred_dist, pred_logits, anchors, stride_col = self._flatten(maps)
        pred_boxes = self._decode(anchors, pred_dist)  # grid units
        target_boxes, target_scores, fg, gt_idx = self.assigner(
            pred_logits.detach().sigmoid(), (pred_boxes.detach() * stride_col).to(gt_boxes.dtype),
            anchors * stride_col, gt_classes, gt_boxes, gt_valid)
        return (pred_dist, pred_logits, anchors, stride_col, pred_boxes, target_boxes,
                target_scores, fg, gt_idx)

    def __call__(self, maps: list[torch.Tensor], gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
                 gt_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (total scaled by batch size, for backward; detached [box, cls, dfl])."""
        (pred_dist, pred_logits, anchors, stride_col, pred_boxes, target_boxes, target_scores,
         fg, _) = self.assign(maps, gt_boxes, gt_classes, gt_valid)
        score_sum = target_scores.sum().clamp(min=1)
        loss_cls = F.binary_cross_entropy_with_logits(pred_logits, target_scores,
                                                      reduction="sum") / score_sum
        zero = pred_dist.sum() * 0  # keeps the graph connected when nothing is assigned
        loss_box = loss_dfl = zero
        if fg.any():
            loss_box, loss_dfl = self._box_losses(pred_dist, pred_boxes, anchors,
                                                  target_boxes / stride_col, target_scores,
                                                  score_sum, fg)
        parts = torch.stack((loss_box * self.gains.box, loss_cls * self.gains.cls,
                             loss_dfl * self.gains.dfl))
        # ultralytics scales by batch size (its lr and grad clipping are tuned for that).
        return parts.sum() * len(maps[0]), parts.detach()


class SegmentationLoss(DetectionLoss):
    """YOLO11-seg loss: detection losses plus mask BCE (gain = box gain, as in ultralytics).

    ``gt_masks`` (B, M, h, w) float/bool instance masks aligned with ``gt_boxes``, at prototype
    resolution (input / 4) or input resolution (then nearest-downsampled).
    """

    def __call__(self, outputs, gt_boxes, gt_classes, gt_valid, gt_masks):
        maps, coeffs, protos = outputs  # coeffs (B, nm, A), protos (B, nm, mh, mw)
        (pred_dist, pred_logits, anchors, stride_col, pred_boxes, target_boxes, target_scores,
         fg, gt_idx) = self.assign(maps, gt_boxes, gt_classes, gt_valid)
        score_sum = target_scores.sum().clamp(min=1)
        loss_cls = F.binary_cross_entropy_with_logits(pred_logits, target_scores,
                                                      reduction="sum") / score_sum
        zero = pred_dist.sum() * 0 + coeffs.sum() * 0 + protos.sum() * 0
        loss_box = loss_dfl = loss_seg = zero
        if fg.any():
            loss_box, loss_dfl = self._box_losses(pred_dist, pred_boxes, anchors,
                                                  target_boxes / stride_col, target_scores,
                                                  score_sum, fg)
            loss_seg = self.mask_loss(fg, gt_idx, target_boxes, coeffs.permute(0, 2, 1), protos,
                                      gt_masks, maps)
        parts = torch.stack((loss_box * self.gains.box, loss_cls * self.gains.cls,
                             loss_dfl * self.gains.dfl, loss_seg * self.gains.box))
        return parts.sum() * len(maps[0]), parts.detach()

    def mask_loss(self, fg, gt_idx, target_boxes, coeffs, protos, gt_masks, maps):
        b, _, mh, mw = protos.shape
        ih, iw = maps[0].shape[2] * self.strides[0], maps[0].shape[3] * self.strides[0]
        gt_masks = gt_masks.to(protos.dtype)
        if tuple(gt_masks.shape[-2:]) != (mh, mw):
            gt_masks = F.interpolate(gt_masks, (mh, mw), mode="nearest")
        scale = torch.tensor([mw / iw, mh / ih, mw / iw, mh / ih], device=protos.device)
        boxes_m = target_boxes * scale  # prototype pixels
        area = ((target_boxes[..., 2] - target_boxes[..., 0]) * (target_boxes[..., 3] - target_boxes[..., 1])
                / (ih * iw)).clamp(min=EPS)  # box area as a fraction of the image
        total = protos.sum() * 0
        for i in range(b):
            sel = fg[i]
            if not sel.any():
                continue
            logits = torch.einsum("nk,khw->nhw", coeffs[i][sel], protos[i])
            target = gt_masks[i][gt_idx[i][sel]]
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            total = total + (crop_mask(bce, boxes_m[i][sel]).mean((1, 2)) / area[i][sel]).sum()
        return total / fg.sum()
