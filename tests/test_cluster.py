"""Several cloud servers (fluxshard_client.cluster): rendezvous homing is stable and balanced, and
a stream whose server stops continues on the other with a key frame, losing no frame."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import run_in_threads

from fluxshard_client.cluster import ClusterClient, home, rank

URLS = ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]
STREAMS = range(1, 30001)


def test_homes_are_fixed_and_independent_of_url_order():
    # every client, in every version, must agree on a stream's home: pinned values
    assert [home(i, URLS) for i in range(6)] == [URLS[0], URLS[0], URLS[0], URLS[2], URLS[1],
                                                 URLS[0]]
    for stream_id in range(200):
        assert rank(stream_id, URLS) == rank(stream_id, URLS[::-1])
        assert sorted(rank(stream_id, URLS)) == sorted(URLS)
    with pytest.raises(ValueError, match="no cloud URLs"):
        home(1, [])


def test_streams_spread_evenly():
    counts = Counter(home(i, URLS) for i in STREAMS)
    for url in URLS:
        assert abs(counts[url] / len(STREAMS) - 1 / 3) < 0.02, counts


def test_a_server_leaving_moves_only_its_streams_to_their_next_server():
    left = URLS[1]
    rest = [u for u in URLS if u != left]
    for i in STREAMS:
        before, after = home(i, URLS), home(i, rest)
        if before != left:
            assert after == before
        else:
            assert after == rank(i, URLS)[1]


def test_a_server_joining_takes_a_fair_share_and_nothing_else_moves():
    joined = URLS + ["10.0.0.4:8001"]
    moved = [i for i in STREAMS if home(i, URLS) != home(i, joined)]
    assert all(home(i, joined) == joined[-1] for i in moved)
    assert abs(len(moved) / len(STREAMS) - 1 / 4) < 0.02


def test_down_marks_expire_on_the_clock():
    now = [0.0]
    cluster = ClusterClient(URLS, down_for_s=10.0, clock=lambda: now[0])
    try:
        stream_id = 3  # homed on URLS[2]
        assert cluster.home_for(stream_id) == URLS[2]
        cluster.mark_down(URLS[2])
        assert cluster.home_for(stream_id) == rank(stream_id, URLS)[1]
        assert cluster.up() == URLS[:2]
        now[0] = 10.5
        assert cluster.home_for(stream_id) == URLS[2]
    finally:
        cluster.close()
    with pytest.raises(ValueError, match="at least one"):
        ClusterClient([])


@pytest.mark.slow
def test_stream_moves_to_the_other_server_when_its_server_stops(triton_installed, tmp_path):
    from fluxshard import wire
    from fluxshard.digest_scene import Scene, residual_mask
    from fluxshard.serving.tritonserver import TritonServer

    servers = [TritonServer(models=["fluxshard"], log_file=tmp_path / f"server{k}.log",
                            exit_timeout_s=1)
               for k in range(2)]
    try:
        run_in_threads(lambda server: server.start(), servers)
        urls = [s.grpc_url for s in servers]
        # a stream homed on the first server
        stream_id = next(i for i in range(1, 1000) if home(i, urls) == urls[0])
        scene = Scene(stream_id)
        with ClusterClient(urls) as cluster:
            stream = cluster.open_stream(stream_id, key_codec=wire.Codec.H264,
                                         residual_codec=wire.Codec.H264)
            results, previous = [], None
            for t in range(8):
                if t == 4:
                    servers[0].stop()  # the home leaves between two frames
                frame = scene.frame(t)
                if previous is None:
                    result = stream.send(frame, key=True, frame_index=t)
                else:
                    zero = np.zeros(wire.field_shape(*frame.shape[:2]), np.float32)
                    result = stream.send(frame, zero, residual_mask(previous, frame, zero),
                                         frame_index=t)
                results.append(result)
                previous = frame
            route = stream.client
            stream.close()
        assert [r.frame_index for r in results] == list(range(8))  # every frame answered
        assert [r.key for r in results] == [True, False, False, False, True, False, False, False]
        assert results[4].resyncs and "re-homed from" in results[4].resyncs[-1]
        # (every answer's digest matched the stream's mirror, or the frame would have been
        # re-sent as a key frame: the key pattern above rules that out)
        assert route.home == urls[1]
        assert [(a, b) for a, b, _ in route.rehomes] == [(urls[0], urls[1])]
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("status,message,unreachable", [
    ("StatusCode.CANCELLED", "", True),  # a START cancelled in Triton's backlog: no free slot
    ("StatusCode.CANCELLED", "CANCELLED", True),  # in flight when the server shut down
    ("StatusCode.INTERNAL", "bad payload: truncated header", False),  # the model's own answer
])
def test_a_cancelled_request_is_the_server_being_unreachable_not_a_rejection(status, message,
                                                                            unreachable):
    """Triton answers CANCELLED for requests it did not compute (a server stopping, a queued
    START): the stream moves to its next server with a key frame instead of losing the frame."""
    from tritonclient.utils import InferenceServerException

    from fluxshard_client import CloudError, transport

    kind = transport._classify(InferenceServerException(message, status=status))
    assert isinstance(kind, transport._Unavailable) == unreachable
    assert isinstance(kind, CloudError) != unreachable
