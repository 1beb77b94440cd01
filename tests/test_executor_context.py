"""The sparse executor keeps nothing per frame on itself (issue 15, item 2): streams on threads
share one executor without a lock, a frame that fails leaves its stream as a fresh one, and every
op type goes through a registered mask rule on both paths (torch executor, ONNX rewrite)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import run_in_threads
from fluxshard.graph.rewrite import rewrite, rewrite_onnx
from fluxshard.sparse import AdaptiveBypass, SparseExecutor, StreamState
from fluxshard.sparse.rules import rule_for_module, rule_for_onnx_op
from test_executor import random_model

H, W = 96, 128


def stream_frames(seed: int, frames: int = 4):
    """(frame, field, key) of one stream: a pan by 4 px with a small patch that changes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, H, W, generator=gen)
    pan = np.zeros((H // 4, W // 4, 2), np.float32)
    pan[..., 0] = 4.0
    out = [(x, None, True)]
    for i in range(1, frames):
        x = x.roll(-4, 3).clone()
        x[:, :, 8 * i:8 * i + 12, 16:40] = torch.rand(1, 3, 12, 24, generator=gen)
        out.append((x, pan, False))
    return out


def run_stream(executor, frames):
    stream = StreamState()
    return [executor.run(stream, x, f, key=k)[0] for x, f, k in frames]


def assert_same_outputs(got, want):
    for a, b in zip(got, want, strict=True):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_streams_on_threads_share_one_executor_without_a_lock(task):
    model = random_model(task)
    executor = SparseExecutor(model, tau=0.02, dense_above=0.6)
    inputs = {seed: stream_frames(seed) for seed in range(3)}
    serial = {seed: run_stream(executor, frames) for seed, frames in inputs.items()}
    concurrent = {}

    def work(seed):
        concurrent[seed] = run_stream(executor, inputs[seed])

    run_in_threads(work, list(inputs))
    for seed in inputs:
        assert_same_outputs(concurrent[seed], serial[seed])
    assert not any(k.startswith("_") and k not in ("_geometries", "_geometries_lock",
                                                     "_point_weights", "_tables_device")
                   for k in vars(executor)), "per-frame scratch left on the executor"


class FailingClock:
    """The executor's clock, which can be told to fail at its n-th reading from now (a frame
    that dies half way through its layers)."""

    def __init__(self):
        self.now, self.fail_in = 0.0, None

    def __call__(self) -> float:
        if self.fail_in is not None:
            self.fail_in -= 1
            if self.fail_in == 0:
                self.fail_in = None
                raise RuntimeError("clock failed mid-frame")
        self.now += 1.0
        return self.now


def test_a_frame_that_fails_leaves_the_stream_as_a_fresh_one():
    model = random_model("detect")
    clock = FailingClock()
    executor = SparseExecutor(model, tau=0.02, clock=clock)
    frames = stream_frames(5, frames=5)
    stream = StreamState()
    for x, f, k in frames[:3]:
        executor.run(stream, x, f, key=k)
    clock.fail_in = 12  # some layers in: their caches are already this frame's
    with pytest.raises(RuntimeError, match="mid-frame"):
        executor.run(stream, *frames[3][:2])
    x, f, _ = frames[4]
    got, report = executor.run(stream, x, f)
    want, fresh_report = executor.run(StreamState(), x, f)
    assert report.key and fresh_report.key
    assert torch.equal(got, want)


def test_every_module_of_the_models_and_every_op_of_their_export_has_a_rule():
    for task in ("detect", "segment"):
        model = random_model(task)
        for m in model.model:
            assert rule_for_module(m) is not None, type(m).__name__
    for op in ("Conv", "ConvTranspose", "Concat", "Add", "Split", "Slice", "Resize", "Reshape"):
        assert rule_for_onnx_op(op) is not None, op
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a YOLO11 export rewrites without an unknown op
        rewrite(random_model("segment"), (64, 96))


def test_an_op_without_a_rule_is_refused_by_the_executor_and_warned_by_the_rewrite(tmp_path):
    model = random_model("detect")
    model.model[1] = torch.nn.Identity()  # a module type no rule knows
    with pytest.raises(TypeError, match="no mask rule for Identity.*rules.py"):
        SparseExecutor(model)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 1, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3, 1, 1)).eval()
    path = tmp_path / "relu.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    with pytest.warns(UserWarning, match="no mask rule for ONNX op 'Relu'"):
        graph = rewrite_onnx(path)
    assert len(graph.caches) == 2  # the input and the first conv; past the Relu: dense


def test_the_bypass_policy_around_an_executor_equals_the_executor_built_with_one():
    model = random_model("detect")
    with torch.no_grad():
        runner = lambda x: model(x)  # noqa: E731  the dense model as the bypass
    frames = stream_frames(7)
    policy = AdaptiveBypass(SparseExecutor(model), runner, above=0.0)
    built = SparseExecutor(model, bypass=runner, bypass_above=0.0)
    got, want = StreamState(), StreamState()
    for x, f, k in frames:
        (a, ra), (b, rb) = policy.run(got, x, f, key=k), built.run(want, x, f, key=k)
        assert torch.equal(a, b) and ra.bypassed == rb.bypassed == (not k)
    assert policy.model is built.model
