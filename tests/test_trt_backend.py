"""The TensorRT backend's pieces that need no GPU (export/, scripts/build_trt_engine.sh): the
committed Triton model config is what the default `fluxshard export` graph gives, it parses as
a Triton ModelConfig and passes tritonserver's own validation, its implicit-state pairs are the graph's cache inputs and outputs in sorted
order, its inputs are what the graph is fed, and the loader Triton's backend dlopens registers
the plugins with a TensorRT runtime (tensorrt-lean here). The engine build and the served model
run only on a GPU (scripts/gpu_check.sh)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "export" / "triton" / "fluxshard_trt"
NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_}


def _module(name: str):
    return load_script(f"export/{name}.py")


triton_config = _module("triton_config")


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """`fluxshard export` with its defaults (the embedded detector at 640x384)."""
    out = tmp_path_factory.mktemp("export")
    done = subprocess.run([sys.executable, "-m", "fluxshard.cli", "export", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_committed_config_is_the_default_exports(default_export, tmp_path):
    onnx_path = default_export / "fluxshard_trt.onnx"
    folder = triton_config.write_repository(onnx_path, tmp_path)
    for name in ("config.pbtxt", "configs/fp16.pbtxt"):
        assert parse(COMMITTED / name) == parse(folder / name), (
            f"export/triton/fluxshard_trt/{name} is stale: rewrite it with "
            "`python3 export/triton_config.py out/export/fluxshard_trt.onnx --repository "
            "export/triton`")
    fp32, fp16 = parse(COMMITTED / "config.pbtxt"), parse(COMMITTED / "configs/fp16.pbtxt")
    assert (fp32.platform, fp32.max_batch_size, fp32.default_model_filename) == (
        "tensorrt_plan", 0, "model.plan")
    assert fp16.default_model_filename == "model_fp16.plan"
    fp16.default_model_filename = fp32.default_model_filename
    assert fp16 == fp32


@pytest.mark.slow
def test_state_pairs_are_the_graphs_caches_in_sorted_order(default_export):
    import onnx

    graph = onnx.load(str(default_export / "fluxshard_trt.onnx"), load_external_data=False)
    cache_in = sorted(i.name for i in graph.graph.input if i.name.startswith("cache_in_"))
    cache_out = sorted(o.name for o in graph.graph.output if o.name.startswith("cache_out_"))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(graph.graph.input) + list(graph.graph.output)}
    states = parse(COMMITTED / "config.pbtxt").sequence_batching.state
    assert len(states) == len(cache_in) == len(cache_out) > 0
    assert [s.input_name for s in states] == cache_in
    assert [s.output_name for s in states] == cache_out
    for state in states:
        assert list(state.dims) == shapes[state.input_name] == shapes[state.output_name]
        assert state.data_type == mc.TYPE_FP32
        [initial] = state.initial_state
        assert initial.zero_data and list(initial.dims) == list(state.dims)
    # the state tensors are Triton's, not the client's: neither input nor output of the model
    config = parse(COMMITTED / "config.pbtxt")
    assert not {i.name for i in config.input} & set(cache_in)
    assert {o.name for o in config.output} == {"output0"}


def test_state_pairs_that_do_not_match_are_refused():
    inputs = [("cache_in_000", "TYPE_FP32", [1, 3, 8, 8]), ("cache_in_001", "TYPE_FP32", [1, 4])]
    outputs = [("cache_out_000", "TYPE_FP32", [1, 3, 8, 8]),
               ("cache_out_001", "TYPE_FP32", [1, 5])]
    with pytest.raises(ValueError, match="cache_in_001 .* does not pair with cache_out_001"):
        triton_config.state_pairs(inputs, outputs)
    with pytest.raises(ValueError, match="2 cache_in_\\* inputs but 1 cache_out_"):
        triton_config.state_pairs(inputs, outputs[:1])
    assert [p[:2] for p in triton_config.state_pairs(inputs[:1], outputs[:1])] == [
        ("cache_in_000", "cache_out_000")]


@pytest.mark.slow
def test_config_inputs_are_what_a_frame_feeds(default_export):
    """The reference frames of export/check_engine.py hold exactly the config's inputs, in the
    config's types and shapes (what a client of the Triton model sends per frame)."""
    check_engine = _module("check_engine")
    reference = check_engine.write_reference(default_export, default_export / "ref.npz", 2)
    config = parse(COMMITTED / "config.pbtxt")
    for frame in check_engine.reference_frames(reference):
        assert set(frame) == {i.name for i in config.input} | {"output0"}
        for spec in config.input:
            value = frame[spec.name]
            assert value.dtype == NUMPY_TYPES[mc.DataType.Name(spec.data_type)], spec.name
            assert list(value.shape) == list(spec.dims), spec.name
        assert list(frame["output0"].shape) == list(config.output[0].dims)


