"""Torch executor of the two FluxShard ops (specification: fluxshard.sparse.spec), on whatever
device the maps live on: every index table and mask is created on the device of the tensor it
indexes (a CPU table mixed into CUDA maps fails or round-trips through the host).

Layout: every feature map the executor keeps is channels_last (NHWC in memory), so a map is a
(H*W, C) table of rows and every sparse step (MV-gather, gathering input tiles with their halo,
scattering results, pointwise convs on scattered positions) is a row gather or row scatter:
contiguous C-float copies, costing the active positions and never the map.

Tile batching (v2 paper section 4.5): the output map is cut into ``tile x tile`` tiles; every tile
holding a recompute position is gathered from the input together with its halo (flat row indices
precomputed per geometry; border rows read as the conv's zero padding), all such tiles go through
ONE dense conv call as a batch, and the results are scattered back over the gathered cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNELS_LAST = torch.channels_last


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the executor's layout (no copy when it already is)."""
    return t.contiguous(memory_format=CHANNELS_LAST)


def rows(t: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C) rows of an (N, C, H, W) map: a view for channels_last maps, a copy otherwise
    (read only: write through :func:`writable_rows`)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def writable_rows(t: torch.Tensor) -> torch.Tensor:
    """(H*W, C) view of a channels_last (1, C, H, W) map; raises for any other layout."""
    if not t.is_contiguous(memory_format=CHANNELS_LAST):
        raise ValueError("executor maps must be channels_last")
    return t.permute(0, 2, 3, 1).view(-1, t.shape[1])


def mv_gather(cache: torch.Tensor, index: torch.Tensor | None, invalid: torch.Tensor | None
              ) -> torch.Tensor:
    """MVGather, out of place (the spec's form): ``cache`` (1, C, H, W) re-indexed by the flat
    source ``index`` (H*W,), zero where ``invalid``. ``index=None`` means zero motion."""
    if index is None:
        return cache
    c = cache.shape[1]
    out = cache.reshape(c, -1).index_select(1, index).view_as(cache)
    if invalid is not None:
        out.masked_fill_(invalid, 0.0)
    return out


def mv_gather_(cache: torch.Tensor, grid, zero_invalid: bool = True) -> torch.Tensor:
    """MVGather in place on a channels_last cache the caller owns, driven by a
    :class:`fluxshard.sparse.rfap.GridPlan`: only moved rows are copied (read before written), so
    a still scene costs nothing and a moving object costs its area. ``zero_invalid=False`` leaves
    invalid rows stale, for callers that overwrite them anyway (the executor forces them fresh)."""
    if grid.moved is None:
        return cache
    table = writable_rows(cache)
    if grid.moved.numel():
        table.index_copy_(0, grid.moved, table.index_select(0, grid.source))
    if zero_invalid:
        table.index_fill_(0, grid.invalid.flatten().nonzero().squeeze(1), 0.0)
    return cache


def box_any(mask: torch.Tensor, kh: int, kw: int, stride: int) -> torch.Tensor:
    """out[i, j] = any(mask[i*stride : i*stride + kh, j*stride : j*stride + kw]) for every
    window that fits: separable ORs of strided bool views (far cheaper than pooling floats)."""
    h, w = mask.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    span_h, span_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    acc = mask[0:span_h:stride]
    for i in range(1, kh):
        acc = acc | mask[i:i + span_h:stride]
    out = acc[:, 0:span_w:stride]
    for j in range(1, kw):
        out = out | acc[:, j:j + span_w:stride]
    return out


def dilate_mask(mask: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Output positions of a (kernel, stride, padding) window op whose window touches ``mask``:
    the receptive-field bleed of a changed input into the next layer."""
    if kernel == 1 and stride == 1:
        return mask
    if padding:
        mask = F.pad(mask, (padding,) * 4)
    return box_any(mask, kernel, kernel, stride)


def window_uniform(field: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """RFAP Cond. 1: True where every vector inside the (kernel, stride) window is the same.
    ``field`` is (2, H, W) integer displacement at the layer's input grid; the zero padding
    counts as displacement 0, so a window that reaches over the border is uniform only when its
    content does not move (a moving window would see different padding than its cached twin).
    A window is uniform exactly when no two neighbouring vectors inside it differ."""
    if kernel == 1:
        out_h = (field.shape[1] - 1) // stride + 1
        out_w = (field.shape[2] - 1) // stride + 1
        return torch.ones(out_h, out_w, dtype=torch.bool, device=field.device)
    f = F.pad(field, (padding,) * 4) if padding else field
    step_x = (f[0, :, 1:] != f[0, :, :-1]) | (f[1, :, 1:] != f[1, :, :-1])
    step_y = (f[0, 1:] != f[0, :-1]) | (f[1, 1:] != f[1, :-1])
    return ~(box_any(step_x, kernel, kernel - 1, stride) | box_any(step_y, kernel - 1, kernel, stride))


def window_rows(top: torch.Tensor, left: torch.Tensor, size: int, hw: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices of ``size`` x ``size`` windows with top-left corners (top, left) in an
    h x w map, (windows, size * size), clamped into the map, and which of them lie outside it
    (on ``top``'s device)."""
    h, w = hw
    r = torch.arange(size, device=top.device)
    iy = (top[:, None] + r)[:, :, None]
    ix = (left[:, None] + r)[:, None, :]
    outside = (iy < 0) | (iy >= h) | (ix < 0) | (ix >= w)
    flat = iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)
    return flat.flatten(1), outside.flatten(1)


