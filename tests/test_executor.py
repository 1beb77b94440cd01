"""The sparse executor against dense inference of the same model on real decoded H.264.

The edge's data path is reproduced exactly: decode (codec MVs) -> dispatch state -> residual
blocks -> assembled input (aligned cache + residual blocks) -> executor, dense model on the same
assembled input as the reference.

Tolerance for tau=0 with strict RFAP: tile-batched 3x3 convs run the same conv kernel on the same
values as the dense map (measured: bit-identical), but 1x1 convs on scattered positions run as
one matmul, whose float32 accumulation order differs from the conv kernel's: each such layer
contributes rounding of ~1 ulp (1.2e-7 relative), ~100 layers deep. Measured max error on the
decoded output: 9e-5 on box coordinates up to 640 px (1.5e-7 relative). The assert allows
|sparse - dense| <= 1e-4 + 1e-5 * |dense| elementwise: 60x the measured relative error, while
an RFAP, gather or mask bug moves scores by 1e-2 and boxes by pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fluxshard import synth
from fluxshard.models import build_yolo11, preprocess
from fluxshard.endpoint import edge_inputs
from fluxshard.sparse import SparseExecutor, StreamState

EXACT_ATOL, EXACT_RTOL = 1e-4, 1e-5
DISPATCH_TAU = 16 / 255  # the dispatch layer's tau (16 grey levels)
# Statistical bounds (issue 11; README "Measured quality" has the per-seed table). The exactness
# tolerances (EXACT_ATOL/RTOL, excess_error <= 1) are float rounding of the same computation and
# stay as they are.
# Strict tau=0 test, best per-frame cache hit rate over frames 1-21; clip seeds 0-4 (the test keeps
# 3), worst over all five parametrizations: 0.165 (segment 640x384 tile, seed 3).
# bound: worst of seeds 0-4 minus 0.03, rounded down to 0.01
MIN_STRICT_REUSE = 0.13
# Relaxed RFAP on a still camera, mean computed fraction over frames 1-11; clip seeds 0-4 (the test
# keeps 3): worst 0.620 (seed 1). bound: worst of seeds 0-4 plus 0.03, rounded up to 0.01; an
# executor that recomputes everything computes 1.0
MAX_RELAXED_STATIC_COMPUTED = 0.65
# Dense bypass test, frame 4 cache hit rate; torch.Generator seeds 0-4 (the test keeps 0): 0.658
# at every seed (the changed 16x16 corner fixes it). bound: worst of seeds 0-4 minus 0.03, rounded
# down to 0.01
MIN_BYPASS_RESUME_REUSE = 0.62
# 100-frame drift test, mean absolute score error per frame; clip seeds 0-5 (the test keeps 5):
# worst per-frame maximum 3.7e-12 (seed 2), rounding level. Another CPU's kernels may flip a few
# truncation decisions (about 1e-6 each): bound 1e-4 leaves room for that, not for drift.
DRIFT_MAX_ERROR = 1e-4
# Same test, mean error of frames 75-99 over that of frames 0-24: worst 1.140 (seed 0).
# bound: worst of seeds 0-5 plus 0.5, rounded up to 0.1, plus DRIFT_FLOOR so that flips at
# rounding level on another CPU do not count as drift
DRIFT_RATIO = 1.7
DRIFT_FLOOR = 1e-6
# scripts/gpu_check.sh runs the CUDA cases (`-k cuda`) on a lent GPU
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: scripts/gpu_check.sh runs the cuda cases on a GPU")])


def random_model(task: str, seed: int = 0):
    """yolo11n with random weights and non-trivial BatchNorm statistics (eval, fused)."""
    torch.manual_seed(seed)
    model = build_yolo11("n", task, num_classes=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval().fuse()


def assembled_inputs(video, dispatch_tau=DISPATCH_TAU):
    """(index, assembled frame, accumulated field, is_key) along the edge's data path, the
    endpoint running on every frame."""
    for mf, image, field, key in edge_inputs(video, dispatch_tau):
        yield mf.index, image, field, key


def head_output(out):
    return out[0] if isinstance(out, tuple) else out


def excess_error(sparse: torch.Tensor, dense: torch.Tensor) -> float:
    """Largest |sparse - dense| in units of the allowed error (<= 1 passes)."""
    allowed = EXACT_ATOL + EXACT_RTOL * dense.abs()
    return float(((sparse - dense).abs() / allowed).max())


def run_both(executor, model, video, frames=None, device="cpu"):
    """Per frame: (error of the decoded output vs dense in allowed units, FrameReport); model and
    executor on ``device``."""
    stream = StreamState()
    results = []
    for index, image, field, key in assembled_inputs(video):
        if frames is not None and index >= frames:
            break
        x = preprocess(image, device=device)
        with torch.no_grad():
            dense = model(x)
        sparse, report = executor.run(stream, x, field, key=key)
        err = excess_error(head_output(sparse), head_output(dense))
        if isinstance(dense, tuple):  # seg prototypes
            err = max(err, excess_error(sparse[1], dense[1]))
        results.append((err, report))
    return results


@pytest.fixture(scope="module")
def exact_clips(tmp_path_factory):
    """Camera pan on the pixel grid plus independently moving, occluding objects."""
    folder = tmp_path_factory.mktemp("executor_clips")
    made = {}

    def get(width, height, frames=22, camera="pan"):
        key = (width, height, frames, camera)
        if key not in made:
            spec = synth.SceneSpec(width=width, height=height, frames=frames, gop=frames, seed=3,
                                   camera=camera, pan_angle=0.0, pan_speed=2.0, num_objects=4)
            made[key] = synth.make_clip(spec, folder, name=f"{camera}{width}x{height}").video
        return made[key]

    return get


@pytest.fixture
def exact_float32(device):
    """Full float32 on CUDA: cuDNN's default TF32 convs round at ~1e-3, far beyond the exactness
    tolerance, and would differ between the dense map and the sparse paths' matmuls."""
    if device != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("task,size,conv_mode", [
    ("detect", (320, 320), "point"),
    ("segment", (320, 320), "point"),
    ("detect", (320, 320), "tile"),
    pytest.param("detect", (640, 384), "point", marks=pytest.mark.slow),
    pytest.param("segment", (640, 384), "tile", marks=pytest.mark.slow),
])
def test_strict_tau0_equals_dense_over_20_frames(exact_clips, exact_float32, task, size,
                                                 conv_mode, device):
    model = random_model(task).to(device)
    # dense_above 0.6: keep the sparse paths busy (the default hands big recompute sets to dense)
    executor = SparseExecutor(model, strict_rfap=True, tau=0.0, conv_mode=conv_mode,
                              dense_above=0.6)
    results = run_both(executor, model, exact_clips(*size), device=device)
    assert len(results) >= 21
    errors = [e for e, _ in results]
    assert max(errors) <= 1.0, f"per-frame error in units of the tolerance: {errors}"
    # The test only means something if caches were really reused.
    reused = [r.cache_hit_rate for _, r in results[1:]]
    assert max(reused) > MIN_STRICT_REUSE, f"no reuse happened: cache hit rates {reused}"
    assert results[0][1].key and not any(r.key for _, r in results[1:])


