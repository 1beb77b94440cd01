"""YOLO11 building blocks, written to match ultralytics module for module.

Attribute names (``cv1``, ``m``, ``bn`` ...) follow ultralytics exactly, so a state dict trained
with ultralytics loads without renaming. Every convolution that carries a BatchNorm is an explicit
:class:`Conv` (conv -> bn -> act) with no hidden state: the sparse executor walks these modules
and re-implements each block type with masked convolutions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# ultralytics sets these on every BatchNorm2d (utils.torch_utils.initialize_weights); pretrained
# weights were trained with eps=1e-3, so using torch's default 1e-5 would shift every activation.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'same' padding for an odd kernel ``k`` with dilation ``d``."""
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU. After :func:`fuse_conv_bn`, ``bn`` is gone and
    ``conv`` carries a bias; ``forward`` then skips the norm."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1, d: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        # Not in-place: executors apply ``act`` to tensors they still hold (caches, gathered views).
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "bn"):
            return self.forward_fuse(x)
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class DWConv(Conv):
    """Depth-wise convolution (groups = gcd(c1, c2))."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, act: bool = True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1,
                 k: tuple[int, int] = (3, 3), e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with 2 convolutions: split, run n blocks on one half, concat every output."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1,
                 e: float = 0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0)
                               for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(1, 3), e=1.0)
                                 for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k(C3):
    """C3 with a configurable kernel in its bottlenecks (3x3 in YOLO11)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5, k: int = 3):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(k, k), e=1.0)
                                 for _ in range(n)))


class C3k2(C2f):
    """C2f whose inner blocks are C3k (c3k=True, scales m/l/x and deep layers) or Bottlenecks."""

    def __init__(self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5,
                 g: int = 1, shortcut: bool = True):
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut, g) if c3k else Bottleneck(self.c, self.c, shortcut, g)
            for _ in range(n))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained k x k max-pools, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Attention(nn.Module):
    """Multi-head self-attention over all positions, plus a depth-wise 3x3 positional term."""

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be a positive multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        h = dim + self.key_dim * num_heads * 2
        self.qkv = Conv(dim, h, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, 1, g=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, self.num_heads, self.key_dim * 2 + self.head_dim, N).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.proj(x)


class PSABlock(nn.Module):
    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4, shortcut: bool = True):
        super().__init__()
        self.attn = Attention(c, attn_ratio=attn_ratio, num_heads=num_heads)
        self.ffn = nn.Sequential(Conv(c, c * 2, 1), Conv(c * 2, c, 1, act=False))
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x) if self.add else self.attn(x)
        return x + self.ffn(x) if self.add else self.ffn(x)


