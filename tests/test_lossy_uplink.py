"""The H.264 uplink through a lossy link (perf/reliability_lossy.py's run, short): the link's
proxy aborts the connection at every lost segment, and still no frame is lost: the edge answers
the frame whose call failed and the cloud comes back with an IDR."""

from __future__ import annotations


import pytest

from fluxshard.serving.netshape import LossSpec, ShapedLink
from conftest import load_script



def _lossy_module():
    return load_script("perf/reliability_lossy.py")


@pytest.mark.slow
def test_h264_uplink_through_connection_resets_loses_no_frame(triton_installed, tmp_path):
    lossy = _lossy_module()
    with ShapedLink(rate_mbit=56, rtt_ms=20) as link:
        link.start_server(models=["fluxshard"], log_file=tmp_path / "server.log")
        # 10% of the segments in bursts of 2: resets come within a few frames; the run goes on
        # (80 frames at most) until the cloud answered again after one
        run = lossy.lossy_run(link, LossSpec(0.10, 2.0, seed=5, effect="reset"), 80, 2301,
                              until_resynced=True)
    assert run["frames_lost"] == 0, run["errors"]
    assert run["proxy"]["resets"] >= 1 and run["cloud_failed"] >= 1
    assert run["resync_idrs"] >= 1 and run["not_resynced"] == 0, run
    assert run["proxy"]["bytes_up"] > 0 and run["resync_idr_bytes"] > 0