def test_relaxed_rfap_is_exact_on_a_static_camera(exact_clips):
    """Relaxed RFAP only approximates under heterogeneous motion; with the camera still and
    objects moving, tau=0 must still track dense within tolerance on most frames."""
    model = random_model("detect", seed=1)
    executor = SparseExecutor(model, strict_rfap=False, tau=0.0)
    results = run_both(executor, model, exact_clips(320, 192, 12, "static"))
    errors = np.array([e for e, _ in results])
    assert np.median(errors) <= 1.0, errors
    # tracking dense means something only if the caches were reused, not recomputed
    computed = [r.computed_fraction for _, r in results[1:]]
    assert np.mean(computed) <= MAX_RELAXED_STATIC_COMPUTED, computed


def test_static_scene_second_frame_recomputes_nothing():
    model = random_model("detect")
    executor = SparseExecutor(model, strict_rfap=True)
    frame = synth.Scene(synth.SceneSpec(width=320, height=192, camera="static")).render(0).image
    x = preprocess(frame)
    stream = StreamState()
    first, r1 = executor.run(stream, x, None, key=True)
    second, r2 = executor.run(stream, x, np.zeros((48, 80, 2), np.float32))
    assert r1.computed_fraction == 1.0
    assert r2.computed_fraction == 0.0 and r2.cache_hit_rate == 1.0
    assert r2.input_changed == 0.0
    assert torch.equal(first, second)



