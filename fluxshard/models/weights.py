"""Saving and loading YOLO11 weights.

Accepted sources for :func:`load_model`:
  * our checkpoint (``save_checkpoint``): {'format': 'fluxshard-yolo11', 'scale', 'task', 'names',
    'state_dict' (fp16), 'meta'};
  * a plain state dict with ultralytics key names (scale, task and class count read from shapes);
  * an ultralytics-style checkpoint dict whose 'model' (or 'ema') entry is such a state dict;
  * an ultralytics ``.pt`` holding a pickled model object: needs ultralytics importable; without it
    a clear error says how to convert it once on a machine that has ultralytics;
  * ``None``: the embedded demo weights ``fluxshard/weights/yolo11n-detect-demo.pt``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from .yolo import SCALES, YOLO11, build_yolo11, fuse

FORMAT = "fluxshard-yolo11"
FORMAT_VERSION = 1
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "yolo11n-detect-demo.pt"

CONVERT_HINT = ("convert it once where ultralytics is installed:\n"
                "    from ultralytics import YOLO\n"
                "    m = YOLO('{path}').model\n"
                "    torch.save({{'model': m.float().state_dict(), 'names': m.names}}, 'sd.pt')\n"
                "(or simply torch.save(YOLO('{path}').model.state_dict(), 'sd.pt')) and load "
                "'sd.pt' instead")


class CheckpointError(ValueError):
    """A weights file or state dict that cannot become a YOLO11."""


def save_checkpoint(model: YOLO11, path: str | os.PathLike, **meta) -> Path:
    """Write ``model`` in our format (fp16 floating tensors; BN must not be fused)."""
    if not isinstance(model, YOLO11):
        raise TypeError(f"save_checkpoint needs a YOLO11, got {type(model).__name__}")
    sd = model.state_dict()
    if "model.0.bn.weight" not in sd:
        raise CheckpointError("save_checkpoint: model is fused (no BatchNorm); save before fuse()")
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().clone()
             for k, v in sd.items()}
    ckpt = {"format": FORMAT, "version": FORMAT_VERSION, "scale": model.scale, "task": model.task,
            "nc": model.nc, "names": dict(model.names), "state_dict": state, "meta": dict(meta)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return path


def infer_architecture(sd: dict[str, torch.Tensor]) -> tuple[str, str, int]:
    """(scale, task, num_classes) of a state dict with ultralytics YOLO11 key names."""
    try:
        stem = sd["model.0.conv.weight"].shape[0]
        nc = sd["model.23.cv3.0.2.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a YOLO11 state dict: missing {e.args[0]!r} (keys look like "
                              f"{list(sd)[:3]})") from None
    task = "segment" if any(k.startswith("model.23.proto.") for k in sd) else "detect"
    widths = {make: int(64 * w) for make, (_, w, _) in SCALES.items()}  # stem = 64 * width
    candidates = [s for s, c in widths.items() if c == stem]
    if len(candidates) > 1:  # m and l share width; l has two blocks per C3k2 where m has one
        candidates = ["l" if "model.2.m.1.cv1.conv.weight" in sd else "m"]
    if not candidates:
        raise CheckpointError(f"stem conv has {stem} channels; YOLO11 scales have "
                              f"{sorted(set(widths.values()))}")
    return candidates[0], task, int(nc)


def model_from_state_dict(sd: dict[str, torch.Tensor], names: dict | list | None = None) -> YOLO11:
    """Build the matching YOLO11 and load ``sd`` strictly (every key and shape must match)."""
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    scale, task, nc = infer_architecture(sd)
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if names is not None and len(names) != nc:
        names = None  # names from some other dataset: fall back to generic ones
    model = build_yolo11(scale, task, nc, names={int(k): str(v) for k, v in names.items()}
                         if names else None)
    if "model.0.bn.weight" not in sd and "model.0.conv.bias" in sd:
        fuse(model)  # a state dict saved after BN folding (e.g. ultralytics YOLO(...).fuse())
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"state dict does not fit yolo11{scale}-{task} (nc={nc}): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model


def _pickles_ultralytics(path: Path) -> bool:
    """Whether a torch zip checkpoint pickles ultralytics classes (read without unpickling)."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            return pkl is not None and b"ultralytics" in zf.read(pkl)
    except (zipfile.BadZipFile, OSError):
        return False


