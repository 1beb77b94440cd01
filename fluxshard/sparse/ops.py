"""CPU executor of the two FluxShard ops (specification: fluxshard.sparse.spec).

Tile batching (v2 paper section 4.5): the output map is cut into ``tile x tile`` tiles; every tile
holding a recompute position is cut from the zero-padded input together with its halo, all such
tiles go through ONE dense conv call as a batch, and the results are scattered back over the
gathered cache. Gather and scatter are single strided-view copies, never Python loops over tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mv_gather(cache: torch.Tensor, index: torch.Tensor | None, invalid: torch.Tensor | None
              ) -> torch.Tensor:
    """MVGather: ``cache`` (1, C, H, W) re-indexed by the flat source ``index`` (H*W,), zero where
    ``invalid``. ``index=None`` means zero motion (identity, no copy)."""
    if index is None:
        return cache
    c = cache.shape[1]
    out = cache.reshape(c, -1).index_select(1, index).view_as(cache)
    if invalid is not None:
        out.masked_fill_(invalid, 0.0)
    return out


def dilate_mask(mask: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Output positions of a (kernel, stride, padding) window op whose window touches ``mask``:
    the receptive-field bleed of a changed input into the next layer."""
    if kernel == 1 and stride == 1:
        return mask
    m = mask[None, None].to(torch.float32)
    return F.max_pool2d(m, kernel, stride, padding)[0, 0] > 0


