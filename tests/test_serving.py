"""The cloud model behind a real tritonserver: streams, isolation, resync, restart recovery.

Scenes are small (64x96) so the dense YOLO11 behind each stream costs milliseconds. Residual blocks
are picked with tau = 0, so every rebuilt input must equal the true frame: the server's digest is
checked against the frame's own digest, not only against the client's mirror.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import crash_and_restart, require_triton, run_in_threads

from fluxshard import wire
from fluxshard.sessions import DenseYoloSession, load_dense_model, yolo_session_factory
from fluxshard.digest_scene import residual_mask
from fluxshard.serving.tritonserver import TritonServer
from fluxshard_client import (AsyncFluxShardClient, CloudError, FluxShardClient, RetryPolicy)

H, W, B = 64, 96, 16


class Scene:
    """A camera panning over a textured world with a square moving against the pan; frame t and
    the true per-frame motion field (pixel x of frame t came from x + d in frame t-1)."""

    def __init__(self, seed: int, pan: tuple[int, int]):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, (H // 4 + 16, W // 4 + 16, 3), dtype=np.uint8)
        self.world = np.kron(coarse, np.ones((4, 4, 1), np.uint8))  # 4x4-block texture
        self.pan = pan
        self.color = rng.integers(0, 256, 3, dtype=np.uint8)

    def frame(self, t: int) -> np.ndarray:
        dx, dy = self.pan
        y0, x0 = 24 + dy * t, 24 + dx * t
        f = self.world[y0:y0 + H, x0:x0 + W].copy()
        s = 8 + 3 * t
        f[20:36, s:s + 16] = self.color
        return f

    def field(self) -> np.ndarray:
        field = np.zeros(wire.field_shape(H, W), np.float32)
        field[..., 0], field[..., 1] = self.pan
        return field


def run_stream(stream, scene: Scene, frames: range, results: list, prev: np.ndarray | None = None):
    for t in frames:
        frame = scene.frame(t)
        if prev is None:
            res = stream.send(frame, key=True, frame_index=t)
        else:
            field = scene.field()
            res = stream.send(frame, field, residual_mask(prev, frame, field), frame_index=t)
        results.append((t, frame, res))
        prev = frame
    return prev


def check_exact(results, stream):
    for t, frame, res in results:
        assert res.frame_index == t
        assert res.digest == wire.cache_digest(frame), f"frame {t}: cloud input != true frame"
    assert stream.mirror.digest == results[-1][2].digest


@pytest.fixture(scope="module")
def exact_server():
    """A server running the exact executor by name (the shipped default is tiles): these tests
    check its answers against the same sparse executor run here."""

    require_triton()
    with TritonServer(models=["fluxshard"], parameters={"executor": "exact"}) as server:
        yield server


@pytest.fixture(scope="module")
def client(exact_server):
    with FluxShardClient(exact_server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def local_model():
    """The server's model, run here with the server's thread count (1) so results match bit for
    bit rather than within a tolerance that a score near the threshold could fall through."""
    import torch

    threads = torch.get_num_threads()
    yield DenseYoloSession(load_dense_model(threads=1))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_sparse_factory():
    """The server's default compute (the sparse executor), in-process, with its thread count."""
    import torch

    threads = torch.get_num_threads()
    yield yolo_session_factory("sparse", threads=1)
    torch.set_num_threads(threads)


def test_three_concurrent_streams_are_served_exactly_and_isolated(client, local_sparse_factory):
    scenes = {11: Scene(1, (2, 0)), 12: Scene(2, (0, 1)), 13: Scene(3, (-1, -2))}
    results = {sid: [] for sid in scenes}
    streams = {sid: client.open_stream(sid, block=B) for sid in scenes}
    run_in_threads(lambda sid: run_stream(streams[sid], scenes[sid], range(8), results[sid]),
                   scenes)
    digests = set()
    for sid, res in results.items():
        check_exact(res, streams[sid])
        assert [r.key for _, _, r in res] == [True] + [False] * 7
        assert all(not r.resyncs for _, _, r in res)
        assert sum(r.stats["residual_blocks"] for _, _, r in res[1:]) > 0
        assert all(r.stats["residual_blocks"] < r.stats["total_blocks"] for _, _, r in res[1:])
        digests |= {r.digest for _, _, r in res}
        # the cloud's sparse executor gave, frame by frame, what the same executor gives
        # in-process on one stream of its own: no stream's caches leaked into another's
        local = local_sparse_factory(sid)
        for i, (t, frame, r) in enumerate(res):
            field = None if i == 0 else scenes[sid].field()
            mask = None if i == 0 else residual_mask(res[i - 1][1], frame, field)
            expected, stats, _ = local.infer(frame, field, mask, i == 0)
            np.testing.assert_allclose(r.detections, expected, rtol=1e-5, atol=1e-4,
                                       err_msg=f"stream {sid} frame {t}")
            assert r.stats["compute"] == "sparse"
            assert r.stats["cache_hit_rate"] == pytest.approx(stats["cache_hit_rate"])
            assert r.stats["computed_fraction"] == pytest.approx(stats["computed_fraction"])
        assert res[0][2].stats["computed_fraction"] == 1.0
        assert [r.stats["dense_pass"] for _, _, r in res] == [True] + [False] * 7
    assert len(digests) == 3 * 8  # no stream ever saw another's input
    for s in streams.values():
        s.close()


