"""Reading an ultralytics ``.pt`` (``yolo11n.pt``, ``yolo11s-seg.pt``, a trained ``best.pt`` or
``last.pt``) as it is, without ultralytics installed and without running code from the file.

An ultralytics checkpoint is a ``torch.save`` dict (``ultralytics.utils.torch_utils.
strip_optimizer`` writes ``date``, ``version``, ``license``, ``docs``, ``epoch``, ``best_fitness``,
``model``, ``ema``, ``updates``, ``optimizer``, ``scaler``, ``train_args``, ``train_metrics``,
``train_results``) whose ``model`` (or ``ema``, while training) is a pickled
``ultralytics.nn.tasks.DetectionModel`` / ``SegmentationModel`` object: a tree of ultralytics and
torch ``nn.Module`` objects. A pickle can call anything it names, so it is read with torch's own
restricted unpickler (``torch.load(weights_only=True)``), to which every class on the allow-list
below is given as an inert stand-in (:class:`PickledObject`: it records its constructor arguments
and state and has no behaviour). A global not on the list is refused, in one line naming it,
before anything is unpickled.

The model's parameters and persistent buffers are then read off the recorded tree under the
ultralytics key names (``model.0.conv.weight`` ...), which is exactly what a family's
``model_from_state_dict`` builds a model from; class names come from the model's ``names``, the
task from its head's class (``Detect`` or ``Segment``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .families import CheckpointError

# module -> the names in it a checkpoint may name (None: any identifier). Each becomes an inert
# record (a PickledObject subclass), never the real class or function.
RECORDED_GLOBALS: dict[str, frozenset[str] | None] = {
    # the model object and its layers, under every module path ultralytics versions used
    "ultralytics.nn.tasks": None,
    "ultralytics.nn.modules": None,
    "ultralytics.nn.modules.block": None,
    "ultralytics.nn.modules.conv": None,
    "ultralytics.nn.modules.head": None,
    "ultralytics.nn.modules.transformer": None,
    "ultralytics.nn.modules.activation": None,
    # training leftovers in unstripped checkpoints (last.pt): args, loss, assigner
    "ultralytics.utils": frozenset({"IterableSimpleNamespace"}),
    "ultralytics.yolo.utils": frozenset({"IterableSimpleNamespace"}),
    "ultralytics.utils.loss": None,
    "ultralytics.yolo.utils.loss": None,
    "ultralytics.utils.tal": None,
    "ultralytics.yolo.utils.tal": None,
    # values in train_args / train_metrics / train_results
    "numpy": frozenset({"dtype", "ndarray"}),
    "numpy.dtypes": None,
    "numpy.core.multiarray": frozenset({"scalar", "_reconstruct"}),
    "numpy._core.multiarray": frozenset({"scalar", "_reconstruct"}),
    "datetime": frozenset({"datetime", "date", "time", "timedelta", "timezone"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                          "PureWindowsPath"}),
    "types": frozenset({"SimpleNamespace"}),
    "argparse": frozenset({"Namespace"}),
    "dill._dill": frozenset({"_load_type"}),
}
# torch's layers and containers (torch.nn.modules.conv.Conv2d, ...container.Sequential ...)
RECORDED_MODULE_PREFIX = "torch.nn.modules."
# Fused models saved by ultralytics pickle ``getattr(layer, "forward_fuse")``: read as an inert
# reference, never looked up.
ATTRIBUTE_GLOBAL = "builtins.getattr"
# Besides these, torch's weights_only defaults apply (tensors, storages, Parameter, dtypes,
# torch.device, torch.Size, collections.OrderedDict, builtins.set ...): see
# torch._weights_only_unpickler._get_allowed_globals.
HEAD_TASKS = {"Detect": "detect", "Segment": "segment"}


class PickledObject:
    """What an allowed class of a checkpoint becomes: its name, the arguments it was built with
    and the state the pickle gave it. No behaviour; subclasses differ in ``pickled_name`` only."""

    pickled_name = ""

    def __new__(cls, *args, **kwargs):
        record = object.__new__(cls)
        record.constructor_args = args
        record.state = None
        return record

    def __init__(self, *args, **kwargs):
        pass  # __new__ recorded them

    def __setstate__(self, state):
        self.state = state

    @property
    def class_name(self) -> str:
        return self.pickled_name.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


class AttributeReference:
    """``getattr(obj, name)`` as a pickle asked for it, not performed."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name


def _inert_getattr(obj, name, *default):
    return AttributeReference(obj, name)


def is_recorded(full_name: str) -> bool:
    """Whether ``full_name`` (``module.name``) is on the allow-list of recorded globals."""
    module, _, name = full_name.rpartition(".")
    if not name.isidentifier():
        return False
    if module.startswith(RECORDED_MODULE_PREFIX) or module + "." == RECORDED_MODULE_PREFIX:
        return True
    if module not in RECORDED_GLOBALS:
        return False
    names = RECORDED_GLOBALS[module]
    return names is None or name in names


