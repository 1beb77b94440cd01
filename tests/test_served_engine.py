"""The served model's engine choice (model parameters ``tiles_engine``, ``tiles_engine_path``;
fluxshard.serving.served_engine): parsed and refused at load in one line (through a real
tritonserver for the refusals), and the CPU engines' answers equal on real camera streams.

The TensorRT engine itself needs a GPU and the ``tensorrt`` module: scripts/gpu_check.sh
serves it (section 5); here only its refusals run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fluxshard.serving.served_engine import ServedEngine
from fluxshard.serving.session import SessionManager, StreamFrame

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
CLIPS = ("bikes", "carphone_pristine")
FRAMES = 6
SIZE = (320, 192)


def refusal(params, device="cpu", executor="tiles", model_dir=None) -> str:
    with pytest.raises(ValueError) as caught:
        ServedEngine.from_parameters(params, device, executor, model_dir)
    message = str(caught.value)
    assert "\n" not in message, message  # one line
    return message


def test_the_cpu_engines_are_taken_as_named_and_onnxruntime_by_default():
    assert ServedEngine.from_parameters({}) == ServedEngine("onnxruntime")
    assert ServedEngine.from_parameters({"tiles_engine": ""}).kind == "onnxruntime"
    torch_engine = ServedEngine.from_parameters({"tiles_engine": "torch"})
    assert torch_engine.session_options("cpu") == {"tile_engine": "torch", "engine_path": None,
                                                   "dense_engine": "torch"}
    # on a GPU instance the dense frames of a CPU engine run on the torch model there
    assert ServedEngine("onnxruntime").dense_engine("cpu") == "onnxruntime"
    assert ServedEngine("onnxruntime").dense_engine("cuda:0") == "torch"
    assert ServedEngine("tensorrt", Path("x")).dense_engine("cuda:0") == "tensorrt"


def test_bad_values_and_unservable_tensorrt_are_refused_in_one_line(tmp_path):
    assert "tiles_engine='cuda'" in refusal({"tiles_engine": "cuda"})
    assert "needs tiles_engine_path" in refusal({"tiles_engine": "tensorrt"})
    missing = refusal({"tiles_engine": "tensorrt", "tiles_engine_path": "tiles_trt/x.engine"},
                      device="cuda:0", model_dir=tmp_path)
    # a relative path is the model folder's
    assert f"engine file {tmp_path / 'tiles_trt/x.engine'} not found" in missing
    assert "scripts/build_tiles_trt.sh" in missing
    # the exact executor never runs the engine: nothing to refuse
    assert ServedEngine.from_parameters(
        {"tiles_engine": "tensorrt", "tiles_engine_path": "/nowhere.engine"},
        "cuda:0", "exact").kind == "tensorrt"


def test_tensorrt_on_a_cpu_instance_or_without_the_module_is_refused(tmp_path):
    plan = tmp_path / "maps.engine"
    plan.write_bytes(b"not checked before the module and the device")
    params = {"tiles_engine": "tensorrt", "tiles_engine_path": str(plan)}
    if HAS_TENSORRT:
        assert "runs on a GPU instance" in refusal(params, device="cpu")
    else:  # this machine: no TensorRT
        assert "the `tensorrt` Python module is not installed" in refusal(params, "cuda:0")


@pytest.mark.slow
@pytest.mark.parametrize("params,message", [
    ({"tiles_engine": "cuda"}, "model parameter tiles_engine='cuda': choose one of"),
    ({"tiles_engine": "tensorrt", "tiles_engine_path": "/nowhere/maps.engine"},
     "tiles_engine=tensorrt: engine file /nowhere/maps.engine not found"),
])
def test_the_served_model_refuses_to_load_with_the_line(triton_installed, tmp_path, params,
                                                        message):
    from fluxshard.serving.tritonserver import TritonServer, TritonStartError

    server = TritonServer(parameters={"executor": "tiles", **params}, models=["fluxshard"],
                          log_file=tmp_path / "server.log")
    with pytest.raises(TritonStartError):
        server.start(timeout=120)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert message in log, server.log_tail()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from fluxshard import footage
    from perf.capacity_kit import clip_payloads

    folder = tmp_path_factory.mktemp("served_engine_footage")
    return [clip_payloads(footage.camera_stream(name, folder, size=SIZE, frames=FRAMES))
            for name in CLIPS]


@pytest.mark.parametrize("executor", ["tiles", "dense"])
def test_torch_and_onnxruntime_give_equal_detections(clips, executor):
    """Two camera streams computed together (handle_many, as the served model does) on each
    CPU engine the parameter names: the same detections and the same work."""
    import torch

    from fluxshard.models import load_model
    from fluxshard.sessions import yolo_session_factory

    torch.set_num_threads(1)
    model = load_model("yolov3-tiny", fused=True)
    managers = {kind: SessionManager(yolo_session_factory(
        executor, model=model, threads=1,
        **ServedEngine.from_parameters({"tiles_engine": kind}).session_options("cpu")))
        for kind in ("torch", "onnxruntime")}
    found = 0
    for k in range(FRAMES):
        frames = [StreamFrame(c + 1, k == 0, False, clip.payloads[k])
                  for c, clip in enumerate(clips)]
        by_torch, by_onnx = (managers[kind].handle_many(frames) for kind in managers)
        for a, b in zip(by_torch, by_onnx):
            assert not isinstance(a, Exception) and not isinstance(b, Exception), (a, b)
            assert a.stats.get("crops") == b.stats.get("crops"), k
            assert a.detections.shape == b.detections.shape, k
            np.testing.assert_allclose(a.detections, b.detections, atol=1e-2)
            found += len(a.detections)
    assert found > 0  # real detections compared