def test_protocol_errors_are_clear_and_the_server_keeps_serving(client):
    scene = Scene(4, (1, 1))
    f0, f1 = scene.frame(0), scene.frame(1)
    residual = wire.encode_residual_frame(f1, scene.field(), np.ones(wire.residual_grid(H, W, B),
                                                                     bool), 1, B)
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="START flag"):
        client.infer(residual, 501, start=False, end=False)  # unknown stream
    with pytest.raises(InferenceServerException, match="resync needed.*key frame"):
        client.infer(residual, 502, start=True, end=False)  # a stream must open with a key frame
    client.infer(wire.encode_key_frame(f0, 5, B), 503, start=True, end=False)
    with pytest.raises(InferenceServerException, match="resync needed.*out of order"):
        client.infer(residual, 503, start=False, end=False)  # frame 1 after frame 5
    with pytest.raises(InferenceServerException, match="bad payload.*bad magic"):
        client.infer(b"GIF89a" + bytes(40), 503, start=False, end=False)
    with pytest.raises(InferenceServerException, match="bad payload.*exceeds"):
        client.infer(residual[:24] + (10**9).to_bytes(4, "little") + residual[28:], 503, False,
                     False)
    # the stream survived its bad requests, and a new stream is served
    ok = client.infer(wire.encode_residual_frame(f1, scene.field(), np.ones(
        wire.residual_grid(H, W, B), bool), 6, B), 503, start=False, end=True)
    assert wire.response_from_tensors(ok["DETECTIONS"], ok["STATS"], ok["DIGEST"]).frame_index == 6
    stream = client.open_stream(504, block=B)
    results = []
    run_stream(stream, scene, range(3), results)
    check_exact(results, stream)


def test_stream_resyncs_when_the_server_forgets_it(client):
    scene = Scene(5, (2, 1))
    stream = client.open_stream(601, block=B)
    results = []
    prev = run_stream(stream, scene, range(2), results)
    # end the sequence behind the stream's back (with its secret: nobody else may end it): the
    # server frees the session, Triton the slot
    client.infer(wire.encode_key_frame(scene.frame(2), 2, B), 601, start=False, end=True,
                 secret=stream.core.secret)
    prev = run_stream(stream, scene, range(3, 5), results, prev)
    check_exact(results, stream)
    t3 = results[2][2]
    assert t3.key and t3.resyncs and "START flag" in t3.resyncs[0]
    assert not results[3][2].key and not results[3][2].resyncs


def test_stream_resyncs_on_digest_mismatch(client):
    scene = Scene(6, (1, 0))
    stream = client.open_stream(701, block=B)
    results = []
    prev = run_stream(stream, scene, range(2), results)
    stream.mirror.cache[50, 50, 0] ^= 0xFF  # the edge's mirror drifts from the cloud's cache
    run_stream(stream, scene, range(2, 4), results, prev)
    check_exact(results, stream)
    t2 = results[2][2]
    assert t2.key and any("digest mismatch" in r for r in t2.resyncs)


def test_http_protocol_and_asyncio_client(tritonserver):
    scene = Scene(7, (0, 2))
    with FluxShardClient(tritonserver.http_url, protocol="http") as http:
        stream, results = http.open_stream(801, block=B), []
        run_stream(stream, scene, range(3), results)
        check_exact(results, stream)
        stream.close()

    async def two_streams():
        async with AsyncFluxShardClient(tritonserver.grpc_url) as aio:
            async def one(sid, sc):
                s, out, prev = aio.open_stream(sid, block=B), [], None
                for t in range(4):
                    f = sc.frame(t)
                    if prev is None:
                        r = await s.send(f, key=True, frame_index=t)
                    else:
                        r = await s.send(f, sc.field(), residual_mask(prev, f, sc.field()),
                                         frame_index=t)
                    out.append((t, f, r))
                    prev = f
                await s.close()
                return s, out
            return await asyncio.gather(one(802, Scene(8, (1, 0))), one(803, Scene(9, (0, -1))))

    for stream, out in asyncio.run(two_streams()):
        check_exact(out, stream)


