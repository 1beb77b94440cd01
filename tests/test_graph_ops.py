"""The ONNX local-function bodies of the FluxShard ops (fluxshard.graph), run by onnxruntime,
against the torch executor's ops (fluxshard.sparse.ops) on the same inputs: one specification,
two executors.

Tolerances: MVGather moves values, so it must match exactly. MaskedSparseConv's body runs
onnxruntime's conv over the whole map, the torch executor an im2col matmul on the recomputed
positions (tile 0) or mkldnn on a batch of tiles: float32 sums in other orders, measured
differences ~1e-6 on outputs of order 1; y is compared at 1e-5 absolute + 1e-5 relative. The
changed masks must be identical: the cached values differ from the fresh ones either by 0.5 (always
changed) or by at most 0.01 against a threshold of 0.05 (never), far from rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from fluxshard.graph import (DOMAIN, masked_sparse_conv_node, mv_gather_node, opset_imports,
                             with_bodies, without_bodies)
from fluxshard.sparse.ops import (PointConv, TileConv, channels_last, masked_point_conv,
                                  masked_sparse_conv, mv_gather, point_weight)
from fluxshard.sparse.rfap import RFAPPlan


def _session(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "op", inputs, outputs, initializer=list(initializers))
    model = with_bodies(helper.make_model(graph, opset_imports=opset_imports()))
    onnx.checker.check_model(model, full_check=True)
    return model, ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])


def _info(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_mv_gather_body_moves_exactly_what_the_torch_gather_moves():
    """A 64x96 input whose field moves one block by a stride multiple, one by a non-multiple
    (invalid at stride 8) and one off the map's edge; compared at the stride-8 grid."""
    field = np.zeros((16, 24, 2), np.float32)
    field[2:6, 4:10] = (8, -16)  # coherent at stride 8
    field[8:12, 12:16] = (3, 0)  # not a multiple of 8: invalid
    field[0:4, 20:24] = (40, 0)  # source beyond the right edge: invalid
    grid = RFAPPlan(field, 64, 96).grid(8)
    assert grid.invalid.any() and grid.moved.numel()
    cache = torch.randn(1, 5, grid.height, grid.width)
    expected = mv_gather(cache.clone(), grid.index, grid.invalid)
    _, session = _session(
        [mv_gather_node("cache", "field_index", "invalid", "gathered")],
        [_info("cache", TensorProto.FLOAT, cache.shape),
         _info("field_index", TensorProto.INT64, [grid.height * grid.width]),
         _info("invalid", TensorProto.BOOL, grid.invalid.shape)],
        [_info("gathered", TensorProto.FLOAT, cache.shape)])
    (got,) = session.run(None, {"cache": cache.numpy(), "field_index": grid.index.numpy(),
                                "invalid": grid.invalid.numpy()})
    assert np.array_equal(got, expected.numpy())
    assert not np.array_equal(got, cache.numpy())  # something really moved


GEOMETRIES = [  # (in, out, kernel, stride, group)
    (8, 16, 3, 1, 1), (8, 16, 3, 2, 1), (8, 16, 1, 1, 1), (16, 16, 3, 1, 16)]


