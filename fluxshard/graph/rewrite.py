"""The FluxShard rewrite of a YOLO11 ONNX graph (onnx-graphsurgeon), and a runner for it.

The dense export (fluxshard.models.export_onnx of the BN-fused model) is rewritten so that every
tensor of the spatial data path carries a changed mask, computed in the graph exactly as the torch
executor (fluxshard.sparse.executor) computes it:

* input: the assembled frame against its MV-gathered cache (``cache_in_000``);
* conv (+ SiLU) -> ``MVGather`` of the layer's cache + ``MaskedSparseConv``; recompute = the input
  mask dilated through the conv's window (MaxPool), or'ed with the grid's invalid positions and,
  where RFAP Cond. 1 applies, its violations;
* Split / Slice along channels pass the mask on, Concat / Add or the masks, Resize (nearest
  upsampling) resizes it;
* global blocks (SPPF, C2PSA) and the seg prototypes' transposed conv run densely; the difference
  to their gathered cache says what changed (truncation at tau / ||w||_1 of the block's last conv).
  The blocks are found by their pattern (:func:`find_global_blocks`: a chain of stride-1 MaxPools
  joined by a Concat; a Softmax between a conv's channel split and the Concat that joins the split
  back), not by node names or layer indices, so any YOLO export with that layout works
  (:func:`rewrite_onnx`, e.g. ``yolo export format=onnx`` from ultralytics);
* everything else (the Detect / Segment decoding) reads the assembled values densely.

Which step an op type takes is its mask rule (fluxshard.sparse.rules, the torch executor's rules
too); an op on the masked path with no rule warns and stays dense (its consumers read its values
densely: exact, only slower).

Per cached op the graph has ``cache_in_NNN`` / ``cache_out_NNN`` (names that sort alike, for
Triton's implicit state), and per grid stride s the RFAP plan's ``field_index_s`` and
``invalid_s``; :meth:`FluxShardGraph.feeds` computes them from a motion field with the same
planner the executor uses (fluxshard.sparse.rfap), so the graph takes exactly the executor's
decisions. A key frame is a frame whose grids are invalid everywhere.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import deque
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fluxshard.sparse.rules import rule_for_onnx_op
from fluxshard.sparse.spec import l1_norm

from .functions import (DOMAIN, MV_GATHER, masked_sparse_conv_node, opset_imports, with_bodies,
                        without_bodies)

@dataclass
class FluxShardGraph:
    """A rewritten model (ONNX Runtime flavour: FluxShard nodes carry their function bodies) and
    what its inputs mean."""

    model: onnx.ModelProto
    height: int
    width: int
    caches: list[tuple[str, str, tuple[int, ...]]]  # (input name, output name, shape)
    strides: list[int]  # grids whose field_index_s / invalid_s are inputs
    cond1: dict[str, tuple[int, int, int, int]]  # input name -> (input stride, k, stride, pad)
    outputs: list[str] = dc_field(default_factory=list)  # the model's own outputs
    input_name: str = "images"
    global_blocks: list[tuple[str, str]] = dc_field(default_factory=list)  # (kind, first node)

    def tensorrt(self) -> onnx.ModelProto:
        """The same graph without the FluxShard bodies: TensorRT binds plugins to the nodes."""
        return without_bodies(self.model)

    def feeds(self, field: np.ndarray | None, key: bool) -> dict[str, np.ndarray]:
        """The field-dependent inputs of one frame: ``field`` is the motion accumulated since the
        stream last ran (fluxshard.sparse.RFAPPlan's convention); ``key``: recompute everything."""
        from fluxshard.sparse.ops import window_uniform
        from fluxshard.sparse.rfap import RFAPPlan

        plan = RFAPPlan(None if key else field, self.height, self.width)
        out = {}
        for s in self.strides:
            grid = plan.grid(s)
            n = grid.height * grid.width
            index = grid.index
            out[f"field_index_{s}"] = (np.arange(n, dtype=np.int64) if index is None
                                       else index.numpy().astype(np.int64))
            if key:
                out[f"invalid_{s}"] = np.ones((grid.height, grid.width), bool)
            elif grid.invalid is None:
                out[f"invalid_{s}"] = np.zeros((grid.height, grid.width), bool)
            else:
                out[f"invalid_{s}"] = grid.invalid.numpy()
        for name, (in_stride, k, s, p) in self.cond1.items():
            vectors = plan.grid(in_stride).vectors
            out[name] = (~window_uniform(vectors, k, s, p)).numpy()
        return out

    def initial_caches(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(shape, np.float32) for name, _, shape in self.caches}


class OnnxStream:
    """One stream through a rewritten graph in onnxruntime: keeps the caches between frames
    (what Triton's implicit state does for the TensorRT flavour)."""

    def __init__(self, graph: FluxShardGraph, threads: int = 2):
        from fluxshard.models.export import onnxruntime_session

        self.graph = graph
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fluxshard.onnx"
            onnx.save(graph.model, path)
            self.session = onnxruntime_session(path, threads=threads)
        self.caches = graph.initial_caches()
        self._outputs = [o.name for o in self.session.get_outputs()]

    def run(self, frame: np.ndarray, field: np.ndarray | None, key: bool = False):
        """``frame`` (1, 3, H, W) float32 in [0, 1]; returns the model's outputs (list)."""
        feeds = {self.graph.input_name: np.ascontiguousarray(frame, np.float32), **self.caches,
                 **self.graph.feeds(field, key)}
        results = dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
        for name_in, name_out, _ in self.graph.caches:
            self.caches[name_in] = results[name_out]
        return [results[name] for name in self.graph.outputs]


# ------------------------------------------------------------------------------------ rewrite

def rewrite(model, imgsz: tuple[int, int] = (384, 640), *, tau: float = 0.0,
            strict_rfap: bool = False, tile: int = 0) -> FluxShardGraph:
    """Rewrite the (fused) YOLO11 ``model`` at input size ``imgsz`` (H, W) into a FluxShard graph
    with the executor's semantics for ``tau`` and ``strict_rfap``; ``tile`` is the
    MaskedSparseConv execution hint (0: per position)."""
    from fluxshard.models.export import export_onnx
    from fluxshard.models.yolo import fuse, is_fused

    if not is_fused(model):
        fuse(model)
    with tempfile.TemporaryDirectory() as tmp:
        dense = onnx.load(export_onnx(model, Path(tmp) / "dense.onnx", imgsz))
    return rewrite_onnx(dense, imgsz, tau=tau, strict_rfap=strict_rfap, tile=tile)


def rewrite_onnx(source: str | os.PathLike | onnx.ModelProto,
                 imgsz: tuple[int, int] | None = None, *, tau: float = 0.0,
                 strict_rfap: bool = False, tile: int = 0) -> FluxShardGraph:
    """Rewrite a dense YOLO ONNX graph (a path or a loaded model: our export, or ultralytics'
    ``yolo export format=onnx``, BN folded, batch 1) into a FluxShard graph. ``imgsz`` (H, W):
    the input size, needed when the graph's input has dynamic height/width; a static input must
    match it. The global blocks are found by pattern (:func:`find_global_blocks`)."""
    model = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source))
    model, (h, w), input_name = _fixed_input(model, imgsz)
    graph = _static_graph(model)
    blocks = find_global_blocks(graph)
    return _Rewriter(graph, h, w, tau, strict_rfap, tile, blocks, input_name).run()


