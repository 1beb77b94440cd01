"""The fluxshard model's own metrics on a real tritonserver's metrics port
(fluxshard/serving/metrics.py): what a scrape says matches what the streams did, and a stream's
series go when the stream ends while the others' go on."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Scrape, served_default_executor
from test_serving import B, H, W, Scene, run_stream
from tritonclient.utils import InferenceServerException

from fluxshard import wire
from fluxshard_client import FluxShardClient

MODEL = {"model": "fluxshard", "version": "1"}


@pytest.fixture(scope="module")
def client(tritonserver):
    with FluxShardClient(tritonserver.grpc_url) as c:
        yield c


def stream_value(scrape: Scrape, name: str, stream_id: int) -> float | None:
    return scrape.value(name, stream=stream_id, **MODEL)


def test_served_model_metrics_count_what_the_streams_did(tritonserver, client):
    url = tritonserver.metrics_url
    before = Scrape(url)
    refused_before = {reason: before.value("fluxshard_requests_refused_total", reason=reason,
                                           **MODEL) for reason in ("resync", "bad_payload")}
    served = served_default_executor()
    executor_before = before.value("fluxshard_executor_seconds_count", executor=served,
                                   **MODEL) or 0
    streams_before = before.value("fluxshard_streams", **MODEL)

    kept, ended = client.open_stream(9201, block=B), client.open_stream(9202, block=B)
    kept_results, ended_results = [], []
    prev = run_stream(kept, Scene(21, (1, 0)), range(5), kept_results)
    run_stream(ended, Scene(22, (0, 1)), range(3), ended_results)
    # a residual frame out of order on a stream the server holds: refused, resync asked
    scene = Scene(21, (1, 0))
    late = wire.encode_residual_frame(scene.frame(2), scene.field(),
                                      np.ones(wire.residual_grid(H, W, B), bool), 2, B)
    with pytest.raises(InferenceServerException, match="resync needed"):
        client.infer(late, 9201, start=False, end=False, secret=kept.core.secret)
    with pytest.raises(InferenceServerException, match="bad payload"):
        client.infer(b"GIF89a" + bytes(40), 9201, start=False, end=False)

    during = Scrape(url)
    assert stream_value(during, "fluxshard_stream_frames_total", 9201) == 5
    assert stream_value(during, "fluxshard_stream_frames_total", 9202) == 3
    assert stream_value(during, "fluxshard_stream_key_frames_total", 9201) == 1
    executor_s = sum(r.stats["compute_ms"] for _, _, r in kept_results) / 1e3
    assert stream_value(during, "fluxshard_stream_executor_seconds_total", 9201) == \
        pytest.approx(executor_s, rel=1e-6)
    assert stream_value(during, "fluxshard_stream_resyncs_total", 9201) == 1
    assert stream_value(during, "fluxshard_stream_resyncs_total", 9202) == 0
    for reason in ("resync", "bad_payload"):
        assert during.value("fluxshard_requests_refused_total", reason=reason, **MODEL) == \
            refused_before[reason] + 1
    assert during.value("fluxshard_executor_seconds_count", executor=served, **MODEL) == \
        executor_before + 8
    assert during.value("fluxshard_streams", **MODEL) == streams_before + 2

    ended.close()  # END: the server frees the session and the stream's series
    after = Scrape(url)
    assert stream_value(after, "fluxshard_stream_frames_total", 9202) is None
    assert 'stream="9202"' not in after.text
    assert during.value("fluxshard_streams", **MODEL) - 1 == after.value("fluxshard_streams",
                                                                          **MODEL)
    # the other stream's series go on at their values, and keep counting
    assert stream_value(after, "fluxshard_stream_frames_total", 9201) == 5
    assert stream_value(after, "fluxshard_stream_resyncs_total", 9201) == 1
    run_stream(kept, scene, range(5, 7), kept_results, prev)
    assert stream_value(Scrape(url), "fluxshard_stream_frames_total", 9201) == 7
    kept.close()