def test_index_tables_are_kept_for_a_bounded_number_of_input_sizes():
    """A server fed ever new frame sizes keeps tables for the last GEOMETRY_SIZES only, and a
    size that comes back is rebuilt correctly (its second frame reuses everything again)."""
    from fluxshard.sparse.executor import GEOMETRY_SIZES

    executor = SparseExecutor(random_model("detect"))
    sizes = [(64, 64 + 32 * k) for k in range(GEOMETRY_SIZES + 2)] + [(64, 64)]
    for h, w in sizes:
        x = torch.rand(1, 3, h, w)
        stream = StreamState()
        executor.run(stream, x, None, key=True)
        _, report = executor.run(stream, x, np.zeros((h // 4, w // 4, 2), np.float32))
        assert report.computed_fraction == 0.0
        assert len(executor._geometries) <= GEOMETRY_SIZES
    assert list(executor._geometries)[-1] == (64, 64)

@pytest.mark.slow
def test_relaxed_and_truncated_error_is_bounded_and_does_not_drift(tmp_path):
    """Relaxed RFAP + tau > 0 over 100 frames with a key frame every 25: the error against dense
    stays bounded and the last quarter is no worse than the first (no drift)."""
    spec = synth.SceneSpec(width=320, height=192, frames=100, gop=100, seed=5, camera="pan+zoom")
    video = synth.make_clip(spec, tmp_path, name="drift").video
    model = random_model("detect", seed=2)
    executor = SparseExecutor(model, strict_rfap=False, tau=0.5, keyframe_interval=25)
    stream = StreamState()
    score_errors = []
    for index, image, field, key in assembled_inputs(video):
        x = preprocess(image)
        with torch.no_grad():
            dense = model(x)
        sparse, report = executor.run(stream, x, field, key=key)
        # Scores (rows 4:) are in [0, 1]: mean absolute score error is a bounded, scale-free measure.
        score_errors.append(float((sparse[:, 4:] - dense[:, 4:]).abs().mean()))
    errors = np.array(score_errors)
    assert len(errors) == 100
    assert errors.max() < DRIFT_MAX_ERROR, errors.max()
    first, last = errors[:25].mean(), errors[75:].mean()
    assert last <= DRIFT_RATIO * first + DRIFT_FLOOR, (first, last)


def test_bad_input_is_refused_clearly():
    executor = SparseExecutor(random_model("detect"))
    stream = StreamState()
    with pytest.raises(ValueError, match="one \\(1, 3, H, W\\) frame"):
        executor.run(stream, torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        executor.run(stream, torch.zeros(1, 3, 60, 64), key=True)
    executor.run(stream, torch.zeros(1, 3, 64, 64), key=True)
    with pytest.raises(ValueError, match="does not fit"):
        executor.run(stream, torch.zeros(1, 3, 64, 64), np.zeros((40, 40, 2), np.float32))
    with pytest.raises(ValueError, match="frame is on meta but the model is on cpu"):
        executor.run(stream, torch.zeros(1, 3, 64, 64, device="meta"), key=True)


class RefuseHostCopies(TorchFunctionMode):
    """Refuses ``Tensor.numpy()``, which a CUDA tensor cannot do without a host copy."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "numpy":
            raise AssertionError("Tensor.numpy() inside the executor (impossible on CUDA)")
        return func(*args, **(kwargs or {}))


def _refuse_from_numpy(*args, **kwargs):
    raise AssertionError("torch.from_numpy inside the executor: the tensor lands on the host "
                         "(use torch.as_tensor(array, device=...))")


@pytest.mark.parametrize("options", [
    dict(strict_rfap=True, conv_mode="point", dense_above=0.6),
    dict(strict_rfap=True, conv_mode="tile", dense_above=0.6),
    dict(grid_snap=True, tau=0.3),  # snapped steps, truncation and its probe skip
    "bypass",  # the dense runner's numpy outputs
])
def test_every_tensor_the_executor_makes_follows_the_input_device(monkeypatch, options):
    """On CUDA, a mask or index table made on the host fails when mixed with the maps (or costs a
    host copy per use). Here maps and weights live on the CPU while the default device is
    'meta' (no data): any tensor the executor makes without taking its device from its inputs or
    weights lands on meta, and the first op mixing it with a real map, or reading it (bool(),
    int()), raises, or the output differs from the same run outside this mode (it must be
    equal). Host round trips (Tensor.numpy, torch.from_numpy) are refused too."""
    model = random_model("segment")
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(1, 3, 96, 128, generator=gen)
    b = a.roll(-8, 3).clone()  # a pan by 8 px: exact up to stride 8, invalid beyond
    b[:, :, 40:60, 48:80] = 0.3  # an object moving by 3.4 px: fails Cond. 2 at every grid
    c = b.clone()
    c[:, :, 8:14, 8:20] = 0.9  # a small still change: scattered recompute sets
    pan = np.zeros((24, 32, 2), np.float32)
    pan[..., 0] = 8.0
    pan[10:15, 12:20] = (3.4, 0.0)
    frames = [(a, None, True), (b, pan, False), (c, np.zeros_like(pan), False)]
    if options == "bypass":  # like onnxruntime: numpy outputs, made before the check
        with torch.no_grad():
            arrays = {id(x): [t.numpy() for t in model(x)] for x in (b, c)}
        options = dict(bypass=lambda x: arrays[id(x)], bypass_above=0.0)
        frames.append((c, np.zeros_like(pan), False))  # nothing changed: a key frame rebuilds

    def run(executor):
        stream = StreamState()
        return [executor.run(stream, x, f, key=k) for x, f, k in frames]

    expected = run(SparseExecutor(model, **options))
    executor = SparseExecutor(model, **options)
    monkeypatch.setattr(torch, "from_numpy", _refuse_from_numpy)
    with torch.device("meta"), RefuseHostCopies():
        got = run(executor)
    monkeypatch.undo()
    for (out, report), (want, want_report) in zip(got, expected):
        for t, w in zip(out, want):
            assert t.device == w.device and torch.equal(t, w)
        assert report.bypassed == want_report.bypassed
    if "bypass" in options:
        assert [r.bypassed for _, r in got] == [False, True, True, False]
        assert got[3][1].key


def test_dense_bypass_takes_unreusable_frames_and_resumes_with_a_key_frame():
    """A frame with nothing to reuse runs on the bypass runner (here the dense model itself);
    layer caches are dropped, the next reusable frame rebuilds them as a key frame, and the one
    after that reuses them."""
    model = random_model("detect")
    calls = []

    def runner(x):
        calls.append(1)
        with torch.no_grad():
            return model(x)

    executor = SparseExecutor(model, tau=0.0, bypass=runner, bypass_above=0.5)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 128, 160, generator=gen), torch.rand(1, 3, 128, 160, generator=gen)
    c = b.clone()
    c[:, :, :16, :16] = 0.5  # a small change: reusable
    still = np.zeros((32, 40, 2), np.float32)
    stream = StreamState()
    reports = []
    for x in (a, b, b, c):
        out, rep = executor.run(stream, x, None if not reports else still, key=not reports)
        with torch.no_grad():
            assert excess_error(out, model(x)) <= 1.0
        reports.append(rep)
    assert [r.bypassed for r in reports] == [False, True, False, False]
    assert [r.key for r in reports] == [True, False, True, False]
    assert len(calls) == 1 and reports[1].computed_fraction == 1.0
    assert reports[3].cache_hit_rate > MIN_BYPASS_RESUME_REUSE


def test_onnxruntime_bypass_per_input_shape_matches_dense(tmp_path):
    """The serving bypass (a runner per input shape, onnxruntime exported on first use) returns
    the model's eval output format and values."""
    from fluxshard.models.dense import ShapeRunners

    model = random_model("segment")
    runners = ShapeRunners(model, "onnxruntime", threads=1, workdir=tmp_path)
    executor = SparseExecutor(model, tau=0.0, bypass=runners)
    gen = torch.Generator().manual_seed(1)
    for h, w in ((96, 128), (64, 96)):
        a, b = torch.rand(1, 3, h, w, generator=gen), torch.rand(1, 3, h, w, generator=gen)
        stream = StreamState()
        executor.run(stream, a, None, key=True)
        out, rep = executor.run(stream, b, np.zeros((h // 4, w // 4, 2), np.float32))
        assert rep.bypassed
        with torch.no_grad():
            dense = model(b)
        assert excess_error(out[0], dense[0]) <= 1.0 and excess_error(out[1], dense[1]) <= 1.0
    assert len(runners._runners) == 2


class StepClock:
    """A deterministic clock: every reading advances it by one second, ``spend`` by more."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


# frames 0-3: key + PROBE_FRAMES sparse; 4: the bypass measured once; then the policy
FAST_BYPASS = dict(bypassed=set(range(4, 14)) | set(range(18, 28)), keys={0, 14, 28})
SLOW_BYPASS = dict(bypassed={4}, keys={0, 5})


@pytest.mark.parametrize("bypass_cost_s,expected", [(0.0, FAST_BYPASS), (1e3, SLOW_BYPASS)])
def test_adaptive_bypass_follows_measured_latency(bypass_cost_s, expected):
    """Adaptive, timed by an injected clock: a sparse frame takes one step per clock reading
    after its first (2 per layer + 1), a bypassed frame 1 plus what its runner spends. After
    measuring both paths the stream bypasses reusable frames only while the bypass is faster;
    every probe_interval (10) bypassed frames it re-measures the sparse path (a key frame
    rebuilds the dropped caches, then PROBE_FRAMES sparse frames) and goes back to bypassing."""
    from fluxshard.sparse.executor import PROBE_FRAMES

    model = random_model("detect")
    gen = torch.Generator().manual_seed(2)
    frame = torch.rand(1, 3, 96, 128, generator=gen)
    with torch.no_grad():
        dense = model(frame)
    clock = StepClock()

    def runner(x):
        clock.spend(bypass_cost_s)
        return dense

    executor = SparseExecutor(model, bypass=runner, adaptive=True, probe_interval=10,
                              clock=clock)
    stream, still = StreamState(), np.zeros((24, 32, 2), np.float32)
    reports = [executor.run(stream, frame, None if i == 0 else still, key=i == 0)[1]
               for i in range(30)]
    assert PROBE_FRAMES == 3  # the expected schedules above assume it
    sparse_s = 2 * len(model.model) + 1
    assert {r.seconds for r in reports if not r.bypassed} == {sparse_s}
    assert {r.seconds for r in reports if r.bypassed} == {1 + bypass_cost_s}
    assert {i for i, r in enumerate(reports) if r.bypassed} == expected["bypassed"]
    assert {i for i, r in enumerate(reports) if r.key} == expected["keys"]
