"""FluxShard as ONNX graphs: the ops as nodes of domain ``fluxshard`` with local-function bodies
(ONNX Runtime flavour) or without (TensorRT flavour, plugins bind)."""

import importlib

__all__ = ["DOMAIN", "MASKED_SPARSE_CONV", "MV_GATHER", "OPSET", "functions",
           "masked_sparse_conv_node", "mv_gather_node", "opset_imports", "with_bodies",
           "without_bodies"]


def __getattr__(name: str):
    # loaded on first use: .functions pulls in onnx and torch, which `fluxshard export --help`
    # (fluxshard.graph.cli) and its argument checks should not wait for
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(".functions", __name__)
    globals().update({n: getattr(module, n) for n in __all__})
    return globals()[name]
