"""Training loop for the demo YOLO11 weights: CPU-friendly, resumable, deterministic for a seed.

Determinism: the model is initialised from ``seed``; the epoch's sample order comes from
``(seed, epoch)`` and each sample's augmentation from ``(seed, epoch, index)``, and nothing else
draws random numbers. So a run resumed from an epoch checkpoint continues exactly as the
uninterrupted run would (same thread count, same machine).

The checkpoint (``<workdir>/last.pt``) holds weights, EMA weights, optimiser state and history;
it is written atomically at the end of every epoch. The exported weights are the EMA's, saved in
fp16 with :func:`fluxshard.models.save_checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fluxshard import synth
from fluxshard.accuracy import evaluate_detections
from fluxshard.models import YOLO11, build_yolo11, postprocess, preprocess, save_checkpoint

from .data import Sample, SyntheticDataset, augment, collate
from .loss import DetectionLoss, SegmentationLoss

# Fields that do not change the trained weights: they may differ between a run and its resume.
NON_TRAINING_FIELDS = {"threads", "val_every", "val_scenes", "val_frames_per_scene", "progress"}


@dataclass
class TrainConfig:
    task: str = "detect"  # or "segment"
    scale: str = "n"
    epochs: int = 5
    batch: int = 16
    crop: tuple[int, int] = (320, 320)  # training crop (H, W); evaluation is on full frames
    train_scenes: int = 600
    frames_per_scene: int = 4
    scene_frames: int = 48
    val_scenes: int = 16
    val_frames_per_scene: int = 4
    optimizer: str = "adamw"  # or "sgd"
    lr: float = 0.002
    lr_final: float = 0.01  # final lr as a fraction of lr (cosine decay)
    momentum: float = 0.9  # AdamW beta1 / SGD (nesterov) momentum
    weight_decay: float = 0.0005
    warmup_iters: int = 100
    ema_decay: float = 0.9999
    ema_tau: float = 500.0  # EMA decay ramps up as 1 - exp(-updates / tau)
    grad_clip: float = 10.0
    flip: float = 0.5
    hsv: tuple[float, float, float] = (0.015, 0.5, 0.3)
    jpeg: float = 0.5
    seed: int = 0
    threads: int = 2
    val_every: int = 1
    progress: bool = True

    def __post_init__(self):
        if self.task not in ("detect", "segment"):
            raise ValueError(f"task must be 'detect' or 'segment', got {self.task!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        self.crop = tuple(int(v) for v in self.crop)
        self.hsv = tuple(float(v) for v in self.hsv)
        if any(v % 32 for v in self.crop):
            raise ValueError(f"crop {self.crop} must be multiples of 32")
        if self.epochs < 1 or self.batch < 1:
            raise ValueError("epochs and batch must be >= 1")

    def training_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in NON_TRAINING_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class ModelEMA:
    """Exponential moving average of every floating tensor of the state dict (weights and BN
    statistics), with the decay ramp ultralytics uses so early averages are not stuck at init."""

    def __init__(self, model: nn.Module, decay: float, tau: float, updates: int = 0):
        self.ema = _clone_model(model).eval().requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)


def _clone_model(model: YOLO11) -> YOLO11:
    clone = build_yolo11(model.scale, model.task, model.nc, model.names)
    clone.load_state_dict(model.state_dict())
    return clone


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only, not on BN parameters or biases (ultralytics)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias" or isinstance(module, nn.modules.batchnorm._BatchNorm):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(cfg: TrainConfig, it: int, total: int) -> float:
    """Linear warm-up, then cosine decay from lr to lr * lr_final."""
    warm = min(cfg.warmup_iters, max(total - 1, 1))
    if it < warm:
        return cfg.lr * (it + 1) / warm
    progress = (it - warm) / max(total - warm, 1)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validate(model: YOLO11, samples: list[Sample], conf: float = 0.001, iou: float = 0.7,
             max_det: int = 100, batch: int = 4) -> dict:
    """mAP of ``model`` on full (un-augmented) frames, ultralytics val thresholds by default
    (``max_det`` 100: COCO scores no more per image, and it bounds the masks kept)."""
    was_training = model.training
    model.eval()
    preds, gts = [], []
    try:
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            x = preprocess([s.image for s in chunk])
            dets = postprocess(model(x), x.shape[2:], chunk[0].image.shape[:2], conf_thres=conf,
                               iou_thres=iou, max_det=max_det)
            preds.extend(dets)
            gts.extend({"boxes": s.boxes, "classes": s.classes, "masks": s.masks} for s in chunk)
    finally:
        model.train(was_training)
    return evaluate_detections(preds, gts)


class Trainer:
    def __init__(self, cfg: TrainConfig, workdir: str | Path, cache_dir: str | Path | None = None):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.workdir / "cache"
        names = dict(enumerate(synth.CLASS_NAMES))
        torch.manual_seed(cfg.seed)
        self.model = build_yolo11(cfg.scale, cfg.task, len(names), names).train()
        self.ema = ModelEMA(self.model, cfg.ema_decay, cfg.ema_tau)
        self.optimizer = self._make_optimizer()
        loss_cls = SegmentationLoss if cfg.task == "segment" else DetectionLoss
        self.criterion = loss_cls(self.model)
        self.epoch = 0  # completed epochs
        self.history: list[dict] = []
        self._train: SyntheticDataset | None = None
        self._val: SyntheticDataset | None = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = param_groups(self.model, self.cfg.weight_decay)
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                   nesterov=True)
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.momentum, 0.999))

    # -- data ---------------------------------------------------------------------------------
    @property
    def train_set(self) -> SyntheticDataset:
        if self._train is None:
            c = self.cfg
            self._train = SyntheticDataset("train", c.train_scenes, c.frames_per_scene,
                                           c.scene_frames, with_masks=c.task == "segment",
                                           cache_dir=self.cache_dir, progress=c.progress)
        return self._train

    @property
    def val_set(self) -> SyntheticDataset:
        if self._val is None:
            c = self.cfg
            self._val = SyntheticDataset("heldout", c.val_scenes, c.val_frames_per_scene,
                                         c.scene_frames, with_masks=c.task == "segment",
                                         mask_stride=1, cache_dir=self.cache_dir,
                                         progress=c.progress)
        return self._val

    def batches(self, epoch: int):
        """This epoch's augmented batches (drops the last partial batch)."""
        c, data = self.cfg, self.train_set
        order = np.random.default_rng([c.seed, epoch]).permutation(len(data))
        for start in range(0, len(order) - c.batch + 1, c.batch):
            idx = order[start:start + c.batch]
            yield collate([augment(data[int(i)], np.random.default_rng([c.seed, epoch, int(i)]),
                                   c.crop, flip=c.flip, hsv=c.hsv, jpeg=c.jpeg) for i in idx])

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.workdir / "last.pt"

    def save(self) -> Path:
        state = {"config": self.cfg.training_dict(), "epoch": self.epoch,
                 "model": self.model.state_dict(), "ema": self.ema.ema.state_dict(),
                 "ema_updates": self.ema.updates, "optimizer": self.optimizer.state_dict(),
                 "history": self.history}
        tmp = self.checkpoint_path.with_name("last.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)
        return self.checkpoint_path

    def resume(self) -> bool:
        """Load ``last.pt`` if present; refuses a checkpoint from a different training setup."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        saved = TrainConfig.from_dict(state["config"]).training_dict()
        mine = self.cfg.training_dict()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"{self.checkpoint_path} was trained with a different setup "
                             f"(field: (checkpoint, now)) {diff}; use another workdir or --fresh")
        self.model.load_state_dict(state["model"])
        self.ema.ema.load_state_dict(state["ema"])
        self.ema.updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        return True

    # -- loop -----------------------------------------------------------------------------------
    def train_step(self, batch, lr: float) -> torch.Tensor:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        out = self.model(batch.images)
        if self.cfg.task == "segment":
            loss, parts = self.criterion(out, batch.gt_boxes, batch.gt_classes, batch.gt_valid,
                                         batch.gt_masks)
        else:
            loss, parts = self.criterion(out, batch.gt_boxes, batch.gt_classes, batch.gt_valid)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {parts.tolist()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        return parts

    def iters_per_epoch(self) -> int:
        return len(self.train_set) // self.cfg.batch

    def train(self, epochs: int | None = None, log=None) -> list[dict]:
        """Train up to ``epochs`` completed epochs (default: the configured total)."""
        c = self.cfg
        log = log or (lambda line: print(line, flush=True))  # flushed: runs log to files
        stop = c.epochs if epochs is None else min(epochs, c.epochs)
        per_epoch = self.iters_per_epoch()
        if per_epoch < 1:
            raise ValueError(f"{len(self.train_set)} samples make no batch of {c.batch}")
        total = per_epoch * c.epochs
        self.model.train()
        while self.epoch < stop:
            start = time.time()
            sums = None
            bar = tqdm(self.batches(self.epoch), total=per_epoch, disable=not c.progress,
                       desc=f"{c.task} epoch {self.epoch + 1}/{c.epochs}", dynamic_ncols=True)
            for k, batch in enumerate(bar):
                parts = self.train_step(batch, lr_at(c, self.epoch * per_epoch + k, total))
                sums = parts if sums is None else sums + parts
                bar.set_postfix(loss=f"{float(parts.sum()):.3f}")
            self.epoch += 1
            names = ["box", "cls", "dfl", "seg"][:len(sums)]
            record = {"epoch": self.epoch, "seconds": round(time.time() - start, 1),
                      **{n: round(float(v) / per_epoch, 4) for n, v in zip(names, sums)}}
            if c.val_every and (self.epoch % c.val_every == 0 or self.epoch == c.epochs):
                metrics = validate(self.ema.ema, self.val_set.samples)
                record.update({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
            self.history.append(record)
            self.save()
            with open(self.workdir / "history.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log(json.dumps(record))
        return self.history

    def export(self, path: str | Path, **meta) -> Path:
        """Save the EMA weights (fp16) with the training setup and history as metadata."""
        return save_checkpoint(self.ema.ema, path, config=self.cfg.training_dict(),
                               epochs_done=self.epoch, history=self.history, **meta)
