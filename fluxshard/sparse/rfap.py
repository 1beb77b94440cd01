"""RFAP planner (v1 section IV-B): one pass over the input-level motion field gives, for every
feature grid the model uses (cumulative stride s), the MV-gather index and the positions that
cannot be reused whatever their inputs (Cond. 2 fails, or the source lies outside the map).

Cond. 1 (all vectors inside a layer's receptive field equal) depends on the layer's kernel and is
evaluated per layer from :attr:`GridPlan.vectors` by :func:`fluxshard.sparse.ops.window_uniform`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fluxshard.motion.field import MV_BLOCK, round_half_away


@dataclass
class GridPlan:
    stride: int
    height: int
    width: int
    index: torch.Tensor | None  # flat gather source per position; None = zero motion everywhere
    invalid: torch.Tensor | None  # (h, w) bool: must be recomputed; None = nothing invalid
    vectors: torch.Tensor  # (2, h, w) integer pixel displacement (dx, dy) sampled on this grid

    @property
    def static(self) -> bool:
        return self.index is None


class RFAPPlan:
    """Per-frame plan: gather indices and invalid masks for every grid, built lazily and kept."""

    def __init__(self, field: np.ndarray | None, height: int, width: int, *,
                 grid_snap: bool = False):
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
        self.disp = torch.from_numpy(np.ascontiguousarray(disp.transpose(2, 0, 1)))  # (2, hb, wb)
        self.zero_motion = not bool(self.disp.any())
        self._grids: dict[int, GridPlan] = {}

    def grid(self, stride: int) -> GridPlan:
        plan = self._grids.get(stride)
        if plan is None:
            plan = self._grids[stride] = self._build(stride)
        return plan

    def _build(self, s: int) -> GridPlan:
        h, w = self.height // s, self.width // s
        d = self.disp
        if s <= MV_BLOCK:
            rep = MV_BLOCK // s
            vec = d.repeat_interleave(rep, 1).repeat_interleave(rep, 2)
            uniform = torch.ones(h, w, dtype=torch.bool)
        else:
            r = s // MV_BLOCK  # blocks per grid cell edge
            cells = d.view(2, h, r, w, r)
            vec = cells[:, :, 0, :, 0]
            uniform = (cells == vec[:, :, None, :, None]).all(4).all(2).all(0)
        if self.zero_motion:
            return GridPlan(s, h, w, None, None, vec)
        if self.grid_snap:
            coherent = uniform
            step = torch.from_numpy(round_half_away(vec.numpy() / s))
        else:  # Cond. 2: uniform inside the cell and landing on the grid
            coherent = uniform & (vec % s == 0).all(0)
            step = torch.div(vec, s, rounding_mode="floor")
        ys = torch.arange(h).view(h, 1) + step[1]
        xs = torch.arange(w).view(1, w) + step[0]
        outside = (ys < 0) | (ys >= h) | (xs < 0) | (xs >= w)
        index = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).flatten()
        return GridPlan(s, h, w, index, ~coherent | outside, vec)