class TileConv:
    """Tile-batched masked sparse conv for one conv geometry and one map size.

    Row indices depend only on the geometry, so an instance is cached per layer and map size:
    for every tile, the flat input rows of its haloed window (clamped, with a mask of the rows
    that fall into the zero padding) and the flat output rows it covers (with a mask for the
    partial tiles at the bottom/right edge). Tables live on ``device`` (default: the conv's).
    """

    def __init__(self, conv: torch.nn.Conv2d, in_hw: tuple[int, int], tile: int,
                 device: torch.device | str | None = None):
        device = conv.weight.device if device is None else torch.device(device)
        self.k = conv.kernel_size[0]
        self.s = conv.stride[0]
        self.p = conv.padding[0]
        self.groups = conv.groups
        h, w = in_hw
        self.out_h = (h + 2 * self.p - self.k) // self.s + 1
        self.out_w = (w + 2 * self.p - self.k) // self.s + 1
        self.tile = t = tile
        self.tiles_y = -(-self.out_h // t)
        self.tiles_x = -(-self.out_w // t)
        self.in_tile = it = (t - 1) * self.s + self.k
        ty = torch.arange(self.tiles_y, device=device).repeat_interleave(self.tiles_x)
        tx = torch.arange(self.tiles_x, device=device).repeat(self.tiles_y)
        # (n_tiles, it * it) input rows of each haloed tile; in_pad: rows in the zero padding
        self.in_rows, self.in_pad = window_rows(ty * t * self.s - self.p,
                                                tx * t * self.s - self.p, it, (h, w))
        self.border = self.in_pad.any(1)  # (n_tiles,)
        self.out_rows, past_edge = window_rows(ty * t, tx * t, t, (self.out_h, self.out_w))
        self.out_fits = ~past_edge  # (n_tiles, t * t): False past the map's bottom/right edge
        self.partial = past_edge.any(1)

    def active_tiles(self, recompute: torch.Tensor) -> torch.Tensor:
        """Flat indices of tiles holding at least one recompute position."""
        t = self.tile
        m = F.pad(recompute, (0, self.tiles_x * t - self.out_w, 0, self.tiles_y * t - self.out_h))
        per_tile = m.view(self.tiles_y, t, self.tiles_x, t).any(3).any(1)
        return per_tile.flatten().nonzero().squeeze(1)

    def gather_inputs(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(A, Cin, in_tile, in_tile) channels_last batch of the active tiles with their halos."""
        c, it = x.shape[1], self.in_tile
        batch = rows(x).index_select(0, self.in_rows[active].flatten())  # (A * it * it, Cin)
        if bool(self.border[active].any()):
            _zero_rows(batch, self.in_pad[active])
        return batch.view(-1, it, it, c).permute(0, 3, 1, 2)


def masked_sparse_conv(plan: TileConv, conv: torch.nn.Conv2d, act, x: torch.Tensor,
                       recompute: torch.Tensor, gathered: torch.Tensor, threshold: float,
                       force: torch.Tensor | None = None, active: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """MaskedSparseConv (see spec). Returns (y, changed, active tile count). ``gathered``
    (channels_last) is written in place and returned as ``y``: pass a tensor nobody else reads
    (the executor passes the layer's own MV-gathered cache, which this output replaces).
    ``force`` (bool, output map; must lie inside ``recompute``): positions that always take the
    fresh value and count as changed (invalid gathers). ``active``: plan.active_tiles(recompute)
    when the caller already has it."""
    if active is None:
        active = plan.active_tiles(recompute)
    n_active = int(active.numel())
    if n_active == 0:
        return gathered, torch.zeros_like(recompute), 0
    batch = plan.gather_inputs(x, active)
    fresh = act(F.conv2d(batch, conv.weight, conv.bias, plan.s, 0, 1, plan.groups))
    fresh = rows(fresh)  # (A * t * t, Cout), tile-major like out_rows
    out = plan.out_rows[active].flatten()
    if bool(plan.partial[active].any()):
        fits = plan.out_fits[active].flatten()
        fresh, out = fresh[fits], out[fits]
    return gathered, _scatter(writable_rows(gathered), out, fresh, threshold,
                              recompute.shape, force), n_active


class PointConv:
    """Per-position masked conv for one window geometry (kernel, stride, padding) and map size:
    the im2col rows of exactly the recompute positions are gathered (k*k input rows each) and
    go through one matmul. No tile or halo waste, so it suits the scattered, small recompute
    sets that truncation leaves; its cost is k*k gathered rows per position. Tap tables live on
    ``device``, the device of the maps the plan will index (None: torch's default device)."""

    def __init__(self, kernel: int, stride: int, padding: int, in_hw: tuple[int, int],
                 device: torch.device | str | None = None):
        h, w = in_hw
        k, s, p = kernel, stride, padding
        self.out_h, self.out_w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        self.taps_per_position = k * k
        if k == 1 and s == 1:  # the position itself: no table needed
            self.taps = self.pad = self.border = None
            return
        oy = torch.arange(self.out_h, device=device).repeat_interleave(self.out_w)
        ox = torch.arange(self.out_w, device=device).repeat(self.out_h)
        # (positions, k * k) input rows under each window; pad: taps in the zero padding
        self.taps, self.pad = window_rows(oy * s - p, ox * s - p, k, (h, w))
        self.border = self.pad.any(1)

    def columns(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(P, k*k, Cin) input rows under the windows of output positions ``index``."""
        table = rows(x)
        if self.taps is None:
            return table.index_select(0, index)[:, None]
        cols = table.index_select(0, self.taps[index].flatten())
        if bool(self.border[index].any()):
            _zero_rows(cols, self.pad[index])
        return cols.view(index.numel(), self.taps_per_position, -1)


def point_weight(conv: torch.nn.Conv2d) -> torch.Tensor:
    """The conv's kernel as the matrix :class:`PointConv` columns multiply: (k*k*Cin, Cout) for a
    dense conv, (k*k, C) for a depth-wise one (tap-major like the columns)."""
    w = conv.weight.detach()
    if conv.groups == 1:
        return w.permute(2, 3, 1, 0).reshape(-1, conv.out_channels).contiguous()
    return w.reshape(conv.out_channels, -1).t().contiguous()


def masked_point_conv(plan: PointConv, conv: torch.nn.Conv2d, weight: torch.Tensor, act,
                      x: torch.Tensor, recompute: torch.Tensor, gathered: torch.Tensor,
                      threshold: float, force: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """MaskedSparseConv computing exactly the recompute positions (see :class:`PointConv`) of a
    dense (groups 1) or depth-wise conv; ``weight`` is :func:`point_weight` of ``conv``. Same
    contract as :func:`masked_sparse_conv`; returns (y, changed, computed positions)."""
    index = recompute.flatten().nonzero().squeeze(1)
    n = int(index.numel())
    if n == 0:
        return gathered, torch.zeros_like(recompute), 0
    cols = plan.columns(x, index)  # (P, k*k, Cin)
    if conv.groups == 1:
        out = cols.view(n, -1)
        fresh = torch.addmm(conv.bias, out, weight) if conv.bias is not None else out @ weight
    else:  # depth-wise: each channel meets its own k*k taps
        fresh = (cols * weight).sum(1)
        if conv.bias is not None:
            fresh += conv.bias
    return gathered, _scatter(writable_rows(gathered), index, act(fresh), threshold,
                              recompute.shape, force), n


def _zero_rows(table: torch.Tensor, pad: torch.Tensor) -> None:
    """Zero the rows of ``table`` whose flag in ``pad`` (any shape, one flag per row) is set:
    they stand for the conv's zero padding."""
    table.index_fill_(0, pad.flatten().nonzero().squeeze(1), 0.0)


def _scatter(table: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor, threshold: float,
             shape: torch.Size, force: torch.Tensor | None) -> torch.Tensor:
    """Write ``fresh`` rows over ``table`` at ``index`` where they differ from the cached row by
    more than ``threshold`` (any channel; threshold 0: any difference, all rows written) or are
    ``force``d. Returns the changed mask of the map."""
    old = table.index_select(0, index)
    changed_rows = (fresh - old).abs().amax(1) > threshold
    if force is not None:
        changed_rows |= force.flatten()[index]
    if threshold > 0:
        fresh = torch.where(changed_rows[:, None], fresh, old)
    table.index_copy_(0, index, fresh)
    changed = torch.zeros(shape.numel(), dtype=torch.bool, device=table.device)
    changed[index] = changed_rows
    return changed.view(shape)
