"""The ONNX local-function bodies of the FluxShard ops (fluxshard.graph), run by onnxruntime,
against the torch executor's ops (fluxshard.sparse.ops) on the same inputs: one specification,
two executors.

The cases are fluxshard.graph.golden's (the same ones the CUDA kernels are checked against).
Tolerances: MVGather moves values, so it must match exactly. MaskedSparseConv's body runs
onnxruntime's conv over the whole map, the torch executor an im2col matmul on the recomputed
positions (tile 0) or mkldnn on a batch of tiles: float32 sums in other orders, measured
differences ~1e-6 on outputs of order 1; y is compared at 1e-5 absolute + 1e-5 relative. The
changed masks must be identical: the cases put every cached value 0.5 off (changed) or within 0.01
of a 0.05 threshold (kept), far from rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fluxshard.graph import (DOMAIN, masked_sparse_conv_node, mv_gather_node, opset_imports,
                             with_bodies, without_bodies)
from fluxshard.graph.golden import (ACTIVATIONS, ATOL, CONV_GEOMETRIES, RTOL, THRESHOLDS, TILES,
                                    conv_case, gather_case)


def _session(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "op", inputs, outputs, initializer=list(initializers))
    model = with_bodies(helper.make_model(graph, opset_imports=opset_imports()))
    onnx.checker.check_model(model, full_check=True)
    return model, ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])


def _info(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_mv_gather_body_moves_exactly_what_the_torch_gather_moves():
    """A field that moves one block by a stride multiple, one by a non-multiple (invalid at
    stride 8) and one off the map's edge; compared at the stride-8 grid."""
    cache, index, invalid, expected = gather_case(8)
    assert invalid.any() and not torch.equal(expected, cache)  # something really moved
    _, session = _session(
        [mv_gather_node("cache", "field_index", "invalid", "gathered")],
        [_info("cache", TensorProto.FLOAT, cache.shape),
         _info("field_index", TensorProto.INT64, index.shape),
         _info("invalid", TensorProto.BOOL, invalid.shape)],
        [_info("gathered", TensorProto.FLOAT, cache.shape)])
    (got,) = session.run(None, {"cache": cache.numpy(), "field_index": index.numpy(),
                                "invalid": invalid.numpy()})
    assert np.array_equal(got, expected.numpy())


@pytest.mark.parametrize("cin,cout,k,s,group", CONV_GEOMETRIES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_masked_sparse_conv_body_equals_the_torch_executor(cin, cout, k, s, group, activation,
                                                           tile, threshold):
    c = conv_case(cin, cout, k, s, group, activation, tile, threshold)
    (ho, wo), g = c.recompute.shape, c.geometry
    node = masked_sparse_conv_node("x", "recompute", "gathered", "invalid", "W", "b", "y",
                                   "changed", kernel=g["kernel"], stride=g["stride"],
                                   padding=g["pad"], group=g["group"], activation=activation,
                                   threshold=threshold, tile=tile)
    _, session = _session(
        [node],
        [_info("x", TensorProto.FLOAT, c.x.shape), _info("recompute", TensorProto.BOOL, (ho, wo)),
         _info("gathered", TensorProto.FLOAT, c.gathered.shape),
         _info("invalid", TensorProto.BOOL, (ho, wo))],
        [_info("y", TensorProto.FLOAT, c.gathered.shape),
         _info("changed", TensorProto.BOOL, (ho, wo))],
        [numpy_helper.from_array(c.conv.weight.detach().numpy(), "W"),
         numpy_helper.from_array(c.conv.bias.detach().numpy(), "b")])
    y, changed = session.run(None, {"x": c.x.numpy(), "recompute": c.recompute.numpy(),
                                    "gathered": c.gathered.numpy(), "invalid": c.invalid.numpy()})
    assert np.array_equal(changed, c.changed.numpy())
    assert changed.any() and (threshold == 0 or not changed[c.recompute.numpy()].all())
    np.testing.assert_allclose(y, c.y.numpy(), atol=ATOL, rtol=RTOL)
    kept = ~changed  # positions not taken from the fresh values keep the cache exactly
    assert np.array_equal(y[:, :, kept], c.gathered.numpy()[:, :, kept])


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
