"""The tile executor's TensorRT maps engine (fluxshard.tiles.tensorrt_engine).

On CPU: the optimization-profile plan covers every crop the planner can make, calls pick the
tightest profile that takes their batch, uncovered shapes name themselves and the profiles, the
polygraphy build configuration carries the plan, the engine refuses clearly without an engine
file or a GPU. On a GPU with TensorRT (``gpu``, run by scripts/gpu_check.sh): the engine's maps
match onnxruntime (or, where the GPU machine lacks onnxruntime, the torch model on CPU) on crop
batches and the whole frame."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxshard.tiles import crops as C
from fluxshard.tiles import tensorrt_engine as T
from fluxshard.tiles.engine import ENGINE_KINDS, make_engine
from fluxshard.tiles.raw_maps import RAW_MAP_OUTPUTS

FRAME = (384, 640)


def every_crop_size(frame_hw):
    return [(h, w) for h in T.crop_sides(frame_hw[0]) for w in T.crop_sides(frame_hw[1])]


def test_crop_sides_are_the_buckets_clamped_to_the_frame():
    assert T.crop_sides(384) == tuple(b for b in C.BUCKETS if b <= 384)
    assert T.crop_sides(640)[-1] == 640 and 1024 not in T.crop_sides(640)
    assert T.crop_sides(96) == tuple(sorted({min(b, 96) for b in C.BUCKETS}))
    assert T.crop_sides(32) == (32,)


@pytest.mark.parametrize("frame_hw,max_batch", [(FRAME, 8), ((192, 320), 4), ((96, 64), 1),
                                                ((1088, 1920), 16)])
def test_plan_covers_every_crop_and_ends_with_the_frame(frame_hw, max_batch):
    profiles = T.plan_profiles(frame_hw, max_batch)
    names = [p.name for p in profiles]
    assert len(set(names)) == len(names) and names[-2:] == ["crops", "frame"]
    assert profiles[-1].min == profiles[-1].opt == profiles[-1].max == (1, *frame_hw)
    for p in profiles:
        assert all(lo <= o <= hi for lo, o, hi in zip(p.min, p.opt, p.max)), p
        assert p.max[0] <= max_batch and p.max[1] <= frame_hw[0] and p.max[2] <= frame_hw[1]
    one_call = max(max_batch // 4, 1)
    for h, w in every_crop_size(frame_hw):
        for b in (1, one_call, max_batch, 3 * max_batch + 1):
            p = profiles[T.choose_profile(profiles, (b, h, w))]
            assert p.covers(min(b, p.max[0]), h, w)
            small = max(h, w) <= max(T.DEFAULT_GROUP_SIDES) and (h, w) != frame_hw
            if b <= one_call or (small and b <= max_batch):
                assert p.covers(b, h, w)  # runs in one call, no chunks


def test_plan_at_384x640():
    profiles = T.plan_profiles(FRAME, 8)
    by_name = {p.name: p for p in profiles}
    assert list(by_name) == ["crops<=128", "crops<=256", "crops", "frame"]
    assert by_name["crops<=128"].max == (8, 128, 128)
    assert by_name["crops<=256"].max == (8, 256, 256)
    assert by_name["crops"].max == (2, 384, 640)  # a quarter of the batch for large crops

    def pick(shape):
        return profiles[T.choose_profile(profiles, shape)].name

    assert pick((1, 384, 640)) == "frame"
    assert pick((8, 64, 64)) == pick((3, 128, 96)) == "crops<=128"
    assert pick((5, 192, 256)) == "crops<=256"
    assert pick((2, 384, 640)) == pick((1, 64, 640)) == "crops"
    assert pick((9, 64, 64)) == "crops<=128"  # more than any profile takes: chunks of 8
    assert pick((3, 384, 384)) == "crops"  # chunks of 2


def test_planned_crops_of_real_masks_are_covered():
    profiles = T.plan_profiles(FRAME, 8)
    rng = np.random.default_rng(0)
    grid = (FRAME[0] // 16, FRAME[1] // 16)
    for density in (0.01, 0.05, 0.2, 0.6):
        selected = rng.random(grid) < density
        plan = C.plan_crops(selected, 16, 16, FRAME)
        sizes: dict[tuple[int, int], int] = {}
        for crop in plan:
            sizes[(crop.h, crop.w)] = sizes.get((crop.h, crop.w), 0) + 1
        for (h, w), n in sizes.items():
            p = profiles[T.choose_profile(profiles, (n, h, w))]
            assert p.covers(min(n, p.max[0]), h, w)


def test_uncovered_shape_names_the_shape_and_the_profiles():
    profiles = T.plan_profiles(FRAME, 8)
    with pytest.raises(T.ShapeNotCovered, match=r"batch 2 of 32x64 crops.*crops<=128: batch 1-8"):
        T.choose_profile(profiles, (2, 32, 64))
    with pytest.raises(T.ShapeNotCovered, match="768x640"):
        T.choose_profile(profiles, (1, 768, 640))
    with pytest.raises(ValueError, match="empty batch"):
        T.choose_profile(profiles, (0, 64, 64))


@pytest.mark.parametrize("frame_hw,max_batch,large", [((384, 600), 8, None), ((0, 64), 8, None),
                                                      (FRAME, 0, None), (FRAME, 8, 9)])
def test_plan_refuses_bad_arguments(frame_hw, max_batch, large):
    with pytest.raises(ValueError):
        T.plan_profiles(frame_hw, max_batch, large_batch=large)


def test_build_config_carries_the_plan_into_polygraphy():
    profiles = T.plan_profiles(FRAME, 8)
    config = T.build_config(profiles, tf32=True, fp16=False, opt_level=3)
    assert config.tf32 and not config.fp16 and config.builder_optimization_level == 3
    assert len(config.profiles) == len(profiles)
    for spec, built in zip(profiles, config.profiles):
        shapes = built[T.INPUT_NAME]
        assert tuple(shapes.min) == spec.nchw("min") and tuple(shapes.max) == spec.nchw("max")
        assert tuple(shapes.opt) == spec.nchw("opt")
    assert T.build_config(profiles, tf32=False).tf32 is False


def test_command_line_arguments():
    ap = T.build_parser()
    a = ap.parse_args(["build", "--onnx", "m.onnx", "--frame", "192x320", "--max-batch", "4",
                       "--no-tf32", "--groups", "128"])
    assert (a.frame, a.max_batch, a.tf32, a.fp16, a.groups) == ((192, 320), 4, False, False, (128,))
    a = ap.parse_args(["build"])
    assert a.frame == FRAME and a.max_batch == 8 and a.tf32 and a.onnx == T.DEFAULT_ONNX
    assert T.default_engine_path(Path("d/m.onnx"), FRAME, 8, False) == Path("d/m-384x640-b8-fp32.engine")
    for bad in ("384", "384x600", "ax640"):
        with pytest.raises(SystemExit):
            ap.parse_args(["plan", "--frame", bad])


def test_plan_command_prints_the_profiles(capsys):
    assert T.main(["plan", "--frame", "192x320", "--max-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "crops<=128: batch 1-4" in out and "frame: batch 1-1, 192-192 x 320-320" in out


def test_build_without_onnx_says_how_to_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="export --out"):
        T.build_engine(tmp_path / "missing.onnx", tmp_path / "x.engine", FRAME)


def test_make_engine_registers_tensorrt_lazily(tmp_path):
    from fluxshard.models import load_model
    assert "tensorrt" in ENGINE_KINDS
    assert "tensorrt" not in sys.modules or torch.cuda.is_available()
    model = load_model(None, fused=True)
    with pytest.raises(ValueError, match="engine_path"):
        make_engine(model, "tensorrt")
    with pytest.raises(FileNotFoundError, match="build_tiles_trt.sh"):
        make_engine(model, "tensorrt", engine_path=tmp_path / "missing.engine")
    if not torch.cuda.is_available():
        fake = tmp_path / "fake.engine"
        fake.write_bytes(b"not an engine")
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            make_engine(model, "tensorrt", engine_path=fake)


def test_timing_table_against_the_whole_frame():
    calls = []

    def engine(x):
        calls.append(tuple(x.shape))
        return [x]

    shapes = T.bench_shapes(FRAME, 8)
    assert shapes[0] == (1, *FRAME) and all(b <= 8 for b, _, _ in shapes)
    assert all((h, w) in every_crop_size(FRAME) for _, h, w in shapes)
    rows = T.time_calls(engine, shapes[:3], torch.device("cpu"), reps=2, warmup=1)
    assert len(calls) == 3 * 3 and [r["batch"] for r in rows] == [s[0] for s in shapes[:3]]
    rows = [{"batch": 1, "h": 384, "w": 640, "ms": 4.0}, {"batch": 8, "h": 64, "w": 64, "ms": 1.0}]
    table = T.timing_table(rows).splitlines()
    assert table[2].split("|")[3:6] == [" 4.000 ", " 1.000 ", " 1.000 "]
    assert table[3].split("|")[4:7] == [" 0.133 ", " 0.250 ", " 1.88 "]


# -- GPU ----------------------------------------------------------------------------------------

# TF32 rounds each conv's inputs to 10 mantissa bits (relative error 2^-11 per product); over the
# ~90 convs of yolo11n the maps' error grows to a few 1e-3 of their magnitude. Bounds per map:
# max |trt - reference| <= 2e-2 * max |reference|, mean <= 2e-3 * max |reference|. With strict
# FP32 (--no-tf32) the same bounds hold with a wide margin.
MAX_REL, MEAN_REL = 2e-2, 2e-3


def _trt_available():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"needs tensorrt and polygraphy: {e}"
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(engine path, ONNX path, frame): the engine scripts/gpu_check.sh built (FLUXSHARD_TILES_TRT_
    ENGINE / _ONNX), else a small one built here."""
    reason = _trt_available()
    if reason:
        pytest.skip(reason)
    env_engine, env_onnx = os.environ.get("FLUXSHARD_TILES_TRT_ENGINE"), os.environ.get("FLUXSHARD_TILES_TRT_ONNX")
    if env_engine and env_onnx:
        meta = json.loads(T.sidecar_path(env_engine).read_text())
        return Path(env_engine), Path(env_onnx), tuple(meta["frame"]), meta["max_batch"]
    from fluxshard.models import load_model
    from fluxshard.tiles.raw_maps import export_raw_maps_onnx
    wd = tmp_path_factory.mktemp("tiles_trt")
    onnx = export_raw_maps_onnx(load_model(None, fused=True), wd / "raw-maps.onnx")
    frame, max_batch = (192, 320), 4
    return T.build_engine(onnx, wd / "maps.engine", frame, max_batch), onnx, frame, max_batch