@pytest.mark.parametrize("cin,cout,k,s,group", GEOMETRIES)
@pytest.mark.parametrize("activation", ["silu", "none"])
@pytest.mark.parametrize("tile", [0, 4])
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_masked_sparse_conv_body_equals_the_torch_executor(cin, cout, k, s, group, activation,
                                                           tile, threshold):
    gen = torch.Generator().manual_seed(cin * 7 + k * 3 + s + tile)
    h, w = 20, 28  # not a multiple of the tile: partial tiles at the bottom/right edge
    conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, groups=group).eval()
    act = F.silu if activation == "silu" else (lambda t: t)
    x = torch.randn(1, cin, h, w, generator=gen)
    with torch.no_grad():
        dense = act(conv(x))
    ho, wo = dense.shape[2:]
    recompute = torch.zeros(ho, wo, dtype=torch.bool)
    recompute[1:4, 2:6] = True  # a blob, a stray position, and the corner (padding)
    recompute[ho // 2, wo - 3] = True
    recompute[ho - 1, 0] = True
    invalid = recompute & (torch.rand(ho, wo, generator=gen) < 0.3)
    # cached values 0.5 off (changed) or within 0.01 (kept at threshold 0.05)
    far = torch.rand(ho, wo, generator=gen) < 0.5
    offset = torch.where(far, torch.tensor(0.5), torch.tensor(0.01 if threshold else 0.5))
    gathered = (dense + offset).contiguous()

    with torch.no_grad():
        if tile:
            y_ref, changed_ref, _ = masked_sparse_conv(
                TileConv(conv, (h, w), tile), conv, act, channels_last(x), recompute,
                channels_last(gathered.clone()), threshold, force=invalid)
        else:
            y_ref, changed_ref, _ = masked_point_conv(
                PointConv(k, s, k // 2, (h, w)), conv, point_weight(conv), act, channels_last(x),
                recompute, channels_last(gathered.clone()), threshold, force=invalid)

    node = masked_sparse_conv_node("x", "recompute", "gathered", "invalid", "W", "b", "y",
                                   "changed", kernel=k, stride=s, padding=k // 2, group=group,
                                   activation=activation, threshold=threshold, tile=tile)
    _, session = _session(
        [node],
        [_info("x", TensorProto.FLOAT, x.shape), _info("recompute", TensorProto.BOOL, (ho, wo)),
         _info("gathered", TensorProto.FLOAT, gathered.shape),
         _info("invalid", TensorProto.BOOL, (ho, wo))],
        [_info("y", TensorProto.FLOAT, gathered.shape), _info("changed", TensorProto.BOOL, (ho, wo))],
        [numpy_helper.from_array(conv.weight.detach().numpy(), "W"),
         numpy_helper.from_array(conv.bias.detach().numpy(), "b")])
    y, changed = session.run(None, {"x": x.numpy(), "recompute": recompute.numpy(),
                                    "gathered": gathered.numpy(), "invalid": invalid.numpy()})
    assert np.array_equal(changed, changed_ref.numpy())
    assert changed.any() and (threshold == 0 or not changed[recompute.numpy()].all())
    np.testing.assert_allclose(y, y_ref.contiguous().numpy(), atol=1e-5, rtol=1e-5)
    outside = ~recompute.numpy() if not tile else ~changed  # untouched positions keep the cache
    assert np.array_equal(y[:, :, outside], gathered.numpy()[:, :, outside])


def test_tensorrt_flavour_keeps_the_nodes_and_drops_only_our_bodies():
    node = masked_sparse_conv_node("x", "r", "g", "i", "W", "b", "y", "c", kernel=3, stride=2,
                                   padding=1, threshold=0.01)
    graph = helper.make_graph(
        [node], "op",
        [_info("x", TensorProto.FLOAT, (1, 4, 8, 8)), _info("r", TensorProto.BOOL, (4, 4)),
         _info("g", TensorProto.FLOAT, (1, 6, 4, 4)), _info("i", TensorProto.BOOL, (4, 4))],
        [_info("y", TensorProto.FLOAT, (1, 6, 4, 4)), _info("c", TensorProto.BOOL, (4, 4))],
        initializer=[numpy_helper.from_array(np.zeros((6, 4, 3, 3), np.float32), "W"),
                     numpy_helper.from_array(np.zeros(6, np.float32), "b")])
    other = helper.make_function("other.domain", "Keep", ["a"], ["b"],
                                 [helper.make_node("Identity", ["a"], ["b"])],
                                 [helper.make_opsetid("", 19)])
    model = helper.make_model(graph, opset_imports=opset_imports(), functions=[other])
    ort_flavour, trt_flavour = with_bodies(model), without_bodies(with_bodies(model))
    assert {f.name for f in ort_flavour.functions} == {"Keep", "MVGather", "MaskedSparseConv"}
    assert [f.name for f in trt_flavour.functions] == ["Keep"]
    (plugin_node,) = trt_flavour.graph.node
    assert plugin_node.domain == DOMAIN and plugin_node.op_type == "MaskedSparseConv"
    attrs = {a.name: helper.get_attribute_value(a) for a in plugin_node.attribute}
    assert attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    assert attrs["activation"] == b"silu" and attrs["threshold"] == pytest.approx(0.01)
    with pytest.raises(Exception, match="MaskedSparseConv"):  # nothing to run it: bodiless
        ort.InferenceSession(trt_flavour.SerializeToString(), providers=["CPUExecutionProvider"])


def test_node_builder_refuses_what_the_spec_does_not_define():
    args = ("x", "r", "g", "i", "W", "b", "y", "c")
    with pytest.raises(ValueError, match="activation"):
        masked_sparse_conv_node(*args, kernel=3, stride=1, padding=1, activation="relu")
    with pytest.raises(ValueError, match="threshold"):
        masked_sparse_conv_node(*args, kernel=3, stride=1, padding=1, threshold=-1.0)
    with pytest.raises(ValueError, match="geometry"):
        masked_sparse_conv_node(*args, kernel=3, stride=0, padding=1)