def test_yolo11_dense_baseline_model(tritonserver, local_model):
    import tritonclient.grpc as grpcclient

    frame = Scene(10, (0, 0)).frame(0)
    with grpcclient.InferenceServerClient(tritonserver.grpc_url) as c:
        inp = grpcclient.InferInput("FRAME", list(frame.shape), "UINT8")
        inp.set_data_from_numpy(frame)
        det = c.infer("yolo11_dense", [inp]).as_numpy("DETECTIONS")
        expected = local_model.infer(frame, None, None, True).detections
        np.testing.assert_allclose(det, expected, rtol=1e-5, atol=1e-4)
        bad = grpcclient.InferInput("FRAME", [1, 1, 3], "UINT8")
        bad.set_data_from_numpy(np.zeros((1, 1, 3), np.uint8))
        assert c.infer("yolo11_dense", [bad]).as_numpy("DETECTIONS").shape == (0, 6)


@pytest.mark.slow
def test_server_restart_mid_stream_loses_no_frame(tmp_path, triton_installed):
    server = TritonServer(log_file=tmp_path / "first.log", models=["fluxshard"])
    scene = Scene(12, (1, 1))
    results = []
    retry = RetryPolicy(reconnect_timeout_s=300.0, backoff_s=(0.2, 1.0))
    with server, FluxShardClient(server.grpc_url, retry=retry) as client:
        stream = client.open_stream(901, block=B)
        prev = run_stream(stream, scene, range(3), results)
        with crash_and_restart(server, tmp_path / "second.log"):
            run_stream(stream, scene, range(3, 7), results, prev)
    assert [t for t, _, _ in results] == list(range(7))
    check_exact(results, stream)
    first_after = results[3][2]
    assert first_after.key and any(r.startswith("unavailable") for r in first_after.resyncs)
    assert [r.key for _, _, r in results[4:]] == [False] * 3


def test_unreachable_cloud_gives_up_with_a_clear_error():
    from fluxshard.serving.tritonserver import free_port

    client = FluxShardClient(f"127.0.0.1:{free_port()}",
                             retry=RetryPolicy(reconnect_timeout_s=0.5, backoff_s=(0.1, 0.2)))
    with pytest.raises(CloudError, match="unreachable"):
        client.open_stream(1, block=B).send(Scene(0, (0, 0)).frame(0))


class CountingSession:
    """A compute that any StreamSession must be replaceable by (the executor plugs in likewise)."""

    def __init__(self, log: list, corrid: int):
        self.log, self.corrid = log, corrid

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        self.log.append((self.corrid, key, wire.cache_digest(rebuilt_frame)))
        return np.zeros((0, 6), np.float32), {"compute": "counting", "recomputed_fraction": 0.0}

    def close(self):
        self.log.append((self.corrid, "closed"))


def test_session_manager_sweeps_idle_streams_and_accepts_any_compute():
    from fluxshard.receive import ResyncNeeded
    from fluxshard.serving.session import SessionManager

    now = [0.0]
    log: list = []
    manager = SessionManager(lambda corrid: CountingSession(log, corrid), idle_seconds=10,
                             clock=lambda: now[0])
    scene = Scene(13, (1, 0))
    f0, f1 = scene.frame(0), scene.frame(1)
    resp = manager.handle(1, True, False, wire.encode_key_frame(f0, 0, B))
    assert resp.digest == wire.cache_digest(f0) and resp.stats["compute"] == "counting"
    manager.handle(2, True, False, wire.encode_key_frame(f1, 0, B))
    now[0] = 8.0
    mask = residual_mask(f0, f1, scene.field())
    manager.handle(1, False, False, wire.encode_residual_frame(f1, scene.field(), mask, 1, B))
    now[0] = 15.0  # stream 2 idle for 15 s, stream 1 for 7 s
    assert manager.sweep() == [2] and (2, "closed") in log and set(manager.streams) == {1}
    with pytest.raises(ResyncNeeded, match="unknown stream 2"):
        manager.handle(2, False, False, wire.encode_residual_frame(f1, scene.field(), mask, 1, B))
    resp = manager.handle(1, False, True, wire.encode_residual_frame(f1, np.zeros_like(
        scene.field()), np.zeros_like(mask), 2, B))  # END frees it after answering
    assert resp.digest == wire.cache_digest(f1) and manager.streams == {}
    assert log[-1] == (1, "closed")


def test_a_server_that_cannot_start_reports_its_log(tmp_path, triton_installed):
    from fluxshard.serving.tritonserver import TritonStartError

    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\n'
                                         'max_batch_size: 0\n')
    with pytest.raises(TritonStartError, match="(?s)exited with code.*no_such_backend"):
        TritonServer(tmp_path / "repo", log_file=tmp_path / "server.log").start(timeout=120)