def input_size(source: str | os.PathLike | onnx.ModelProto) -> tuple[int, int] | None:
    """(H, W) of an image graph's input, or None where they are dynamic."""
    model = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source),
                                                                         load_external_data=False)
    dims = _image_input(model).type.tensor_type.shape.dim
    hw = [d.dim_value if d.HasField("dim_value") else None for d in dims[2:]]
    return None if None in hw else (hw[0], hw[1])


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise ValueError(f"expected one (1, 3, H, W) image input, got "
                         f"{[(i.name, _dims(i)) for i in inputs]}")
    return inputs[0]


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def _fixed_input(model: onnx.ModelProto, imgsz):
    """The model with a static (1, 3, H, W) input; ((H, W), input name)."""
    image = _image_input(model)
    batch, channels, *hw = _dims(image)
    if channels != 3 or (isinstance(batch, int) and batch != 1):
        raise ValueError(f"input {image.name!r} is {_dims(image)}; expected (1, 3, H, W)")
    static = None if any(not isinstance(d, int) for d in hw) else tuple(hw)
    if static is not None:
        if imgsz is not None and tuple(imgsz) != static:
            raise ValueError(f"the graph's input {image.name!r} is fixed at {static[1]}x"
                             f"{static[0]} (W x H), not {imgsz[1]}x{imgsz[0]}: export it at that "
                             "size, or with dynamic height/width")
        size = static
    elif imgsz is None:
        raise ValueError(f"the graph's input {image.name!r} has dynamic size {_dims(image)}: "
                         "give the size to rewrite it for")
    else:
        size = tuple(int(v) for v in imgsz)
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"input size {size[1]}x{size[0]} (W x H) is not a multiple of 32")
    if static is None or batch != 1:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        image = _image_input(model)
        for dim, value in zip(image.type.tensor_type.shape.dim, (1, 3, *size)):
            dim.Clear()
            dim.dim_value = value
        # shapes derived from the dynamic ones are re-inferred from the fixed input
        del model.graph.value_info[:]
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape")
    return model, size, image.name


