"""perf/bench_real.py end to end on one short real clip (both variants, few frames): the JSON
has a row per (clip, variant, executor) with exactly the documented fields, dense agrees with
itself, the speedup is the ratio of the rows' means, and every row ran the frames asked for.
No timing is asserted."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

CLIP = "carphone_pristine"  # the smallest real clip: 176x144
FRAMES = 12
# what is checked (rows, fields, self-agreement, the speedup's arithmetic) holds for any detector;
# the embedded one needs no fetch
WEIGHTS = "demo"


def load_bench():
    return load_script("perf/bench_real.py")


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_real")
    assert bench.main(["--quick", "--clips", CLIP, "--frames", str(FRAMES), "--out", str(out),
                       "--weights", WEIGHTS, "--footage-dir", str(out / "footage"),
                       "--no-progress"]) == 0
    return json.loads((out / "bench_real.json").read_text()), out


def test_a_row_per_clip_variant_and_executor_with_exactly_the_fields(bench, report):
    data, out = report
    rows = data["rows"]
    assert [(r["clip"], r["variant"], r["executor"]) for r in rows] == [
        (CLIP, v, e) for v in ("as_shipped", "camera") for e in ("dense", "tiles")]
    for r in rows:
        assert set(r) == set(bench.ROW_FIELDS)
    assert {"date", "machine", "threads", "weights", "frames"} <= set(data["header"])
    assert data["header"]["threads"] == 1
    assert (out / "bench_real.png").stat().st_size > 0


def test_every_row_ran_the_frames_asked_for(report):
    data, _ = report
    assert data["header"]["frames"] == FRAMES
    assert all(r["frames"] == FRAMES for r in data["rows"])


def test_dense_agrees_with_itself(report):
    dense = [r for r in report[0]["rows"] if r["executor"] == "dense"]
    assert any(r["agreement"] is not None for r in dense), \
        f"dense found no box with score >= 0.5 on {CLIP}: the test needs a clip with some"
    for r in dense:
        if r["agreement"] is not None:
            assert r["agreement"] == 1.0
            assert r["agreement_worst_window"] == 1.0
        assert r["dense_frame_fraction"] == 1.0 and r["crop_area_mean"] == 1.0


def test_speedup_is_the_ratio_of_the_rows_means(report):
    rows = report[0]["rows"]
    for variant in ("as_shipped", "camera"):
        by = {r["executor"]: r for r in rows if r["variant"] == variant}
        assert by["dense"]["speedup_mean_vs_dense"] == 1.0
        assert by["tiles"]["speedup_mean_vs_dense"] == pytest.approx(
            by["dense"]["ms_mean"] / by["tiles"]["ms_mean"], rel=1e-12)


def test_a_short_file_loops_and_each_restart_is_a_key_frame(bench, tmp_path):
    from fluxshard import synth

    spec = synth.SceneSpec(width=64, height=64, frames=5, gop=5, seed=0)
    video = synth.make_clip(spec, tmp_path, name="loop", progress=False).video
    restarts: list[int] = []
    frames = [mf for mf, _ in bench.decoded_frames(video, 12, loop=True, restarts=restarts)]
    assert len(frames) == 12
    assert restarts == [5, 10]
    assert [i for i, mf in enumerate(frames) if mf.is_key] == [0, 5, 10]


def test_a_short_file_without_loop_is_an_error(bench, tmp_path):
    from fluxshard import synth

    spec = synth.SceneSpec(width=64, height=64, frames=5, gop=5, seed=0)
    video = synth.make_clip(spec, tmp_path, name="short", progress=False).video
    with pytest.raises(RuntimeError, match="decoded to 5 frames, expected 8"):
        list(bench.decoded_frames(video, 8, loop=False, restarts=[]))


def test_an_unknown_clip_is_refused_by_name(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--clips", "no-such-clip", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "no-such-clip" in capsys.readouterr().err
    assert not (tmp_path / "bench_real.json").exists()


def test_late_frames_count_from_the_last_dense_frame(bench):
    flags = [True] + [False] * 34 + [True] + [False] * 25
    late = bench.late_frames(flags)
    assert late.nonzero()[0].tolist() == list(range(20, 30)) + list(range(55, 61))


def test_a_tile_knob_runs_as_a_third_stream_on_the_same_frames(bench, tmp_path):
    """--tiles-option KNOB=VALUE: a row per clip and variant for the tile executor with that
    knob, named by it, on the same frames as the other two."""
    out = tmp_path / "ab"
    assert bench.main(["--clips", CLIP, "--variants", "camera", "--frames", "6", "--out",
                       str(out), "--weights", WEIGHTS, "--footage-dir", str(out / "footage"),
                       "--no-progress", "--tiles-option", "halo=64"]) == 0
    rows = json.loads((out / "bench_real.json").read_text())["rows"]
    assert [r["executor"] for r in rows] == ["dense", "tiles", "tiles[halo=64]"]
    assert all(r["frames"] == 6 for r in rows)


@pytest.mark.parametrize("item", ["no_such_knob=1", "halo", "halo=not a value"])
def test_a_bad_tile_knob_is_refused_before_anything_runs(bench, tmp_path, capsys, item):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--tiles-option", item, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--tiles-option" in capsys.readouterr().err
    assert not (tmp_path / "bench_real.json").exists()


def test_tile_knobs_parse_as_python_literals(bench):
    assert bench.parse_tile_options(["adaptive=false", "halo=48", "max_age=None",
                                     "budget=0.5"]) == {"adaptive": False, "halo": 48,
                                                        "max_age": None, "budget": 0.5}
