"""The executor as a choice: `fluxshard run --executor exact|tiles|dense` on the edge, the
`fluxshard` model's `executor` parameter (tiles served by a real tritonserver), and the dispatcher's
per-executor edge latency tables. Real H.264 from fluxshard.synth, no mocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TickingClock, require_triton

from fluxshard import wire
from fluxshard.motion import EndpointState, iter_motion
from fluxshard_client import (Dispatcher, FluxShardClient, FluxShardStream, LatencyProfile,
                              LatencyTable, LocalEndpoint)
from fluxshard_client.dispatch import tile_crop_share


@pytest.fixture(scope="module")
def model():
    import torch

    from fluxshard.sessions import load_dense_model

    threads = torch.get_num_threads()
    yield load_dense_model(threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tile_sessions(model):
    """Tile sessions like the server's: onnxruntime, one thread."""
    from fluxshard.sessions import tile_session_factory

    return tile_session_factory(model, threads=1)


def _rows_close(got, expected, atol=1e-3):
    assert got.shape == expected.shape, (got, expected)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol)


# ------------------------------------------------------------------------------- edge (SDK)

def test_tiles_edge_gets_the_whole_frame_and_the_field_since_it_last_ran(synth_clips, model,
                                                                          tile_sessions):
    """Dispatch alternates, so the edge runs every other frame: it must see the decoded frame
    (not a residual-assembled one) and the motion of both frames since its last run."""
    from fluxshard.sessions import DenseYoloSession

    paths, _spec = synth_clips("pan")
    frames = 9
    edge = LocalEndpoint(tile_sessions(1))
    cloud = LocalEndpoint(DenseYoloSession(model))  # any endpoint: it only takes frames away
    stream = FluxShardStream(edge, cloud, dispatch="alternate", imgsz=None)
    assert stream.dispatcher.edge_executor == "tiles"  # the tiles latency table
    decoded = list(iter_motion(paths.video, max_frames=frames))
    results = []
    for mf in decoded:
        results.append(stream.process(mf.image, None if mf.is_key else mf.field, mf.is_key,
                                      mf.index))
        if results[-1].endpoint == "edge":  # its dispatch cache is the frame it ran on
            np.testing.assert_array_equal(stream.states["edge"].cache, mf.image)
    assert [r.endpoint for r in results] == ["edge", "cloud"] * (frames // 2) + ["edge"]

    # the same frames through a fresh tile session, fields accumulated between edge runs
    local, state = tile_sessions(2), EndpointState()
    for mf, r in zip(decoded, results):
        if state.cache is not None and not mf.is_key:
            state.accumulate(mf.field)
        if r.endpoint != "edge":
            continue
        key = state.cache is None or mf.is_key
        field = None if key else wire.quantize_field(state.field)
        expected, stats, _ = local.infer(mf.image, field, None, key)
        assert r.key == key and r.stats["executor"] == "tiles"
        if not key:
            np.testing.assert_array_equal(r.field, field)  # two frames of motion, composed
        _rows_close(r.detections, expected)
        assert r.stats["crop_area_fraction"] == pytest.approx(stats["crop_area_fraction"])
        state.reset(mf.image)
    edge_stats = [r.stats for r in results if r.endpoint == "edge" and not r.key]
    assert any(s["crop_area_fraction"] < 1 for s in edge_stats)  # crops, not dense passes
    stream.close()


def test_a_key_frame_resets_the_tiles_edge(synth_clips, tile_sessions):
    paths, _spec = synth_clips("pan")
    session = tile_sessions(3)
    stream = FluxShardStream(LocalEndpoint(session), dispatch="edge", imgsz=None)
    decoded = list(iter_motion(paths.video, max_frames=3))
    for mf in decoded:
        stream.process(mf.image, None if mf.is_key else mf.field, mf.is_key, mf.index)
    assert session.last_report is not None and not session.last_report.key
    result = stream.process(decoded[0].image, None, True, 3)  # an I-frame mid-stream
    assert result.key and session.last_report.key and session.last_report.dense
    assert result.stats["crop_area_fraction"] == 1.0
    stream.close()


# -------------------------------------------------------------------------- fluxshard run

def _run(tmp_path, *args):
    from fluxshard.cli import main

    out = tmp_path / "run"
    rc = main(["run", "--imgsz", "native",
               "--demo", "--frames", "5", "--size", "320", "192", "--out", str(out),
               "--dispatch", "edge", "--no-progress", *map(str, args)])
    assert rc == 0
    lines = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    return out, json.loads((out / "summary.json").read_text()), lines


def test_run_executor_tiles_says_tiles_ran_with_its_crop_area(tmp_path, capsys):
    out, summary, lines = _run(tmp_path, "--executor", "tiles")
    assert summary["executor"] == "tiles"
    crops = [line["crop_area_fraction"] for line in lines]
    assert all(line["executor"] == "tiles" for line in lines) and crops[0] == 1.0  # key: dense
    assert summary["crop_area_fraction_mean"] == pytest.approx(np.mean(crops), abs=1e-4)
    assert min(crops) < 1.0  # frames after the key frame ran crops
    printed = capsys.readouterr().out
    assert "edge executor tiles" in printed and "crop area" in printed


def test_run_executor_dense_gives_the_dense_models_detections(tmp_path, model):
    from fluxshard.sessions import DenseYoloSession

    out, summary, lines = _run(tmp_path, "--executor", "dense")
    assert summary["executor"] == "dense" and summary["crop_area_fraction_mean"] is None
    dense = DenseYoloSession(model)
    for mf, line in zip(iter_motion(str(out / "demo.mp4")), lines, strict=True):
        rows = dense.infer(mf.image, None, None, True).detections
        assert line["executor"] == "dense" and line["classes"] == rows[:, 5].astype(int).tolist()
        # the fastest engine may be onnxruntime: its floats differ from torch's in the last bits
        np.testing.assert_allclose(line["boxes"], rows[:, :4].reshape(-1, 4), atol=0.05)
        np.testing.assert_allclose(line["scores"], rows[:, 4], atol=2e-3)


def test_run_executor_tiles_is_the_default(tmp_path):
    from edge_runtime.run import DEFAULT_EXECUTOR

    _out, summary, lines = _run(tmp_path)
    assert DEFAULT_EXECUTOR == "tiles" and summary["executor"] == DEFAULT_EXECUTOR
    assert summary["crop_area_fraction_mean"] is not None
    assert all(line["executor"] == "tiles" for line in lines)


def test_run_refuses_an_unknown_executor_while_parsing(tmp_path):
    from fluxshard.cli import main

    assert main(["run", "--demo", "--executor", "fast", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- serving

@pytest.fixture(scope="module")
def tiles_server(triton_installed_module):
    from fluxshard.serving.tritonserver import TritonServer

    with TritonServer(models=["fluxshard"], parameters={"executor": "tiles"}) as server:
        yield server


@pytest.fixture(scope="module")
def triton_installed_module():
    require_triton()


@pytest.mark.slow
def test_served_tiles_equal_the_tile_executor_on_the_rebuilt_frames(tiles_server, synth_clips,
                                                                   tile_sessions):
    paths, _spec = synth_clips("pan")
    with FluxShardClient(tiles_server.grpc_url) as client:
        stream = FluxShardStream(LocalEndpoint(tile_sessions(4)), client.open_stream(3001),
                                 dispatch="cloud", imgsz=None)
        results, inputs = [], {}
        for r in stream.run(paths.video, max_frames=8):
            results.append(r)
            inputs[r.index] = stream.states["cloud"].cache.copy()  # what the server rebuilt
        stream.close()
    assert [r.key for r in results] == [True] + [False] * 7
    local = tile_sessions(5)
    for r in results:
        assert r.endpoint == "cloud" and r.stats["executor"] == "tiles"
        expected, stats, _ = local.infer(inputs[r.index], r.field, r.residual_mask, r.key)
        _rows_close(r.detections, expected)
        assert r.stats["crop_area_fraction"] == pytest.approx(stats["crop_area_fraction"])
    assert any(r.stats["crop_area_fraction"] < 1 for r in results[1:])


def test_default_server_reports_the_tiles_executor(tritonserver, synth_clips):
    paths, _spec = synth_clips("pan")
    with FluxShardClient(tritonserver.grpc_url) as client:
        stream = client.open_stream(3002)
        frame = next(iter(iter_motion(paths.video, max_frames=1))).image
        result = stream.send(frame, key=True, frame_index=0)
        stream.close()
    assert result.stats["executor"] == "tiles"


def test_server_parameters_are_written_where_a_model_has_them(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from fluxshard.serving.tritonserver import (DEFAULT_MODEL_REPOSITORY,
                                                repository_with_parameters)

    repo = repository_with_parameters(DEFAULT_MODEL_REPOSITORY, {"executor": "dense"},
                                      tmp_path / "repo")
    for config in ("config.pbtxt", "configs/gpu.pbtxt"):
        message = text_format.Parse((repo / "fluxshard" / config).read_text(),
                                    model_config_pb2.ModelConfig())
        assert message.parameters["executor"].string_value == "dense"
    with pytest.raises(ValueError, match="no model"):  # a typo must not serve the defaults
        repository_with_parameters(DEFAULT_MODEL_REPOSITORY, {"exector": "tiles"},
                                   tmp_path / "repo2")


def test_session_factory_names_executors():
    from fluxshard.sessions import executor_name

    assert executor_name("sparse") == "exact" and executor_name("tiles") == "tiles"
    with pytest.raises(ValueError, match="executor must be one of"):
        executor_name("fast")


# ---------------------------------------------------------------------- dispatch tables

def test_edge_table_follows_the_executor_and_old_profiles_still_load(tmp_path):
    old = {"version": 1, "width": 640, "height": 384, "source": "profiled",
           "edge": {"fractions": [0.0, 1.0], "ms": [10.0, 50.0]},
           "cloud": {"fractions": [0.0, 1.0], "ms": [2.0, 12.0]}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    profile = LatencyProfile.load(tmp_path / "old.json")
    assert profile.edge_executors == {} and not profile.has_edge_table("tiles")
    builtin = LatencyProfile.default()
    assert profile.edge_ms("tiles", 0.3, 640, 384) == builtin.edge_executors["tiles"](0.3)
    assert profile.edge_ms("exact", 0.5, 640, 384) == 30.0

    profile.edge_executors = {"tiles": LatencyTable([0.0, 0.5, 1.0], [4.0, 20.0, 40.0]),
                              "dense": LatencyTable([0.0, 1.0], [35.0, 35.0])}
    loaded = LatencyProfile.load(profile.save(tmp_path / "new.json"))
    assert loaded.has_edge_table("tiles") and loaded.edge_ms("tiles", 0.25, 320, 192) == 3.0

    mask = np.zeros((24, 40), bool)
    mask[10, 20] = True  # one block: a 3x3-block crop with the 16-px halo
    share = tile_crop_share(mask, 16)
    assert share == pytest.approx(9 / mask.size)
    for executor, expected in (("exact", loaded.edge(mask.mean())),
                               ("tiles", loaded.edge_executors["tiles"](share)),
                               ("dense", 35.0)):
        d = Dispatcher(loaded, edge_executor=executor)
        x = d.edge_share(mask, 16)
        assert d.decide(x, 0.1, 0, 640, 384).edge_ms == pytest.approx(expected), executor
    tiles = Dispatcher(loaded, edge_executor="tiles")
    assert tiles.edge_share(np.ones_like(mask), 16) == 1.0  # too much area: the frame runs dense
    # the load factor learns against the crop share the executor reports, not the prediction
    assert tiles.observed_edge_share({"crop_area_fraction": 0.4}, mask, 16) == 0.4
    with pytest.raises(ValueError, match="edge executor"):
        Dispatcher(loaded, edge_executor="fast")


def test_profile_latency_measures_less_work_for_fewer_changed_blocks():
    """The edge table as measured before its running maximum: timed on a clock that reads the
    floating-point work torch has done (FlopCounterMode), each level costs what the sparse
    executor computed on it, the same on every machine. Fewer changed blocks must cost less, and
    every block changed costs what the dense model does."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fluxshard.models import load_model
    from fluxshard.tools.profile import profile_latency

    work = FlopCounterMode(display=False)
    with work:
        profile = profile_latency(width=160, height=96, fractions=(0, 0.1, 1), repeats=1,
                                  cloud=False, executors=(), progress=False,
                                  clock=lambda: work.get_total_flops() / 1e9)
    measured = profile.meta["raw"]["edge_ms"]  # MFLOP per level on this clock
    assert measured[0] < measured[1] < measured[2]
    dense_work = FlopCounterMode(display=False)
    with dense_work, torch.no_grad():
        load_model(None)(torch.rand(1, 3, 96, 160))
    assert measured[2] == pytest.approx(dense_work.get_total_flops() / 1e6, rel=1e-6)


def test_profile_latency_measures_tiles_against_crop_area(tmp_path):
    from fluxshard.cli import main
    from fluxshard.tools.profile import profile_latency

    path = tmp_path / "latency.json"
    # big enough that a tenth of the blocks with the 32-px halo crops less than the frame
    assert main(["profile", "latency", "--imgsz", "native",
                 "--size", "320", "192", "--fractions", "0", "0.1", "1",
                 "--repeats", "1", "--no-cloud", "--executors", "tiles", "dense", "--out",
                 str(path), "--no-progress"]) == 0
    profile = LatencyProfile.load(path)
    tiles, dense = profile.edge_executors["tiles"], profile.edge_executors["dense"]
    assert tiles.fractions[0] == 0.0 and tiles.fractions[-1] == 1.0  # nothing to crop .. dense
    # the levels between are the crop area shares the executor reported: for 0.1 of the blocks
    # changed, one partial crop (the change and its halo, less than the frame)
    assert len(tiles.fractions) == 3 and 0.1 <= tiles.fractions[1] < 1.0
    assert dense.fractions == [0.0, 1.0] and dense.ms[0] > 0
    assert Dispatcher(profile, edge_executor="tiles").decide(1.0, 1.0, 0, 320, 192).edge_ms == \
        pytest.approx(tiles.ms[-1])
    # what the tables hold, on an injected clock: each timed run is exactly one 2 ms tick
    timed = profile_latency(width=160, height=96, fractions=(0, 0.1, 1), repeats=1, cloud=False,
                            executors=("tiles", "dense"), progress=False,
                            clock=TickingClock(0.002))
    assert timed.edge.ms == pytest.approx([2.0] * 3)
    tiles_ms = timed.edge_executors["tiles"].ms
    assert tiles_ms == pytest.approx([2.0] * len(tiles_ms))
    assert timed.edge_executors["dense"].ms == pytest.approx([2.0, 2.0])


@pytest.mark.parametrize("halo_px", [0, 16, 32, 40])
def test_the_predicted_crop_share_is_every_block_within_the_halo_of_a_residual(halo_px):
    """tile_crop_share against its definition: a block is in a crop when a residual block lies
    within ceil(halo / block) blocks of it on both axes (frame edges cut the crops)."""
    rng = np.random.default_rng(halo_px)
    r = -(-halo_px // 16)
    for shape in ((9, 11), (24, 40), (1, 7)):
        mask = rng.random(shape) < 0.04
        mask[0, -1] = True
        ys, xs = np.nonzero(mask)
        rows, cols = np.indices(shape)
        near = np.zeros(shape, bool)
        for y, x in zip(ys, xs):
            near |= (abs(rows - y) <= r) & (abs(cols - x) <= r)
        assert tile_crop_share(mask, 16, halo_px, dense_above=1.0) == pytest.approx(near.mean())


def test_the_edges_dense_and_tile_executors_run_dense_frames_on_one_engine_session(model):
    """In one process the dense executor and the tile executor's dense frames share one
    BestDenseRunners per model and thread count (two sessions of a model run at different
    speeds, and each would pick its engine apart); sharing keeps no model alive."""
    import gc
    import weakref

    from edge_runtime.run import _edge_session
    from fluxshard.sessions import load_dense_model, shared_dense_runners

    dense = _edge_session("dense", model, {}).runners
    assert _edge_session("tiles", model, {}).tile_executor.dense_runner is dense
    assert shared_dense_runners(model, 1) is dense
    assert shared_dense_runners(model, 2) is not dense
    other = load_dense_model(threads=1)
    held = shared_dense_runners(other, 1)
    assert held is not dense and shared_dense_runners(other, 1) is held
    gone = weakref.ref(other)
    del other, held
    gc.collect()
    assert gone() is None
