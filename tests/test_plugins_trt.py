"""plugins_trt/: built with nvcc (sm_87, sm_90) against the TensorRT headers, loaded into the
`tensorrt-lean` plugin registry, checked the way TensorRT uses a plugin at build time (no GPU
needed), and its CUDA kernels checked against the torch executor's golden cases on a GPU."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from fluxshard.sparse.spec import OPS
from test_plugin_configs import config, plugin_version

def test_plugins_answer_tensorrt_build_time_questions(plugin_build):
    """dlopen + getCreators as the registry does; creators, attribute validation, output types,
    formats, shape checks, workspace, serialized fields round trip, clone (selftest.cpp)."""
    library, selftest = plugin_build
    done = subprocess.run([str(selftest), "plugins", str(library)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "0 failed" in done.stdout, done.stdout + done.stderr
    assert int(done.stdout.split(" passed")[0].split()[-1]) >= 20


def test_library_loads_into_the_tensorrt_lean_registry(plugin_build):
    import tensorrt_lean as trt  # a test dependency (pyproject [test])
    library, _ = plugin_build
    registry = trt.get_plugin_registry()
    registry.load_library(str(library))
    ours = {(c.name, c.plugin_version) for c in registry.all_creators if c.name in OPS}
    assert ours == {(op, plugin_version(op)) for op in OPS}
    conv = registry.get_creator("MaskedSparseConv", plugin_version("MaskedSparseConv"), "")
    assert [f.name for f in conv.field_names] == config("MaskedSparseConv")["attributes"]

    def fields(activation: bytes):
        return trt.PluginFieldCollection([
            trt.PluginField("kernel_shape", np.array([3, 3], np.int32), trt.PluginFieldType.INT32),
            trt.PluginField("strides", np.array([2, 2], np.int32), trt.PluginFieldType.INT32),
            trt.PluginField("pads", np.array([1, 1, 1, 1], np.int32), trt.PluginFieldType.INT32),
            trt.PluginField("activation", np.frombuffer(activation, np.int8),
                            trt.PluginFieldType.CHAR),
            trt.PluginField("threshold", np.array([0.05], np.float32),
                            trt.PluginFieldType.FLOAT32)])

    plugin = conv.create_plugin("layer", fields(b"silu"), trt.TensorRTPhase.BUILD)
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    assert (core.plugin_name, core.plugin_version) == ("MaskedSparseConv",
                                                       plugin_version("MaskedSparseConv"))
    assert conv.create_plugin("layer", fields(b"relu"), trt.TensorRTPhase.BUILD) is None


@pytest.mark.gpu
def test_cuda_kernels_equal_the_torch_executor_on_golden_cases(plugin_build, tmp_path):
    """Needs a CUDA device (skips without one): MVGather exactly, MaskedSparseConv with identical
    changed masks and values within the golden cases' tolerance."""
    from fluxshard.graph.golden import write

    _, selftest = plugin_build
    names = write(tmp_path)
    done = subprocess.run([str(selftest), "kernels", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    if done.returncode == 2:
        pytest.skip("no CUDA device here: run on a GPU machine (the device tool)")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(names)} passed, 0 failed" in done.stdout
