"""Pre- and post-processing for YOLO11 in pure torch/numpy (no torchvision).

Frames are padded bottom/right to a multiple of 32 and never resized here, so boxes need no
rescaling: mapping back to the frame is a clip. Resizing to ``--imgsz`` happens before, on the
source frame and its motion field alike (fluxshard.letterbox).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fluxshard.letterbox import PAD_VALUE

MAX_WH = 7680  # class offset for batched NMS: larger than any box coordinate
MAX_NMS = 30000  # boxes entering NMS per image, highest scores first


@dataclass
class Detections:
    """Detections of one frame, in frame pixels."""

    boxes: np.ndarray  # (N, 4) float32 xyxy
    scores: np.ndarray  # (N,) float32
    classes: np.ndarray  # (N,) int64
    masks: np.ndarray | None = None  # (N, H, W) bool, segment models only

    def __len__(self) -> int:
        return len(self.scores)


def padded_shape(height: int, width: int, multiple: int = 32) -> tuple[int, int]:
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def padded_size(width: int, height: int, who: str = "fluxshard", multiple: int = 32
                ) -> tuple[int, int]:
    """(W, H) rounded up to multiples of ``multiple`` (the model's largest stride), saying so on
    stdout when that changes them: frames are padded bottom/right, as :func:`preprocess` does."""
    ph, pw = padded_shape(height, width, multiple)
    if (pw, ph) != (width, height):
        print(f"{who}: size {width}x{height} padded to {pw}x{ph} (multiples of {multiple})")
    return pw, ph


def preprocess(frames: np.ndarray | list[np.ndarray], multiple: int = 32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB uint8 frame(s) (H, W, 3) -> float32 (B, 3, H', W') in [0, 1], H' and W' the next
    multiples of ``multiple``; padding (grey 114) goes bottom/right only."""
    if isinstance(frames, np.ndarray) and frames.ndim == 3:
        frames = [frames]
    frames = list(frames)
    if not frames:
        raise ValueError("preprocess: no frames")
    h, w = frames[0].shape[:2]
    for k, f in enumerate(frames):
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            desc = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
            raise ValueError(f"preprocess: frame {k} must be uint8 (H, W, 3) RGB, got {desc}")
        if f.shape[:2] != (h, w):
            raise ValueError(f"preprocess: frame {k} is {f.shape[:2]}, frame 0 is {(h, w)}; "
                             "a batch needs one frame size")
    ph, pw = padded_shape(h, w, multiple)
    batch = np.full((len(frames), ph, pw, 3), PAD_VALUE, dtype=np.uint8)
    for k, f in enumerate(frames):
        batch[k, :h, :w] = f
    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).contiguous()
    return x.float().div_(255.0)


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    half = x[..., 2:4] / 2
    y[..., 0:2] = x[..., 0:2] - half
    y[..., 2:4] = x[..., 0:2] + half
    return y


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float,
        max_keep: int | None = None) -> torch.Tensor:
    """Greedy NMS (torchvision.ops.nms semantics): indices of kept boxes, highest score first.

    Each step keeps the best remaining box and drops the remaining boxes overlapping it by more
    than ``iou_thres``. Only one row of IoUs is computed per kept box (O(kept x N) time, O(N)
    memory) and the loop stops after ``max_keep`` boxes. The loop runs in numpy: per step it is a
    handful of vector ops on small arrays, where torch's per-op overhead would dominate.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms: boxes must be (N, 4) and scores (N,), got {tuple(boxes.shape)} "
                         f"and {tuple(scores.shape)}")
    order = scores.detach().argsort(descending=True, stable=True)
    b = boxes.detach()[order].cpu().double().numpy()  # float64: exact for offset coordinates
    x1, y1, x2, y2 = b.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    limit = len(b) if max_keep is None else max_keep
    keep: list[int] = []
    remaining = np.arange(len(b))
    while remaining.size and len(keep) < limit:
        i, rest = remaining[0], remaining[1:]
        keep.append(int(i))
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        remaining = rest[iou <= iou_thres]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def non_max_suppression(preds: torch.Tensor | tuple, conf_thres: float = 0.25,
                        iou_thres: float = 0.7, max_det: int = 300,
                        classes: list[int] | None = None, agnostic: bool = False,
                        nm: int | None = None) -> list[torch.Tensor]:
    """Per image (n, 6 + nm) rows [x1, y1, x2, y2, score, class, mask coeffs...].

    ``preds`` is the eval output of a YOLO11 (B, 4 + nc + nm, A) (or the (preds, protos) tuple of
    a segment model). Best class per anchor; classes are kept apart by offsetting boxes by
    class * MAX_WH unless ``agnostic``.
    """
    if isinstance(preds, (tuple, list)):
        preds, protos = preds[0], preds[1]
        if nm is None:
            nm = protos.shape[1]
    nm = nm or 0
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres and iou_thres must lie in [0, 1], got {conf_thres}, {iou_thres}")
    if preds.ndim != 3 or preds.shape[1] <= 4 + nm:
        raise ValueError(f"preds must be (B, 4 + nc + nm, A) with nm={nm}, got {tuple(preds.shape)}")
    nc = preds.shape[1] - 4 - nm
    out = []
    for p in preds.transpose(1, 2):  # (A, 4 + nc + nm)
        p = p[p[:, 4:4 + nc].amax(1) > conf_thres]
        box, cls, mask = p.split((4, nc, nm), 1)
        conf, j = cls.max(1, keepdim=True)
        x = torch.cat((xywh2xyxy(box), conf, j.to(box.dtype), mask), 1)
        if classes is not None:
            x = x[(x[:, 5:6] == torch.tensor(classes, device=x.device)).any(1)]
        if len(x) > MAX_NMS:
            x = x[x[:, 4].argsort(descending=True)[:MAX_NMS]]
        offsets = x[:, 5:6] * (0 if agnostic else MAX_WH)
        keep = nms(x[:, :4] + offsets, x[:, 4], iou_thres, max_keep=max_det)
        out.append(x[keep])
    return out


def crop_mask(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero mask (N, h, w) values outside each xyxy box (N, 4), box given in mask pixels."""
    _, h, w = masks.shape
    x1, y1, x2, y2 = torch.chunk(boxes[:, :, None], 4, 1)
    r = torch.arange(w, device=masks.device, dtype=boxes.dtype)[None, None, :]
    c = torch.arange(h, device=masks.device, dtype=boxes.dtype)[None, :, None]
    return masks * ((r >= x1) * (r < x2) * (c >= y1) * (c < y2))


