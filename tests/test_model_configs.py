"""The Triton configs: each model's GPU variant (configs/gpu.pbtxt) is its CPU config
(config.pbtxt) with only the instance kind, its GPUs, the thread settings and the dense engine
(onnxruntime runs on CPUs only) changed, and the
python backend takes its torch device from the instance Triton gives it."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from fluxshard.serving.instance import instance_device

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
MODELS = sorted(p.parent.parent.name for p in REPOSITORY.glob("*/configs/gpu.pbtxt"))
# the CPU and GPU instances want different thread counts; yolo11_dense's engine is onnxruntime on
# a CPU and torch on the instance's GPU; fluxshard's tiles_engine onnxruntime on a CPU, TensorRT
# (and its engine file) on a GPU; fluxshard's executor tiles on a CPU, exact on a GPU until the
# TensorRT crop engine its tiles need is built there
PLACEMENT_PARAMETERS = ("torch_threads", "engine", "tiles_engine", "tiles_engine_path",
                        "executor")


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def without_placement(config: model_config_pb2.ModelConfig) -> dict:
    """The config with what may differ between CPU and GPU removed: instance kind and GPUs,
    thread and engine parameters, and how long the sequence batcher waits to fill a batch of
    what size (batching gains compute on a GPU, not on a CPU: docs/capacity.md)."""
    config = model_config_pb2.ModelConfig.FromString(config.SerializeToString())
    for group in config.instance_group:
        group.ClearField("kind")
        group.ClearField("gpus")
    if config.HasField("sequence_batching") and config.sequence_batching.HasField("oldest"):
        config.sequence_batching.oldest.ClearField("max_queue_delay_microseconds")
        config.sequence_batching.oldest.ClearField("preferred_batch_size")
    for key in PLACEMENT_PARAMETERS:
        if key in config.parameters:
            del config.parameters[key]
    return json_format.MessageToDict(config)


def triton_args(group: model_config_pb2.ModelInstanceGroup) -> dict:
    """initialize()'s instance arguments for the first instance of ``group``, as Triton's python
    backend passes them (kind without "KIND_", device id of the instance's GPU)."""
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind).removeprefix("KIND_")
    return {"model_instance_kind": kind,
            "model_instance_device_id": str(group.gpus[0] if group.gpus else 0)}


def test_every_model_has_both_configs():
    assert "fluxshard" in MODELS and "yolo11_dense" in MODELS, MODELS


@pytest.mark.parametrize("model", MODELS)
def test_gpu_config_differs_from_cpu_only_in_placement_threads_and_batching_waits(model):
    cpu = parse(REPOSITORY / model / "config.pbtxt")
    gpu = parse(REPOSITORY / model / "configs" / "gpu.pbtxt")
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert not any(g.gpus for g in cpu.instance_group)
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert all(g.gpus for g in gpu.instance_group)
    assert without_placement(gpu) == without_placement(cpu)


@pytest.mark.parametrize("model", MODELS)
def test_each_config_runs_where_its_instance_group_says(model):
    for path, device in ((REPOSITORY / model / "config.pbtxt", "cpu"),
                         (REPOSITORY / model / "configs" / "gpu.pbtxt", "cuda:0")):
        config = parse(path)
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert instance_device(triton_args(config.instance_group[0]), params) == device, path


def test_instance_device_mapping_and_refusals():
    assert instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "3"}) \
        == "cuda:3"
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) \
        == "cpu"
    with pytest.raises(ValueError, match="instance_group kind decides"):
        instance_device({"model_instance_kind": "GPU"}, {"device": "cuda"})
    with pytest.raises(ValueError, match="not supported"):
        instance_device({"model_instance_kind": "MODEL"})
