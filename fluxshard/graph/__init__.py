"""FluxShard as ONNX graphs: the ops as nodes of domain ``fluxshard`` with local-function bodies
(ONNX Runtime flavour) or without (TensorRT flavour, plugins bind), and the whole-model rewrite of
a YOLO11 ONNX export (``rewrite_onnx``: ours or ultralytics')."""

import importlib

_FROM = {**{n: ".functions" for n in (
    "DOMAIN", "MASKED_SPARSE_CONV", "MV_GATHER", "OPSET", "functions", "masked_sparse_conv_node",
    "mv_gather_node", "opset_imports", "with_bodies", "without_bodies")},
    **{n: ".rewrite" for n in ("rewrite", "rewrite_onnx", "find_global_blocks",
                                "FluxShardGraph", "OnnxStream")}}
__all__ = sorted(_FROM)


def __getattr__(name: str):
    # loaded on first use: these modules pull in onnx and torch, which `fluxshard export --help`
    # (fluxshard.tools.export) and its argument checks should not wait for
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_FROM[name], __name__), name)
    globals()[name] = value
    return value