@pytest.mark.slow
def test_the_loader_registers_the_plugins_where_triton_only_dlopens(plugin_build, default_export,
                                                                    tmp_path):
    """Triton's TensorRT backend dlopens `plugins=` libraries and nothing more; the loader it is
    given has the process's TensorRT runtime (tensorrt-lean here) load the plugin library."""
    library, _ = plugin_build
    done = subprocess.run(["bash", "scripts/build_trt_engine.sh", "--onnx",
                           str(default_export / "fluxshard_trt.onnx"), "--repository",
                           str(tmp_path), "--plugins", str(library), "--loader-only"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loader = library.parent / "libfluxshard_trt_triton.so"
    assert (tmp_path / "fluxshard_trt" / "config.pbtxt").is_file()
    code = ("import ctypes, sys, tensorrt_lean as trt\n"
            "registry = trt.get_plugin_registry()\n"
            "ours = lambda: sorted((c.name, c.plugin_version) for c in registry.all_creators\n"
            "                      if c.name in ('MVGather', 'MaskedSparseConv'))\n"
            "before = ours()\n"
            "ctypes.CDLL(sys.argv[1])  # what the backend does with plugins=\n"
            "print(before, ours())\n")
    run = subprocess.run([sys.executable, "-c", code, str(loader)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[] [('MVGather', '1'), ('MaskedSparseConv', '1')]", run.stdout


@pytest.mark.slow
def test_engine_build_commands_load_the_plugins_by_the_registry(default_export, tmp_path):
    done = subprocess.run(["bash", "scripts/build_trt_engine.sh", "--onnx",
                           str(default_export / "fluxshard_trt.onnx"), "--repository",
                           str(tmp_path), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and "libfluxshard_trt_plugins.so not found" in done.stderr:
        pytest.skip("the plugin library is not built here (scripts/build_plugins.sh)")
    assert done.returncode == 0, done.stderr[-3000:]
    commands = [line for line in done.stdout.splitlines() if line.startswith("== ")]
    assert len(commands) == 2 and all("--dynamicPlugins=" in c for c in commands)
    assert "--noTF32" in commands[0] and "model.plan" in commands[0]
    assert "--fp16" in commands[1] and "model_fp16.plan" in commands[1]


def _tritonserver_load(config_text: str, tmp_path: Path) -> str:
    """Start the bundled tritonserver (python backend only) on a repository holding the
    fluxshard_trt model with ``config_text`` and a placeholder plan; -> its log (it exits: the
    model cannot load without the TensorRT backend)."""
    from fluxshard.serving.tritonserver import find_triton, free_port, server_environment

    install = find_triton()
    model = tmp_path / "repo" / "fluxshard_trt"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(config_text)
    (model / "1" / "model.plan").write_bytes(b"no engine: the backend is missing anyway")
    done = subprocess.run(
        [str(install.binary), f"--model-repository={tmp_path / 'repo'}",
         "--model-control-mode=none", f"--backend-directory={install.backend_dir}",
         f"--http-port={free_port()}", f"--grpc-port={free_port()}",
         f"--metrics-port={free_port()}"],
        env=server_environment(install), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    return done.stdout + done.stderr


def test_tritonserver_accepts_the_config_up_to_the_missing_backend(triton_installed, tmp_path):
    """Triton's own validation of the repository (model_repository_manager's poll) passes the
    committed config; loading then stops only because this server has no TensorRT backend. The
    control: a setting Triton refuses for a model without batching is refused at the poll."""
    log = _tritonserver_load((COMMITTED / "config.pbtxt").read_text(), tmp_path / "ours")
    assert "Poll failed" not in log, log[-3000:]
    assert "unable to find backend library for backend 'tensorrt'" in log, log[-3000:]
    broken = (COMMITTED / "config.pbtxt").read_text().replace(
        "max_candidate_sequences: 16", "max_candidate_sequences: 16 preferred_batch_size: [ 4 ]")
    log = _tritonserver_load(broken, tmp_path / "control")
    assert "Poll failed for model directory 'fluxshard_trt'" in log, log[-3000:]
    assert "preferred batch size must be <= max batch size" in log
