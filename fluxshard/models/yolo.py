"""YOLO11 detect / segment: one config for every scale, built the way ultralytics builds it.

The config mirrors ultralytics ``yolo11.yaml`` / ``yolo11-seg.yaml``; :func:`parse_model` applies
the same width/depth rules, so parameter counts and state-dict keys match ultralytics exactly
(``model.0.conv.weight`` ... ``model.23.dfl.conv.weight``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .families import CheckpointError, ModelFamily, register_family, run_layers
from .modules import (SPPF, C2PSA, C3k2, Concat, Conv, Detect, Segment)

TASKS = ("detect", "segment")

# scale -> (depth multiple, width multiple, max channels), as in ultralytics yolo11.yaml.
SCALES: dict[str, tuple[float, float, int]] = {
    "n": (0.50, 0.25, 1024),
    "s": (0.50, 0.50, 1024),
    "m": (0.50, 1.00, 512),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.50, 512),
}

# [from, repeats, module, args] rows, verbatim from yolo11.yaml.
BACKBONE = [
    [-1, 1, "Conv", [64, 3, 2]],  # 0-P1/2
    [-1, 1, "Conv", [128, 3, 2]],  # 1-P2/4
    [-1, 2, "C3k2", [256, False, 0.25]],
    [-1, 1, "Conv", [256, 3, 2]],  # 3-P3/8
    [-1, 2, "C3k2", [512, False, 0.25]],
    [-1, 1, "Conv", [512, 3, 2]],  # 5-P4/16
    [-1, 2, "C3k2", [512, True]],
    [-1, 1, "Conv", [1024, 3, 2]],  # 7-P5/32
    [-1, 2, "C3k2", [1024, True]],
    [-1, 1, "SPPF", [1024, 5]],  # 9
    [-1, 2, "C2PSA", [1024]],  # 10
]
HEAD = [
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 6], 1, "Concat", [1]],  # cat backbone P4
    [-1, 2, "C3k2", [512, False]],  # 13
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]],  # cat backbone P3
    [-1, 2, "C3k2", [256, False]],  # 16 (P3/8-small)
    [-1, 1, "Conv", [256, 3, 2]],
    [[-1, 13], 1, "Concat", [1]],  # cat head P4
    [-1, 2, "C3k2", [512, False]],  # 19 (P4/16-medium)
    [-1, 1, "Conv", [512, 3, 2]],
    [[-1, 10], 1, "Concat", [1]],  # cat head P5
    [-1, 2, "C3k2", [1024, True]],  # 22 (P5/32-large)
]
DETECT_ROW = [[16, 19, 22], 1, "Detect", ["nc"]]
SEGMENT_ROW = [[16, 19, 22], 1, "Segment", ["nc", 32, 256]]  # 32 masks, 256 proto channels

MODULES = {"Conv": Conv, "C3k2": C3k2, "SPPF": SPPF, "C2PSA": C2PSA, "Concat": Concat,
           "nn.Upsample": nn.Upsample, "Detect": Detect, "Segment": Segment}
STRIDE_CHANGERS = {"Conv"}  # the only rows with stride args (args[2]) in this config
OUTPUT_STRIDES = (8.0, 16.0, 32.0)


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def yolo11_config(scale: str = "n", task: str = "detect", num_classes: int = 80) -> dict:
    """The yaml-like config dict (what ultralytics keeps in ``model.yaml``)."""
    if scale not in SCALES:
        raise ValueError(f"unknown YOLO11 scale {scale!r}; expected one of {list(SCALES)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return {
        "nc": num_classes,
        "scale": scale,
        "task": task,
        "scales": {k: list(v) for k, v in SCALES.items()},
        "backbone": copy.deepcopy(BACKBONE),
        "head": copy.deepcopy(HEAD) + [copy.deepcopy(DETECT_ROW if task == "detect" else SEGMENT_ROW)],
        "ch": 3,
    }


def parse_model(cfg: dict, ch: int = 3) -> tuple[nn.Sequential, list[int]]:
    """Build the layer list from ``cfg`` (ultralytics ``parse_model`` rules for these modules).

    Returns (layers, save): each layer carries ``.i``, ``.f``, ``.type`` and ``.np``; ``save``
    lists the indices whose outputs a later layer reads.
    """
    depth, width, max_channels = cfg["scales"][cfg["scale"]]
    nc = cfg["nc"]
    chs = [ch]
    layers, save = [], []
    for i, (f, n, name, args) in enumerate(cfg["backbone"] + cfg["head"]):
        m = MODULES[name]
        args = [nc if a == "nc" else a for a in args]
        n = max(round(n * depth), 1) if n > 1 else n
        if m in (Conv, C3k2, SPPF, C2PSA):
            c1, c2 = chs[f], args[0]
            if c2 != nc:
                c2 = make_divisible(min(c2, max_channels) * width, 8)
            args = [c1, c2, *args[1:]]
            if m in (C3k2, C2PSA):
                args.insert(2, n)  # repeats are the block's own argument
                n = 1
            if m is C3k2 and cfg["scale"] in "mlx":
                args[3] = True  # c3k: C3k inner blocks for the larger scales
        elif m is Concat:
            c2 = sum(chs[x] for x in f)
        elif m in (Detect, Segment):
            if m is Segment:
                args[2] = make_divisible(min(args[2], max_channels) * width, 8)
            args = [*args, [chs[x] for x in f]]
            c2 = None
        else:
            c2 = chs[f]
        if n != 1:
            raise ValueError(f"row {i}: repeats not supported for {name}")
        module = m(*args)
        module.i, module.f, module.type = i, f, name
        module.np = sum(p.numel() for p in module.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        if i == 0:
            chs = []
        chs.append(c2)
    return nn.Sequential(*layers), sorted(set(save))


class YOLO11(nn.Module):
    """YOLO11 detect or segment model.

    ``model`` is an ``nn.Sequential`` walked by :meth:`forward` (ultralytics ``_predict_once``):
    a layer with ``f == -1`` reads the previous output, otherwise ``y[f]`` (or a list of those).
    """

    def __init__(self, scale: str = "n", task: str = "detect", num_classes: int = 80,
                 names: dict[int, str] | None = None):
        super().__init__()
        self.yaml = yolo11_config(scale, task, num_classes)
        self.scale, self.task, self.nc = scale, task, num_classes
        self.model, self.save = parse_model(self.yaml, ch=self.yaml["ch"])
        if names is None:
            names = {i: f"class{i}" for i in range(num_classes)}
        if len(names) != num_classes:
            raise ValueError(f"names has {len(names)} entries but num_classes is {num_classes}")
        self.names = dict(names)
        head = self.model[-1]
        head.stride.copy_(torch.tensor(OUTPUT_STRIDES))
        self.register_buffer("stride", torch.tensor(OUTPUT_STRIDES), persistent=False)
        head.bias_init()

    @property
    def head(self) -> Detect:
        return self.model[-1]

    def forward(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"YOLO11 expects (B, 3, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"input H and W must be multiples of 32 (use preprocess()), got "
                             f"{tuple(x.shape[2:])}")
        return run_layers(self, x)

    def fuse(self) -> "YOLO11":
        """Fold BatchNorm into the convolutions in place (see :func:`fuse`)."""
        return fuse(self)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, task={self.task!r}, nc={self.nc}"


def build_yolo11(scale: str = "n", task: str = "detect", num_classes: int = 80,
                 names: dict[int, str] | None = None) -> YOLO11:
    """A freshly initialised YOLO11 (ultralytics init: BN eps 1e-3, prior biases)."""
    return YOLO11(scale, task, num_classes, names)


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d computing bn(conv(x)) in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      device=conv.weight.device, dtype=conv.weight.dtype).requires_grad_(False)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return fused


@torch.no_grad()
def fuse_batchnorms(model: nn.Module, conv_class: type[nn.Module]) -> nn.Module:
    """Fold the BatchNorm (``bn``) of every ``conv_class`` layer into its ``conv``, in place
    (inference only): what every family's ``fuse`` does with its own conv block."""
    for m in model.modules():
        if isinstance(m, conv_class) and hasattr(m, "bn"):
            m.conv = fuse_conv_bn(m.conv, m.bn)
            del m.bn
    return model