class C2PSA(nn.Module):
    """Split channels; run position-sensitive attention blocks on one half; merge."""

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5):
        super().__init__()
        if c1 != c2:
            raise ValueError(f"C2PSA needs c1 == c2, got {c1} and {c2}")
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv(2 * self.c, c1, 1)
        self.m = nn.Sequential(*(PSABlock(self.c, attn_ratio=0.5, num_heads=self.c // 64)
                                 for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        return self.cv2(torch.cat((a, self.m(b)), 1))


class DFL(nn.Module):
    """Distribution focal loss integral: expected value of a softmax over ``c1`` bins (fixed)."""

    def __init__(self, c1: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Proto(nn.Module):
    """Mask prototypes at stride 4 (one 2x transposed-conv upsample of the P3 features)."""

    def __init__(self, c1: int, c_: int = 256, c2: int = 32):
        super().__init__()
        self.cv1 = Conv(c1, c_, k=3)
        self.upsample = nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True)
        self.cv2 = Conv(c_, c_, k=3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


def make_anchors(shapes: list[tuple[int, int]], strides: list[float], dtype: torch.dtype,
                 device: torch.device, offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres (A, 2) in grid units and their strides (A, 1), levels concatenated."""
    points, stride_col = [], []
    for (h, w), s in zip(shapes, strides):
        sx = torch.arange(w, device=device, dtype=dtype) + offset
        sy = torch.arange(h, device=device, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_col.append(torch.full((h * w, 1), float(s), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_col)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """(left, top, right, bottom) distances -> (cx, cy, w, h)."""
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)


class Detect(nn.Module):
    """YOLO11 detection head: per level a box branch (cv2, 4*reg_max DFL bins) and a class branch
    (cv3, depth-wise convs as in YOLO11). Training returns raw maps; eval returns decoded
    (B, 4 + nc, A) with xywh in input pixels and sigmoid class scores."""

    reg_max = 16

    def __init__(self, nc: int = 80, ch: tuple[int, ...] = ()):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.no = nc + self.reg_max * 4
        # Filled in by YOLO11 from the layer graph; a buffer so .to(device) moves it.
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        c2 = max(16, ch[0] // 4, self.reg_max * 4)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
            for x in ch)
        self.cv3 = nn.ModuleList(
            nn.Sequential(nn.Sequential(DWConv(x, x, 3), Conv(x, c3, 1)),
                          nn.Sequential(DWConv(c3, c3, 3), Conv(c3, c3, 1)),
                          nn.Conv2d(c3, nc, 1))
            for x in ch)
        self.dfl = DFL(self.reg_max)
        # Anchor grids depend only on the input shape: cached per (shapes, dtype, device). This is
        # a pure memo (recomputable from the input), not stream state.
        self._anchor_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    anchors_per_cell = 1  # anchor-free: one box per cell and level

    @property
    def strides(self) -> tuple[int, ...]:
        """Input pixels per cell of each level, in the order ``head_maps`` returns them."""
        return tuple(int(s) for s in self.stride.tolist())

    def head_maps(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(self.nl)]

    def relative(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw maps (B, 4*reg_max + nc, h, w) -> per cell, relative to the cell: (B, 4 + nc, h, w)
        holding the box centre's offset from the cell's centre and the box size (input
        pixels), then the class scores. What the tile executor caches: a cell's values stay
        right wherever the cell is carried (the head interface, fluxshard/models/families.py)."""
        out = []
        for m, s in zip(maps, self.strides):
            b, _, h, w = m.shape
            box, cls = m.reshape(b, self.no, h * w).split((self.reg_max * 4, self.nc), 1)
            lt, rb = self.dfl(box).chunk(2, 1)
            rel = torch.cat(((rb - lt) * (s / 2), (lt + rb) * s, cls.sigmoid()), 1)
            out.append(rel.reshape(b, 4 + self.nc, h, w))
        return out

    def forward(self, x: list[torch.Tensor]):
        maps = self.head_maps(x)
        return maps if self.training else self.decode(maps)

    def anchors_for(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        shapes = [tuple(m.shape[2:]) for m in maps]
        key = (tuple(shapes), maps[0].dtype, maps[0].device)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return make_anchors(shapes, self.stride.tolist(), maps[0].dtype, maps[0].device)
        if key not in self._anchor_cache:
            if len(self._anchor_cache) > 16:  # many input sizes: keep the memo bounded
                self._anchor_cache.clear()
            self._anchor_cache[key] = make_anchors(shapes, self.stride.tolist(),
                                                   maps[0].dtype, maps[0].device)
        return self._anchor_cache[key]

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        b = maps[0].shape[0]
        x_cat = torch.cat([m.reshape(b, self.no, -1) for m in maps], 2)
        anchors, strides = self.anchors_for(maps)
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), anchors.t().unsqueeze(0), dim=1) * strides.t()
        return torch.cat((dbox, cls.sigmoid()), 1)

    def bias_init(self) -> None:
        """Prior biases (ultralytics Detect.bias_init): box logits 1.0; class logits so that about
        5 objects per 640x640 image are expected per class at each level."""
        for a, b, s in zip(self.cv2, self.cv3, self.stride.tolist()):
            a[-1].bias.data[:] = 1.0
            b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)


class Segment(Detect):
    """Detect plus 32 mask coefficients per anchor (cv4) and prototypes from P3 (proto)."""

    def __init__(self, nc: int = 80, nm: int = 32, npr: int = 256, ch: tuple[int, ...] = ()):
        super().__init__(nc, ch)
        self.nm = nm
        self.npr = npr
        self.proto = Proto(ch[0], npr, nm)
        c4 = max(ch[0] // 4, nm)
        self.cv4 = nn.ModuleList(
            nn.Sequential(Conv(x, c4, 3), Conv(c4, c4, 3), nn.Conv2d(c4, nm, 1)) for x in ch)

    proto_stride = 4  # input pixels per prototype cell (one 2x upsample of the P3 features)

    @property
    def map_strides(self) -> tuple[int, ...]:
        """Input pixels per cell of every map ``head_maps`` returns: the levels, then the
        prototypes."""
        return (*self.strides, self.proto_stride)

    def head_maps(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the tile executor carries: per level the detect maps with the level's mask
        coefficients appended (B, no + nm, h, w), then the prototypes (B, nm, H/4, W/4), a
        map like the levels, at stride 4."""
        levels = [torch.cat((m, self.cv4[i](x[i])), 1)
                  for i, m in enumerate(Detect.head_maps(self, x))]
        return levels + [self.proto(x[0])]

    def relative(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`head_maps`' maps per cell: the levels as ``Detect.relative`` with the mask
        coefficients after the scores (B, 4 + nc + nm, h, w), as the eval output orders them
        (a coefficient belongs to its cell wherever the cell is carried); the prototypes as
        they are."""
        levels = maps[:self.nl]
        detect = Detect.relative(self, [m[:, :self.no] for m in levels])
        return [torch.cat((rel, m[:, self.no:]), 1) for rel, m in zip(detect, levels)] \
            + list(maps[self.nl:])

    def forward(self, x: list[torch.Tensor]):
        p = self.proto(x[0])
        bs = p.shape[0]
        mc = torch.cat([self.cv4[i](x[i]).reshape(bs, self.nm, -1) for i in range(self.nl)], 2)
        maps = Detect.head_maps(self, x)
        if self.training:
            return maps, mc, p
        return torch.cat([self.decode(maps), mc], 1), p
