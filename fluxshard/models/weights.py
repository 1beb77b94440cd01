"""Saving and loading model weights, for every registered model family (``families.py``).

Accepted sources for :func:`load_model`:
  * our checkpoint (``save_checkpoint``): {'format': the family's checkpoint format
    ('fluxshard-yolo11' for YOLO11), 'version', 'scale', 'task', 'nc', 'names', 'state_dict'
    (fp16), 'meta'};
  * a plain state dict whose keys a family recognises, e.g. ultralytics key names (scale, task
    and class count read from shapes);
  * an ultralytics-style checkpoint dict whose 'model' (or 'ema') entry is such a state dict;
  * an ultralytics ``.pt`` as it is (``yolo11n.pt``, ``yolo11s-seg.pt``, a trained ``best.pt``),
    holding a pickled model object: read without ultralytics and without running code from the
    file (``ultralytics_checkpoint.py``: allow-listed globals become inert records; any other
    global is refused in one line naming it);
  * ``None``: the embedded demo weights ``fluxshard/weights/yolo11n-detect-demo.pt``;
  * a registered name of pretrained weights (``families.named_weights``; ``"yolov3-tiny"``),
    fetched into the cache on first use;
  * a file in a family's own format (``ModelFamily.file_suffixes``: a Darknet ``.cfg`` with its
    ``.weights`` beside it, or the ``.weights`` with its ``.cfg`` beside it).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from . import ultralytics_checkpoint
from .families import (CheckpointError, ModelFamily, families, family_for_file, family_for_format,
                       family_for_state_dict, family_matching, family_names, family_of,
                       named_weights_for)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "yolo11n-detect-demo.pt"

CONVERT_HINT = ("ultralytics .pt files load as they are for YOLO11 detect and segment models of "
                "every scale (yolo11n.pt ... yolo11x-seg.pt, or a trained best.pt); for another "
                "architecture export ONNX where ultralytics is installed (yolo export "
                "model={path} format=onnx) and use `fluxshard export --onnx`")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **meta) -> Path:
    """Write ``model`` in its family's format (fp16 floating tensors; BN must not be fused)."""
    try:
        family = family_of(model)
    except TypeError as e:
        raise TypeError(f"save_checkpoint: {e}") from None
    sd = model.state_dict()
    if family.is_fused_state_dict(sd):
        raise CheckpointError("save_checkpoint: model is fused (no BatchNorm); save before fuse()")
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().clone()
             for k, v in sd.items()}
    ckpt = {"format": family.checkpoint_format, "version": family.checkpoint_version,
            "scale": model.scale, "task": model.task, "nc": model.nc, "names": dict(model.names),
            "state_dict": state, "meta": dict(meta)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return path


def infer_architecture(sd: dict[str, torch.Tensor]) -> tuple[str, str, int]:
    """(scale, task, num_classes) of a state dict, read by the family whose keys it has."""
    return family_for_state_dict(sd).infer_architecture(sd)


def model_from_state_dict(sd: dict[str, torch.Tensor], names: dict | list | None = None,
                          family: ModelFamily | None = None) -> nn.Module:
    """Build the matching model (of ``family``, else of the family whose keys ``sd`` has) and
    load ``sd`` strictly (every key and shape must match)."""
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    family = family or family_for_state_dict(sd)
    scale, task, nc = family.infer_architecture(sd)
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if names is not None and len(names) != nc:
        names = None  # names from some other dataset: fall back to generic ones
    model = family.build(scale, task, nc, names={int(k): str(v) for k, v in names.items()}
                         if names else None, **family.build_options(sd))
    if family.is_fused_state_dict(sd):
        family.fuse(model)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"state dict does not fit {family.tag(scale, task)} (nc={nc}): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model


def _model_from_ultralytics_file(path: Path) -> nn.Module:
    """A torch file that ``weights_only`` refuses: an ultralytics ``.pt`` (pickled model
    object), read with the allow-list of ``ultralytics_checkpoint``."""
    ckpt = ultralytics_checkpoint.read_checkpoint(path)
    record = ultralytics_checkpoint.model_record(ckpt)
    if record is None:  # state dicts beside values weights_only refuses (numpy scalars ...)
        return model_from_object(ckpt, str(path))
    sd, names, task = ultralytics_checkpoint.read_model(record, str(path))
    try:
        model = model_from_state_dict(sd, names)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: an ultralytics {record.class_name} that is no model of "
                              f"a registered family: {e}; " + CONVERT_HINT.format(path=path)
                              ) from None
    if model.task != task:
        raise CheckpointError(f"{path}: its head is a {task} head but its tensors make a "
                              f"{model.task} model")
    return model