def fuse(model: YOLO11) -> YOLO11:
    """Fold every Conv's BatchNorm into its convolution, in place (inference only)."""
    return fuse_batchnorms(model, Conv)


def is_fused(model: nn.Module) -> bool:
    return not any(isinstance(m, Conv) and hasattr(m, "bn") for m in model.modules())


@dataclass(frozen=True)
class LayerSpec:
    """One row of the layer graph, for executors that walk ``model.model``."""

    i: int
    f: int | list[int]
    type: str
    out_shape: tuple  # (C, H, W) of the output; the head's is the eval output's shape(s)
    stride: int | None  # input pixels per output position; None for the head
    params: int


@torch.no_grad()
def describe_layers(model: YOLO11, imgsz: tuple[int, int] = (384, 640)) -> list[LayerSpec]:
    """Output shape and cumulative stride of every layer for an ``imgsz`` input (runs one
    eval forward on zeros; the model's mode is restored)."""
    shapes: dict[int, object] = {}

    def shape_of(out):
        if isinstance(out, torch.Tensor):
            return tuple(out.shape[1:])
        return tuple(shape_of(o) for o in out)

    hooks = [m.register_forward_hook(lambda mod, _in, out: shapes.__setitem__(mod.i, shape_of(out)))
             for m in model.model]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        model(torch.zeros(1, 3, *imgsz, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    specs = []
    for m in model.model:
        out = shapes[m.i]
        head = isinstance(m, Detect)
        stride = None if head else imgsz[0] // out[1]
        specs.append(LayerSpec(m.i, m.f, m.type, out, stride, m.np))
    return specs


def yolo11_architecture(sd) -> tuple[str, str, int]:
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


FAMILY = register_family(ModelFamily(
    name="YOLO11", checkpoint_format="fluxshard-yolo11", model_class=YOLO11, build=build_yolo11,
    # ultralytics key names, with YOLO11's head at layer 23 (other families share "model.N.")
    matches_state_dict=lambda sd: "model.0.conv.weight" in sd and "model.23.cv3.0.2.weight" in sd,
    infer_architecture=yolo11_architecture, fuse=fuse,
    # saved after BN folding (fuse(), or ultralytics YOLO(...).fuse()): biases, no BatchNorm
    is_fused_state_dict=lambda sd: "model.0.bn.weight" not in sd and "model.0.conv.bias" in sd))