def _static_graph(model: onnx.ModelProto) -> gs.Graph:
    """The dense graph with shapes inferred and shape arithmetic folded (two passes: slices whose
    bounds come from Shape ops fold only once the shapes are known)."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    graph.fold_constants().cleanup().toposort()
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(graph)))
    graph.fold_constants().cleanup().toposort()
    return graph


# ------------------------------------------------------------------- global blocks by pattern

@dataclass
class GlobalBlock:
    """A block that runs densely: ``kind`` "SPPF" or "C2PSA", its nodes (entry conv first) and
    the tensor it hands to the rest of the graph."""

    kind: str
    nodes: list[gs.Node]
    output: gs.Variable

    @property
    def name(self) -> str:
        return self.nodes[0].name


def find_global_blocks(graph: gs.Graph) -> list[GlobalBlock]:
    """The SPPF and C2PSA blocks of a (shape-folded) YOLO graph, found by structure:

    * SPPF: a Concat (channels) of a tensor and a chain of stride-1 MaxPools of it, with the conv
      that makes the tensor and the conv that reads the Concat;
    * C2PSA: a Softmax (the attention) downstream of a conv whose output is only split along
      channels, one part of which a channel Concat downstream of the Softmax joins back, with the
      conv that reads that Concat.

    Each block spans every node between its entry conv and its exit conv."""
    blocks: list[GlobalBlock] = []
    taken: set[int] = set()
    for node in graph.nodes:
        if id(node) in taken:
            continue
        found = None
        if node.op == "Concat" and _channel_axis(node.attrs.get("axis", 0)):
            found = _sppf(node)
        elif node.op == "Softmax":
            found = _c2psa(node)
        if found is None:
            continue
        kind, entry, exit_nodes = found
        nodes = _between(graph, entry, exit_nodes[-1].outputs[0])
        blocks.append(GlobalBlock(kind, nodes, exit_nodes[-1].outputs[0]))
        taken.update(id(n) for n in nodes)
    return blocks


def _channel_axis(axis) -> bool:
    return int(axis) in (1, -3)


def _producer(tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None


def _conv_act(tensor) -> list[gs.Node] | None:
    """[conv] or [conv, sigmoid, mul] when ``tensor`` is a conv's output, with SiLU or without."""
    node = _producer(tensor)
    if node is None:
        return None
    if node.op == "Conv":
        return [node]
    if node.op == "Mul" and len(node.inputs) == 2:
        producers = [_producer(t) for t in node.inputs]
        conv = next((p for p in producers if p is not None and p.op == "Conv"), None)
        sigmoid = next((p for p in producers if p is not None and p.op == "Sigmoid"), None)
        if conv is not None and sigmoid is not None and sigmoid.inputs[0] is conv.outputs[0]:
            return [conv, sigmoid, node]
    return None


