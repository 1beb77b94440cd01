"""The tile executor's per-cell loops, compiled with numba: a search per cell among its
neighbours, which NumPy can only do by building (9, cells) temporaries every frame. Each
kernel writes into arrays the caller owns; the caller (``warp.carry_maps``) holds the
semantics.

The signatures are explicit, so the kernels compile (or load from numba's cache) when this
module is imported, not inside a frame: a first frame that paid the compiler would teach the
executor's latency table that crops are slow.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit("void(f4[::1], f4[::1], i4[::1], i4[::1], i8[::1], f4[:, ::1], f4[:, ::1], "
            "i4[:, ::1], i8[::1], f4[:, ::1], b1[::1])", cache=True, nogil=True)
def nearest_contents(xs, ys, heights, widths, base, field, offset, neighbours, index, moved, miss):
    """For every cell (rows of the concatenated levels) that moves or holds moved content:
    the old cell among ``neighbours`` (offsets (K, 2) dy, dx, around the source's nearest cell,
    the first one first on ties) whose content lies nearest the source ``(x, y) + field``;
    writes its flat index into ``index``, the remainder (content place - source) into
    ``moved`` (zero where the source lies outside its level's map) and ``miss``. Cells that do
    neither keep what the caller set (their own content)."""
    half = np.float32(0.5)
    for i in range(xs.shape[0]):
        fx, fy = field[i, 0], field[i, 1]
        if fx == 0 and fy == 0 and offset[i, 0] == 0 and offset[i, 1] == 0:
            continue
        qx, qy = xs[i] + fx, ys[i] + fy
        h, w = heights[i], widths[i]
        outside = qx < -0.5 or qx > w - 0.5 or qy < -0.5 or qy > h - 0.5
        cy, cx = np.int64(np.floor(qy + half)), np.int64(np.floor(qx + half))
        best, best_x, best_y, best_flat = np.inf, 0.0, 0.0, 0
        for k in range(neighbours.shape[0]):
            ty = min(max(cy + neighbours[k, 0], 0), h - 1)
            tx = min(max(cx + neighbours[k, 1], 0), w - 1)
            flat = base[i] + ty * w + tx
            ex = tx + np.float64(offset[flat, 0]) - np.float64(qx)
            ey = ty + np.float64(offset[flat, 1]) - np.float64(qy)
            d = ex * ex + ey * ey
            if d < best:
                best, best_x, best_y, best_flat = d, ex, ey, flat
        index[i] = best_flat
        miss[i] = outside
        if not outside:
            moved[i, 0], moved[i, 1] = best_x, best_y
