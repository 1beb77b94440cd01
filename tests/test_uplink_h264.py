"""The H.264 uplink (fluxshard.uplink_h264, wire Codec.H264): a real x264 encoder per stream on the
edge, a decoder per stream on the cloud and on the edge's mirror, IDR resyncs; against a real
tritonserver for several streams, a server restart and a dropped packet."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import crash_and_restart, run_in_threads

from fluxshard import wire
from fluxshard.receive import ReceiveState, ResyncNeeded
from fluxshard.serving.tritonserver import TritonServer
from fluxshard.uplink_h264 import BytesModel, H264Decoder, H264Encoder, LinkRate
from fluxshard.wire import Codec, PayloadError
from fluxshard_client import FluxShardClient, RetryPolicy
from fluxshard_client.transport import _StreamCore

H, W, B = 96, 160, 16


class Scene:
    """A smooth textured world under a pan with a square moving against it."""

    def __init__(self, seed: int, pan: tuple[int, int]):
        import cv2

        rng = np.random.default_rng(seed)
        world = rng.integers(0, 256, (H + 64, W + 64, 3), dtype=np.uint8)
        self.world = cv2.GaussianBlur(world, (7, 7), 2)
        self.pan, self.color = pan, rng.integers(0, 256, 3, dtype=np.uint8)

    def frame(self, t: int) -> np.ndarray:
        dx, dy = self.pan
        y0, x0 = 24 + dy * t, 24 + dx * t
        f = self.world[y0:y0 + H, x0:x0 + W].copy()
        s = 8 + 3 * t
        f[30:54, s:s + 24] = self.color
        return f


def h264_payloads(scene: Scene, frames: int, idr_at=(0,)):
    encoder, seq, out = H264Encoder(), 0, []
    for t in range(frames):
        packet, key = encoder.encode(scene.frame(t), idr=t in idr_at)
        seq = 0 if key else seq + 1
        out.append(wire.encode_h264_frame(packet, t, H, W, key, seq, B))
    return out


def test_encoder_and_decoder_one_packet_per_frame_and_vectors_follow_the_pan():
    scene = Scene(0, (2, 0))
    decoder, cloud = H264Decoder(), ReceiveState()
    for t, payload in enumerate(h264_payloads(scene, 6, idr_at=(0, 4))):
        req = wire.decode_request(payload)
        assert req.codec == Codec.H264 and req.key == (t in (0, 4)) and req.frame is None
        decoded = decoder.decode(req.packet)
        cloud.apply(req)  # fills in frame, field and mask
        np.testing.assert_array_equal(req.frame, decoded.image)
        assert cloud.digest == decoded.digest
        psnr = 10 * np.log10(255 ** 2 / np.mean((decoded.image.astype(float) - scene.frame(t)) ** 2))
        assert psnr > 30, f"frame {t}: PSNR {psnr:.1f}"
        if not req.key:
            assert req.residual_mask.shape == wire.residual_grid(H, W, B)
            # the background moved by the pan: the codec's vectors say where it came from
            assert np.median(req.field[..., 0]) == pytest.approx(2.0)
            assert np.median(req.field[..., 1]) == pytest.approx(0.0)


def test_the_mirror_decodes_only_the_digest_and_keeps_the_frame_it_sent():
    scene = Scene(4, (1, 2))
    cloud, mirror = ReceiveState(), ReceiveState(pixels=False)
    for t, payload in enumerate(h264_payloads(scene, 5, idr_at=(0, 3))):
        cloud.apply(wire.decode_request(payload))
        sent = wire.decode_request(payload)
        with pytest.raises(ValueError, match="needs the frame it sent"):
            mirror.apply(sent)  # refused before decoding: the mirror's decoder is untouched
        sent.frame = scene.frame(t)
        mirror.apply(sent)
        assert mirror.digest == cloud.digest and mirror.packet_seq == cloud.packet_seq
        assert sent.field is None and mirror.cache is sent.frame
        assert not np.array_equal(cloud.cache, mirror.cache)  # decoded (lossy) against sent
    # a mirror that decoded other pixels than the cloud would disagree
    assert wire.cache_digest(np.zeros((H * 3 // 2, W), np.uint8)) != cloud.digest


def test_idr_packets_are_smaller_than_lossless_and_p_frames_much_smaller():
    scene = Scene(1, (1, 1))
    payloads = h264_payloads(scene, 4)
    assert len(payloads[0]) < len(wire.encode_key_frame(scene.frame(0), 0, B))
    assert max(len(p) for p in payloads[1:]) < len(payloads[0]) / 4


def test_a_lost_or_repeated_packet_or_a_p_frame_without_idr_needs_a_resync():
    payloads = h264_payloads(Scene(2, (1, 0)), 4)
    with pytest.raises(ResyncNeeded, match="no IDR"):
        ReceiveState().apply(wire.decode_request(payloads[1]))
    state = ReceiveState()
    state.apply(wire.decode_request(payloads[0]))
    with pytest.raises(ResyncNeeded, match="packet 2 does not follow packet 0"):
        state.apply(wire.decode_request(payloads[2]))
    state.apply(wire.decode_request(payloads[1]))
    before = state.digest
    with pytest.raises(ResyncNeeded, match="out of order"):
        state.apply(wire.decode_request(payloads[1]))
    assert state.digest == before  # a refused frame leaves the state as it was
    state.apply(wire.decode_request(payloads[0]))  # an IDR always restarts the decoder
    assert state.packet_seq == 0


def test_corrupt_packets_are_refused_clearly_never_crash():
    payloads = h264_payloads(Scene(3, (0, 1)), 3)
    state = ReceiveState()
    state.apply(wire.decode_request(payloads[0]))
    req = wire.decode_request(payloads[1])
    garbage = bytes(np.random.default_rng(0).integers(0, 256, len(req.packet), dtype=np.uint8))
    corrupt = wire.encode_h264_frame(garbage, 1, H, W, False, 1, B)
    with pytest.raises(ResyncNeeded):
        state.apply(wire.decode_request(corrupt))
    with pytest.raises(ResyncNeeded, match="no IDR"):  # the failed decoder is gone
        state.apply(wire.decode_request(payloads[2]))
    # an IDR of another size than the header says
    other = H264Encoder().encode(np.zeros((64, 64, 3), np.uint8), idr=True)[0]
    with pytest.raises(ResyncNeeded, match="header says"):
        ReceiveState().apply(wire.decode_request(wire.encode_h264_frame(other, 0, H, W, True, 0,
                                                                         B)))
    # a picture larger than the header says is refused before the decoder allocates it
    larger = H264Encoder().encode(np.zeros((H * 4, W * 4, 3), np.uint8), idr=True)[0]
    with pytest.raises(ResyncNeeded, match="does not decode"):
        ReceiveState().apply(wire.decode_request(wire.encode_h264_frame(larger, 0, H, W, True, 0,
                                                                          B)))
    # header-level checks
    with pytest.raises(PayloadError, match="packet_seq"):
        body = payloads[1]  # a P-frame body claiming the key flag
        wire.decode_request(body[:4] + bytes([wire.FLAG_KEY]) + body[5:])
    with pytest.raises(ValueError, match="packet_seq"):
        wire.encode_h264_frame(b"x", 0, H, W, True, 3)
    with pytest.raises(PayloadError, match="exceeds"):
        bad = bytearray(payloads[0])
        bad[24:28] = (10 ** 9).to_bytes(4, "little")  # raw_len
        wire.decode_request(bytes(bad))


def test_the_mirror_tracks_the_cloud_and_a_failed_send_turns_into_an_idr():
    scene = Scene(4, (2, 1))
    core = _StreamCore(1, B, RetryPolicy(), Codec.H264, Codec.H264)
    cloud = ReceiveState()

    def deliver(t, commit=True):
        payload, predicted, key, index = core.prepare(scene.frame(t), None, None, False, t)
        if commit:
            cloud.apply(wire.decode_request(payload))
            assert cloud.digest == predicted.digest
            core.commit(predicted, index)
        return key

    assert [deliver(t) for t in range(3)] == [True, False, False]
    deliver(3, commit=False)  # encoded, never delivered
    assert deliver(4)  # the encoder's reference is not the cloud's: an IDR


def test_bytes_model_learns_per_fraction():
    model = BytesModel()
    pixels = H * W
    first = model.estimate(False, 0.1, pixels)
    for _ in range(20):
        model.observe(False, 0.1, pixels, 500)
        model.observe(True, 1.0, pixels, 9000)
    assert model.estimate(False, 0.1, pixels) == pytest.approx(500, rel=0.05)
    assert model.estimate(True, 1.0, pixels) == pytest.approx(9000, rel=0.05)
    assert first != model.estimate(False, 0.1, pixels)


def test_bytes_model_rescales_what_it_learned_to_another_crf():
    model = BytesModel()
    for _ in range(30):
        model.observe(False, 0.1, H * W, 600, crf=29)  # coded 6 crf (one halving) above 23
    assert model.estimate(False, 0.1, H * W, crf=29) == pytest.approx(600, rel=0.05)
    assert model.estimate(False, 0.1, H * W, crf=23) == pytest.approx(1200, rel=0.05)


def test_link_rate_picks_the_best_crf_whose_p_frames_fit_the_link():
    rate = LinkRate(base_crf=23, max_crf=35, budget_s=0.01, patience=3)
    assert rate.decide(None, idr_due=False) == 23  # no link estimate: the stream's own quality
    rate.observe(True, 50_000, 23)  # IDRs do not say what a P-frame costs
    assert rate.p_bytes_at_base is None
    rate.observe(False, 4000, 23)
    assert rate.fitting_crf(4000 / 0.01) == 23  # fits exactly
    assert rate.fitting_crf(1000 / 0.01) == 35  # a quarter of the bytes needs +12 (capped at 35)
    assert rate.fitting_crf(2000 / 0.01) == 29  # half the bytes: one halving
    assert rate.fitting_crf(1e12) == 23  # never better than the stream's own quality
    # a tight link: the switch (an IDR) waits for `patience` frames unless an IDR is due anyway
    assert [rate.decide(2000 / 0.01, idr_due=False) for _ in range(3)] == [23, 23, 29]
    rate.observe(False, 2000, 29)  # as predicted
    assert rate.decide(2000 / 0.01, idr_due=False) == 29
    # the link recovers a little: within the hysteresis, no switch (it would cost an IDR)
    assert rate.fitting_crf(2500 / 0.01) == 28
    assert [rate.decide(2500 / 0.01, idr_due=False) for _ in range(5)] == [29] * 5
    # better quality waits for `settle` P-frames after the last IDR, even when an IDR is due:
    # the first ones after an IDR refer to a sharper picture and come out small
    rate.observe(True, 30_000, 29)
    rate.observe(False, 500, 29)
    assert [rate.decide(1e9, idr_due=False) for _ in range(5)] == [29] * 5
    assert rate.decide(1e9, idr_due=True) == 29 and rate.changes == 1
    for _ in range(rate.settle - 1):
        rate.observe(False, 2000, 29)
    # it recovers fully: back to the base quality after `patience` frames, at once at an IDR
    assert [rate.decide(1e9, idr_due=False) for _ in range(3)] == [29, 29, 23]
    rate.decide(2000 / 0.01, idr_due=True)
    assert rate.crf == 29 and rate.changes == 3
    with pytest.raises(ValueError):
        LinkRate(base_crf=30, max_crf=25)


def test_a_crf_change_reopens_the_encoder_with_an_idr_and_smaller_p_frames():
    scene = Scene(10, (2, 1))
    encoder, sizes = H264Encoder(crf=20), {}
    assert encoder.encode(scene.frame(0), idr=True)[1]
    sizes[20] = [len(encoder.encode(scene.frame(t), idr=False)[0]) for t in (1, 2, 3)]
    encoder.set_crf(32)
    packet, key = encoder.encode(scene.frame(4), idr=False)
    assert key, "a new quality starts with an IDR"
    decoder = H264Decoder()  # a fresh decoder starts at that IDR
    decoder.decode(packet)
    sizes[32] = []
    for t in (5, 6, 7):
        packet, key = encoder.encode(scene.frame(t), idr=False)
        assert not key
        decoder.decode(packet)
        sizes[32].append(len(packet))
    assert np.mean(sizes[32]) < np.mean(sizes[20]) / 2


def test_the_stream_core_codes_at_the_quality_the_link_allows():
    scene = Scene(11, (1, 2))
    core = _StreamCore(51, B, RetryPolicy(), Codec.H264, Codec.H264, uplink_quality=23)

    def send(t):
        payload, predicted, key, index = core.prepare(scene.frame(t), None, None, False, t)
        core.commit(predicted, index)
        return key, len(payload)

    assert [send(t)[0] for t in range(4)] == [True, False, False, False]
    uplink = core.uplink
    p_bytes = uplink.link_rate.p_bytes_at_base
    # a link on which these P-frames take 4x the budget: two halvings after `patience` frames
    uplink.link_bytes_per_s = p_bytes / 4 / uplink.link_rate.budget_s
    keys = [send(t)[0] for t in range(4, 4 + uplink.link_rate.patience + 1)]
    assert keys == [False] * (uplink.link_rate.patience - 1) + [True, False]
    assert uplink.encoder.crf == 23 + 12


# ------------------------------------------------------------------------ a real tritonserver

def run_h264(stream, scene: Scene, frames, results):
    for t in frames:
        frame = scene.frame(t)
        results.append((t, frame, stream.send(frame, frame_index=t)))


def check_mirror(results, stream):
    for t, frame, res in results:
        assert res.frame_index == t
    # the cloud's digest of the picture it decoded is the mirror's; the mirror keeps what it sent
    assert stream.mirror.digest == results[-1][2].digest
    np.testing.assert_array_equal(stream.mirror.cache, results[-1][1])


def test_three_h264_streams_are_served_and_isolated(tritonserver):
    scenes = {21: Scene(5, (2, 0)), 22: Scene(6, (0, 1)), 23: Scene(7, (-1, -2))}
    results = {sid: [] for sid in scenes}
    with FluxShardClient(tritonserver.grpc_url) as client:
        streams = {sid: client.open_stream(sid, block=B, key_codec=Codec.H264,
                                           residual_codec=Codec.H264) for sid in scenes}
        run_in_threads(lambda sid: run_h264(streams[sid], scenes[sid], range(8), results[sid]),
                       scenes)
        digests = set()
        for sid, res in results.items():
            check_mirror(res, streams[sid])
            assert [r.key for _, _, r in res] == [True] + [False] * 7
            assert all(not r.resyncs for _, _, r in res)
            assert all(r.stats["uplink_codec"] == "h264" for _, _, r in res)
            assert max(r.wire_bytes for _, _, r in res[1:]) < res[0][2].wire_bytes / 4
            digests |= {r.digest for _, _, r in res}
        assert len(digests) == 3 * 8
        for s in streams.values():
            s.close()


def test_a_dropped_packet_is_refused_and_the_stream_recovers_with_an_idr(tritonserver):
    from tritonclient.utils import InferenceServerException

    scene = Scene(8, (1, 1))
    with FluxShardClient(tritonserver.grpc_url) as client:
        stream = client.open_stream(31, block=B, key_codec=Codec.H264, residual_codec=Codec.H264)
        results = []
        run_h264(stream, scene, range(3), results)
        core = stream.core
        core.prepare(scene.frame(3), None, None, False, 3)  # packet 3: lost on the way
        # packet 4 as a sender that did not notice the loss would send it
        packet, key = core.uplink.encoder.encode(scene.frame(4), idr=False)
        late = wire.encode_h264_frame(packet, 4, H, W, key, core.uplink.encoder_seq + 1, B)
        with pytest.raises(InferenceServerException, match="resync needed.*does not follow"):
            client.infer(late, 31, start=False, end=False, secret=core.secret)
        run_h264(stream, scene, range(5, 8), results)  # the stream's next frame is an IDR
        check_mirror(results, stream)
        assert [r.key for _, _, r in results] == [True, False, False, True, False, False]
        stream.close()


@pytest.mark.slow
def test_server_restart_mid_h264_stream_loses_no_frame(tmp_path, triton_installed):
    server = TritonServer(log_file=tmp_path / "first.log", models=["fluxshard"])
    scene = Scene(9, (1, 0))
    results = []
    retry = RetryPolicy(reconnect_timeout_s=300.0, backoff_s=(0.2, 1.0))
    with server, FluxShardClient(server.grpc_url, retry=retry) as client:
        stream = client.open_stream(41, block=B, key_codec=Codec.H264, residual_codec=Codec.H264)
        run_h264(stream, scene, range(3), results)
        with crash_and_restart(server, tmp_path / "second.log"):
            run_h264(stream, scene, range(3, 7), results)
    assert [t for t, _, _ in results] == list(range(7))
    check_mirror(results, stream)
    first_after = results[3][2]
    assert first_after.key and any(r.startswith("unavailable") for r in first_after.resyncs)
    assert [r.key for _, _, r in results[4:]] == [False] * 3
