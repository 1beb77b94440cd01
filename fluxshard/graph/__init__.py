"""FluxShard as ONNX graphs: the ops as nodes of domain ``fluxshard`` with local-function bodies
(ONNX Runtime flavour) or without (TensorRT flavour, plugins bind)."""

from .functions import (DOMAIN, MASKED_SPARSE_CONV, MV_GATHER, OPSET, functions,
                        masked_sparse_conv_node, mv_gather_node, opset_imports, with_bodies,
                        without_bodies)

__all__ = ["DOMAIN", "MASKED_SPARSE_CONV", "MV_GATHER", "OPSET", "functions",
           "masked_sparse_conv_node", "mv_gather_node", "opset_imports", "with_bodies",
           "without_bodies"]
