"""plugins_trt/<name>Plugin/<Op>_PluginConfig.yaml describe each op once more (as TensorRT OSS
plugin folders do): they must agree with the ONNX function signatures, the node builder's attributes, the golden
tolerances and, where the library is built, the plugin creators' fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fluxshard.graph import golden
from fluxshard.graph.functions import (masked_sparse_conv_function, masked_sparse_conv_node,
                                       mv_gather_function)
from fluxshard.sparse.spec import ACTIVATIONS, OPS

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = {"MVGather": mv_gather_function, "MaskedSparseConv": masked_sparse_conv_function}


def plugin_config(op: str) -> dict:
    """The op's whole PluginConfig (name, domain, versions), found in its plugin folder."""
    found = list((ROOT / "plugins_trt").glob(f"*/{op}_PluginConfig.yaml"))
    assert len(found) == 1, f"one {op}_PluginConfig.yaml in a plugins_trt/ folder, found {found}"
    data = yaml.safe_load(found[0].read_text())
    assert data["name"] == op and data["domain"] == "fluxshard"
    return data


def plugin_version(op: str) -> str:
    """The one version the plugin library builds of the op."""
    versions = list(plugin_config(op)["versions"])
    assert len(versions) == 1, versions
    return versions[0]


def config(op: str) -> dict:
    return plugin_config(op)["versions"][plugin_version(op)]


@pytest.mark.parametrize("op", OPS)
def test_config_matches_the_onnx_function(op):
    c, function = config(op), FUNCTIONS[op]()
    assert c["inputs"] == list(function.input) and c["outputs"] == list(function.output)
    assert c["attributes"] == list(function.attribute)
    assert set(c["input_dims"]) == set(c["inputs"]) and set(c["output_dims"]) == set(c["outputs"])
    assert set(c["supported_input_types"]["combination1"]) == set(c["inputs"])


def test_conv_config_matches_the_node_builder_and_the_golden_tolerances():
    c = config("MaskedSparseConv")
    node = masked_sparse_conv_node("x", "r", "g", "i", "W", "b", "y", "c", kernel=3, stride=1,
                                   padding=1)
    assert sorted(a.name for a in node.attribute) == sorted(c["attributes"])
    assert c["attribute_options"]["activation"] == list(ACTIVATIONS)
    assert (c["abs_tol"], c["rel_tol"]) == (golden.ATOL, golden.RTOL)
    assert config("MVGather")["abs_tol"] == 0.0


def test_config_matches_the_built_plugin_creators(plugin_build):
    import tensorrt_lean as trt  # a test dependency (pyproject [test])
    library, _ = plugin_build
    registry = trt.get_plugin_registry()
    registry.load_library(str(library))
    types = {"int32": trt.PluginFieldType.INT32, "float32": trt.PluginFieldType.FLOAT32,
             "char": trt.PluginFieldType.CHAR}
    for op in OPS:
        c = config(op)
        creator = registry.get_creator(op, plugin_version(op), "")
        fields = [(f.name, f.type) for f in creator.field_names]
        assert fields == [(a, types[c["attribute_types"][a]]) for a in c["attributes"]]
    assert np.isfinite(config("MaskedSparseConv")["abs_tol"])
