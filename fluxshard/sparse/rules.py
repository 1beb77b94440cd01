"""Mask-propagation rules, one class per op type (the detectron2 registry / DeltaCNN idea).

A rule says how the changed mask of a tensor propagates through one kind of op, on both paths
that run FluxShard:

* ``sparse``: the torch executor (:class:`fluxshard.sparse.executor.SparseExecutor`) walking the
  model's modules; the rule is looked up by the module's type (its nearest registered class, so
  C3k2 takes C2f's rule);
* ``onnx_ops`` / ``rewrite``: the ONNX op types the op becomes in a dense export and what the
  graph rewrite (:mod:`fluxshard.graph.rewrite`) builds for them; the rewrite looks the rule up by
  op type. A container (Bottleneck, C2f, ...) dissolves into the ops of other rules on export
  and names none.

Adding an op whose mask follows one of the existing kinds (or'ed, passed on, dilated through a
window, recomputed densely and compared) is one rule class here. The rewrite calls only the
rewriter's public mask steps (``conv``, ``merge``, ``channel_slice``, ``resize``,
``dense_block``), so this module imports neither onnx nor graphsurgeon.

An op type with no rule: the executor refuses the model (``TypeError`` when it is built or when
the frame reaches the op) rather than run it densely, because it cannot know which outputs of an
unknown op a changed input reaches and any guess could silently reuse stale values; the rewrite
warns and leaves the op dense (its consumers then read its values densely, which is exact, only
slower).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.models.modules import (C2PSA, SPPF, Bottleneck, C2f, C3, Concat, Conv, Detect,
                                      Segment)

if TYPE_CHECKING:
    from .state import FrameContext, FrameWalker



class Feat(NamedTuple):
    """A tensor on the sparse path: its assembled value, the mask of positions whose value
    differs from the MV-gathered cache of the same tensor, and its grid stride."""

    value: torch.Tensor  # (1, C, H, W)
    changed: torch.Tensor  # (H, W) bool
    stride: int


_BY_MODULE: dict[type, "MaskRule"] = {}
_BY_ONNX_OP: dict[str, "MaskRule"] = {}


class MaskRule:
    """How a changed mask goes through one op type: subclass, set ``modules`` and/or
    ``onnx_ops``, implement ``sparse`` and/or ``rewrite``, and decorate with :func:`register`."""

    modules: tuple[type, ...] = ()  # torch module types the executor walks with this rule
    onnx_ops: tuple[str, ...] = ()  # ONNX op types the rewrite handles with this rule

    def sparse(self, ex: FrameWalker, ctx: FrameContext, m: nn.Module, x) -> Feat:
        raise NotImplementedError(f"{type(self).__name__} has no torch executor side")

    def rewrite(self, rw, node) -> None:
        """``rw``: the rewriter (fluxshard.graph.rewrite), ``node``: a graphsurgeon node one of
        whose inputs carries a mask."""
        raise NotImplementedError(f"{type(self).__name__} has no ONNX rewrite side")


def register(cls: type[MaskRule]) -> type[MaskRule]:
    """Class decorator: the rule for its ``modules`` and ``onnx_ops`` (each claimed once)."""
    rule = cls()
    for key, table in [(t, _BY_MODULE) for t in cls.modules] + [(op, _BY_ONNX_OP)
                                                                  for op in cls.onnx_ops]:
        if key in table:
            raise ValueError(f"{key!r} already has the mask rule {type(table[key]).__name__}")
        table[key] = rule
    return cls


def rule_for_module(m: nn.Module) -> MaskRule | None:
    """The rule of ``m``'s nearest registered class, or None."""
    for cls in type(m).__mro__:
        rule = _BY_MODULE.get(cls)
        if rule is not None:
            return rule
    return None


def rule_for_onnx_op(op: str) -> MaskRule | None:
    return _BY_ONNX_OP.get(op)


def no_rule_error(m: nn.Module) -> TypeError:
    return TypeError(f"the sparse executor has no mask rule for {type(m).__name__}: register a "
                     "MaskRule for it in fluxshard/sparse/rules.py")


# ------------------------------------------------------------------------------ the rules

@register
class ConvRule(MaskRule):
    """Recompute where the receptive field holds a changed input, RFAP fails or the gather is
    invalid; the rest keeps the MV-gathered cache. ONNX: Conv (+ Sigmoid, Mul: SiLU) becomes
    MVGather + MaskedSparseConv, the mask dilated by a MaxPool."""

    modules = (Conv, nn.Conv2d)
    onnx_ops = ("Conv",)

    def sparse(self, ex, ctx, m, x):
        if isinstance(m, Conv):
            return ex.conv(ctx, m.conv, m.act, x)
        return ex.conv(ctx, m, nn.Identity(), x)

    def rewrite(self, rw, node):
        if node.inputs[0].name in rw.masks:
            rw.conv(node)


@register
class SequentialRule(MaskRule):
    modules = (nn.Sequential,)

    def sparse(self, ex, ctx, m, x):
        for sub in m:
            x = ex.module(ctx, sub, x)
        return x


@register
class BottleneckRule(MaskRule):
    """Two convs, then the shortcut's Add (``MergeRule``)."""

    modules = (Bottleneck,)

    def sparse(self, ex, ctx, m, x):
        y = ex.module(ctx, m.cv2, ex.module(ctx, m.cv1, x))
        return merge([x, y], add=True) if m.add else y