def _reference(onnx_path):
    """onnxruntime on the same ONNX; the torch model on CPU where onnxruntime is missing (its
    maps equal onnxruntime's within 1e-4 on CPU, far below the TF32 bounds)."""
    try:
        import onnxruntime as ort
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()})]
    except ImportError:
        from fluxshard.models import load_model
        from fluxshard.tiles.raw_maps import raw_head_maps
        model = load_model(None, fused=True).float().eval()

        def run(x):
            with torch.inference_mode():
                return raw_head_maps(model, x)
        return run


def _frame_input(frame_hw):
    from fluxshard import synth
    spec = synth.SceneSpec(width=frame_hw[1], height=frame_hw[0], frames=1, seed=3, camera="static")
    image = synth.Scene(spec).render(0).image
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


@pytest.mark.gpu
def test_tensorrt_maps_match_the_reference_on_crop_batches_and_the_frame(built):
    engine_path, onnx_path, frame, max_batch = built
    engine = T.TensorRTMapsEngine(engine_path)
    reference = _reference(onnx_path)
    x = _frame_input(frame)
    fh, fw = frame
    cases = {"frame": x}
    for h, w in ((64, 64), (128, 128), (T.crop_sides(fh)[-2], T.crop_sides(fw)[-2])):
        n = max_batch + 1 if (h, w) == (64, 64) else 2  # 64x64: more than a profile takes
        ys = [(i * 32) % (fh - h + 1) // 32 * 32 for i in range(n)]
        xs = [(i * 96) % (fw - w + 1) // 32 * 32 for i in range(n)]
        cases[f"{n} x {h}x{w}"] = torch.cat([x[:, :, y:y + h, c:c + w] for y, c in zip(ys, xs)])
    assert engine.profile_for((1, fh, fw)).name == "frame"
    for label, batch in cases.items():
        ref = reference(batch)
        for on_gpu in (False, True):
            got = engine(batch.cuda() if on_gpu else batch)
            assert [g.device.type for g in got] == ["cuda" if on_gpu else "cpu"] * 3, label
            for level, (g, r) in enumerate(zip(got, ref)):
                assert g.shape == r.shape, (label, level)
                err = (g.float().cpu() - r).abs()
                scale = float(r.abs().max())
                print(f"{label} level {level}: max err {float(err.max()):.2e}, "
                      f"mean {float(err.mean()):.2e}, max |ref| {scale:.2f}")
                assert float(err.max()) <= MAX_REL * scale, (label, level)
                assert float(err.mean()) <= MEAN_REL * scale, (label, level)
    with pytest.raises(T.ShapeNotCovered, match="profiles"):
        engine(torch.zeros(1, 3, 32, 32))
    assert [len(o) for o in engine(cases["frame"][:, :, :64, :64].cuda())] == [1, 1, 1]
    assert list(engine.output_names) == list(RAW_MAP_OUTPUTS)