def _stand_in(full_name: str) -> type[PickledObject]:
    return type(full_name.rsplit(".", 1)[-1], (PickledObject,),
                {"pickled_name": full_name, "__module__": __name__})


def read_checkpoint(path: str | os.PathLike) -> object:
    """Unpickle the torch zip checkpoint at ``path`` with torch's restricted unpickler, every
    allow-listed global read as an inert stand-in. A global off the list is refused with a
    :class:`CheckpointError` of one line naming it, before anything is unpickled."""
    path = Path(path)
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a torch zip checkpoint, or opcodes a torch.save never writes
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: "
                              f"{_first_line(e)}") from None
    refused = sorted(n for n in named if n != ATTRIBUTE_GLOBAL and not is_recorded(n))
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise CheckpointError(f"{path}: refused: its pickle names {refused[0]}{more}, which is "
                              f"not on the allow-list of ultralytics checkpoint globals (a .pt is "
                              f"a pickle; loading one never runs code from it)")
    stand_ins = [(_stand_in(n), n) for n in named if n != ATTRIBUTE_GLOBAL]
    if ATTRIBUTE_GLOBAL in named:
        stand_ins.append((_inert_getattr, ATTRIBUTE_GLOBAL))
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # what the restricted unpickler refused past the scan, or bad data
        raise CheckpointError(f"cannot read {path} as an ultralytics checkpoint: "
                              f"{type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # torch's weights_only message explains the option first; the cause is on a later line
    cause = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line),
                 None)
    return (cause or (text.splitlines() or [""])[0])[:300]


def model_record(ckpt: object) -> PickledObject | None:
    """The pickled model object of a checkpoint: its ``ema`` (the weights ultralytics uses while
    training), else its ``model``; a checkpoint that is the model object itself; else None (a
    dict of state dicts, which the families read as they are)."""
    if isinstance(ckpt, PickledObject):
        return ckpt
    if isinstance(ckpt, Mapping):
        for key in ("ema", "model"):
            if isinstance(ckpt.get(key), PickledObject):
                return ckpt[key]
    return None


def _attributes(record: PickledObject, origin: str) -> Mapping:
    state = record.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], Mapping):
        state = state[0]  # (dict state, slot state)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{origin}: {record.pickled_name} holds no module state")
    return state


def state_dict_of(record: PickledObject, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a pickled module tree, keyed as ``nn.Module.
    state_dict`` keys them (``model.0.conv.weight`` ...)."""
    out: dict[str, torch.Tensor] = {}

    def walk(node: PickledObject, prefix: str) -> None:
        attrs = _attributes(node, origin)
        skipped = attrs.get("_non_persistent_buffers_set") or set()
        tensors = list((attrs.get("_parameters") or {}).items())
        tensors += [(k, v) for k, v in (attrs.get("_buffers") or {}).items() if k not in skipped]
        for name, value in tensors:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{origin}: {prefix}{name} is a {type(value).__name__}, "
                                      f"not a tensor")
            out[prefix + name] = value.detach()
        for name, child in (attrs.get("_modules") or {}).items():
            if child is None:
                continue
            if not isinstance(child, PickledObject):
                raise CheckpointError(f"{origin}: layer {prefix}{name} is a "
                                      f"{type(child).__name__}, not a module")
            walk(child, f"{prefix}{name}.")

    walk(record, "")
    return out


def head_of(record: PickledObject, origin: str = "checkpoint") -> PickledObject:
    """The last layer of an ultralytics model object (``model.model[-1]``)."""
    layers = (_attributes(record, origin).get("_modules") or {}).get("model")
    children = list((_attributes(layers, origin).get("_modules") or {}).values()) \
        if isinstance(layers, PickledObject) else []
    if not children or not isinstance(children[-1], PickledObject):
        raise CheckpointError(f"{origin}: {record.pickled_name} has no layer list "
                              f"(model.model) to read")
    return children[-1]


def read_model(record: PickledObject, origin: str = "checkpoint"
               ) -> tuple[dict[str, torch.Tensor], dict | list | None, str]:
    """(state dict, class names, task) of a pickled ultralytics model object."""
    head = head_of(record, origin)
    task = HEAD_TASKS.get(head.class_name)
    if task is None:
        raise CheckpointError(f"{origin}: an ultralytics {record.class_name} whose head is "
                              f"{head.class_name}; FluxShard runs detect (Detect) and segment "
                              f"(Segment) models")
    names = _attributes(record, origin).get("names")
    if not isinstance(names, (Mapping, list, tuple)):
        names = None
    return state_dict_of(record, origin), names, task