def _exit_conv(tensor) -> list[gs.Node] | None:
    """The conv(+SiLU) that alone reads ``tensor``."""
    if len(tensor.outputs) != 1 or tensor.outputs[0].op != "Conv":
        return None
    conv = tensor.outputs[0]
    users = list(conv.outputs[0].outputs)
    mul = next((u for u in users if u.op == "Mul"), None)
    if mul is not None and len(users) == 2 and any(u.op == "Sigmoid" for u in users):
        nodes = _conv_act(mul.outputs[0])
        if nodes is not None and nodes[0] is conv:
            return nodes
    return [conv]


def _sppf(concat: gs.Node):
    ins = concat.inputs
    if len(ins) < 2:
        return None
    for prev, cur in zip(ins, ins[1:]):
        pool = _producer(cur)
        if pool is None or pool.op != "MaxPool" or pool.inputs[0] is not prev or any(
                s != 1 for s in pool.attrs.get("strides", [1, 1])):
            return None
    entry, exit_nodes = _conv_act(ins[0]), _exit_conv(concat.outputs[0])
    if entry is None or exit_nodes is None:
        return None
    return "SPPF", entry[0], exit_nodes


def _is_channel_split(node: gs.Node) -> bool:
    if node.op == "Split":
        return _channel_axis(node.attrs.get("axis", 0))
    if node.op == "Slice" and len(node.inputs) > 3 and isinstance(node.inputs[3], gs.Constant):
        axes = node.inputs[3].values.reshape(-1)
        return axes.size == 1 and _channel_axis(axes[0])
    return False


def _c2psa(softmax: gs.Node):
    below = _descendants(softmax)
    # the nearest conv above the attention whose output is only split along channels
    queue, seen = deque(t for t in softmax.inputs if isinstance(t, gs.Variable)), set()
    while queue:
        tensor = queue.popleft()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        entry = _conv_act(tensor)
        if entry is not None and tensor.outputs and all(_is_channel_split(u)
                                                        for u in tensor.outputs):
            parts = [t for split in tensor.outputs for t in split.outputs]
            joins = [u for t in parts for u in t.outputs
                     if u.op == "Concat" and _channel_axis(u.attrs.get("axis", 0))
                     and id(u) in below]
            if joins:
                exit_nodes = _exit_conv(joins[0].outputs[0])
                if exit_nodes is not None:
                    return "C2PSA", entry[0], exit_nodes
        node = _producer(tensor)
        if node is not None:
            queue.extend(t for t in node.inputs if isinstance(t, gs.Variable))
    return None


def _descendants(node: gs.Node) -> set[int]:
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        for t in n.outputs:
            for user in t.outputs:
                if id(user) not in out:
                    out.add(id(user))
                    stack.append(user)
    return out


def _between(graph: gs.Graph, entry: gs.Node, output: gs.Variable) -> list[gs.Node]:
    """Nodes on a path from ``entry`` to ``output`` (both ends included), in graph order."""
    below = _descendants(entry) | {id(entry)}
    above, stack = set(), [output]
    while stack:
        node = _producer(stack.pop())
        if node is not None and id(node) not in above:
            above.add(id(node))
            stack.extend(t for t in node.inputs if isinstance(t, gs.Variable))
    return [n for n in graph.nodes if id(n) in below and id(n) in above]