def process_mask(protos: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """Boolean masks (N, H, W) at input size ``shape`` (ultralytics process_mask with upsample):
    linear combination of prototypes, cropped to the box at prototype resolution, bilinearly
    upsampled, thresholded at logit 0."""
    c, mh, mw = protos.shape
    ih, iw = shape
    masks = (coeffs.float() @ protos.float().view(c, -1)).view(-1, mh, mw)
    scaled = boxes.float().clone()
    scaled[:, [0, 2]] *= mw / iw
    scaled[:, [1, 3]] *= mh / ih
    masks = crop_mask(masks, scaled)
    masks = F.interpolate(masks[None], (ih, iw), mode="bilinear", align_corners=False)[0]
    return masks > 0.0


def postprocess(output: torch.Tensor | tuple, input_shape: tuple[int, int],
                orig_shape: tuple[int, int] | None = None, conf_thres: float = 0.25,
                iou_thres: float = 0.7, max_det: int = 300, classes: list[int] | None = None,
                agnostic: bool = False) -> list[Detections]:
    """Eval output of a YOLO11 -> one :class:`Detections` per image, in frame pixels.

    ``input_shape`` is the (H', W') the model saw; ``orig_shape`` the frame's (H, W) before
    bottom/right padding (default: no padding). Boxes are clipped to the frame, masks cropped.
    """
    protos = None
    if isinstance(output, (tuple, list)):
        output, protos = output
    ih, iw = (int(v) for v in input_shape[-2:])
    oh, ow = (int(v) for v in (orig_shape[:2] if orig_shape is not None else (ih, iw)))
    if oh > ih or ow > iw:
        raise ValueError(f"orig_shape {(oh, ow)} is larger than input_shape {(ih, iw)}; frames are "
                         "padded, never resized")
    nm = 0 if protos is None else protos.shape[1]
    results = []
    with torch.no_grad():
        for b, det in enumerate(non_max_suppression(output, conf_thres, iou_thres, max_det,
                                                    classes, agnostic, nm=nm)):
            masks = None
            if protos is not None:
                if len(det):
                    full = process_mask(protos[b], det[:, 6:], det[:, :4], (ih, iw))
                    masks = full[:, :oh, :ow].cpu().numpy()
                else:
                    masks = np.zeros((0, oh, ow), dtype=bool)
            boxes = det[:, :4].float()
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, ow)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, oh)
            results.append(Detections(
                boxes=boxes.cpu().numpy().astype(np.float32),
                scores=det[:, 4].float().cpu().numpy().astype(np.float32),
                classes=det[:, 5].cpu().numpy().astype(np.int64),
                masks=masks))
    return results
