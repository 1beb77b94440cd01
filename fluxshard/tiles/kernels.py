"""The tile executor's per-cell and per-block loops, compiled with numba: a search per cell
among its neighbours (which NumPy can only do by building (9, cells) temporaries every frame),
and per-block arithmetic that NumPy spreads over a dozen passes of small arrays. Each kernel
writes into arrays the caller owns; the callers (``warp.carry_maps``, ``reference.carry``,
``crops.outside_share``, ``crops.boxes_to_blocks``) hold the semantics.

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


@numba.njit("void(f4[:, :, ::1], f4, f4, i8, i8, f4[:, ::1])", cache=True, nogil=True)
def outside_shares(field, height, width, motion_block, k, share):
    """Per block of ``share`` (``k`` x ``k`` of the field's motion blocks): the mean over its
    motion blocks (those the field has) of the share of each motion block's pixels whose
    source, pixel + vector, lies outside a ``height`` x ``width`` frame (the share of its
    columns or rows that fall outside)."""
    hb, wb = field.shape[0], field.shape[1]
    side = np.float32(motion_block)
    inverse = np.float32(1.0) / side
    one, zero = np.float32(1), np.float32(0)
    for r in range(share.shape[0]):
        for c in range(share.shape[1]):
            total, count = zero, 0
            for y in range(r * k, min(r * k + k, hb)):
                for x in range(c * k, min(c * k + k, wb)):
                    x0 = np.float32(x * motion_block) + field[y, x, 0]
                    y0 = np.float32(y * motion_block) + field[y, x, 1]
                    count += 1
                    if x0 >= zero and y0 >= zero and x0 + side <= width and y0 + side <= height:
                        continue
                    out_x = (min(max(-x0 * inverse, zero), one)
                             + min(max((x0 + side - width) * inverse, zero), one))
                    out_y = (min(max(-y0 * inverse, zero), one)
                             + min(max((y0 + side - height) * inverse, zero), one))
                    total += one - (one - min(out_x, one)) * (one - min(out_y, one))
            share[r, c] = total / count if count else zero


@numba.njit("void(i8[::1], i8[::1], i8[::1], i8[::1], b1[:, ::1])", cache=True, nogil=True)
def mark_rectangles(r0, c0, r1, c1, mask):
    """Set ``mask`` over every rectangle [r0, r1) x [c0, c1) (clipped before)."""
    for i in range(r0.shape[0]):
        for r in range(r0[i], r1[i]):
            for c in range(c0[i], c1[i]):
                mask[r, c] = True


@numba.njit("void(f4[:, :, ::1], f4[:, :, ::1], i8, i2[:, :, ::1], f4[:, :, ::1])", cache=True,
            nogil=True)
def composed_moves(move, offset, cell, whole, remainder):
    """Per block of ``cell`` x ``cell`` reference pixels: its backward ``move`` (reference
    pixels) composed with the sub-pixel ``offset`` of the block its centre's source lands on
    (clamped into the grid), split into whole pixels (rounded half up) and the remainder."""
    hb, wb = move.shape[0], move.shape[1]
    half, inverse_cell = np.float32(0.5), np.float32(1.0 / cell)
    for by in range(hb):
        for bx in range(wb):
            dx, dy = move[by, bx, 0], move[by, bx, 1]
            sy = min(max(np.int64(np.floor(np.float32(by) + half + dy * inverse_cell)), 0), hb - 1)
            sx = min(max(np.int64(np.floor(np.float32(bx) + half + dx * inverse_cell)), 0), wb - 1)
            tx, ty = dx + offset[sy, sx, 0], dy + offset[sy, sx, 1]
            wx, wy = np.floor(tx + half), np.floor(ty + half)
            whole[by, bx, 0], whole[by, bx, 1] = np.int16(wx), np.int16(wy)
            remainder[by, bx, 0], remainder[by, bx, 1] = tx - wx, ty - wy
