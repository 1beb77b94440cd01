"""The FluxShard rewrite of a whole YOLO11 ONNX graph, run by onnxruntime (the local-function
flavour) on real decoded H.264 along the edge's data path, against dense inference and the torch
executor. Tolerance as in tests/test_executor.py (strict RFAP at tau 0 is exact reuse)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from fluxshard.graph import DOMAIN
from fluxshard.graph.rewrite import OnnxStream, rewrite
from fluxshard.models import load_model, preprocess
from fluxshard.sparse import SparseExecutor, StreamState
from test_executor import (assembled_inputs, excess_error, exact_clips, head_output,  # noqa: F401
                           random_model)


def run_graph_and_dense(graph_stream, model, video, corrupt_at: int | None = None):
    """Per frame: error of the graph's decoded output against dense, in allowed units.
    ``corrupt_at``: before that frame, overwrite every cached feature (not the input cache) with
    garbage; frames after it must then differ from dense, since reused positions read caches."""
    errors = []
    for index, image, field, key in assembled_inputs(video):
        if index == corrupt_at:
            for name in list(graph_stream.caches)[1:]:
                graph_stream.caches[name] = np.full_like(graph_stream.caches[name], 7.0)
        x = preprocess(image)
        outputs = graph_stream.run(x.numpy(), field, key)
        with torch.no_grad():
            dense = model(x)
        err = excess_error(torch.from_numpy(outputs[0]), head_output(dense))
        if isinstance(dense, tuple):
            err = max(err, excess_error(torch.from_numpy(outputs[1]), dense[1]))
        errors.append(err)
    return errors


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_rewritten_graph_with_strict_rfap_equals_dense_over_20_frames(exact_clips, task):
    model = random_model(task)
    graph = rewrite(model, (320, 320), strict_rfap=True)
    onnx.checker.check_model(graph.model, full_check=True)
    errors = run_graph_and_dense(OnnxStream(graph), model, exact_clips(320, 320))
    assert len(errors) >= 21 and max(errors) <= 1.0, errors


def test_the_graph_really_reads_its_caches(exact_clips):
    """Garbage in the feature caches must show up in the output of a non-key frame of a still
    camera: the graph reuses cached positions rather than recomputing everything."""
    model = random_model("detect")
    graph = rewrite(model, (192, 320), strict_rfap=True)
    errors = run_graph_and_dense(OnnxStream(graph), model, exact_clips(320, 192, 12, "static"),
                                 corrupt_at=5)
    assert max(errors[:5]) <= 1.0 and errors[5] > 1e3, errors


def test_graph_and_torch_executor_truncate_alike_on_a_still_camera(exact_clips):
    """tau 1.0 with the trained demo detector (truncation acts on real activations): the torch
    executor following the spec literally (truncation_probe=0) and the graph keep the same
    positions, while both depart far from dense. Their float sums differ, so a value within
    rounding of a threshold may go either way: the median frame must agree within the exact
    tolerance, every frame within a small multiple of it."""
    model = load_model(None, fused=True)
    tau = 1.0
    graph_stream = OnnxStream(rewrite(model, (192, 320), tau=tau))
    executor, stream = SparseExecutor(model, tau=tau, truncation_probe=0), StreamState()
    errors, departures = [], []
    for index, image, field, key in assembled_inputs(exact_clips(320, 192, 12, "static")):
        x = preprocess(image)
        got = graph_stream.run(x.numpy(), field, key)[0]
        want, _ = executor.run(stream, x, field, key=key)
        with torch.no_grad():
            departures.append(excess_error(want, model(x)))
        errors.append(excess_error(torch.from_numpy(got), want))
    assert max(departures) > 500, departures  # truncation really changed the outputs
    assert np.median(errors) <= 1.0 and max(errors) <= 50.0, errors


def test_tensorrt_flavour_and_state_names(exact_clips):
    model = random_model("segment")
    graph = rewrite(model, (128, 160))
    trt = graph.tensorrt()
    assert not [f for f in trt.functions if f.domain == DOMAIN]
    ops = {n.op_type for n in trt.graph.node if n.domain == DOMAIN}
    assert ops == {"MVGather", "MaskedSparseConv"}
    # every cached op has a state pair whose names sort alike (Triton pairs states by position)
    ins = sorted(i.name for i in trt.graph.input if i.name.startswith("cache_in_"))
    outs = sorted(o.name for o in trt.graph.output if o.name.startswith("cache_out_"))
    assert len(ins) == len(outs) == len(graph.caches) > 50
    assert [n.replace("cache_in_", "") for n in ins] == [n.replace("cache_out_", "") for n in outs]
    assert [o.name for o in trt.graph.output][:2] == ["output0", "output1"]
    # the field-dependent inputs the graph asks for are exactly what feeds() computes
    feeds = graph.feeds(np.zeros((32, 40, 2), np.float32), key=False)
    needed = {i.name for i in trt.graph.input} - {"images"} - set(ins)
    assert set(feeds) == needed


def test_export_command_writes_both_flavours_and_verifies(tmp_path, capsys):
    import json

    from fluxshard.cli import main

    out = tmp_path / "export"
    assert main(["export", "--size", "160", "128", "--tau", "0.15", "--verify", "3",
                 "--out", str(out)]) == 0
    io = json.loads((out / "fluxshard_io.json").read_text())
    from fluxshard.tau import quantize_tau

    assert io["images"] == [1, 3, 128, 160] and io["options"]["tau"] == quantize_tau(0.15)
    ort_model, trt_model = onnx.load(out / "fluxshard.onnx"), onnx.load(out / "fluxshard_trt.onnx")
    assert len(io["states"]) == len([i for i in trt_model.graph.input
                                     if i.name.startswith("cache_in_")]) > 50
    assert {f.name for f in ort_model.functions} >= {"MVGather", "MaskedSparseConv"}
    assert not trt_model.functions
    printed = capsys.readouterr().out
    worst = float(printed.split("decoded output: ")[1].split()[0])
    assert worst < 1e-2, printed  # the executor and the graph took the same decisions
    # sizes are padded up to multiples of 32 (tests/test_user_model.py); a zero one is refused
    assert main(["export", "--size", "0", "100", "--out", str(out)]) == 2