def window_uniform(field: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """RFAP Cond. 1: True where every vector inside the (kernel, stride) window is the same.
    ``field`` is (2, H, W) integer displacement at the layer's input grid; the zero padding
    counts as displacement 0, so a window that reaches over the border is uniform only when its
    content does not move (a moving window would see different padding than its cached twin)."""
    if kernel == 1:
        out_h = (field.shape[1] - 1) // stride + 1
        out_w = (field.shape[2] - 1) // stride + 1
        return torch.ones(out_h, out_w, dtype=torch.bool)
    f = F.pad(field[None].to(torch.float32), (padding,) * 4)
    hi = F.max_pool2d(f, kernel, stride)[0]
    lo = -F.max_pool2d(-f, kernel, stride)[0]
    return (hi == lo).all(0)


class TileConv:
    """Tile-batched masked sparse conv for one conv geometry and one map size.

    Index tensors depend only on the geometry, so an instance is cached per layer and map size.
    """

    def __init__(self, conv: torch.nn.Conv2d, in_hw: tuple[int, int], tile: int):
        self.k = conv.kernel_size[0]
        self.s = conv.stride[0]
        self.p = conv.padding[0]
        self.groups = conv.groups
        h, w = in_hw
        self.out_h = (h + 2 * self.p - self.k) // self.s + 1
        self.out_w = (w + 2 * self.p - self.k) // self.s + 1
        self.tile = tile
        self.tiles_y = -(-self.out_h // tile)
        self.tiles_x = -(-self.out_w // tile)
        self.in_tile = (tile - 1) * self.s + self.k
        # Zero padding: the conv's own on top/left, and enough on bottom/right that the last
        # (partial) tile's halo exists.
        need_h = (self.tiles_y * tile - 1) * self.s + self.k
        need_w = (self.tiles_x * tile - 1) * self.s + self.k
        self.pad = (self.p, need_w - w - self.p, self.p, need_h - h - self.p)

    def active_tiles(self, recompute: torch.Tensor) -> torch.Tensor:
        """Flat indices of tiles holding at least one recompute position."""
        t = self.tile
        m = F.pad(recompute, (0, self.tiles_x * t - self.out_w, 0, self.tiles_y * t - self.out_h))
        per_tile = m.view(self.tiles_y, t, self.tiles_x, t).any(3).any(1)
        return per_tile.flatten().nonzero().squeeze(1)

    def gather_inputs(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(A, Cin, in_tile, in_tile) batch of the active tiles with their halos."""
        xp = F.pad(x[0], self.pad)
        step = self.tile * self.s
        windows = xp.unfold(1, self.in_tile, step).unfold(2, self.in_tile, step)
        # Index the strided (C, ty, tx, i, i) view directly: copies only the active tiles
        # (a reshape of the view first would copy every tile with its halo).
        return windows[:, active // self.tiles_x, active % self.tiles_x].transpose(0, 1)

    def padded(self, y: torch.Tensor) -> torch.Tensor:
        t = self.tile
        ph, pw = self.tiles_y * t - self.out_h, self.tiles_x * t - self.out_w
        return F.pad(y, (0, pw, 0, ph)) if ph or pw else y.contiguous()


def masked_sparse_conv(plan: TileConv, conv: torch.nn.Conv2d, act, x: torch.Tensor,
                       recompute: torch.Tensor, gathered: torch.Tensor, threshold: float
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """MaskedSparseConv (see spec). Returns (y, changed, active tile count). ``gathered`` may be
    overwritten: pass a tensor nobody else reads."""
    active = plan.active_tiles(recompute)
    n_active = int(active.numel())
    if n_active == 0:
        return gathered, torch.zeros_like(recompute), 0
    batch = plan.gather_inputs(x, active).contiguous()
    fresh = act(F.conv2d(batch, conv.weight, conv.bias, plan.s, 0, 1, plan.groups))
    t = plan.tile
    ty, tx = active // plan.tiles_x, active % plan.tiles_x
    # Written in place: ``gathered`` is either a fresh MV-gather or the layer's old cache, which
    # this call's output replaces (the executor resets the stream if a frame fails midway).
    y = plan.padded(gathered)
    view = y[0].view(y.shape[1], plan.tiles_y, t, plan.tiles_x, t).permute(1, 3, 0, 2, 4)
    old = view[ty, tx]  # (A, C, t, t) copy of the gathered values
    diff = (fresh - old).abs().amax(1)  # (A, t, t)
    changed_tiles = diff > threshold
    if threshold > 0:
        fresh = torch.where(changed_tiles[:, None], fresh, old)
    view[ty, tx] = fresh
    changed = torch.zeros(plan.tiles_y * plan.tiles_x, t, t, dtype=torch.bool)
    changed[active] = changed_tiles
    changed = changed.view(plan.tiles_y, plan.tiles_x, t, t).permute(0, 2, 1, 3).reshape(
        plan.tiles_y * t, plan.tiles_x * t)
    if y.shape[2] != plan.out_h or y.shape[3] != plan.out_w:
        y = y[:, :, :plan.out_h, :plan.out_w]
        changed = changed[:plan.out_h, :plan.out_w]
    return y, changed, n_active


def masked_pointwise_conv(conv: torch.nn.Conv2d, act, x: torch.Tensor, recompute: torch.Tensor,
                          gathered: torch.Tensor, threshold: float
                          ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """MaskedSparseConv for a 1x1, stride-1, ungrouped conv: no halo, so the recompute positions
    themselves are gathered (not tiles) and go through one matmul; scattered changes (what
    truncation leaves) cost exactly their count. Same contract as :func:`masked_sparse_conv`."""
    index = recompute.flatten().nonzero().squeeze(1)
    n = int(index.numel())
    if n == 0:
        return gathered, torch.zeros_like(recompute), 0
    cout = conv.out_channels
    picked = x[0].reshape(x.shape[1], -1).index_select(1, index)  # (Cin, N)
    fresh = torch.addmm(conv.bias[:, None], conv.weight.view(cout, -1), picked) \
        if conv.bias is not None else conv.weight.view(cout, -1) @ picked
    fresh = act(fresh)
    y = gathered if gathered.is_contiguous() else gathered.contiguous()
    flat = y[0].view(cout, -1)
    old = flat.index_select(1, index)
    changed_points = (fresh - old).abs().amax(0) > threshold
    if threshold > 0:
        fresh = torch.where(changed_points, fresh, old)
    flat.index_copy_(1, index, fresh)
    changed = torch.zeros(recompute.numel(), dtype=torch.bool)
    changed[index] = changed_points
    return y, changed.view_as(recompute), n
