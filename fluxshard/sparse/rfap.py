"""RFAP planner (v1 section IV-B): one pass over the input-level motion field gives, for every
feature grid the model uses (cumulative stride s), the MV-gather index and the positions that
cannot be reused whatever their inputs (Cond. 2 fails, or the source lies outside the map).

Cond. 1 (all vectors inside a layer's receptive field equal) depends on the layer's kernel and is
evaluated per layer from :attr:`GridPlan.vectors` by :func:`fluxshard.sparse.ops.window_uniform`.

The plan lives on the device of the maps it indexes (``device``; None: torch's default device):
the numpy field is copied there once and every index and mask is derived on it.
"""

from __future__ import annotations

import numpy as np
import torch

from fluxshard.motion.field import MV_BLOCK, round_half_away


class GridPlan:
    """One feature grid (cumulative stride ``stride``) of a frame's plan.

    The gather is kept sparse: only ``moved`` positions (flat, coherent, displaced by a nonzero
    grid step) read from elsewhere (``source``); every other valid position reads itself, so an
    in-place gather costs the moving content, not the map (fluxshard.sparse.ops.mv_gather_)."""

    def __init__(self, stride: int, height: int, width: int, moved: torch.Tensor | None,
                 source: torch.Tensor | None, invalid: torch.Tensor | None, vectors):
        self.stride, self.height, self.width = stride, height, width
        self.moved = moved  # (M,) flat positions that read from elsewhere; None = zero motion
        self.source = source  # (M,) their flat source positions
        self.invalid = invalid  # (h, w) bool: must be recomputed; None = zero motion
        self._vectors = vectors

    @property
    def static(self) -> bool:
        return self.moved is None

    @property
    def vectors(self) -> torch.Tensor:
        """(2, h, w) integer pixel displacement (dx, dy) sampled on this grid (built on demand:
        only RFAP Cond. 1 reads it)."""
        if callable(self._vectors):
            self._vectors = self._vectors()
        return self._vectors

    @property
    def index(self) -> torch.Tensor | None:
        """The spec's dense MVGather index (flat source of every position; None = identity)."""
        if self.moved is None:
            return None
        index = torch.arange(self.height * self.width, device=self.moved.device)
        index[self.moved] = self.source
        return index


class RFAPPlan:
    """Per-frame plan: gather indices and invalid masks for every grid, built lazily and kept."""

    def __init__(self, field: np.ndarray | None, height: int, width: int, *,
                 grid_snap: bool = False, device: torch.device | str | None = None):
        if height % 32 or width % 32:
            raise ValueError(f"model input must be a multiple of 32, got {height}x{width}")
        self.height, self.width = height, width
        # grid_snap relaxes Cond. 2: a cell whose vectors agree reuses its cache at the nearest
        # grid displacement even when that is not d / s exactly (approximate: features land up to
        # s/2 input pixels off). Without it any motion that is not a multiple of the stride
        # recomputes that grid entirely (a 1.5 px/frame pan recomputes every layer past stride 1).
        self.grid_snap = grid_snap
        hb, wb = height // MV_BLOCK, width // MV_BLOCK
        if field is None:
            disp = np.zeros((hb, wb, 2), np.int64)
        else:
            field = np.asarray(field)
            if field.ndim != 3 or field.shape[2] != 2 or field.shape[0] > hb or field.shape[1] > wb:
                raise ValueError(f"motion field of shape {field.shape} does not fit a "
                                 f"{height}x{width} model input (at most ({hb}, {wb}, 2))")
            # The frame was padded bottom/right to a multiple of 32; padding never moves.
            disp = np.zeros((hb, wb, 2), np.int64)
            disp[:field.shape[0], :field.shape[1]] = round_half_away(field)
        self.zero_motion = not disp.any()  # decided on the host: no device sync
        self.disp = torch.as_tensor(np.ascontiguousarray(disp.transpose(2, 0, 1)),
                                    device=device)  # (2, hb, wb)
        self._grids: dict[int, GridPlan] = {}

    def grid(self, stride: int) -> GridPlan:
        plan = self._grids.get(stride)
        if plan is None:
            plan = self._grids[stride] = self._build(stride)
        return plan

    def _build(self, s: int) -> GridPlan:
        h, w = self.height // s, self.width // s
        d = self.disp
        if s <= MV_BLOCK:  # a block covers rep x rep grid positions
            rep = MV_BLOCK // s
            block_vec, block_uniform = d, None
        else:  # a grid cell covers r x r blocks
            rep, r = 1, s // MV_BLOCK
            cells = d.view(2, h, r, w, r)
            block_vec = cells[:, :, 0, :, 0]
            block_uniform = (cells == block_vec[:, :, None, :, None]).all(4).all(2).all(0)

        def expand(t: torch.Tensor) -> torch.Tensor:  # per block -> per grid position
            if rep == 1:
                return t
            *lead, bh, bw = t.shape
            return t[..., :, None, :, None].expand(*lead, bh, rep, bw, rep).reshape(
                *lead, bh * rep, bw * rep)

        # int16 is plenty for pixel displacements and halves Cond. 1's memory traffic
        vectors = lambda: expand(block_vec.to(torch.int16))  # noqa: E731
        if self.zero_motion:
            return GridPlan(s, h, w, None, None, None, vectors)
        if self.grid_snap:
            coherent = torch.ones(block_vec.shape[1:], dtype=torch.bool, device=d.device)
            step = _round_half_away(block_vec.to(torch.float64) / s)
        else:  # Cond. 2: uniform inside the cell and landing on the grid
            coherent = (block_vec % s == 0).all(0)
            step = torch.div(block_vec, s, rounding_mode="floor")
        if block_uniform is not None:
            coherent &= block_uniform
        invalid = expand(~coherent)
        # Only blocks that move and are coherent gather from elsewhere: enumerate their positions.
        by, bx = ((step != 0).any(0) & coherent).nonzero(as_tuple=True)
        offs = torch.arange(rep, device=d.device)
        ys = (by[:, None, None] * rep + offs[None, :, None]).expand(-1, rep, rep).flatten()
        xs = (bx[:, None, None] * rep + offs[None, None, :]).expand(-1, rep, rep).flatten()
        sy = ys + step[1][by, bx].repeat_interleave(rep * rep)
        sx = xs + step[0][by, bx].repeat_interleave(rep * rep)
        outside = (sy < 0) | (sy >= h) | (sx < 0) | (sx >= w)
        if bool(outside.any()):
            invalid = invalid.clone()
            invalid.view(-1)[ys[outside] * w + xs[outside]] = True
        inside = ~outside
        moved = ys[inside] * w + xs[inside]
        source = sy[inside] * w + sx[inside]
        return GridPlan(s, h, w, moved, source, invalid, vectors)


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """fluxshard.motion.field.round_half_away on a tensor, on its device (int64)."""
    return ((values.abs() + 0.5).floor() * values.sign()).to(torch.int64)