class _Rewriter:
    def __init__(self, graph: gs.Graph, h: int, w: int, tau: float, strict: bool, tile: int,
                 blocks: list[GlobalBlock], input_name: str = "images"):
        self.g, self.h, self.w = graph, h, w
        self.tau, self.strict, self.tile = float(tau), strict, tile
        self.blocks = blocks
        self.input_name = input_name
        self.masks: dict[str, tuple[gs.Variable, int]] = {}  # tensor -> (changed mask, stride)
        self.caches: list[tuple[str, str, tuple[int, ...]]] = []
        self.grid_inputs: dict[int, tuple[gs.Variable, gs.Variable]] = {}
        self.cond1: dict[str, tuple[int, int, int, int]] = {}
        self.cond1_inputs: dict[str, gs.Variable] = {}
        self.first_spatial_done = False
        self.new_nodes: list[gs.Node] = []
        self.extra_inputs: list[gs.Variable] = []
        self.extra_outputs: list[gs.Variable] = []
        self._n = 0

    # ------------------------------------------------------------------ helpers
    def _name(self, hint: str) -> str:
        self._n += 1
        return f"fluxshard/{hint}_{self._n}"

    def _var(self, hint: str, dtype, shape=None) -> gs.Variable:
        return gs.Variable(self._name(hint), dtype=dtype, shape=shape)

    def _const(self, hint: str, values) -> gs.Constant:
        return gs.Constant(self._name(hint), np.asarray(values))

    def _op(self, op: str, inputs, dtype, shape=None, **attrs) -> gs.Variable:
        out = self._var(op.lower(), dtype, shape)
        self.new_nodes.append(gs.Node(op, self._name(op), attrs, list(inputs), [out]))
        return out

    def _stride(self, tensor: gs.Variable) -> int:
        return self.h // int(tensor.shape[2])

    def _grid(self, s: int) -> tuple[gs.Variable, gs.Variable]:
        """(field_index_s, invalid_s) graph inputs of grid stride ``s``."""
        if s not in self.grid_inputs:
            gh, gw = self.h // s, self.w // s
            index = gs.Variable(f"field_index_{s}", dtype=np.int64, shape=(gh * gw,))
            invalid = gs.Variable(f"invalid_{s}", dtype=bool, shape=(gh, gw))
            self.grid_inputs[s] = (index, invalid)
            self.extra_inputs += [index, invalid]
        return self.grid_inputs[s]

    def _cache(self, like: gs.Variable, stride: int) -> tuple[gs.Variable, gs.Variable]:
        """A new cache_in/cache_out pair shaped like ``like`` at grid ``stride``: (its
        MV-gathered cache_in, the cache_out output that :meth:`_store` connects)."""
        k = len(self.caches)
        shape = tuple(int(d) for d in like.shape)
        cache_in = gs.Variable(f"cache_in_{k:03d}", dtype=np.float32, shape=shape)
        cache_out = gs.Variable(f"cache_out_{k:03d}", dtype=np.float32, shape=shape)
        self.caches.append((cache_in.name, cache_out.name, shape))
        self.extra_inputs.append(cache_in)
        self.extra_outputs.append(cache_out)
        index, invalid = self._grid(stride)
        gathered = self._var("gathered", np.float32, shape)
        self.new_nodes.append(gs.Node(MV_GATHER, self._name("mv_gather"), {},
                                      [cache_in, index, invalid], [gathered], domain=DOMAIN))
        return gathered, cache_out

    def _store(self, value: gs.Variable, cache_out: gs.Variable) -> None:
        """This frame's ``value`` becomes the cache the next frame gathers."""
        self.new_nodes.append(gs.Node("Identity", self._name("store"), {}, [value], [cache_out]))

    def _moved(self, fresh: gs.Variable, gathered: gs.Variable, threshold: float) -> gs.Variable:
        """(H, W) bool: where max_c |fresh - gathered| > threshold."""
        hw = tuple(int(d) for d in fresh.shape[2:])
        delta = self._op("Sub", [fresh, gathered], np.float32, fresh.shape)
        magnitude = self._op("Abs", [delta], np.float32, fresh.shape)
        largest = self._op("ReduceMax", [magnitude, self._const("axis", np.array([1]))],
                           np.float32, (1, *hw), keepdims=0)
        largest = self._op("Squeeze", [largest, self._const("axis", np.array([0]))], np.float32, hw)
        return self._op("Greater", [largest, self._const("threshold", np.float32(threshold))],
                        bool, hw)

    def _dilate(self, mask: gs.Variable, k: int, s: int, p: int, out_hw) -> gs.Variable:
        """Output positions of a (k, s, p) window that touch ``mask`` (v1's receptive-field
        bleed), as a max pool of the mask."""
        if k == 1 and s == 1:
            return mask
        in_hw = tuple(int(d) for d in mask.shape)
        m = self._op("Cast", [mask], np.float32, in_hw, to=onnx.TensorProto.FLOAT)
        m = self._op("Unsqueeze", [m, self._const("axes", np.array([0, 1]))], np.float32,
                     (1, 1, *in_hw))
        m = self._op("MaxPool", [m], np.float32, (1, 1, *out_hw), kernel_shape=[k, k],
                     strides=[s, s], pads=[p] * 4)
        m = self._op("Squeeze", [m, self._const("axes", np.array([0, 1]))], np.float32, out_hw)
        return self._op("Cast", [m], bool, out_hw, to=onnx.TensorProto.BOOL)

    def _or(self, masks: list[gs.Variable]) -> gs.Variable:
        out = masks[0]
        for m in masks[1:]:
            if m is not out:
                out = self._op("Or", [out, m], bool, out.shape)
        return out

    # ------------------------------------------------------------------ the walk
    # The public steps (conv, dense_block, channel_slice, merge, resize) are what the mask
    # rules (fluxshard.sparse.rules) call per node.
    def run(self) -> FluxShardGraph:
        images = next(t for t in self.g.inputs if t.name == self.input_name)
        self._input(images)
        block_of = {id(n): b for b in self.blocks for n in b.nodes}
        unknown: dict[str, str] = {}  # op type -> first node, for the warning
        for node in list(self.g.nodes):
            block = block_of.get(id(node))
            if block is not None:
                if node is block.nodes[0]:  # the entry conv: every input of the block is ready
                    self.dense_block(block.nodes)
                continue
            if not any(t.name in self.masks for t in node.inputs if isinstance(t, gs.Variable)):
                continue  # not on the masked path
            rule = rule_for_onnx_op(node.op)
            if rule is None:
                unknown.setdefault(node.op, node.name)
            else:
                rule.rewrite(self, node)
        for op, name in unknown.items():
            warnings.warn(f"the FluxShard rewrite has no mask rule for ONNX op {op!r} (first at "
                          f"{name!r}): it runs densely and its consumers recompute everything; "
                          "register a MaskRule in fluxshard/sparse/rules.py", stacklevel=3)
        return self._finish()

    def _input(self, images: gs.Variable) -> None:
        """The dispatch layer: which pixels differ from the aligned input cache."""
        gathered, cache_out = self._cache(images, 1)
        self._store(images, cache_out)  # the assembled frame (what the executor caches)
        _, invalid = self._grid(1)
        moved = self._moved(images, gathered, 0.0)
        self.masks[images.name] = (self._or([moved, invalid]), 1)

    def conv(self, conv: gs.Node) -> None:
        x, weight = conv.inputs[0], conv.inputs[1]
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        if not isinstance(weight, gs.Constant) or (bias is not None
                                                   and not isinstance(bias, gs.Constant)):
            raise ValueError(f"{conv.name}: conv weights must be constants after folding")
        k = int(conv.attrs.get("kernel_shape", weight.values.shape[2:])[0])
        s = int(conv.attrs.get("strides", [1, 1])[0])
        pads = list(conv.attrs.get("pads", [0, 0, 0, 0]))
        group = int(conv.attrs.get("group", 1))
        if len(set(pads)) != 1 or any(d != 1 for d in conv.attrs.get("dilations", [1, 1])):
            raise ValueError(f"{conv.name}: only symmetric padding and no dilation are supported")
        p = pads[0]
        if bias is None:
            bias = self._const("bias", np.zeros(weight.values.shape[0], np.float32))
        out = conv.outputs[0]
        activation, final, removed = "none", out, [conv]
        users = list(out.outputs)
        sigmoid = next((u for u in users if u.op == "Sigmoid"), None)
        if sigmoid is not None and len(users) == 2:
            mul = next((u for u in users if u.op == "Mul"), None)
            if mul is not None and set(t.name for t in mul.inputs) == {out.name,
                                                                        sigmoid.outputs[0].name}:
                activation, final, removed = "silu", mul.outputs[0], [conv, sigmoid, mul]
        mask, in_stride = self.masks[x.name]
        out_stride = in_stride * s
        out_hw = tuple(int(d) for d in final.shape[2:])
        _, invalid = self._grid(out_stride)
        parts = [self._dilate(mask, k, s, p, out_hw), invalid]
        if k > 1 and (self.strict or not self.first_spatial_done):
            name = f"rfap_cond1_s{in_stride}_k{k}_st{s}_p{p}"
            if name not in self.cond1_inputs:
                self.cond1_inputs[name] = gs.Variable(name, dtype=bool, shape=out_hw)
                self.cond1[name] = (in_stride, k, s, p)
                self.extra_inputs.append(self.cond1_inputs[name])
            parts.append(self.cond1_inputs[name])
        if k > 1:
            self.first_spatial_done = True
        recompute = self._or(parts)
        threshold = 0.0
        if self.tau > 0 and activation == "silu":
            threshold = self.tau / l1_norm(weight.values)
        # the new op takes over the final tensor; the old conv (+ SiLU) nodes lose their outputs
        for node in removed:
            node.outputs.clear()
        fresh = final  # the node's y: the assembled output, which is also the new cache
        gathered, cache_out = self._cache(fresh, out_stride)
        self._store(fresh, cache_out)
        changed = self._var("changed", bool, out_hw)
        node = masked_sparse_conv_node(
            x.name, recompute.name, gathered.name, invalid.name, weight.name, bias.name,
            fresh.name, changed.name, kernel=k, stride=s, padding=p, group=group,
            activation=activation, threshold=threshold, tile=self.tile)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs["activation"] = activation  # graphsurgeon wants str, not bytes
        self.new_nodes.append(gs.Node(node.op_type, self._name("masked_sparse_conv"), attrs,
                                      [x, recompute, gathered, invalid, weight, bias],
                                      [fresh, changed], domain=DOMAIN))
        self.masks[fresh.name] = (changed, out_stride)

    def dense_block(self, nodes: list[gs.Node]) -> None:
        """A block run densely; its difference to the gathered cache says what changed."""
        inside = {id(n) for n in nodes}
        produced = {t.name for n in nodes for t in n.outputs}
        inputs = [t for n in nodes for t in n.inputs
                  if isinstance(t, gs.Variable) and t.name not in produced]
        in_masks = [self.masks[t.name][0] for t in inputs if t.name in self.masks]
        if not in_masks:
            return  # not on the data path
        fresh = next(t for n in nodes for t in n.outputs
                     if any(id(c) not in inside for c in t.outputs))
        stride = self._stride(fresh)
        threshold = 0.0
        last = fresh.inputs[0] if fresh.inputs else None
        if self.tau > 0 and last is not None and last.op == "Mul":  # SiLU after the last conv
            conv = next((t.inputs[0] for t in last.inputs
                         if t.inputs and t.inputs[0].op == "Conv"), None)
            if conv is not None:
                threshold = self.tau / l1_norm(conv.inputs[1].values)
        consumers = {id(c) for c in fresh.outputs}
        hw = tuple(int(d) for d in fresh.shape[2:])
        gathered, cache_out = self._cache(fresh, stride)
        _, invalid = self._grid(stride)
        moved = self._moved(fresh, gathered, threshold)
        any_mask = self._or(in_masks)
        flat = self._op("Cast", [any_mask], np.uint8, any_mask.shape, to=onnx.TensorProto.UINT8)
        any_in = self._op("ReduceMax", [flat], np.uint8, (), keepdims=0)
        any_in = self._op("Cast", [any_in], bool, (), to=onnx.TensorProto.BOOL)
        taken = self._op("And", [any_in, self._or([moved, invalid])], bool, hw)
        y = self._op("Where", [taken, fresh, gathered], np.float32, fresh.shape)
        changed = self._or([self._op("And", [any_in, moved], bool, hw), invalid])
        self._store(y, cache_out)
        for consumer in list(fresh.outputs):  # the block's consumers read the assembled y
            if id(consumer) in consumers:
                for i, t in enumerate(consumer.inputs):
                    if t is fresh:
                        consumer.inputs[i] = y
        self.masks[y.name] = (changed, stride)

    def channel_slice(self, node: gs.Node) -> None:
        x = node.inputs[0]
        if x.name not in self.masks:
            return
        if node.op == "Split":
            axis = int(node.attrs.get("axis", 0))
        else:
            axes = node.inputs[3] if len(node.inputs) > 3 else None
            axis = int(axes.values[0]) if isinstance(axes, gs.Constant) and axes.values.size == 1 \
                else -1
        if axis == 1:
            for out in node.outputs:
                self.masks[out.name] = self.masks[x.name]

    def merge(self, node: gs.Node) -> None:
        ins = node.inputs
        if not all(t.name in self.masks for t in ins):
            return
        if node.op == "Concat" and int(node.attrs.get("axis", 0)) != 1:
            return
        strides = {self.masks[t.name][1] for t in ins}
        if len(strides) != 1:
            return
        self.masks[node.outputs[0].name] = (self._or([self.masks[t.name][0] for t in ins]),
                                            strides.pop())

    def resize(self, node: gs.Node) -> None:
        """Nearest upsampling by an integer factor f: every mask position repeated f x f."""
        scales = node.inputs[2] if len(node.inputs) > 2 else None
        if (node.attrs.get("mode", "nearest") != "nearest" or not isinstance(scales, gs.Constant)
                or list(scales.values[:2]) != [1, 1] or scales.values[2] != scales.values[3]
                or scales.values[2] != int(scales.values[2])):
            return
        f = int(scales.values[2])
        mask, stride = self.masks[node.inputs[0].name]
        h, w = (int(d) for d in mask.shape)
        m = self._op("Cast", [mask], np.uint8, (h, w), to=onnx.TensorProto.UINT8)
        m = self._op("Reshape", [m, self._const("shape", np.array([h, 1, w, 1]))], np.uint8,
                     (h, 1, w, 1))
        m = self._op("Expand", [m, self._const("shape", np.array([h, f, w, f]))], np.uint8,
                     (h, f, w, f))
        m = self._op("Reshape", [m, self._const("shape", np.array([h * f, w * f]))], np.uint8,
                     (h * f, w * f))
        self.masks[node.outputs[0].name] = (
            self._op("Cast", [m], bool, (h * f, w * f), to=onnx.TensorProto.BOOL), stride // f)

    def _finish(self) -> FluxShardGraph:
        outputs = [t.name for t in self.g.outputs]
        self.g.nodes.extend(self.new_nodes)
        self.g.inputs.extend(self.extra_inputs)
        self.g.outputs.extend(self.extra_outputs)
        self.g.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(self.g)
        del model.opset_import[:]
        model.opset_import.extend(opset_imports())
        model = with_bodies(model)
        return FluxShardGraph(model=model, height=self.h, width=self.w, caches=self.caches,
                              strides=sorted(self.grid_inputs), cond1=dict(self.cond1),
                              outputs=outputs, input_name=self.input_name,
                              global_blocks=[(b.kind, b.name) for b in self.blocks])
