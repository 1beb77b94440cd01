"""Model families: what loading, saving and serving need to know about one kind of model.

A family is one module that builds its models and registers a :class:`ModelFamily` when imported
(``yolo.py`` registers YOLO11; ``fluxshard/models/__init__.py`` imports it). ``load_model`` and
``save_checkpoint`` (``weights.py``) and ``sessions.load_dense_model`` find the family here: by a
checkpoint's ``format`` string, by a state dict's keys, or by a model's class.

What the rest of FluxShard needs from a family's model (an ``nn.Module``):
  * attributes ``scale``, ``task`` ("detect" or "segment"), ``nc`` and ``names`` ({index: name},
    ``nc`` entries): checkpoints store them, the tools print them, a "segment" model's
    sessions return masks;
  * eval ``forward((B, 3, H, W) in [0, 1])`` -> (B, 4 + nc, A): xywh boxes in input pixels, then
    sigmoid class scores; a segment model returns ``(that with nm mask coefficients appended,
    prototypes)``. ``ops.postprocess`` (NMS) and ``export.export_onnx`` rely on this only;
  * ``model.model``: the layers in order, each with ``i`` (index), ``f`` (-1, or the index or
    list of indices of the layers it reads), ``type`` and ``np`` (parameters), and
    ``model.save`` (indices whose outputs later layers read), and ``model.model[0].conv`` (the
    first spatial conv). The sparse executor walks them, and every layer type needs a mask rule
    in ``fluxshard/sparse/rules.py`` (a family using new op types adds rules there: that is the
    "add an op" change);
  * ``model.head`` (the last layer), for the tile executor: ``head_maps(features)`` (raw
    per-level maps, walked to by :func:`run_layers` with ``raw_head``), ``strides`` (one per
    level, in that order), ``anchors_per_cell`` (K), ``no`` (raw channels per map), ``nc``,
    ``relative(maps)`` -> per level (B, K*(4 + nc), h, w): per anchor slot the box centre's
    offset from the cell's centre and the box size (input pixels), then the scores, and
    ``anchors_for(maps)`` -> (cell centres (A, 2) in cells, strides (A, 1)) in the eval
    output's order (level, anchor slot, cell row-major). A segment head (YOLO11's ``Segment``)
    appends each level's mask coefficients to its maps and to ``relative``'s (after the
    scores, as the eval output has them), returns its prototypes after the levels, as they
    are, and names every map's stride in ``map_strides`` (the levels', then the prototypes').
The trainer (``fluxshard/train/``) is YOLO's: its loss reads YOLO11's head outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from torch import nn

# The family of the embedded demo weights, and of the random stand-in when they are missing.
DEFAULT_FAMILY = "YOLO11"


class CheckpointError(ValueError):
    """A weights file or state dict that cannot become a model of a registered family."""


def _unchanged(model: nn.Module) -> nn.Module:
    return model


def _never(_state_dict: Mapping) -> bool:
    return False


def _no_options(_state_dict: Mapping) -> dict:
    return {}


@dataclass(frozen=True)
class ModelFamily:
    """One kind of model. ``build(scale, task, num_classes, names=None)`` makes a freshly
    initialised one; ``matches_state_dict(sd)`` says whether the keys look like this family's;
    ``infer_architecture(sd)`` -> (scale, task, num_classes), raising :class:`CheckpointError`
    when it cannot; ``fuse(model)`` folds BatchNorm in place (inference only) and
    ``is_fused_state_dict(sd)`` says whether ``sd`` was saved after that.
    ``build_options(sd)``: keyword arguments ``build`` needs beyond (scale, task, num_classes) to
    rebuild ``sd``'s architecture (a Darknet state dict carries its cfg). ``file_suffixes`` and
    ``load_file(path)``: the family's own file formats, which ``load_model`` hands to it."""

    name: str  # as users write it ("YOLO11"); lower-cased in architecture tags ("yolo11n-detect")
    checkpoint_format: str  # the ``format`` entry of its checkpoints
    model_class: type[nn.Module]
    build: Callable[..., nn.Module]
    matches_state_dict: Callable[[Mapping], bool]
    infer_architecture: Callable[[Mapping], tuple[str, str, int]]
    fuse: Callable[[nn.Module], nn.Module] = _unchanged
    is_fused_state_dict: Callable[[Mapping], bool] = _never
    checkpoint_version: int = 1
    build_options: Callable[[Mapping], dict] = _no_options
    file_suffixes: tuple[str, ...] = ()
    load_file: Callable[[Path], nn.Module] | None = None

    def tag(self, scale: str, task: str) -> str:
        return f"{self.name.lower()}{scale}-{task}"


