"""Training data from :mod:`fluxshard.synth` scenes, rendered once and kept in memory.

Each scene gets a random spec (camera mode, object count, seed) drawn from its own index, and a few
frames spread over its duration are rendered. Train and held-out scenes use disjoint seed ranges,
so no held-out scene is ever seen in training. Rendered sets can be cached on disk (``.npz``) keyed
by everything that determines them.

Augmentation (train only) is light and deterministic per (seed, epoch, sample): a random crop (the
model is fully convolutional, so training on crops at native scale transfers to full 640x384
frames), horizontal flip, HSV-style colour jitter, and JPEG re-encoding that imitates the block
artifacts of the decoded H.264 frames the model sees in deployment.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fluxshard import synth
from fluxshard.synth import scene_seed

CAMERAS = ("pan", "zoom", "pan+zoom", "static")
MASK_STRIDE = 4  # masks are kept at prototype resolution (input / 4)
PAD_VALUE = 114


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    classes: np.ndarray  # (N,) int64
    masks: np.ndarray | None = None  # (N, H / 4, W / 4) bool, segmentation data only


def scene_spec(split: str, index: int, frames: int = 48,
               object_range: tuple[int, int] = (2, 8)) -> "synth.SceneSpec":
    """The random (but fixed per split and index) spec of one scene."""
    seed = scene_seed(split, index)
    rng = np.random.default_rng(seed)
    return synth.SceneSpec(frames=frames, seed=seed,
                           num_objects=int(rng.integers(object_range[0], object_range[1] + 1)),
                           camera=str(CAMERAS[int(rng.integers(len(CAMERAS)))]))


def downsample_masks(masks: np.ndarray, stride: int = MASK_STRIDE) -> np.ndarray:
    """(N, H, W) bool -> (N, ceil(H/s), ceil(W/s)) bool by majority over each s x s cell."""
    n, h, w = masks.shape
    ph, pw = -(-h // stride) * stride, -(-w // stride) * stride
    padded = np.zeros((n, ph, pw), dtype=np.float32)
    padded[:, :h, :w] = masks
    return padded.reshape(n, ph // stride, stride, pw // stride, stride).mean((2, 4)) >= 0.5


def render_scene_samples(spec, frame_indices, with_masks: bool,
                         mask_stride: int = MASK_STRIDE) -> list[Sample]:
    scene = synth.Scene(spec)
    out = []
    for t in frame_indices:
        f = scene.render(int(t))
        boxes = np.asarray(f.boxes, dtype=np.float32).reshape(-1, 4)
        classes = np.asarray(f.classes, dtype=np.int64).reshape(-1)
        masks = None
        if with_masks:
            masks = np.asarray(f.instance_masks, dtype=bool).reshape(len(classes), *f.image.shape[:2])
            masks = downsample_masks(masks, mask_stride) if mask_stride > 1 else masks
        out.append(Sample(np.ascontiguousarray(f.image, dtype=np.uint8), boxes, classes, masks))
    return out


class SyntheticDataset(torch.utils.data.Dataset):
    """``num_scenes`` scenes of ``split``, ``frames_per_scene`` frames each, rendered up front.

    Masks are kept at ``1 / mask_stride`` resolution (training: prototype resolution; evaluation:
    ``mask_stride=1``, full frames).
    """

    def __init__(self, split: str, num_scenes: int, frames_per_scene: int = 4,
                 scene_frames: int = 48, with_masks: bool = False,
                 mask_stride: int = MASK_STRIDE, cache_dir: str | Path | None = None,
                 progress: bool = True):
        if num_scenes < 1 or frames_per_scene < 1 or frames_per_scene > scene_frames:
            raise ValueError("need num_scenes >= 1 and 1 <= frames_per_scene <= scene_frames")
        self.split, self.with_masks = split, with_masks
        self.key = {"split": split, "num_scenes": num_scenes, "frames_per_scene": frames_per_scene,
                    "scene_frames": scene_frames, "masks": with_masks, "mask_stride": mask_stride,
                    "synth": getattr(synth, "__version__", None),
                    "classes": list(synth.CLASS_NAMES)}
        cache = None
        if cache_dir is not None:
            digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
            cache = Path(cache_dir) / f"{split}-{digest}.npz"
        if cache is not None and cache.is_file():
            self.samples = load_samples(cache)
            return
        self.samples = []
        for i in tqdm(range(num_scenes), desc=f"render {split}", unit="scene", disable=not progress,
                      dynamic_ncols=True):
            spec = scene_spec(split, i, scene_frames)
            # Frames spread evenly over the clip with a per-scene phase, so motion states vary.
            phase = (scene_seed(split, i) * 7919) % scene_frames
            step = scene_frames / frames_per_scene
            ts = sorted({int(phase + k * step) % scene_frames for k in range(frames_per_scene)})
            self.samples.extend(render_scene_samples(spec, ts, with_masks, mask_stride))
        if cache is not None:
            save_samples(cache, self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def save_samples(path: Path, samples: list[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = np.array([len(s.classes) for s in samples], dtype=np.int64)
    arrays = {"images": np.stack([s.image for s in samples]), "counts": counts,
              "boxes": np.concatenate([s.boxes for s in samples]).reshape(-1, 4),
              "classes": np.concatenate([s.classes for s in samples])}
    if samples[0].masks is not None:
        arrays["masks"] = np.packbits(np.concatenate([s.masks for s in samples]), axis=-1)
        arrays["mask_shape"] = np.array(samples[0].masks.shape[1:])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_samples(path: Path) -> list[Sample]:
    with np.load(path) as z:
        images, counts, boxes, classes = z["images"], z["counts"], z["boxes"], z["classes"]
        masks = None
        if "masks" in z:
            mh, mw = z["mask_shape"]
            masks = np.unpackbits(z["masks"], axis=-1, count=int(mw)).astype(bool)
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [Sample(images[i], boxes[a:b], classes[a:b], None if masks is None else masks[a:b])
            for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))]


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def augment(sample: Sample, rng: np.random.Generator, crop_hw: tuple[int, int] | None,
            flip: float = 0.5, hsv: tuple[float, float, float] = (0.015, 0.5, 0.3),
            jpeg: float = 0.5, min_visible: float = 0.25) -> Sample:
    """Random crop (origin on the mask grid), flip, colour jitter, JPEG artifacts.

    A box cut by the crop is kept (clipped) when at least ``min_visible`` of its area remains.
    ``hsv`` are ultralytics-style gains: hue shift (fraction of a turn), saturation and value.
    """
    image, boxes, classes, masks = sample.image, sample.boxes, sample.classes, sample.masks
    h, w = image.shape[:2]
    if crop_hw is not None:
        ch, cw = crop_hw
        if ch % MASK_STRIDE or cw % MASK_STRIDE:
            raise ValueError(f"crop size {crop_hw} must be a multiple of {MASK_STRIDE}")
        if ch > h or cw > w:  # pad bottom/right like preprocess()
            padded = np.full((max(h, ch), max(w, cw), 3), PAD_VALUE, np.uint8)
            padded[:h, :w] = image
            image = padded
            if masks is not None:
                mpad = np.zeros((len(masks), padded.shape[0] // MASK_STRIDE,
                                 padded.shape[1] // MASK_STRIDE), bool)
                mpad[:, :masks.shape[1], :masks.shape[2]] = masks
                masks = mpad
            h, w = image.shape[:2]
        y0 = int(rng.integers(0, (h - ch) // MASK_STRIDE + 1)) * MASK_STRIDE
        x0 = int(rng.integers(0, (w - cw) // MASK_STRIDE + 1)) * MASK_STRIDE
        image = image[y0:y0 + ch, x0:x0 + cw]
        clipped = boxes - np.array([x0, y0, x0, y0], np.float32)
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, cw)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, ch)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        new_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = (new_area >= min_visible * np.maximum(area, 1e-6)) & \
               (clipped[:, 2] - clipped[:, 0] >= 2) & (clipped[:, 3] - clipped[:, 1] >= 2)
        boxes, classes = clipped[keep], classes[keep]
        if masks is not None:
            s = MASK_STRIDE
            masks = masks[keep][:, y0 // s:(y0 + ch) // s, x0 // s:(x0 + cw) // s]
        h, w = ch, cw
    if rng.random() < flip:
        image = image[:, ::-1]
        boxes = boxes.copy()
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        if masks is not None:
            masks = masks[:, :, ::-1]
    image = hsv_jitter(np.ascontiguousarray(image), rng, *hsv)
    if rng.random() < jpeg:
        image = jpeg_roundtrip(image, int(rng.integers(40, 96)))
    return Sample(np.ascontiguousarray(image), boxes.astype(np.float32), classes,
                  None if masks is None else np.ascontiguousarray(masks))


def hsv_jitter(image: np.ndarray, rng: np.random.Generator, hue: float, sat: float,
               val: float) -> np.ndarray:
    """Random hue rotation and saturation / value gains (ultralytics ``augment_hsv`` ranges)."""
    from PIL import Image

    gains = rng.uniform(-1, 1, 3) * np.array([hue, sat, val]) + np.array([0, 1, 1])
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(round(gains[0] * 255))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * gains[1], 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * gains[2], 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1]
    gt_boxes: torch.Tensor  # (B, M, 4) xyxy pixels, zero rows where invalid
    gt_classes: torch.Tensor  # (B, M) int64
    gt_valid: torch.Tensor  # (B, M) bool
    gt_masks: torch.Tensor | None  # (B, M, H / 4, W / 4) float32


def collate(samples: list[Sample]) -> Batch:
    """Stack same-size samples and pad their targets to the most objects in the batch."""
    b = len(samples)
    m = max([len(s.classes) for s in samples] + [0])
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
    gt_boxes = torch.zeros(b, m, 4)
    gt_classes = torch.zeros(b, m, dtype=torch.long)
    gt_valid = torch.zeros(b, m, dtype=torch.bool)
    with_masks = samples[0].masks is not None
    gt_masks = None
    if with_masks:
        mh, mw = samples[0].image.shape[0] // MASK_STRIDE, samples[0].image.shape[1] // MASK_STRIDE
        gt_masks = torch.zeros(b, m, mh, mw)
    for i, s in enumerate(samples):
        n = len(s.classes)
        gt_boxes[i, :n] = torch.from_numpy(s.boxes)
        gt_classes[i, :n] = torch.from_numpy(s.classes)
        gt_valid[i, :n] = True
        if with_masks and n:
            gt_masks[i, :n] = torch.from_numpy(s.masks.astype(np.float32))
    return Batch(images.float().div_(255.0), gt_boxes, gt_classes, gt_valid, gt_masks)
