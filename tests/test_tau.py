"""One tau, one unit: the value the dispatch layer picks residual blocks with is the value the edge
executor and the cloud executor truncate with, and what the profile measured is what runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fluxshard.tau import DEFAULT_TAU, TauPolicy, TruncationTable, quantize_tau, tau_argument


def test_tau_is_one_quantity_on_the_input_scale():
    policy = TauPolicy.from_options(0.1)
    tau = policy.tau_for(3.0)
    assert tau == quantize_tau(0.1) == 26 / 255
    assert policy.dispatch_threshold(tau) == pytest.approx(26.0)  # grey levels
    assert policy.layer_threshold(tau, 20.0) == pytest.approx(tau / 20)
    assert TauPolicy().tau_for(0.0) == DEFAULT_TAU
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="grey levels"):
        tau_argument("12")  # the old grey-level spelling is refused with the conversion
    with pytest.raises(argparse.ArgumentTypeError):
        tau_argument("-0.1")


def test_table_policy_picks_tau_per_motion_level(tmp_path):
    table = TruncationTable(alpha=0.99, levels=[
        dict(name="low", motion_max=0.5, tau=0.25), dict(name="high", motion_max=float("inf"),
                                                          tau=0.06)])
    table.save(tmp_path / "t.json")
    policy = TauPolicy.from_options(0.5, tmp_path / "t.json")  # the table wins
    assert policy.tau_for(0.1) == quantize_tau(0.25) and policy.tau_for(4.0) == quantize_tau(0.06)
    bad = tmp_path / "grey.json"
    bad.write_text(json.dumps(dict(alpha=0.99, levels=[dict(motion_max=1.0, tau=12)])))
    with pytest.raises(ValueError, match="grey levels"):
        TruncationTable.load(bad)


@pytest.mark.slow
def test_fluxshard_run_and_the_profile_give_the_same_output(synth_clips, tmp_path):
    """A clip through `fluxshard run --executor exact --dispatch edge --tau T` and through the profile's path
    (fluxshard.truncation.edge_path_outputs) at the same T: the same detections on every frame,
    and every frame reports the tau it used."""
    import torch

    from fluxshard.cli import main
    from fluxshard.models import load_model, postprocess
    from fluxshard.sessions import detection_rows
    from fluxshard.sparse import SparseExecutor
    from fluxshard.truncation import edge_path_outputs

    paths, _spec = synth_clips("pan")
    tau = 0.1
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["run", "--imgsz", "native", "--executor", "exact",
                     str(paths.video), "--dispatch", "edge", "--tau", str(tau),
                     "--out", str(out), "--frames", "8", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["tau"] == quantize_tau(tau) for r in records)

    executor = SparseExecutor(load_model(None, fused=True))  # the options `run` builds for exact
    profiled = []
    with torch.inference_mode():
        for mf, image, x, out_, _report, _key in edge_path_outputs(executor, paths.video, tau):
            if mf.index >= 8:
                break
            det = postprocess(out_, x.shape[-2:], image.shape[:2], conf_thres=0.25,
                              iou_thres=0.7)[0]
            profiled.append(detection_rows(det))
    assert sum(len(p) for p in profiled) > 0, "the clip must have detections to compare"
    for record, rows in zip(records, profiled):
        np.testing.assert_allclose(np.array(record["boxes"]).reshape(-1, 4), rows[:, :4],
                                   atol=0.01, err_msg=f"frame {record['index']}")
        np.testing.assert_allclose(record["scores"], rows[:, 4], atol=1e-4)
        assert record["classes"] == rows[:, 5].astype(int).tolist()


def test_the_cloud_truncates_with_the_tau_the_edge_dispatched_with(tritonserver, synth_clips):
    """Cloud frames carry the dispatch tau; the server reports the tau its executor ran with."""
    from fluxshard_client import FluxShardClient, FluxShardStream, LocalEndpoint
    from fluxshard.sessions import yolo_session_factory

    paths, _spec = synth_clips("pan")
    with FluxShardClient(tritonserver.grpc_url) as client:
        stream = FluxShardStream(LocalEndpoint(yolo_session_factory("sparse", threads=1)(0)),
                                 client.open_stream(4101), dispatch="cloud", tau=0.2, imgsz=None)
        results = list(stream.run(paths.video, max_frames=4))
        stream.close()
    assert [r.endpoint for r in results] == ["cloud"] * 4
    assert all(r.stats["tau"] == quantize_tau(0.2) for r in results)
