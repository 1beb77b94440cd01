"""The SDK and `fluxshard run` end to end against a real tritonserver (the session fixture) on
real H.264 from fluxshard.synth."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from conftest import TickingClock, require_triton

from fluxshard import wire
from fluxshard.motion import iter_motion
from fluxshard.tau import DEFAULT_TAU, quantize_tau
from fluxshard_client import (AsyncFluxShardClient, AsyncFluxShardStream, FluxShardClient,
                              FluxShardStream, LocalEndpoint)

FRAMES = 10


@pytest.fixture(scope="module")
def sessions():
    """In-process sparse sessions with the server's model and thread count."""
    import torch

    from fluxshard.sessions import yolo_session_factory

    threads = torch.get_num_threads()
    yield yolo_session_factory("sparse", threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exact_server():
    """A server running the exact executor (the reference; the shipped default is tiles), whose
    answers the in-process sparse sessions must reproduce."""
    from fluxshard.serving.tritonserver import TritonServer

    require_triton()
    with TritonServer(models=["fluxshard"], parameters={"executor": "exact"}) as server:
        yield server


def test_alternating_dispatch_against_the_real_server(exact_server, synth_clips, sessions):
    paths, _spec = synth_clips("pan")
    with FluxShardClient(exact_server.grpc_url) as client:
        stream = FluxShardStream(LocalEndpoint(sessions(1)), client.open_stream(2001),
                                 dispatch="alternate", imgsz=None)
        results, cloud_inputs = [], {}
        for r in stream.run(paths.video, max_frames=FRAMES):
            results.append(r)
            if r.endpoint == "cloud":
                # the cloud state is reset with the input the server rebuilt (the mirror)
                cloud_inputs[r.index] = stream.states["cloud"].cache.copy()
                assert wire.cache_digest(cloud_inputs[r.index]) == \
                    stream.cloud.stream.mirror.digest
        stream.close()
    assert [r.endpoint for r in results] == ["edge", "cloud"] * (FRAMES // 2)
    assert [r.index for r in results] == list(range(FRAMES))
    # each endpoint's first frame is a key frame; after that both resume with residual frames
    assert [r.key for r in results] == [True, True] + [False] * (FRAMES - 2)
    cloud = [r for r in results if r.endpoint == "cloud"]
    key_bytes = cloud[0].uplink_bytes
    for r in cloud[1:]:
        assert 0 < r.residual_fraction < 1 and 0 < r.uplink_bytes < key_bytes / 2
        assert r.stats["compute"] == "sparse" and r.stats["residual_blocks"] > 0
    assert all(r.uplink_bytes == 0 for r in results if r.endpoint == "edge")
    assert stream.dispatcher.bandwidth.samples >= 1
    # the server's answers equal the same executor run here on the same inputs and fields
    local = sessions(2)
    for r in cloud:
        # with the tau the dispatch layer used, which travelled with the frame
        assert r.stats["tau"] == quantize_tau(DEFAULT_TAU)
        expected, stats, _ = local.infer(cloud_inputs[r.index], r.field, r.residual_mask, r.key,
                                      tau=r.stats["tau"])
        np.testing.assert_allclose(r.detections, expected, rtol=1e-5, atol=1e-4)
        assert r.cache_hit_rate == pytest.approx(stats["cache_hit_rate"])


def test_async_stream_matches_the_sync_stream(tritonserver, synth_clips, sessions):
    paths, _spec = synth_clips("pan_zoom")
    with FluxShardClient(tritonserver.grpc_url) as client:
        sync = FluxShardStream(LocalEndpoint(sessions(3)), client.open_stream(2002),
                               dispatch="cloud", imgsz=None)
        expected = list(sync.run(paths.video, max_frames=5))
        sync.close()

    async def main():
        async with AsyncFluxShardClient(tritonserver.grpc_url) as aio:
            stream = AsyncFluxShardStream(LocalEndpoint(sessions(4)), aio.open_stream(2003),
                                          dispatch="cloud", imgsz=None)
            out = [r async for r in stream.run(paths.video, max_frames=5)]
            await stream.close()
            return out

    got = asyncio.run(main())
    assert [r.key for r in got] == [True] + [False] * 4
    for a, b in zip(got, expected):
        assert a.endpoint == b.endpoint == "cloud" and a.uplink_bytes == b.uplink_bytes
        np.testing.assert_array_equal(a.detections, b.detections)


def test_jpeg_uplink_keeps_the_mirror_exact_with_far_fewer_bytes(tritonserver, synth_clips):
    """Lossy pixels on the wire: the edge mirrors what the cloud decodes, so every digest
    matches (no resync) while the payloads shrink several times against the lossless codec."""
    paths, _spec = synth_clips("pan")
    sizes = {}
    with FluxShardClient(tritonserver.grpc_url) as client:
        for k, codec in enumerate((wire.Codec.ZLIB, wire.Codec.JPEG)):
            stream = FluxShardStream(cloud=client.open_stream(2100 + k, key_codec=codec,
                                                              residual_codec=codec),
                                     dispatch="cloud", edge=LocalEndpoint(threads=1), imgsz=None)
            results = list(stream.run(paths.video, max_frames=6))
            stream.close()
            # a digest mismatch would re-send the frame as a key frame, with the reason in stats
            assert all(r.endpoint == "cloud" and "resyncs" not in r.stats for r in results)
            assert [r.key for r in results] == [True] + [False] * 5
            sizes[codec] = [r.uplink_bytes for r in results]
            if codec == wire.Codec.JPEG:  # the cloud detected on the decoded pixels
                assert any(len(r.boxes) for r in results)
    assert sum(sizes[wire.Codec.JPEG]) < sum(sizes[wire.Codec.ZLIB]) / 3, sizes


def test_run_demo_writes_every_output(tritonserver, tmp_path, capsys):
    import av

    from fluxshard.cli import main

    out = tmp_path / "run"
    frames = 6
    rc = main(["run", "--imgsz", "native",
               "--demo", "--frames", str(frames), "--size", "320", "192", "--out", str(out),
               "--cloud-url", tritonserver.grpc_url, "--dispatch", "alternate", "--no-progress"])
    assert rc == 0
    for name in ("detections.jsonl", "annotated.mp4", "report.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    lines = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(frames))
    assert [line["endpoint"] for line in lines] == ["edge", "cloud"] * (frames // 2)
    assert all(len(line["boxes"]) == len(line["names"]) == len(line["scores"]) for line in lines)
    # every frame says why it ran there; both endpoints ran, so both load factors were measured
    assert {line["dispatch"]["reason"] for line in lines} == {"alternate"}
    assert lines[0]["dispatch"]["edge_load"] == lines[0]["dispatch"]["cloud_load"] == 1.0
    assert 1.0 not in (lines[-1]["dispatch"]["edge_load"], lines[-1]["dispatch"]["cloud_load"])
    with av.open(str(out / "annotated.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (192, 320, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == frames and summary["endpoints"]["cloud"]["frames"] == frames // 2
    assert 0 < summary["uplink_bytes_total"] and 0 < summary["jpeg_q90_bytes_total"]
    assert "uplink" in capsys.readouterr().out


def test_run_refuses_bad_input_clearly(tmp_path, capsys):
    from fluxshard.cli import main

    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    # usage errors (tests/test_cli.py has the full set): exit 2 while the command line is read
    assert main(["run", str(not_video), "--dispatch", "edge", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "fluxshard run:" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "o")]) == 2  # neither VIDEO nor --demo
    assert main(["run", "--demo", "--bandwidth-mbps", "0", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "bandwidth" in capsys.readouterr().err
    # `fluxshard demo` is `run --demo`: the same checks, the same clear error
    assert main(["demo", "--bandwidth-mbps", "-1", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "bandwidth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_profile_latency_writes_a_table_the_dispatcher_loads(tritonserver, tmp_path):
    from fluxshard.cli import main
    from fluxshard.tools.profile import profile_latency
    from fluxshard_client import Dispatcher, LatencyProfile

    path = tmp_path / "latency.json"
    assert main(["profile", "latency", "--size", "160", "96", "--imgsz", "native",
                 "--fractions", "0", "0.5", "1", "--repeats", "1", "--cloud-url", tritonserver.grpc_url, "--out", str(path),
                 "--no-progress"]) == 0
    profile = LatencyProfile.load(path)
    assert profile.source == "profiled" and (profile.width, profile.height) == (160, 96)
    raw = profile.meta["raw"]  # the medians as measured, before the running maximum
    for table, measured in ((profile.edge, raw["edge_ms"]), (profile.cloud, raw["cloud_ms"])):
        assert table.fractions == [0.0, 0.5, 1.0]
        # one median per level from runs that took time (the cloud's: the server's own times)
        assert len(measured) == 3 and all(ms > 0 for ms in measured)
    # the edge's runs are timed on the injected clock: exactly one 2 ms tick each
    timed = profile_latency(width=160, height=96, fractions=(0, 0.5, 1), repeats=1, cloud=False,
                            executors=(), progress=False, clock=TickingClock(0.002))
    assert timed.edge.ms == pytest.approx([2.0, 2.0, 2.0])
    # the other edge executors' tables, by name (tiles: against the crop area share)
    assert set(profile.edge_executors) == {"tiles", "dense"}
    decision = Dispatcher(profile).decide(0.5, 0.5, 0, 160, 96)
    assert decision.edge_ms == pytest.approx(profile.edge(0.5))
    assert main(["profile", "latency", "--fractions", "1.5", "--out", str(path),
                 "--no-cloud", "--no-progress"]) == 2  # a usage error, not a traceback


def test_h264_uplink_under_alternating_dispatch_learns_its_bytes(tritonserver, synth_clips):
    """The H.264 uplink behind the SDK: the encoder sees only the cloud's frames (alternate
    dispatch), every digest matches its mirror, and the dispatcher's byte estimate comes from
    what the encoder produced."""
    paths, _spec = synth_clips("pan")
    with FluxShardClient(tritonserver.grpc_url) as client:
        stream = FluxShardStream(cloud=client.open_stream(2200, key_codec=wire.Codec.H264,
                                                          residual_codec=wire.Codec.H264),
                                 dispatch="alternate", edge=LocalEndpoint(threads=1), imgsz=None)
        results = list(stream.run(paths.video, max_frames=8))
        learned = stream.core.h264_bytes
        stream.close()
    cloud = [r for r in results if r.endpoint == "cloud"]
    assert len(cloud) >= 3 and "resyncs" not in str([r.stats for r in cloud])
    assert [r.key for r in cloud] == [True] + [False] * (len(cloud) - 1)
    assert all(r.stats["uplink_codec"] == "h264" for r in cloud)
    assert max(r.uplink_bytes for r in cloud[1:]) < cloud[0].uplink_bytes
    assert any(len(r.boxes) for r in cloud)  # the cloud detected on the decoded frames
    assert learned.key_bpp == pytest.approx(0.25 + 0.3 * (cloud[0].uplink_bytes / (320 * 192)
                                                          - 0.25), rel=0.01)
