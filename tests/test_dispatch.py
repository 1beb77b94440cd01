"""The dispatcher on hand-made latency tables, and FluxShardStream's per-endpoint state keeping on
real H.264 (fluxshard synth) with two real in-process sparse executors as edge and cloud."""

from __future__ import annotations

import numpy as np
import pytest

from fluxshard_client import (BandwidthEstimator, Dispatcher, FluxShardStream, LatencyProfile,
                              LatencyTable, LocalEndpoint)

W, H = 640, 384  # the profile's own size: no scaling


def flat_profile(edge_ms: float, cloud_ms: float) -> LatencyProfile:
    return LatencyProfile(edge=LatencyTable([0.0, 1.0], [edge_ms, edge_ms]),
                          cloud=LatencyTable([0.0, 1.0], [cloud_ms, cloud_ms]), width=W, height=H)


def test_latency_table_interpolates_piecewise_linearly_and_refuses_bad_tables(tmp_path):
    table = LatencyTable([0.0, 0.5, 1.0], [10.0, 20.0, 60.0])
    assert table(0.25) == pytest.approx(15.0)
    assert table(0.75) == pytest.approx(40.0)
    assert table(-1.0) == 10.0 and table(2.0) == 60.0
    for fractions, ms in (([0.5, 0.2], [1, 2]), ([0.0, 1.5], [1, 2]), ([0.0], [1, 2]),
                          ([0.0, 1.0], [1, -2]), ([], [])):
        with pytest.raises(ValueError):
            LatencyTable(fractions, ms)
    profile = flat_profile(10, 5)
    path = profile.save(tmp_path / "latency.json")
    loaded = LatencyProfile.load(path)
    assert loaded.edge(0.3) == 10 and loaded.cloud(0.3) == 5 and loaded.scale(W // 2, H) == 0.5
    (tmp_path / "bad.json").write_text('{"version": 1, "edge": {}}')
    with pytest.raises(ValueError, match="not a latency profile"):
        LatencyProfile.load(tmp_path / "bad.json")


def test_prefers_the_cloud_within_the_margin():
    fast_link = BandwidthEstimator(initial_bytes_per_s=1e9)
    d = Dispatcher(flat_profile(edge_ms=10.0, cloud_ms=11.0), margin_ms=2.0, bandwidth=fast_link)
    assert d.decide(0.2, 0.2, 1000, W, H).endpoint == "cloud"  # edge 1 ms faster: within eps
    d = Dispatcher(flat_profile(edge_ms=10.0, cloud_ms=12.5), margin_ms=2.0, bandwidth=fast_link)
    decision = d.decide(0.2, 0.2, 1000, W, H)
    assert decision.endpoint == "edge" and decision.cloud_ms > decision.edge_ms + 2.0


def test_switches_to_the_edge_when_the_uplink_slows_down():
    d = Dispatcher(flat_profile(edge_ms=40.0, cloud_ms=5.0), margin_ms=2.0,
                   bandwidth=BandwidthEstimator(initial_bytes_per_s=10e6))
    payload = 50_000  # bytes of the cloud's residual set
    assert d.decide(0.3, 0.3, payload, W, H).endpoint == "cloud"  # 5 + 5 ms
    sizes = [10_000, 50_000, 30_000, 20_000, 40_000, 25_000]
    choices = []
    for k in range(12):  # the link drops to 1 MB/s (and 2 ms of round trip)
        n = sizes[k % len(sizes)]
        d.observe_uplink(n, 0.002 + n / 1e6)
        choices.append(d.decide(0.3, 0.3, payload, W, H).endpoint)
    assert choices[-1] == "edge" and d.bandwidth.bytes_per_s < 1.5e6
    assert d.bandwidth.resolved
    for k in range(32):  # and comes back
        n = sizes[k % len(sizes)]
        d.observe_uplink(n, 0.002 + n / 50e6)
    assert d.decide(0.3, 0.3, payload, W, H).endpoint == "cloud"
    # a transfer too short to time says nothing about the link
    before = d.bandwidth.bytes_per_s
    d.observe_uplink(100, 1e-6)
    assert d.bandwidth.bytes_per_s == before


def _transfers(bytes_per_s: float, base_s: float, sizes, jitter_s: float, stall_share=0.0,
               seed: int = 0):
    """Transfer times of ``sizes`` on a link: the fixed part, the bytes', a random delay (the
    scheduler, queues: never negative) and now and then a 200 ms stall (a retransmission)."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, float)
    stalls = 0.2 * (rng.random(sizes.size) < stall_share)
    return base_s + sizes / bytes_per_s + rng.exponential(jitter_s, sizes.size) + stalls


# a still camera's H.264 uplink: an IDR, then P-frames of a few hundred bytes
STILL = [15_000] + list(np.random.default_rng(1).integers(100, 1500, 199))
PAN = [15_000] + list(np.random.default_rng(2).integers(2000, 6000, 199))


def test_a_long_round_trip_is_latency_not_bandwidth():
    """The finding of docs/reliability.md: 56 Mbit/s, 40 ms round trip, P-frames of a few
    hundred bytes, a few ms of jitter: every transfer takes about the round trip, which a
    bytes / time estimate read as a link of well under 1 Mbit/s. The fit leaves the fixed part
    out: the estimate stays at the nominal 20 Mbit/s (the bytes' share, under 0.3 ms, is lost
    in the jitter) and the round trip goes to the fixed part, where the dispatcher adds it."""
    link = BandwidthEstimator(initial_bytes_per_s=20e6 / 8)
    times = _transfers(56e6 / 8, 0.040, STILL, jitter_s=0.005, stall_share=0.03)
    estimates = [link.observe(n, t) * 8 / 1e6 for n, t in zip(STILL, times)]
    assert min(estimates) >= 56 / 4, min(estimates)
    assert 0.040 <= link.base_s <= 0.050
    old_reading = STILL[-1] / times[-1] * 8 / 1e6  # what one bytes / time sample says
    assert old_reading < 0.5
    # the dispatcher's cloud estimate of a small P-frame is the round trip, not bytes / B
    d = Dispatcher(flat_profile(edge_ms=40.0, cloud_ms=5.0), bandwidth=link)
    _, cloud_ms, transfer_ms = d.estimate(0.1, 0.1, 500, W, H)
    assert transfer_ms == pytest.approx(1e3 * (link.base_s + 500 / link.bytes_per_s))
    assert 40.0 <= transfer_ms <= 51.0 and cloud_ms == pytest.approx(5.0 + transfer_ms)


@pytest.mark.parametrize("sizes", [STILL, PAN], ids=["still", "pan"])
def test_a_slow_link_is_measured_despite_stalls(sizes):
    """1 Mbit/s and 20 ms of round trip, 5% of the transfers stalled 200 ms: the frames' sizes
    resolve the rate after the first window, within a factor 2.5 (the estimate is the fastest
    rate the transfers allow, so it errs on the fast side)."""
    link = BandwidthEstimator(initial_bytes_per_s=20e6 / 8)
    times = _transfers(1e6 / 8, 0.020, sizes, jitter_s=0.003, stall_share=0.05, seed=3)
    estimates = np.array([link.observe(n, t) * 8 / 1e6 for n, t in zip(sizes, times)])
    assert ((estimates[32:] > 1 / 2.5) & (estimates[32:] < 2.5)).all(), estimates[32:]
    assert link.resolved and 0.015 <= link.base_s <= 0.04


def test_the_estimate_follows_a_link_that_slows_and_recovers():
    """Nominal 20 Mbit/s; the link drops to 1 Mbit/s, then recovers to 100: a window of
    transfers later the estimate is within a factor 2.5 of 1, then back at the nominal rate or
    above (100 Mbit/s shows no bytes' share above 2 ms of jitter)."""
    link = BandwidthEstimator(initial_bytes_per_s=20e6 / 8)
    for rate, seed, lowest, highest in ((1.0, 4, 1 / 2.5, 2.5), (100.0, 5, 20.0, 100.0)):
        times = _transfers(rate * 1e6 / 8, 0.020, PAN[1:33], jitter_s=0.002, seed=seed)
        for n, t in zip(PAN[1:33], times):
            link.observe(n, t)
        assert lowest <= link.mbps <= highest, (rate, link.mbps)


def test_theil_sen_agrees_with_scipy():
    from statistics import NormalDist

    from scipy.stats import theilslopes

    from fluxshard_client.dispatch import theil_sen

    rng = np.random.default_rng(7)
    for trial in range(50):
        m = int(rng.integers(3, 40))
        x = rng.integers(100, 3000, m).astype(float)
        x[-1] = x[0]  # ties in x and in y
        y = 0.02 + x / rng.uniform(1e4, 1e7) + rng.exponential(0.01, m)
        y[1] = y[0]
        for confidence in (0.9, 0.95):
            expected = theilslopes(y, x, alpha=confidence)
            got = theil_sen(x, y, NormalDist().inv_cdf(0.5 + confidence / 2))
            np.testing.assert_allclose(got, (expected.slope, expected.low_slope,
                                             expected.high_slope), rtol=1e-12)
    with pytest.raises(ValueError, match="window >= 3"):
        BandwidthEstimator(window=2)


def test_an_idle_cloud_is_probed_so_the_estimate_can_recover():
    d = Dispatcher(flat_profile(edge_ms=10.0, cloud_ms=5.0), probe_interval=5,
                   bandwidth=BandwidthEstimator(initial_bytes_per_s=1e5))  # 1 s per 100 kB
    choices = [d.decide(0.3, 0.3, 100_000, W, H) for _ in range(10)]
    assert [c.endpoint for c in choices] == (["edge"] * 4 + ["cloud"]) * 2
    assert choices[4].reason == "probe"
    d = Dispatcher(flat_profile(edge_ms=10.0, cloud_ms=5.0), probe_interval=None,
                   bandwidth=BandwidthEstimator(initial_bytes_per_s=1e5))
    assert {d.decide(0.3, 0.3, 100_000, W, H).endpoint for _ in range(50)} == {"edge"}


def test_measured_load_moves_the_decision_and_probes_let_it_recover():
    """The edge's table says 10 ms, the cloud's 12 (fast link): edge. The edge then measures 3x
    its table (another process took its cores): the load factor moves the frames to the cloud;
    the edge is probed every probe_interval frames, and once it measures its table again the
    frames come back."""
    d = Dispatcher(flat_profile(edge_ms=10.0, cloud_ms=12.0), margin_ms=1.0, probe_interval=4,
                   bandwidth=BandwidthEstimator(initial_bytes_per_s=1e12))
    assert d.decide(0.2, 0.2, 1000, W, H).endpoint == "edge"
    for _ in range(5):
        d.observe_latency("edge", 0.2, W, H, 30.0)
    decisions = [d.decide(0.2, 0.2, 1000, W, H) for _ in range(8)]
    assert [x.endpoint for x in decisions] == (["cloud"] * 3 + ["edge"]) * 2
    assert decisions[3].reason == "probe" and decisions[0].edge_load > 2.0
    assert decisions[0].edge_ms == pytest.approx(10.0 * decisions[0].edge_load)
    for _ in range(8):  # the probes measure the edge back at its table
        d.observe_latency("edge", 0.2, W, H, 10.0)
    assert d.decide(0.2, 0.2, 1000, W, H).endpoint == "edge"
    assert d.load["cloud"].factor == 1.0  # the cloud was never measured


def test_a_single_stall_moves_the_load_factor_a_bounded_step_a_lasting_change_all_the_way():
    d = Dispatcher(flat_profile(edge_ms=10.0, cloud_ms=12.0))
    factor = d.observe_latency("edge", 0.5, W, H, 10_000.0)  # a 10 s stall, e.g. swapping
    assert factor == pytest.approx(1 + 0.3 * (4.0 - 1))
    assert d.observe_latency("edge", 0.5, W, H, float("nan")) == factor  # unmeasurable: ignored
    # a lasting change gets there: a server 20x slower than its table
    for _ in range(20):
        d.observe_latency("cloud", 0.5, W, H, 240.0)
    assert d.load["cloud"].factor == pytest.approx(20.0, rel=0.05)
    # the table scales with the frame size, and so does what a measurement is compared with
    assert d.profiled_ms("cloud", 0.5, W // 2, H) == pytest.approx(6.0)


def test_forced_policies_and_bad_policy():
    d = Dispatcher(flat_profile(1.0, 100.0), policy="cloud")
    assert d.decide(0, 1, 10**6, W, H).endpoint == "cloud"
    d = Dispatcher(flat_profile(100.0, 1.0), policy="edge")
    assert d.decide(1, 0, 0, W, H).endpoint == "edge"
    d = Dispatcher(flat_profile(100.0, 1.0), policy="alternate")
    assert [d.decide(0, 0, 0, W, H).endpoint for _ in range(4)] == ["edge", "cloud"] * 2
    assert Dispatcher(flat_profile(100.0, 1.0)).decide(0, 0, 0, W, H,
                                                       cloud_available=False).endpoint == "edge"
    with pytest.raises(ValueError, match="dispatch policy"):
        Dispatcher(policy="fastest")


@pytest.fixture(scope="module")
def two_endpoints():
    from fluxshard.sessions import yolo_session_factory

    factory = yolo_session_factory("sparse")
    return factory


def test_idle_endpoint_keeps_accumulating_and_resumes_with_a_residual_frame(synth_clips,
                                                                            two_endpoints):
    from fluxshard.motion import iter_motion

    paths, _spec = synth_clips("pan")
    cloud_session = two_endpoints(2)
    stream = FluxShardStream(LocalEndpoint(two_endpoints(1)), LocalEndpoint(cloud_session),
                             profile=flat_profile(edge_ms=30.0, cloud_ms=5.0),
                             initial_mbps=1000.0, imgsz=None)
    fast = stream.dispatcher.bandwidth.bytes_per_s
    results, cloud_idle = [], []
    for mf in iter_motion(paths.video, max_frames=10):
        # frames 3-6: the uplink is "down" to 10 kB/s, so the edge must take them
        stream.dispatcher.bandwidth.bytes_per_s = 1e4 if 3 <= mf.index <= 6 else fast
        results.append(stream.process(mf.image, None if mf.is_key else mf.field, mf.is_key,
                                      mf.index))
        cloud_idle.append(stream.states["cloud"].frames_since_reset)
    endpoints = [r.endpoint for r in results]
    assert endpoints == ["cloud"] * 3 + ["edge"] * 4 + ["cloud"] * 3
    assert [r.key for r in results] == [True, False, False, True] + [False] * 6
    # the cloud's state accumulated the motion of the four frames it did not run ...
    assert cloud_idle[3:7] == [1, 2, 3, 4] and cloud_idle[7] == 0
    # ... and it resumed from its own cache (frame 2) with residual blocks, not a key frame
    resumed = results[7]
    assert not resumed.key and 0 < resumed.residual_fraction < 1
    assert resumed.field is not None and np.abs(resumed.field).max() > 0
    assert cloud_session.last_report.key is False
    # the edge's first frame was a key frame: its state had never run
    assert results[3].key and results[3].residual_fraction == 1.0


def test_bad_input_is_refused_clearly(two_endpoints):
    stream = FluxShardStream(LocalEndpoint(two_endpoints(3)), dispatch="edge",
                             profile=flat_profile(10, 5), imgsz=None)
    frame = np.zeros((64, 96, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8 RGB"):
        stream.process(frame.astype(np.float32), None, True)
    stream.process(frame, None, True, index=0)
    with pytest.raises(ValueError, match="motion field shape"):
        stream.process(frame, np.zeros((3, 3, 2), np.float32), index=1)
    with pytest.raises(ValueError, match="not after"):
        stream.process(frame, np.zeros((16, 24, 2), np.float32), index=0)
    with pytest.raises(ValueError, match="needs a cloud"):
        FluxShardStream(LocalEndpoint(two_endpoints(4)), dispatch="cloud", imgsz=None)


def test_an_unreachable_cloud_falls_back_to_the_edge(two_endpoints):
    """With the default retry policy: the frame that finds the cloud gone gives up at once (no
    reconnect wait inside a frame), and the cloud is left out while a background probe asks."""
    from fluxshard.serving.tritonserver import free_port
    from fluxshard_client import RemoteEndpoint

    cloud = RemoteEndpoint.connect(f"127.0.0.1:{free_port()}", 5, block=16)
    stream = FluxShardStream(LocalEndpoint(two_endpoints(5)), cloud, dispatch="cloud",
                             profile=flat_profile(10, 5), probe_interval=3, imgsz=None)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    field = np.zeros((16, 24, 2), np.float32)
    results = [stream.process(frame, None if t == 0 else field, t == 0, t) for t in range(5)]
    stream.close()
    assert [r.endpoint for r in results] == ["edge"] * 5  # every frame still answered
    assert results[0].decision.reason.startswith("cloud failed") and "unreachable" in \
        results[0].decision.reason
    # left out (not retried every probe_interval frames) until it answers a readiness probe
    assert all(r.decision.reason.startswith("cloud down") for r in results[1:])
    assert all(r.stats["cloud_fallback"] == r.decision.reason for r in results)
    assert [r.key for r in results] == [True, False, False, False, False]
    assert len(stream.core.cloud_failures) == 1


def test_the_sdk_reads_no_latency_profile_from_the_working_folder(tmp_path, monkeypatch):
    from fluxshard_client.dispatch import DEFAULT_PROFILE_PATH, PROFILE_ENV, LatencyProfile

    measured = LatencyProfile.default()
    measured.source = "measured"
    (tmp_path / DEFAULT_PROFILE_PATH).parent.mkdir(parents=True)
    measured.save(tmp_path / DEFAULT_PROFILE_PATH)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert LatencyProfile.load_or_default().source == "default"  # where it runs does not matter
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / DEFAULT_PROFILE_PATH))
    assert LatencyProfile.load_or_default().source != "default"  # the application said so
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError):
        LatencyProfile.load_or_default()


@pytest.mark.parametrize("executor", ["tiles", "dense"])
def test_an_edge_only_stream_reports_what_its_whole_frame_executor_recomputed(executor):
    """Edge only, an executor that runs on the whole frame (tiles, dense): the stream keeps the
    edge's motion without its residual set, and a frame's residual mask is what the executor
    recomputed: the tile executor's crops (a share of the frame where one object moves on a
    still scene), everything for dense."""
    from fluxshard.sessions import yolo_session_factory

    session = yolo_session_factory(executor, threads=1)(0)
    stream = FluxShardStream(LocalEndpoint(session), dispatch="edge", imgsz=None)
    rng = np.random.default_rng(5)
    background = rng.integers(60, 200, (192, 320, 3), dtype=np.uint8)
    still = np.zeros((192 // 4, 320 // 4, 2), np.float32)
    for t in range(4):
        frame = background.copy()
        frame[40:90, 30 + 10 * t:80 + 10 * t] = (220, 40, 40)
        result = stream.process(frame, None if t == 0 else still, t == 0, index=t)
        assert result.residual_mask.shape == (192 // 16, 320 // 16)
    assert not result.key and result.endpoint == "edge"
    if executor == "dense":
        assert result.residual_fraction == 1.0
    else:
        report = session.last_report
        assert not report.dense and report.crops >= 1
        np.testing.assert_array_equal(result.residual_mask, report.computed[:12, :20])
        assert 0 < result.residual_fraction < 0.6


def test_the_motion_without_the_residual_is_the_residual_sets_field_and_tau():
    from fluxshard.endpoint import EndpointPath

    rng = np.random.default_rng(6)
    first = rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)
    field = np.full((24, 40, 2), 1.3, np.float32)
    path = EndpointPath(None, 16)
    path.reset(first)
    path.accumulate(field)
    full, tau = path.residual_at_tau(first)
    light, light_tau = path.motion_at_tau(first)
    assert light_tau == tau and light.threshold == full.threshold
    np.testing.assert_array_equal(light.field, full.field)
    assert light.mask.all() and light.mask.shape == full.mask.shape
