"""The two FluxShard ops (fluxshard.sparse.spec) against plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluxshard.sparse import RFAPPlan, TileConv, masked_sparse_conv, mv_gather, window_uniform
from fluxshard.sparse.ops import mv_gather_

CL = torch.channels_last  # the executor's layout: every cache it writes is channels_last


def test_mv_gather_matches_numpy_reference():
    rng = np.random.default_rng(0)
    cache = torch.from_numpy(rng.standard_normal((1, 5, 32, 64)).astype(np.float32))
    field = rng.integers(-3, 4, size=(32, 64, 2)).astype(np.float32) * 4  # on the stride-4 grid
    plan = RFAPPlan(field, 128, 256).grid(4)
    out = mv_gather(cache, plan.index, plan.invalid)
    c = cache.numpy()[0]
    for y, x in [(0, 0), (5, 7), (31, 63), (16, 40)]:
        dx, dy = (field[y, x] / 4).astype(int)
        sy, sx = y + dy, x + dx
        if 0 <= sy < 32 and 0 <= sx < 64:
            assert not plan.invalid[y, x]
            np.testing.assert_array_equal(out[0, :, y, x].numpy(), c[:, sy, sx])
        else:
            assert plan.invalid[y, x] and (out[0, :, y, x] == 0).all()


@pytest.mark.parametrize("stride", [1, 2, 4, 8, 16])
def test_in_place_gather_equals_spec_gather(stride):
    """The executor's sparse in-place MVGather (moved rows only) is the spec's dense gather."""
    rng = np.random.default_rng(stride)
    field = np.zeros((32, 64, 2), np.float32)  # 128x256 input, 4x4 blocks
    field[4:20, 8:40] = (16, -8)  # an object moving by whole cells at every stride <= 8
    field[24:, :] = rng.integers(-2, 3, size=(8, 64, 2)) * 4  # clutter, partly off-grid
    field[:, 60:] = (-32, 0)  # a band whose content came from 32 px to the left
    plan = RFAPPlan(field, 128, 256).grid(stride)
    h, w = 128 // stride, 256 // stride
    cache = torch.from_numpy(rng.standard_normal((1, 6, h, w)).astype(np.float32))
    expected = mv_gather(cache, plan.index, plan.invalid)
    got = mv_gather_(cache.clone(memory_format=CL), plan)
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got, expected)
    assert 0 < plan.moved.numel() < h * w  # sparse: the still part is not touched


def test_cond2_marks_off_grid_and_non_uniform_cells():
    field = np.zeros((8, 8, 2), np.float32)  # 32x32 input, 4x4 blocks
    field[:4, :4] = (8, 0)  # on the stride-8 grid, uniform inside each 8x8 cell
    field[4:, 4:] = (2, 0)  # not a multiple of 8
    field[0, 6] = (8, 0)  # one block of a stride-8 cell differs from its neighbours
    plan = RFAPPlan(field, 32, 32).grid(8)
    invalid = plan.invalid.numpy()
    assert not invalid[:2, :2].any()  # coherent: moves one cell
    assert invalid[2:, 2:].all()  # 2 px is off the stride-8 grid
    assert invalid[0, 3]  # non-uniform cell
    assert not invalid[0, 2] and not invalid[2, 0]  # still / unaffected cells (in bounds)


def test_window_uniform_treats_padding_as_still():
    vec = torch.zeros(2, 6, 6, dtype=torch.int64)
    assert window_uniform(vec, 3, 1, 1).all()
    vec[0] = 2  # whole map moves: windows over the border see still padding
    u = window_uniform(vec, 3, 1, 1)
    assert u[1:-1, 1:-1].all() and not u[0].any() and not u[:, 0].any()


@pytest.mark.parametrize("k,s,groups,tile", [(3, 1, 1, 8), (3, 2, 1, 8), (1, 1, 1, 4),
                                             (3, 1, 16, 8), (3, 2, 1, 16)])
def test_masked_sparse_conv_equals_dense_on_active_tiles(k, s, groups, tile):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, k, s, k // 2, groups=groups).eval()
    x = torch.randn(1, 16, 40, 56)
    plan = TileConv(conv, (40, 56), tile)
    dense = F.silu(conv(x))
    recompute = torch.zeros(plan.out_h, plan.out_w, dtype=torch.bool)
    recompute[1, 2] = recompute[-1, -1] = True  # a corner tile: partial, padded
    stale = torch.full_like(dense, 7.0)  # a gathered cache that differs everywhere
    with torch.no_grad():
        y, changed, n_active = masked_sparse_conv(plan, conv, F.silu, x, recompute,
                                                  stale.clone(memory_format=CL), 0.0)
    assert n_active == 2
    torch.testing.assert_close(y[0][:, recompute], dense[0][:, recompute], rtol=0, atol=1e-5)
    assert changed[recompute].all()
    untouched = ~changed
    assert (y[0][:, untouched] == 7.0).all()


def test_truncation_keeps_cached_values_below_threshold():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, 1, 1).eval()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        dense = F.silu(conv(x))
        near = dense + 1e-3  # the gathered cache is almost right everywhere
        near[0, :, 0, 0] += 1.0  # except one position
        plan = TileConv(conv, (16, 16), 8)
        everything = torch.ones(16, 16, dtype=torch.bool)
        y, changed, _ = masked_sparse_conv(plan, conv, F.silu, x, everything,
                                           near.clone(memory_format=CL), 0.01)
    assert changed.sum() == 1 and changed[0, 0]
    assert torch.equal(y[0, :, 1:, 1:], near[0, :, 1:, 1:])
    # A 4-tile batch and the whole map may round differently in the last bit.
    torch.testing.assert_close(y[0, :, 0, 0], dense[0, :, 0, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,s,groups", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 12), (3, 2, 12)])
def test_masked_point_conv_touches_only_recompute_positions(k, s, groups):
    from fluxshard.sparse.ops import PointConv, masked_point_conv, point_weight

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 12 if groups > 1 else 20, k, s, k // 2, groups=groups).eval()
    x = torch.randn(1, 12, 9, 13)
    plan = PointConv(k, s, k // 2, (9, 13))
    with torch.no_grad():
        dense = F.silu(conv(x))
        recompute = torch.rand(dense.shape[2:]) < 0.3
        recompute[0, 0] = recompute[-1, -1] = True  # windows over the zero padding
        y, changed, n = masked_point_conv(plan, conv, point_weight(conv), F.silu,
                                          x.to(memory_format=CL), recompute,
                                          torch.full_like(dense, 7.0).to(memory_format=CL), 0.0)
    assert n == int(recompute.sum()) and torch.equal(changed, recompute)
    torch.testing.assert_close(y[0][:, recompute], dense[0][:, recompute], rtol=1e-5, atol=1e-5)
    assert (y[0][:, ~recompute] == 7.0).all()
