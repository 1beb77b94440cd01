"""The H.264 uplink's quality follows the link, measured through a real link: a real tritonserver
behind ``fluxshard.serving.netshape``'s delay proxy on loopback (a 40 ms round trip) and the
client's simulated uplink rate (``FluxShardClient(uplink_mbps=...)``, part of each measured round
trip). A fast link with a long round trip keeps the uplink's quality over a still scene (the
round trip is latency, not bandwidth); a slow link still drives the quality down."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fluxshard import wire
from fluxshard.digest_scene import Scene

from conftest import delay_proxy

RTT_S = 0.040
FRAME_SIZE = (192, 320)  # H, W


def _h264_stream(client, stream_id):
    from fluxshard_client import FluxShardStream, LocalEndpoint

    # no deadline: every frame is the cloud's, however slow a call on a loaded machine
    return FluxShardStream(LocalEndpoint(threads=1),
                           client.open_stream(stream_id, key_codec=wire.Codec.H264,
                                              residual_codec=wire.Codec.H264),
                           dispatch="cloud", deadline_ms=math.inf)


@pytest.mark.slow
def test_a_fast_link_with_a_long_round_trip_keeps_the_quality(tritonserver):
    """56 Mbit/s, 40 ms round trip, a still camera (the bouncing square of perf/reliability*):
    P-frames of a few hundred bytes to a few kB take the round trip, which a bytes / time
    estimate read as a link under 1 Mbit/s (and the quality controller re-coded every few
    frames). Now the estimate stays within a factor 20 of the link's rate every frame and ends
    within a factor 4, the round trip is the fixed part, and 40 frames go at the stream's
    quality with no IDR after the first."""
    from fluxshard_client import FluxShardClient

    scene, zero = Scene(2201, *FRAME_SIZE), np.zeros(wire.field_shape(*FRAME_SIZE), np.float32)
    port = int(tritonserver.grpc_url.rsplit(":", 1)[1])
    with delay_proxy(port, RTT_S / 2) as proxy_port, \
            FluxShardClient(f"127.0.0.1:{proxy_port}", uplink_mbps=56.0) as client:
        stream = _h264_stream(client, 2401)
        rate = stream.cloud.stream.core.uplink.link_rate
        results = [stream.process(scene.frame(t), None if t == 0 else zero, t == 0, t)
                   for t in range(40)]
        link = stream.dispatcher.bandwidth
        stream.close()
    assert [r.endpoint for r in results] == ["cloud"] * 40
    assert [r.index for r in results if r.key] == [0]
    estimates = [round(r.bandwidth_mbps, 2) for r in results]
    assert rate.changes == 0 and rate.crf == rate.base_crf, (rate.crf, estimates)
    sizes = [r.uplink_bytes for r in results]
    assert max(sizes[1:]) < sizes[0] / 4, sizes  # P-frames: their time is the round trip
    # the first IDR (tens of kB on a fresh connection: beyond TCP's initial window, it waits a
    # round trip more) reads as a slower link while it is in the estimator's window; after it
    # the estimate is the nominal rate again
    assert min(estimates) >= 56.0 / 20 and estimates[-1] >= 56.0 / 4, estimates
    assert link.samples == 40 and link.base_s >= 0.8 * RTT_S


@pytest.mark.slow
def test_a_slow_link_still_drives_the_quality_down(tritonserver, synth_clips):
    """0.4 Mbit/s, 40 ms round trip, a panning camera (P-frames of 1-2 kB at the stream's crf,
    more than the link carries in the controller's budget): the frames' sizes resolve the rate
    (within a factor 2.5, by the last frame), and the quality controller codes at a worse crf
    so that P-frames cross the link in its budget."""
    from fluxshard_client import FluxShardClient

    paths, _spec = synth_clips("pan")
    port = int(tritonserver.grpc_url.rsplit(":", 1)[1])
    with delay_proxy(port, RTT_S / 2) as proxy_port, \
            FluxShardClient(f"127.0.0.1:{proxy_port}", uplink_mbps=0.15) as client:
        stream = _h264_stream(client, 2402)
        rate = stream.cloud.stream.core.uplink.link_rate
        results = list(stream.run(paths.video, max_frames=30))
        link = stream.dispatcher.bandwidth
        stream.close()
    assert [r.endpoint for r in results] == ["cloud"] * 30
    assert link.resolved and 0.15 / 2.5 <= link.mbps <= 0.15 * 2.5, link.mbps
    assert rate.crf > rate.base_crf and rate.changes >= 1
    # the frames after the switch are smaller than the stream's own quality made them
    first_p = [r.uplink_bytes for r in results[1:5]]
    assert np.mean([r.uplink_bytes for r in results[-5:] if not r.key]) < np.mean(first_p)