def _load_ultralytics_object(path: Path) -> YOLO11:
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        raise CheckpointError(
            f"{path} is an ultralytics checkpoint holding a pickled model object, which needs the "
            f"ultralytics package to unpickle (not installed here); "
            + CONVERT_HINT.format(path=path)) from None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    obj = ckpt
    if isinstance(ckpt, dict):  # ultralytics keeps the EMA weights (the ones to use) in 'ema'
        obj = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if obj is None or not hasattr(obj, "state_dict"):
        raise CheckpointError(f"{path}: ultralytics checkpoint without a model object")
    return model_from_state_dict(obj.float().state_dict(), getattr(obj, "names", None))


def model_from_object(ckpt, origin: str = "checkpoint") -> YOLO11:
    """A loaded checkpoint object (any accepted dict layout) -> YOLO11."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{origin}: expected a dict, got {type(ckpt).__name__}")
    if ckpt.get("format") == FORMAT:
        if ckpt.get("version", 1) > FORMAT_VERSION:
            raise CheckpointError(f"{origin}: checkpoint version {ckpt['version']} is newer than "
                                  f"this code reads ({FORMAT_VERSION})")
        model = model_from_state_dict(ckpt["state_dict"], ckpt.get("names"))
        if (model.scale, model.task) != (ckpt.get("scale"), ckpt.get("task")):
            raise CheckpointError(f"{origin}: header says yolo11{ckpt.get('scale')}-"
                                  f"{ckpt.get('task')} but tensors are yolo11{model.scale}-{model.task}")
        model.meta = dict(ckpt.get("meta", {}))
        return model
    for key in ("ema", "model", "state_dict"):  # ultralytics-style dict holding a state dict
        inner = ckpt.get(key)
        if isinstance(inner, torch.nn.Module):  # already unpickled (ultralytics importable)
            return model_from_state_dict(inner.float().state_dict(), getattr(inner, "names", None))
        if isinstance(inner, dict) and "model.0.conv.weight" in inner:
            return model_from_state_dict(inner, ckpt.get("names"))
    if "model.0.conv.weight" in ckpt:
        return model_from_state_dict(ckpt, None)
    raise CheckpointError(f"{origin}: not a YOLO11 checkpoint (top-level keys {list(ckpt)[:6]})")


def load_model(source: str | os.PathLike | dict | torch.nn.Module | None = None, device: str | torch.device = "cpu",
               fused: bool = False, eval_mode: bool = True) -> YOLO11:
    """Load a YOLO11 from a path, a state dict / checkpoint dict, a module with ultralytics key
    names (an ultralytics model object, or our own), or ``None`` (the embedded demo weights).
    Returns a new model on ``device``, in eval mode unless ``eval_mode=False``, BN-folded if
    ``fused``."""
    if source is None:
        if not DEFAULT_WEIGHTS.is_file():
            raise FileNotFoundError(
                f"no embedded default weights at {DEFAULT_WEIGHTS} (they are produced by the "
                "training step); pass a checkpoint path, or build_yolo11() for random weights")
        source = DEFAULT_WEIGHTS
    if isinstance(source, torch.nn.Module):  # e.g. an ultralytics DetectionModel object
        model = model_from_state_dict(source.float().state_dict(), getattr(source, "names", None))
    elif isinstance(source, dict):
        model = model_from_object(source, "state dict")
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        try:  # weights_only: never run code from a file; tensors and plain containers only
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt file, foreign pickle, not a torch file at all
            if _pickles_ultralytics(path):
                model = _load_ultralytics_object(path)
            else:
                raise CheckpointError(f"cannot read {path} as a torch checkpoint: "
                                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        else:
            model = model_from_object(ckpt, str(path))
    model = model.to(device)
    if eval_mode:
        model.eval()
    if fused:
        fuse(model)
    return model
