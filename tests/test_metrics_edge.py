"""`fluxshard run` on an endless source: bounded memory (a rolling summary, the optional outputs
off by default), and its Prometheus metrics (--metrics-port) scraped from a real run on a
looped synthetic H.264 clip with a real tritonserver as its cloud, checked against the frames
it wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLIP_FRAMES, Scrape, served_default_executor

from edge_runtime.metrics import EdgeMetrics, RollingSummary
from fluxshard.serving.tritonserver import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
EDGE = {"endpoint": "edge", "executor": "exact"}


def record(index: int, latency_ms: float, endpoint: str = "edge", key: bool = False) -> dict:
    return {"index": index, "endpoint": endpoint, "key": key, "latency_ms": latency_ms,
            "uplink_bytes": 10, "cache_hit_rate": 0.5, "residual_fraction": 0.25}


def test_rolling_summary_keeps_a_window_not_a_row_per_frame():
    summary = RollingSummary(window=100)
    for i in range(1000):
        summary.add(record(i, float(i), key=i % 250 == 0))
    assert summary.all.latencies.values.size == 100  # the window, however long the stream
    s = summary.summary({})
    assert s["frames"] == 1000 and s["endpoints"]["edge"]["key_frames"] == 4
    assert s["latency_ms"]["mean"] == pytest.approx(499.5)  # over every frame
    assert s["latency_ms"]["p50"] == pytest.approx(949.5)  # over the last 100 frames
    assert s["latency_percentiles_over_frames"] == 100
    assert s["uplink_bytes_total"] == 10_000 and s["jpeg_q90_bytes_total"] is None


def test_rolling_summary_of_a_short_clip_is_exact():
    summary = RollingSummary(window=100)
    latencies = [5.0, 1.0, 3.0, 9.0, 7.0]
    for i, ms in enumerate(latencies):
        summary.add(record(i, ms, endpoint="cloud" if i % 2 else "edge"), jpeg_bytes=40)
    s = summary.summary({})
    assert s["latency_ms"] == {"mean": 5.0, "p50": 5.0, "p90": 8.2}
    assert s["endpoints"]["cloud"]["frames"] == 2 and s["endpoints"]["edge"]["frames"] == 3
    assert s["jpeg_q90_bytes_total"] == 200 and s["uplink_vs_jpeg"] == 0.25


def test_what_counts_as_a_live_source_and_a_looped_file_goes_on_counting(synth_clips):
    from edge_runtime.run import edge_frames, is_live

    assert is_live("rtsp://camera/stream") and is_live("udp://0.0.0.0:5000")
    assert not is_live("file:///clips/a.mp4") and not is_live("clips/a.mp4")
    assert is_live("clips/a.mp4", loop=True)
    clip, _spec = synth_clips("pan")
    frames = list(edge_frames(str(clip.video), CLIP_FRAMES + 3, loop=True))
    assert [mf.index for mf in frames] == list(range(CLIP_FRAMES + 3))
    assert [mf.index for mf in frames if mf.is_key] == [0, CLIP_FRAMES]  # each pass opens anew


def test_decoded_frames_are_freed_without_the_cyclic_collector(synth_clips):
    """A frame whose side data formed a cycle with it waited for Python's cyclic collector,
    which runs rarely: an endless stream kept a decoded picture per frame."""
    import gc

    from fluxshard.motion import iter_motion

    clip, _spec = synth_clips("pan")
    gc.collect()
    gc.disable()
    try:
        frames = sum(1 for mf in iter_motion(clip.video) if mf.motion_source != "none")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("av.")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert frames > 0 and left == []


def test_each_run_has_its_own_registry_and_a_busy_port_is_one_clear_error():
    first, second = EdgeMetrics(), EdgeMetrics()
    first.frames.labels("edge", "exact").inc()
    assert second.registry.get_sample_value("fluxshard_frames_total", EDGE) is None
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match=r"--metrics-port \d+: cannot listen"):
            first.serve(busy.getsockname()[1])


def test_cloud_state_counts_each_loss_once():
    metrics = EdgeMetrics()
    for up in (True, False, False, True, False):  # lost twice, reported three times while out
        metrics.cloud_state("cloud:8001", up)
    value = metrics.registry.get_sample_value
    assert value("fluxshard_cloud_losses_total") == 2
    assert value("fluxshard_cloud_up", {"cloud": "cloud:8001"}) == 0


def _wait_for_frames(url: str, process: subprocess.Popen, frames: int) -> Scrape:
    """The first scrape with at least ``frames`` frames counted (the run must still be going)."""
    deadline = time.monotonic() + 600  # only a guard against a hung run, not a speed check
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run counted too few frames"
        try:
            scrape = Scrape(url)
        except OSError:  # not listening yet (the model loads first)
            scrape = None
        if scrape and (scrape.value("fluxshard_frames_total", **EDGE) or 0) >= frames:
            return scrape
        time.sleep(0.5)


@pytest.mark.slow
def test_run_on_a_looped_clip_serves_metrics_that_match_its_frames(synth_clips, tmp_path,
                                                                   tritonserver):
    clip, _spec = synth_clips("pan")  # one key frame per pass
    out, port = tmp_path / "run", free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # frames in turn on the edge and the cloud: both endpoints' series, the uplink's bytes
    process = subprocess.Popen(
        [sys.executable, "-m", "fluxshard.cli", "run", str(clip.video), "--loop", "--dispatch",
         "alternate", "--imgsz", "native", "--cloud-url", tritonserver.grpc_url, "--executor", "exact",
         "--metrics-port", str(port), "--out", str(out), "--no-progress"], cwd=REPO_ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        scrape = _wait_for_frames(f"http://127.0.0.1:{port}/metrics", process,
                                  CLIP_FRAMES + 5)  # into the second pass
    finally:
        process.send_signal(signal.SIGTERM)  # a service's stop: the stream ends, outputs written
        _stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]

    counted = int(scrape.value("fluxshard_frames_total"))
    # a scrape sees whole frames: every per-frame series counted the same frames
    assert scrape.value("fluxshard_frame_latency_seconds_count") == counted
    assert scrape.value("fluxshard_cache_hit_ratio_count") == counted
    assert scrape.value("fluxshard_cloud_up", cloud=tritonserver.grpc_url) == 1
    assert scrape.value("fluxshard_uplink_estimate_bits_per_second") > 0

    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert summary["source"] == "live" and summary["stopped"] == "interrupted"
    assert len(records) == summary["frames"] >= counted
    assert [r["index"] for r in records] == list(range(len(records)))  # the loop goes on counting
    first = records[:counted]  # the frames the scrape counted, as the run wrote them
    for endpoint in ("edge", "cloud"):
        ran = [r for r in first if r["endpoint"] == endpoint]
        assert ran, f"no {endpoint} frame"
        # the edge runs --executor exact; the cloud says which ran its frames: the server's default
        executor = "exact" if endpoint == "edge" else served_default_executor()
        assert scrape.value("fluxshard_frames_total", endpoint=endpoint,
                            executor=executor) == len(ran)
        assert scrape.value("fluxshard_key_frames_total", endpoint=endpoint) == \
            sum(r["key"] for r in ran)
        assert scrape.value("fluxshard_frame_latency_seconds_sum", endpoint=endpoint) == \
            pytest.approx(sum(r["latency_ms"] for r in ran) / 1e3, abs=len(ran) * 1e-6)
        assert scrape.value("fluxshard_cache_hit_ratio_sum", endpoint=endpoint) == \
            pytest.approx(sum(r["cache_hit_rate"] for r in ran), abs=len(ran) * 1e-4)
    assert scrape.value("fluxshard_uplink_bytes_total") == sum(r["uplink_bytes"] for r in first)
    # each pass of the clip opens with its key frame
    assert sum(r["key"] for r in first) >= (counted - 1) // CLIP_FRAMES + 1
    # a live source writes neither the annotated video nor the report unless asked
    assert sorted(p.name for p in out.iterdir()) == ["detections.jsonl", "summary.json"]
    assert summary["jpeg_q90_bytes_total"] is None


def test_run_on_a_file_writes_the_outputs_its_flags_ask_for(synth_clips, tmp_path):
    from edge_runtime.run import run

    clip, _spec = synth_clips("pan")
    summary = run(str(clip.video), out=tmp_path, dispatch="edge", executor="dense", frames=4,
                  progress=False, save_video=False)
    assert summary["source"] == "file" and summary["stopped"] is None
    assert sorted(summary["outputs"]) == ["detections.jsonl", "report.png", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(summary["outputs"])
    assert summary["frames"] == 4 and summary["jpeg_q90_bytes_total"] > 0  # the report's baseline
