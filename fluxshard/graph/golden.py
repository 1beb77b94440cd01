"""Golden cases of the two FluxShard ops, computed by the torch executor (fluxshard.sparse.ops):
every other executor (the ONNX function bodies, the CUDA kernels of plugins_trt/) is checked
against them.

    python3 -m fluxshard.graph.golden DIR     # writes DIR/cases.txt and one folder per case

Each case folder holds ``meta.txt`` ("key value" lines: op, geometry, tolerances) and raw
little-endian tensors: float32 ``*.f32``, int64 ``*.i64``, bool ``*.u8``
(the plugins_trt/ self-test reads them: each plugin's <name>Selftest.cpp).

Conv cases are built so that the changed masks are decided far from any threshold: cached values
differ from the fresh ones by 0.5 (changed) or by at most 0.01 against a threshold of 0.05 (kept),
so every correct float32 executor reproduces the mask exactly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# (in, out, kernel, stride, group): the conv shapes YOLO11 uses, small maps
CONV_GEOMETRIES = [(8, 16, 3, 1, 1), (8, 16, 3, 2, 1), (8, 16, 1, 1, 1), (16, 16, 3, 1, 16)]
ACTIVATIONS = ("silu", "none")
TILES = (0, 4)
THRESHOLDS = (0.0, 0.05)
# float32 sums in another order (im2col matmul, mkldnn, a CUDA loop): ~1e-6 on values of order 1
ATOL = RTOL = 1e-5


@dataclass
class ConvCase:
    conv: torch.nn.Conv2d
    activation: str
    tile: int
    threshold: float
    x: torch.Tensor  # (1, Cin, H, W)
    recompute: torch.Tensor  # (Ho, Wo) bool
    gathered: torch.Tensor  # (1, Cout, Ho, Wo)
    invalid: torch.Tensor  # (Ho, Wo) bool, inside recompute
    y: torch.Tensor  # the torch executor's outputs
    changed: torch.Tensor

    @property
    def geometry(self) -> dict:
        c = self.conv
        return dict(kernel=c.kernel_size[0], stride=c.stride[0], pad=c.padding[0], group=c.groups)


def conv_case(cin: int, cout: int, k: int, s: int, group: int, activation: str, tile: int,
              threshold: float, h: int = 20, w: int = 28) -> ConvCase:
    """Inputs of one MaskedSparseConv and the torch executor's outputs. The map is not a multiple
    of the tile (partial tiles); recompute holds a blob, a stray position and a padded corner."""
    from fluxshard.sparse.ops import (PointConv, TileConv, channels_last, masked_point_conv,
                                      masked_sparse_conv, point_weight)

    gen = torch.Generator().manual_seed(cin * 7 + k * 3 + s + tile)
    torch.manual_seed(cin * 7 + k * 3 + s + tile)
    conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, groups=group).eval()
    act = F.silu if activation == "silu" else (lambda t: t)
    x = torch.randn(1, cin, h, w, generator=gen)
    with torch.no_grad():
        dense = act(conv(x))
    ho, wo = dense.shape[2:]
    recompute = torch.zeros(ho, wo, dtype=torch.bool)
    recompute[1:4, 2:6] = True
    recompute[ho // 2, wo - 3] = True
    recompute[ho - 1, 0] = True
    invalid = recompute & (torch.rand(ho, wo, generator=gen) < 0.3)
    far = torch.rand(ho, wo, generator=gen) < 0.5
    offset = torch.where(far, torch.tensor(0.5), torch.tensor(0.01 if threshold else 0.5))
    gathered = (dense + offset).contiguous()
    with torch.no_grad():
        if tile:
            y, changed, _ = masked_sparse_conv(
                TileConv(conv, (h, w), tile), conv, act, channels_last(x), recompute,
                channels_last(gathered.clone()), threshold, force=invalid)
        else:
            y, changed, _ = masked_point_conv(
                PointConv(k, s, k // 2, (h, w)), conv, point_weight(conv), act, channels_last(x),
                recompute, channels_last(gathered.clone()), threshold, force=invalid)
    return ConvCase(conv, activation, tile, threshold, x, recompute, gathered, invalid,
                    y.contiguous(), changed)


def conv_cases():
    for cin, cout, k, s, group in CONV_GEOMETRIES:
        for activation in ACTIVATIONS:
            for tile in TILES:
                for threshold in THRESHOLDS:
                    name = f"conv_{cin}x{cout}_k{k}s{s}g{group}_{activation}_t{tile}_thr{threshold}"
                    yield name, conv_case(cin, cout, k, s, group, activation, tile, threshold)


def gather_case(stride: int = 8):
    """(cache, index, invalid, gathered) at ``stride`` of a 64x96 input whose field moves one
    block coherently, one by a non-multiple of the stride and one off the map's edge."""
    from fluxshard.sparse.ops import mv_gather
    from fluxshard.sparse.rfap import RFAPPlan

    field = np.zeros((16, 24, 2), np.float32)
    field[2:6, 4:10] = (8, -16)
    field[8:12, 12:16] = (3, 0)
    field[0:4, 20:24] = (40, 0)
    grid = RFAPPlan(field, 64, 96).grid(stride)
    cache = torch.randn(1, 5, grid.height, grid.width,
                        generator=torch.Generator().manual_seed(stride))
    return cache, grid.index, grid.invalid, mv_gather(cache.clone(), grid.index, grid.invalid)


def write(folder: str | Path) -> list[str]:
    """Every case into ``folder``; returns the case names (also in cases.txt)."""
    folder = Path(folder)
    names = []

    def save(case_dir: Path, meta: dict, tensors: dict) -> None:
        case_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / "meta.txt").write_text("".join(f"{k} {v}\n" for k, v in meta.items()))
        for name, t in tensors.items():
            a = t.numpy() if isinstance(t, torch.Tensor) else t
            suffix = {np.dtype(np.float32): "f32", np.dtype(np.int64): "i64",
                      np.dtype(bool): "u8"}[a.dtype]
            np.ascontiguousarray(a).astype({"u8": np.uint8}.get(suffix, a.dtype)).tofile(
                case_dir / f"{name}.{suffix}")

    for stride in (2, 8):
        cache, index, invalid, gathered = gather_case(stride)
        name = f"gather_s{stride}"
        save(folder / name, dict(op="MVGather", planes=cache.shape[0] * cache.shape[1],
                                 positions=cache.shape[2] * cache.shape[3]),
             dict(cache=cache, index=index.to(torch.int64), invalid=invalid, gathered=gathered))
        names.append(name)
    for name, c in conv_cases():
        g = c.geometry
        save(folder / name, dict(op="MaskedSparseConv", cin=c.x.shape[1], hin=c.x.shape[2],
                                 win=c.x.shape[3], cout=c.y.shape[1], hout=c.y.shape[2],
                                 wout=c.y.shape[3], **g, silu=int(c.activation == "silu"),
                                 threshold=c.threshold, tile=c.tile, atol=ATOL, rtol=RTOL),
             dict(x=c.x, recompute=c.recompute, gathered=c.gathered, invalid=c.invalid,
                  W=c.conv.weight.detach(), b=c.conv.bias.detach(), y=c.y, changed=c.changed))
        names.append(name)
    (folder / "cases.txt").write_text("\n".join(names) + "\n")
    return names


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[0], "\nusage: python3 -m fluxshard.graph.golden DIR",
              file=sys.stderr)
        sys.exit(2)
    print(f"{len(write(sys.argv[1]))} golden cases in {sys.argv[1]}")
