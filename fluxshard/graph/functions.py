"""The FluxShard ops as ONNX nodes of domain ``fluxshard``, and their local-function bodies.

The specification is ``fluxshard.sparse.spec``; here each op gets

* a node builder that validates the attributes once (:func:`mv_gather_node`,
  :func:`masked_sparse_conv_node`), and
* an ONNX local function (:func:`mv_gather_function`, :func:`masked_sparse_conv_function`) whose
  body is standard ops only, with the node's attributes referenced by name, so ONNX Runtime runs
  a FluxShard graph on the CPU (the flavour that proves a rewrite). The TensorRT flavour is the
  same graph without the bodies (:func:`without_bodies`): TensorRT's ONNX parser then binds each
  node to the plugin of the same name (plugins_trt/).

The bodies compute densely and select (a conv over the whole map, then ``Where``): they state the
semantics, not a fast path.
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from fluxshard.sparse.spec import ACTIVATIONS

DOMAIN = "fluxshard"
DOMAIN_VERSION = 1
# Equal on strings (the activation switch) needs opset 19; TensorRT 10 parses opsets up to 22.
OPSET = 19
MV_GATHER = "MVGather"
MASKED_SPARSE_CONV = "MaskedSparseConv"


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    """What a model holding FluxShard nodes imports."""
    return [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]


# --------------------------------------------------------------------------------- nodes

def mv_gather_node(cache: str, field_index: str, invalid: str, gathered: str, *,
                   name: str | None = None) -> onnx.NodeProto:
    """``gathered = MVGather(cache, field_index, invalid)``."""
    return helper.make_node(MV_GATHER, [cache, field_index, invalid], [gathered], name=name,
                            domain=DOMAIN)


def masked_sparse_conv_node(x: str, recompute: str, gathered: str, invalid: str, weight: str,
                            bias: str, y: str, changed: str, *, kernel: int, stride: int,
                            padding: int, group: int = 1, activation: str = "silu",
                            threshold: float = 0.0, tile: int = 0,
                            name: str | None = None) -> onnx.NodeProto:
    """``y, changed = MaskedSparseConv(x, recompute, gathered, invalid, W, b)`` for a square
    ``kernel`` with symmetric ``padding`` (YOLO11's convs). ``kernel`` is carried for plugins
    (the body reads it from W)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if kernel < 1 or stride < 1 or padding < 0 or group < 1 or tile < 0:
        raise ValueError(f"bad conv geometry: kernel {kernel}, stride {stride}, padding {padding}, "
                         f"group {group}, tile {tile}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return helper.make_node(
        MASKED_SPARSE_CONV, [x, recompute, gathered, invalid, weight, bias], [y, changed],
        name=name, domain=DOMAIN, kernel_shape=[kernel, kernel], strides=[stride, stride],
        pads=[padding] * 4, group=group, activation=activation, threshold=float(threshold),
        tile=tile)


# --------------------------------------------------------------------------------- bodies

def _ref(node: onnx.NodeProto, attribute: str, kind: int, as_name: str | None = None
         ) -> onnx.NodeProto:
    """Let ``node``'s attribute ``as_name`` (default: the same name) take the calling node's
    attribute ``attribute``."""
    ref = AttributeProto()
    ref.name = as_name or attribute
    ref.ref_attr_name = attribute
    ref.type = kind
    node.attribute.append(ref)
    return node


def _const(output: str, attribute: str, kind: int, value_attribute: str) -> onnx.NodeProto:
    """A Constant holding the calling node's attribute ``attribute``."""
    return _ref(helper.make_node("Constant", [], [output]), attribute, kind, value_attribute)


def _ints(output: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value_ints=values)


def mv_gather_function() -> onnx.FunctionProto:
    """gathered[n, c, p] = cache[n, c, field_index[p]] (flat positions), 0 where invalid."""
    nodes = [
        _ints("keep_nc", [0, 0, -1]),
        helper.make_node("Reshape", ["cache", "keep_nc"], ["flat"]),
        helper.make_node("Gather", ["flat", "field_index"], ["moved"], axis=2),
        helper.make_node("Shape", ["cache"], ["shape"]),
        helper.make_node("Reshape", ["moved", "shape"], ["aligned"]),
        helper.make_node("Constant", [], ["zero"],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Where", ["invalid", "zero", "aligned"], ["gathered"]),
    ]
    return helper.make_function(DOMAIN, MV_GATHER, ["cache", "field_index", "invalid"],
                                ["gathered"], nodes, [helper.make_opsetid("", OPSET)])


def _tile_widen(nodes: list, mask: str, out: str) -> None:
    """``out``: ``mask`` (Ho, Wo) bool widened to whole tile x tile tiles (the calling node's
    ``tile`` attribute; 0 and 1 both mean per position)."""
    nodes += [
        _const("tile_attr", "tile", AttributeProto.INT, "value_int"),
        helper.make_node("Constant", [], ["one"], value_int=1),
        helper.make_node("Max", ["tile_attr", "one"], ["t"]),  # int64 scalar
        helper.make_node("Shape", [mask], ["hw"]),
        helper.make_node("Add", ["hw", "t"], ["hw_t"]),
        helper.make_node("Sub", ["hw_t", "one"], ["hw_up"]),
        helper.make_node("Div", ["hw_up", "t"], ["tiles"]),  # ceil(hw / t), int64 division
        helper.make_node("Mul", ["tiles", "t"], ["padded_hw"]),
        helper.make_node("Sub", ["padded_hw", "hw"], ["pad_end"]),
        _ints("pad_begin", [0, 0]),
        helper.make_node("Concat", ["pad_begin", "pad_end"], ["pads"], axis=0),
        helper.make_node("Cast", [mask], ["mask_u8"], to=TensorProto.UINT8),
        helper.make_node("Pad", ["mask_u8", "pads"], ["padded"]),
        _ints("idx0", [0]),
        _ints("idx1", [1]),
        helper.make_node("Gather", ["tiles", "idx0"], ["tiles_y"], axis=0),
        helper.make_node("Gather", ["tiles", "idx1"], ["tiles_x"], axis=0),
        helper.make_node("Reshape", ["t", "idx1"], ["t1"]),  # (1,)
        helper.make_node("Concat", ["tiles_y", "t1", "tiles_x", "t1"], ["grid4"], axis=0),
        helper.make_node("Reshape", ["padded", "grid4"], ["by_tile"]),
        _ints("tile_axes", [1, 3]),
        helper.make_node("ReduceMax", ["by_tile", "tile_axes"], ["any_in_tile"], keepdims=1),
        helper.make_node("Expand", ["any_in_tile", "grid4"], ["spread"]),
        helper.make_node("Reshape", ["spread", "padded_hw"], ["widened"]),
        helper.make_node("Slice", ["widened", "pad_begin", "hw"], ["cropped"]),
        helper.make_node("Cast", ["cropped"], [out], to=TensorProto.BOOL),
    ]


def masked_sparse_conv_function() -> onnx.FunctionProto:
    """The spec's MaskedSparseConv: dense conv + activation, truncation against the gathered
    cache on the computed positions, assembly (v1 Eq. 3)."""
    nodes: list[onnx.NodeProto] = []
    conv = helper.make_node("Conv", ["x", "W", "b"], ["pre"])
    for attribute, kind in (("kernel_shape", AttributeProto.INTS),
                            ("strides", AttributeProto.INTS), ("pads", AttributeProto.INTS),
                            ("group", AttributeProto.INT)):
        _ref(conv, attribute, kind)
    nodes += [
        conv,
        helper.make_node("Sigmoid", ["pre"], ["gate"]),
        helper.make_node("Mul", ["pre", "gate"], ["silu"]),
        _const("activation_name", "activation", AttributeProto.STRING, "value_string"),
        helper.make_node("Constant", [], ["silu_name"], value_string="silu"),
        helper.make_node("Equal", ["activation_name", "silu_name"], ["is_silu"]),
        helper.make_node("Where", ["is_silu", "silu", "pre"], ["fresh"]),
    ]
    _tile_widen(nodes, "recompute", "computed")
    nodes += [
        helper.make_node("Sub", ["fresh", "gathered"], ["delta"]),
        helper.make_node("Abs", ["delta"], ["magnitude"]),
        _ints("channel_axis", [1]),
        helper.make_node("ReduceMax", ["magnitude", "channel_axis"], ["largest"], keepdims=0),
        _ints("batch_axis", [0]),
        helper.make_node("Squeeze", ["largest", "batch_axis"], ["largest_hw"]),
        _const("threshold_value", "threshold", AttributeProto.FLOAT, "value_float"),
        helper.make_node("Greater", ["largest_hw", "threshold_value"], ["moved"]),
        helper.make_node("Or", ["moved", "invalid"], ["must_change"]),
        helper.make_node("And", ["computed", "must_change"], ["changed"]),
        helper.make_node("Where", ["changed", "fresh", "gathered"], ["y"]),
    ]
    function = helper.make_function(DOMAIN, MASKED_SPARSE_CONV,
                                    ["x", "recompute", "gathered", "invalid", "W", "b"],
                                    ["y", "changed"], nodes, [helper.make_opsetid("", OPSET)])
    function.attribute.extend(["kernel_shape", "strides", "pads", "group", "activation",
                               "threshold", "tile"])
    return function


def functions() -> list[onnx.FunctionProto]:
    """Every FluxShard op's local function (attach to ``ModelProto.functions``)."""
    return [mv_gather_function(), masked_sparse_conv_function()]


def with_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ONNX Runtime flavour: ``model`` with the FluxShard local functions attached (replacing
    any it had) and the opsets they need imported."""
    out = onnx.ModelProto()
    out.CopyFrom(without_bodies(model))
    out.functions.extend(functions())
    return out


def without_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    """The TensorRT flavour: the same graph, FluxShard nodes left bodiless for plugins to bind."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [f for f in out.functions if f.domain != DOMAIN]
    del out.functions[:]
    out.functions.extend(kept)
    imports = {op.domain: op for op in out.opset_import}
    for op in opset_imports():
        current = imports.get(op.domain)
        if current is None:
            out.opset_import.append(op)
        elif current.version < op.version:
            current.version = op.version
    return out