@register
class C2fRule(MaskRule):
    """C2f and C3k2: a conv, its channel split (``ChannelSplitRule``), the blocks, a Concat."""

    modules = (C2f,)

    def sparse(self, ex, ctx, m, x):
        y = ex.module(ctx, m.cv1, x)
        parts = list(channel_split(y, (m.c, m.c)))
        for block in m.m:
            parts.append(ex.module(ctx, block, parts[-1]))
        return ex.module(ctx, m.cv2, merge(parts))


@register
class C3Rule(MaskRule):
    modules = (C3,)

    def sparse(self, ex, ctx, m, x):
        a = ex.module(ctx, m.m, ex.module(ctx, m.cv1, x))
        return ex.module(ctx, m.cv3, merge([a, ex.module(ctx, m.cv2, x)]))


@register
class GlobalBlockRule(MaskRule):
    """Receptive field global: run densely when any input changed; the difference to the
    gathered cache (truncated at tau / ||w||_1 of the last conv) says what changed. ONNX: found
    by structure, not op type (fluxshard.graph.rewrite.find_global_blocks: SPPF, a chain of
    stride-1 MaxPools joined by a Concat; C2PSA, a Softmax between a conv's channel split and
    the Concat that joins it back) and rewritten with the rewriter's ``dense_block``."""

    modules = (SPPF, C2PSA)

    def sparse(self, ex, ctx, m, x):
        return ex.dense_block(ctx, m, x, m.cv2.conv)


@register
class ConvTransposeRule(MaskRule):
    """The seg prototypes' stride-2 transposed conv: cheap, so run densely and compared."""

    modules = (nn.ConvTranspose2d,)
    onnx_ops = ("ConvTranspose",)

    def sparse(self, ex, ctx, m, x):
        return ex.dense_block(ctx, m, x, None, out_stride=x.stride // m.stride[0])

    def rewrite(self, rw, node):
        if node.inputs[0].name in rw.masks:
            rw.dense_block([node])


@register
class UpsampleRule(MaskRule):
    """Nearest upsampling by f: every mask position repeated f x f. ONNX: Resize (nearest)."""

    modules = (nn.Upsample,)
    onnx_ops = ("Resize",)

    def sparse(self, ex, ctx, m, x):
        f = int(m.scale_factor)
        return Feat(F.interpolate(x.value, scale_factor=f, mode="nearest"),
                    x.changed.repeat_interleave(f, 0).repeat_interleave(f, 1), x.stride // f)

    def rewrite(self, rw, node):
        if node.inputs[0].name in rw.masks:
            rw.resize(node)


@register
class MergeRule(MaskRule):
    """Concat along channels and Add: the masks or'ed."""

    modules = (Concat,)
    onnx_ops = ("Concat", "Add")

    def sparse(self, ex, ctx, m, x):
        return merge(x)

    def rewrite(self, rw, node):
        rw.merge(node)


@register
class ChannelSplitRule(MaskRule):
    """A split along channels (C2f's chunk): every part keeps the mask."""

    onnx_ops = ("Split", "Slice")

    def rewrite(self, rw, node):
        rw.channel_slice(node)


@register
class DetectRule(MaskRule):
    """The head: its convs carry masks; the decode reads the assembled maps densely. ONNX: the
    decode starts with each level's Reshape, where the masks end."""

    modules = (Detect,)
    onnx_ops = ("Reshape",)

    def sparse(self, ex, ctx, m, x):
        return m.decode(head_maps(ex, ctx, m, x))

    def rewrite(self, rw, node):
        pass  # the mask ends: consumers read the assembled values densely


@register
class SegmentRule(MaskRule):
    """Detect's rule plus the prototypes (conv, transposed conv, convs) and the mask coefficients;
    ONNX as Detect."""

    modules = (Segment,)

    def sparse(self, ex, ctx, m, xs):
        p = ex.module(ctx, m.proto.cv1, xs[0])
        # 2x2 stride-2 transposed conv: output q reads input q // 2 only
        p = ex.module(ctx, m.proto.upsample, p)
        p = ex.module(ctx, m.proto.cv3, ex.module(ctx, m.proto.cv2, p)).value
        p = p.clone(memory_format=torch.contiguous_format)  # the cache stays ours
        mc = torch.cat([ex.module(ctx, m.cv4[i], xs[i]).value.flatten(2) for i in range(m.nl)],
                       2)
        return torch.cat([m.decode(head_maps(ex, ctx, m, xs)), mc], 1), p


# ------------------------------------------------------------------------- shared helpers

def head_maps(ex: FrameWalker, ctx: FrameContext, m: Detect, xs: list[Feat]):
    """Each level's box and class maps, as Detect.decode takes them."""
    return [torch.cat((ex.module(ctx, m.cv2[i], xs[i]).value,
                       ex.module(ctx, m.cv3[i], xs[i]).value), 1) for i in range(m.nl)]


def merge(parts: list[Feat], add: bool = False) -> Feat:
    """Channel Concat (with ``add``: the sum) of ``parts``: the masks or'ed."""
    changed = parts[0].changed
    for p in parts[1:]:
        changed = changed | p.changed
    if add:
        value = parts[0].value
        for p in parts[1:]:
            value = value + p.value
    else:
        value = torch.cat([p.value for p in parts], 1)
    return Feat(value, changed, parts[0].stride)


def channel_split(x: Feat, sizes: tuple[int, ...]):
    return (Feat(v, x.changed, x.stride) for v in x.value.split(sizes, 1))