def model_from_object(ckpt, origin: str = "checkpoint") -> nn.Module:
    """A loaded checkpoint object (any accepted dict layout) -> a model of its family."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{origin}: expected a dict, got {type(ckpt).__name__}")
    family = family_for_format(ckpt.get("format"))
    if family is not None:
        if ckpt.get("version", 1) > family.checkpoint_version:
            raise CheckpointError(f"{origin}: checkpoint version {ckpt['version']} is newer than "
                                  f"this code reads ({family.checkpoint_version})")
        model = model_from_state_dict(ckpt["state_dict"], ckpt.get("names"), family)
        if (model.scale, model.task) != (ckpt.get("scale"), ckpt.get("task")):
            header = family.tag(ckpt.get("scale"), ckpt.get("task"))
            raise CheckpointError(f"{origin}: header says {header} but tensors are "
                                  f"{family.tag(model.scale, model.task)}")
        model.meta = dict(ckpt.get("meta", {}))
        return model
    for key in ("ema", "model", "state_dict"):  # ultralytics-style dict holding a state dict
        inner = ckpt.get(key)
        if isinstance(inner, torch.nn.Module):  # a model object loaded in this process
            return model_from_state_dict(inner.float().state_dict(), getattr(inner, "names", None))
        if isinstance(inner, dict) and family_matching(inner) is not None:
            return model_from_state_dict(inner, ckpt.get("names"))
    if family_matching(ckpt) is not None:
        return model_from_state_dict(ckpt, None)
    raise CheckpointError(f"{origin}: not a {' or '.join(f.name for f in families())} checkpoint "
                          f"(registered model families: {family_names()}; top-level keys "
                          f"{list(ckpt)[:6]})")


def load_model(source: str | os.PathLike | dict | torch.nn.Module | None = None, device: str | torch.device = "cpu",
               fused: bool = False, eval_mode: bool = True) -> nn.Module:
    """Load a model of a registered family from a path, a state dict / checkpoint dict, a module
    whose keys a family recognises (an ultralytics model object, or our own), or ``None`` (the
    embedded demo YOLO11 weights).
    Returns a new model on ``device``, in eval mode unless ``eval_mode=False``, BN-folded if
    ``fused``."""
    if source is None:
        if not DEFAULT_WEIGHTS.is_file():
            raise FileNotFoundError(
                f"no embedded default weights at {DEFAULT_WEIGHTS} (they are produced by the "
                "training step); pass a checkpoint path, or build_yolo11() for random weights")
        source = DEFAULT_WEIGHTS
    named = named_weights_for(source)
    if named is not None and not Path(source).exists():  # a file of that name would win
        model = named.load()
    elif isinstance(source, torch.nn.Module):  # e.g. an ultralytics DetectionModel object
        model = model_from_state_dict(source.float().state_dict(), getattr(source, "names", None))
    elif isinstance(source, dict):
        model = model_from_object(source, "state dict")
    else:
        path = Path(source)
        if not path.is_file():
            from .families import named_weights

            known = ", ".join(w.name for w in named_weights()) or "none"
            raise FileNotFoundError(f"weights file not found: {path} (named weights: {known})")
        own_format = family_for_file(path)
        if own_format is not None:
            model = own_format.load_file(path)
        else:
            model = _load_torch_file(path)
    model = model.to(device)
    if eval_mode:
        model.eval()
    if fused:
        family_of(model).fuse(model)
    return model


def _load_torch_file(path: Path) -> nn.Module:
    """Our checkpoint or an ultralytics file (any accepted layout) at ``path``."""
    try:  # weights_only: never run code from a file; tensors and plain containers only
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, not a torch file at all, or a pickled model object
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"cannot read {path} as a torch checkpoint: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        return _model_from_ultralytics_file(path)
    return model_from_object(ckpt, str(path))
