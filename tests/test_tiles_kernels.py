"""The tile executor's compiled loops (fluxshard.tiles.kernels) against their definitions
written as plain loops: the carry of the cached maps (each cell takes the content nearest its
source among the 3x3 around it, the centre first on ties; a source off the map is a miss), the
entering edge's share and the reference's move."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxshard.tiles.crops import outside_share
from fluxshard.tiles.reference import CELL, Reference, carry
from fluxshard.tiles.warp import carry_maps

SHAPES = [(6, 10), (3, 5)]  # two levels, one stride apart


def _carried_by_definition(offsets, fields):
    """Per level: (source cell index, remainder, miss) of every cell, by plain loops."""
    out = []
    for o, f in zip(offsets, fields):
        h, w = o.shape[:2]
        index = np.zeros((h, w), np.int64)
        moved = np.zeros((h, w, 2), np.float32)
        miss = np.zeros((h, w), bool)
        for y in range(h):
            for x in range(w):
                if not f[y, x].any() and not o[y, x].any():
                    index[y, x] = y * w + x
                    continue
                qx, qy = np.float32(x) + f[y, x, 0], np.float32(y) + f[y, x, 1]
                cy, cx = int(np.floor(qy + np.float32(0.5))), int(np.floor(qx + np.float32(0.5)))
                best = None
                for dy, dx in [(0, 0)] + [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)
                                          if (a, b) != (0, 0)]:
                    ty, tx = min(max(cy + dy, 0), h - 1), min(max(cx + dx, 0), w - 1)
                    ex = tx + float(o[ty, tx, 0]) - float(qx)
                    ey = ty + float(o[ty, tx, 1]) - float(qy)
                    if best is None or ex * ex + ey * ey < best[0]:
                        best = (ex * ex + ey * ey, ty * w + tx, ex, ey)
                index[y, x] = best[1]
                miss[y, x] = qx < -0.5 or qx > w - 0.5 or qy < -0.5 or qy > h - 0.5
                if not miss[y, x]:
                    moved[y, x] = best[2], best[3]
        out.append((index, moved, miss))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_carry_takes_the_nearest_content_as_defined(seed):
    rng = np.random.default_rng(seed)
    offsets = [np.where(rng.random((h, w, 1)) < 0.5, rng.uniform(-0.6, 0.6, (h, w, 2)), 0)
               .astype(np.float32) for h, w in SHAPES]
    fields = [np.where(rng.random((h, w, 1)) < 0.7, rng.uniform(-3, 3, (h, w, 2)), 0)
              .astype(np.float32) for h, w in SHAPES]
    if seed % 2:  # halves: sources exactly between cells (ties)
        fields = [np.round(f * 2) / 2 for f in fields]
    caches = [torch.arange(4 * h * w, dtype=torch.float32).reshape(1, 4, h, w) for h, w in SHAPES]
    for (carried, moved, miss), (index, want_moved, want_miss), cache in zip(
            carry_maps(caches, offsets, fields), _carried_by_definition(offsets, fields), caches):
        c, h, w = cache.shape[1:]
        want = cache.reshape(c, h * w)[:, torch.from_numpy(index.ravel())].reshape(1, c, h, w)
        assert torch.equal(carried, want)
        assert np.array_equal(moved, want_moved) and np.array_equal(miss, want_miss)
        assert miss.any() or seed  # the first seed moves cells off the map


def _outside_by_definition(field, height, width, block):
    """Per block: the mean over its 4x4 motion blocks (those the field has) of the share of
    each one's pixels whose source lies outside the frame, pixel by pixel."""
    hb, wb = field.shape[:2]
    k = block // 4
    out = np.zeros((-(-hb // k), -(-wb // k)))
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            shares = []
            for y in range(r * k, min(r * k + k, hb)):
                for x in range(c * k, min(c * k + k, wb)):
                    xs = np.arange(4) + x * 4 + field[y, x, 0]  # each pixel column's source
                    ys = np.arange(4) + y * 4 + field[y, x, 1]
                    # a fractional source counts by the part of its pixel that lies outside
                    col_in = np.clip(np.minimum(xs + 1, width) - np.maximum(xs, 0), 0, 1)
                    row_in = np.clip(np.minimum(ys + 1, height) - np.maximum(ys, 0), 0, 1)
                    shares.append(1 - col_in.mean() * row_in.mean())
            out[r, c] = np.mean(shares)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_compiled_entering_share_is_the_share_of_sources_outside(seed):
    """Fields larger than the frame and grids cut by it (blocks at the bottom and right edge
    average the motion blocks they have), sources beyond every edge."""
    rng = np.random.default_rng(seed)
    hb, wb = rng.integers(6, 30, 2)
    height, width = hb * 4 - int(rng.integers(0, 4)), wb * 4 - int(rng.integers(0, 4))
    field = rng.uniform(-9, 9, (hb, wb, 2)).astype(np.float32)
    for block in (8, 16, 32):
        np.testing.assert_allclose(outside_share(field, height, width, block),
                                   _outside_by_definition(field, height, width, block),
                                   atol=1e-6)


def _carried_reference_by_definition(image, offset, move):
    """The reference's carry, block by block: the block its centre's source lands on gives its
    remainder, the composed move is split into whole pixels (half up) and what is left; every
    pixel takes the pixel its whole move points at (the edge replicated)."""
    h, w = image.shape
    hb, wb = offset.shape[:2]
    cell = h // hb
    out, remainder = np.empty_like(image), np.empty_like(offset)
    for by in range(hb):
        for bx in range(wb):
            d, half = move[by, bx], np.float32(0.5)
            source = np.floor(np.float32([bx, by]) + half + d / np.float32(cell)).astype(int)
            sx, sy = min(max(source[0], 0), wb - 1), min(max(source[1], 0), hb - 1)
            total = d + offset[sy, sx]
            whole = np.floor(total + np.float32(0.5))
            remainder[by, bx] = total - whole
            for y in range(by * cell, by * cell + cell):
                for x in range(bx * cell, bx * cell + cell):
                    out[y, x] = image[min(max(y + int(whole[1]), 0), h - 1),
                                      min(max(x + int(whole[0]), 0), w - 1)]
    return out, remainder


@pytest.mark.parametrize("seed", range(4))
def test_the_reference_moves_whole_pixels_and_keeps_the_composed_remainder(seed):
    rng = np.random.default_rng(seed)
    hb, wb = rng.integers(3, 12, 2)
    image = rng.integers(0, 256, (hb * CELL, wb * CELL), dtype=np.uint8)
    offset = np.where(rng.random((hb, wb, 1)) < 0.6, rng.uniform(-0.5, 0.5, (hb, wb, 2)), 0)
    field = rng.uniform(-10, 10, (hb, wb, 2))  # input pixels; the reference is at half scale
    if seed % 2:
        field = np.round(field * 2) / 2  # sources exactly between blocks and pixels
    carried = carry(Reference(image, offset.astype(np.float32)), field.astype(np.float32))
    want_image, want_remainder = _carried_reference_by_definition(
        image, offset.astype(np.float32), (field / 2).astype(np.float32))
    assert np.array_equal(carried.image, want_image)
    np.testing.assert_array_equal(carried.offset, want_remainder)
