"""The user's own model: `fluxshard run/serve/export --weights` with a checkpoint or an
ultralytics-layout state dict (class names and count from the weights), `fluxshard export --onnx`
on an ultralytics-layout ONNX export with the global blocks found by pattern and `--verify`
through polygraphy, and sizes padded to multiples of 32.

ultralytics is not a dependency: the stand-ins are our YOLO11, whose modules and state-dict keys
mirror ultralytics', saved the way ultralytics saves (``{'model': state_dict, 'names': ...}``) and
exported the way `yolo export format=onnx` exports (BN folded, input ``images``, decoded
``output0`` of (1, 4 + nc, anchors), node names ``/model.9/m/MaxPool``, class names in the
metadata)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from fluxshard import synth
from fluxshard.cli import main
from fluxshard.graph.rewrite import (OnnxStream, _static_graph, find_global_blocks, input_size,
                                     rewrite_onnx)
from fluxshard.models import build_yolo11, export_onnx, fuse, save_checkpoint
from fluxshard.models.export import onnxruntime_session

FACTORY_NAMES = {0: "forklift", 1: "pallet", 2: "worker"}
SEVEN_NAMES = {k: f"part{k}" for k in range(7)}


def user_model(names: dict[int, str], seed: int = 0, confident: int = 1):
    """A random YOLO11n detector with ``names``, whose class ``confident`` scores high
    everywhere, so every frame has detections to label."""
    torch.manual_seed(seed)
    model = build_yolo11("n", "detect", len(names), names=names).eval()
    with torch.no_grad():
        for branch in model.head.cv3:
            branch[-1].bias[confident] = 8.0
    return model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A short synthetic clip whose height is not a multiple of 32."""
    spec = synth.SceneSpec(width=160, height=120, frames=4, gop=4, camera="static")
    return synth.make_clip(spec, tmp_path_factory.mktemp("clip"), name="user", progress=False).video


def ultralytics_onnx(model, path, imgsz=(128, 160), opset=19, dynamic=False):
    """What `yolo export format=onnx` writes for ``model``: fused, ``images`` -> ``output0``,
    the class names in the metadata as a dict literal."""
    fused = fuse(model)
    if dynamic:
        m = fused.float().eval()
        torch.onnx.export(m, (torch.zeros(1, 3, *imgsz),), str(path), input_names=["images"],
                          output_names=["output0"], opset_version=opset, dynamo=False,
                          dynamic_axes={"images": {2: "height", 3: "width"},
                                        "output0": {2: "anchors"}})
    else:
        export_onnx(fused, path, imgsz, opset=opset)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {"names": str(dict(model.names)), "stride": "32",
                                        "task": "detect"})
    onnx.save(proto, path)
    return path