_FAMILIES: dict[str, ModelFamily] = {}  # lower-cased name -> family, in registration order


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family``; a second family under the same name or checkpoint format is refused."""
    key = family.name.lower()
    if key in _FAMILIES and _FAMILIES[key] is not family:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    clash = family_for_format(family.checkpoint_format)
    if clash is not None and clash is not family:
        raise ValueError(f"checkpoint format {family.checkpoint_format!r} already belongs to "
                         f"the {clash.name} family")
    _FAMILIES[key] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family (tests that register a toy one clean up with this)."""
    _FAMILIES.pop(name.lower(), None)


def families() -> tuple[ModelFamily, ...]:
    return tuple(_FAMILIES.values())


def family_names() -> str:
    return ", ".join(f.name for f in _FAMILIES.values()) or "none"


def family_named(name: str) -> ModelFamily:
    try:
        return _FAMILIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; registered: {family_names()}") from None


def family_for_format(checkpoint_format) -> ModelFamily | None:
    return next((f for f in _FAMILIES.values() if f.checkpoint_format == checkpoint_format), None)


def family_matching(state_dict: Mapping) -> ModelFamily | None:
    """The first registered family whose keys ``state_dict`` has, else None."""
    return next((f for f in _FAMILIES.values() if f.matches_state_dict(state_dict)), None)


def family_for_state_dict(state_dict: Mapping) -> ModelFamily:
    family = family_matching(state_dict)
    if family is None:
        raise CheckpointError(f"state dict matches no registered model family "
                              f"({family_names()}); keys look like {list(state_dict)[:3]}")
    return family


def family_of(model: nn.Module) -> ModelFamily:
    family = next((f for f in _FAMILIES.values() if isinstance(model, f.model_class)), None)
    if family is None:
        raise TypeError(f"{type(model).__name__} is no model of a registered family "
                        f"({family_names()})")
    return family


def family_for_file(path: Path) -> ModelFamily | None:
    """The family that reads files named like ``path`` in its own format (by suffix)."""
    suffix = Path(path).suffix.lower()
    return next((f for f in _FAMILIES.values() if f.load_file and suffix in f.file_suffixes),
                None)


@dataclass(frozen=True)
class NamedWeights:
    """Pretrained weights users name (``--weights yolov3-tiny``): ``fetch()`` caches the files
    (-> {file name: path}), ``load()`` the model (fetching first when needed)."""

    name: str
    family: str
    description: str
    fetch: Callable[[], Mapping[str, Path]]
    load: Callable[[], nn.Module]
    cached: Callable[[], bool] = lambda: False  # whether fetch() would download nothing


_NAMED: dict[str, NamedWeights] = {}


def register_named_weights(weights: NamedWeights) -> NamedWeights:
    if weights.name in _NAMED and _NAMED[weights.name] is not weights:
        raise ValueError(f"named weights {weights.name!r} are already registered")
    _NAMED[weights.name] = weights
    return weights


def named_weights() -> tuple[NamedWeights, ...]:
    return tuple(_NAMED.values())


def named_weights_for(name) -> NamedWeights | None:
    """The registered weights called ``name`` (a str), else None."""
    return _NAMED.get(name) if isinstance(name, str) else None


def run_layers(model: nn.Module, x, raw_head: bool = False):
    """Walk ``model.model`` as every family's model does (ultralytics' ``_predict_once``): a layer
    with ``f == -1`` reads the previous output, otherwise ``y[f]`` (or a list of those), and only
    the outputs of ``model.save`` are kept. ``raw_head``: the last layer (the head) returns its
    raw per-level maps (``head_maps``) instead of its eval output, as the tile executor's crop
    engines want them."""
    head = model.model[-1]
    y: list = []
    for m in model.model:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = head.head_maps(x) if raw_head and m is head else m(x)
        y.append(x if m.i in model.save else None)
    return x
