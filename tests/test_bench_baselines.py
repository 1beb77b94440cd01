"""perf/bench_baselines.py end to end on tiny clips: every baseline of docs/DESIGN.md
("Baselines") gets a row per motion level, and the rows say what each baseline is."""

from __future__ import annotations

import json
from conftest import load_script

# "FluxShard edge" mean cache hit rate at the low motion level (--quick, 5 frames, 1 thread) over
# scenes synth.heldout_spec(level, k), k = 0-4 (the harness uses k = 0):
# 0.354 / 0.372 / 0.377 / 0.501 / 0.388 (README "Measured quality").
# bound: worst of seeds 0-4 minus 0.03, rounded down to 0.01
MIN_LOW_MOTION_REUSE = 0.32


def test_baselines_harness_writes_a_row_per_baseline_and_level(tmp_path):
    bench = load_script("perf/bench_baselines.py")
    assert bench.main(["--quick", "--frames", "5", "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_baselines.json").read_text())["rows"]
    assert {(r["level"], r["baseline"]) for r in rows} == {
        (level, b) for level in ("low", "medium", "high") for b in bench.BASELINES}
    by = {(r["level"], r["baseline"]): r for r in rows}
    for level in ("low", "medium", "high"):
        # the cloud over a lossless wire and the edge reach the same input by independent paths
        # (the uplink's payload and the mirror the receiver rebuilds, against the edge's own
        # assembly; another executor and stream): they must detect, score and reuse alike
        edge, cloud = by[(level, "FluxShard edge")], by[(level, "FluxShard cloud")]
        for measure in ("agreement", "map50", "map50_95", "reuse"):
            assert cloud[measure] == edge[measure], (level, measure)
        assert by[(level, "edge dense")]["uplink_kb"] == 0.0
        assert by[(level, "cloud dense, JPEG")]["uplink_kb"] > by[(level, "cloud dense, H.264")][
            "uplink_kb"] > 0
        assert by[(level, "FluxShard cloud")]["uplink_kb"] > 0
    # a still camera reuses features
    assert by[("low", "FluxShard edge")]["reuse"] > MIN_LOW_MOTION_REUSE
    assert (tmp_path / "bench_baselines.png").stat().st_size > 0