def run_verb(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


# ------------------------------------------------------------------------------- run --weights

def test_run_with_our_checkpoint_labels_detections_with_its_names(tmp_path, clip, capsys):
    weights = save_checkpoint(user_model(FACTORY_NAMES), tmp_path / "factory.pt")
    out = tmp_path / "run"
    code, printed = run_verb(["run", "--imgsz", "native",
                              clip, "--weights", weights, "--dispatch", "edge",
                              "--frames", "3", "--out", out, "--no-progress"], capsys)
    assert code == 0, printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == list(FACTORY_NAMES.values())
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    names = {n for r in records for n in r["names"]}
    assert len(records) == 3 and "pallet" in names and names <= set(FACTORY_NAMES.values())
    assert "size 160x120 padded to 160x128" in printed.out


def test_run_with_an_ultralytics_state_dict_of_seven_classes(tmp_path, clip, capsys):
    model = user_model(SEVEN_NAMES, seed=1, confident=5)
    weights = tmp_path / "sd.pt"
    # an ultralytics state dict saved with its class names
    torch.save({"model": model.state_dict(), "names": dict(model.names)}, weights)
    out = tmp_path / "run"
    code, printed = run_verb(["run", "--imgsz", "native",
                              clip, "--weights", weights, "--dispatch", "edge",
                              "--frames", "2", "--out", out, "--no-progress"], capsys)
    assert code == 0, printed.err
    assert json.loads((out / "summary.json").read_text())["classes"] == list(SEVEN_NAMES.values())
    first = json.loads((out / "detections.jsonl").read_text().splitlines()[0])
    assert "part5" in first["names"]


def test_run_with_a_file_that_is_no_detector_says_so(tmp_path, clip, capsys):
    weights = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    code, printed = run_verb(["run", "--imgsz", "native",
                              clip, "--weights", weights, "--dispatch", "edge",
                              "--out", tmp_path / "run", "--no-progress"], capsys)
    assert code == 1 and "not a YOLO11 or Darknet checkpoint" in printed.err


def test_serve_weights_reach_the_models_config_as_an_absolute_path(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from fluxshard.serving.tritonserver import DEFAULT_MODEL_REPOSITORY, repository_with_weights

    weights = (tmp_path / "w.pt").resolve()
    repo = repository_with_weights(DEFAULT_MODEL_REPOSITORY, weights, tmp_path / "repo")
    for config in ("fluxshard/config.pbtxt", "fluxshard/configs/gpu.pbtxt"):
        message = text_format.Parse((repo / config).read_text(), model_config_pb2.ModelConfig())
        assert message.parameters["weights"].string_value == str(weights)
    assert (repo / "fluxshard" / "1" / "model.py").is_file()  # the backend code is linked


# ------------------------------------------------------------------- global blocks by pattern

def renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every node and inner tensor renamed: no ``/model.N/`` left."""
    graph = gs.import_onnx(model)
    keep = {t.name for t in graph.inputs + graph.outputs}
    for i, node in enumerate(graph.nodes):
        node.name = f"node{i}"
    for i, tensor in enumerate(t for t in graph.tensors().values() if t.name not in keep):
        tensor.name = f"tensor{i}"
    return gs.export_onnx(graph)


def test_global_blocks_are_found_by_pattern_on_both_layouts(tmp_path):
    model = user_model(SEVEN_NAMES)
    ours = onnx.load(export_onnx(fuse(build_yolo11("n", "segment", 2).eval()),
                                 tmp_path / "ours.onnx", (128, 160)))
    theirs = onnx.load(ultralytics_onnx(model, tmp_path / "yolo.onnx"))
    for proto in (ours, theirs, renamed(theirs)):
        graph = _static_graph(proto)
        blocks = find_global_blocks(graph)
        assert [b.kind for b in blocks] == ["SPPF", "C2PSA"]
        sppf, c2psa = blocks
        assert [n.op for n in sppf.nodes].count("MaxPool") == 3
        assert sorted({n.op for n in c2psa.nodes} & {"Softmax", "MatMul"}) == ["MatMul",
                                                                                "Softmax"]
        assert sppf.nodes[0].op == c2psa.nodes[0].op == "Conv"  # from the entry conv ...
        assert sppf.output.outputs and sppf.output in c2psa.nodes[0].inputs  # ... to the exit


def test_renamed_graph_rewrites_and_its_key_frame_equals_dense(tmp_path):
    path = ultralytics_onnx(user_model(SEVEN_NAMES), tmp_path / "yolo.onnx")
    anonymous = tmp_path / "anonymous.onnx"
    onnx.save(renamed(onnx.load(path)), anonymous)
    graph = rewrite_onnx(anonymous)
    assert [k for k, _ in graph.global_blocks] == ["SPPF", "C2PSA"]
    x = np.random.default_rng(0).random((1, 3, 128, 160), dtype=np.float32)
    dense = onnxruntime_session(path, threads=1).run(["output0"], {"images": x})[0]
    got = OnnxStream(graph, threads=1).run(x, None, key=True)[0]
    np.testing.assert_allclose(got, dense, atol=1e-3, rtol=1e-4)


def test_a_graph_without_global_blocks_is_rewritten_all_sparse(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 4, 3, 2, 1)).eval()
    path = tmp_path / "plain.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 64, 96),), str(path), input_names=["frame"],
                      output_names=["y"], opset_version=17, dynamo=False)
    graph = rewrite_onnx(path)
    assert graph.global_blocks == [] and graph.input_name == "frame"
    assert len(graph.caches) == 3  # the input and both convs
    x = np.random.default_rng(1).random((1, 3, 64, 96), dtype=np.float32)
    with torch.no_grad():
        dense = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxStream(graph, threads=1).run(x, None, key=True)[0], dense,
                               atol=1e-5)


def test_a_graph_that_takes_no_image_fails_clearly(tmp_path):
    net = torch.nn.Linear(4, 2).eval()
    path = tmp_path / "linear.onnx"
    torch.onnx.export(net, (torch.zeros(1, 4),), str(path), input_names=["v"], dynamo=False)
    with pytest.raises(ValueError, match=r"expected one \(1, 3, H, W\) image input"):
        rewrite_onnx(path)


# --------------------------------------------------------------------- export --onnx --verify

def test_export_onnx_of_an_ultralytics_export_verifies_through_polygraphy(tmp_path, capsys):
    path = ultralytics_onnx(user_model(SEVEN_NAMES), tmp_path / "yolo11n-parts.onnx")
    out = tmp_path / "export"
    code, printed = run_verb(["export", "--onnx", path, "--verify", "2", "--out", out], capsys)
    assert code == 0, printed.out + printed.err
    assert "global blocks (run densely): SPPF at" in printed.out and "C2PSA at" in printed.out
    # polygraphy's own report: both iterations compared, and passed
    assert "Passed: 2/2 iterations" in printed.out and "PASSED | Runtime" in printed.out
    assert "stream check against the torch executor is skipped" in printed.out
    io = json.loads((out / "fluxshard_io.json").read_text())
    assert io["images"] == [1, 3, 128, 160] and io["input"] == "images"
    assert io["names"] == {str(k): v for k, v in SEVEN_NAMES.items()}
    assert (out / "verify" / "fluxshard_inputs.json").is_file()


def test_export_onnx_with_its_weights_also_checks_the_torch_executor(tmp_path, capsys):
    model = user_model(FACTORY_NAMES, seed=2)
    weights = save_checkpoint(model, tmp_path / "factory.pt")
    path = ultralytics_onnx(model, tmp_path / "factory.onnx", opset=17)
    code, printed = run_verb(["export", "--onnx", path, "--weights", weights, "--verify", "2",
                              "--out", tmp_path / "export"], capsys)
    assert code == 0, printed.out + printed.err
    worst = float(printed.out.split("decoded output: ")[1].split()[0])
    assert "Passed: 2/2 iterations" in printed.out and worst < 1e-2


def test_export_pads_a_dynamic_onnx_and_refuses_a_fixed_one_at_another_size(tmp_path, capsys):
    model = user_model(FACTORY_NAMES, seed=3)
    dynamic = ultralytics_onnx(model, tmp_path / "dynamic.onnx", dynamic=True)
    assert input_size(dynamic) is None
    out = tmp_path / "export"
    code, printed = run_verb(["export", "--onnx", dynamic, "--size", "160", "120", "--out", out],
                             capsys)
    assert code == 0, printed.err
    assert "size 160x120 padded to 160x128" in printed.out
    assert json.loads((out / "fluxshard_io.json").read_text())["images"] == [1, 3, 128, 160]
    fixed = ultralytics_onnx(build_yolo11("n", "detect", 3).eval(), tmp_path / "fixed.onnx")
    code, printed = run_verb(["export", "--onnx", fixed, "--size", "320", "320", "--out", out],
                             capsys)
    assert code == 1 and "fixed at 160x128" in printed.err


def test_export_size_640_272_is_padded_to_640_288(tmp_path, capsys):
    weights = save_checkpoint(user_model(FACTORY_NAMES, seed=4), tmp_path / "factory.pt")
    out = tmp_path / "export"
    code, printed = run_verb(["export", "--weights", weights, "--size", "640", "272",
                              "--out", out], capsys)
    assert code == 0, printed.err
    assert "size 640x272 padded to 640x288" in printed.out
    io = json.loads((out / "fluxshard_io.json").read_text())
    assert io["images"] == [1, 3, 288, 640]
    assert io["names"] == {str(k): v for k, v in FACTORY_NAMES.items()}


@pytest.mark.slow
def test_run_starts_a_local_cloud_that_serves_the_same_weights(tmp_path, clip, capsys,
                                                               triton_installed):
    """The local tritonserver gets the weights too: with 3 classes and class 1 scoring high, the
    cloud's detections are all "pallet" (the embedded detector has 4 other classes)."""
    weights = save_checkpoint(user_model(FACTORY_NAMES), tmp_path / "factory.pt")
    out = tmp_path / "run"
    code, printed = run_verb(["run", "--imgsz", "native",
                              clip, "--weights", weights, "--dispatch", "cloud",
                              "--frames", "3", "--out", out, "--no-progress"], capsys)
    assert code == 0, printed.err
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [r["endpoint"] for r in records] == ["cloud"] * 3
    assert all(r["classes"] and set(r["names"]) == {"pallet"} for r in records)
