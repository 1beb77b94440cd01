"""`fluxshard profile accuracy --executor tiles`: the tile executor's knobs per motion level
(fluxshard.tiles.profile), tuned on synthetic seeds and the tuning half of the real corpus
(fluxshard.footage.TUNING_CLIPS). Tiny clips (320x192, a few frames) and tiny grids with the
embedded demo detector; real clips: a few frames of a camera stream with yolov3-tiny (the cache
scripts/install.sh fills). Synthetic timings come from an injected clock; nothing here asserts a
time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fluxshard.synth import MOTION_LEVELS

FAST = dict(width=320, height=192, threads=1, progress=False)
TINY_GRID = {"threshold": (4, 8), "halo": (32,)}


class StepClock:
    """A clock that advances a fixed step per reading: every timed span is a whole number of
    steps, whatever the machine does."""

    def __init__(self, step: float = 0.001):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture(scope="module")
def model():
    from fluxshard.models import load_model

    return load_model(None, fused=True)


@pytest.fixture(scope="module")
def swept(model, tmp_path_factory):
    from fluxshard.tiles.profile import sweep_tiles

    levels = {k: MOTION_LEVELS[k] for k in ("low", "high")}
    return sweep_tiles(model, levels, TINY_GRID, frames=4, clock=StepClock(), **FAST)


def _row(level, threshold, map50_ratio, map50_95_ratio, ms_ratio):
    return dict(level=level, settings=dict(threshold=threshold), map50_ratio=map50_ratio,
                map50_95_ratio=map50_95_ratio, ms_ratio=ms_ratio, speedup=1 / ms_ratio)


def test_choose_setting_takes_the_fastest_that_keeps_both_ratios():
    from fluxshard.tiles.profile import choose_setting

    rows = [_row("low", 4, 1.0, 1.0, 0.9),
            _row("low", 6, 0.995, 0.975, 0.6),  # feasible and fastest of the feasible
            _row("low", 8, 1.0, 0.96, 0.3),  # fastest, but mAP@0.5:0.95 falls below 0.97
            _row("low", 10, 0.98, 1.0, 0.2)]  # fastest, but mAP@0.5 falls below 0.99
    row, meets = choose_setting(rows)
    assert meets and row["settings"] == dict(threshold=6)
    # the thresholds are arguments
    row, meets = choose_setting(rows, min_map50_ratio=0.95, min_map50_95_ratio=0.95)
    assert meets and row["settings"] == dict(threshold=10)


def test_choose_setting_falls_back_to_the_most_accurate_and_says_so():
    from fluxshard.tiles.profile import choose_setting

    rows = [_row("high", 4, 0.98, 0.95, 0.9), _row("high", 8, 0.999, 0.90, 0.3),
            _row("high", 6, 0.97, 0.95, 0.5)]
    row, meets = choose_setting(rows)
    assert not meets
    # mAP@0.5:0.95 first; between equals, mAP@0.5
    assert row["settings"] == dict(threshold=4)
    with pytest.raises(ValueError, match="no sweep rows"):
        choose_setting([])


def test_a_tie_in_speed_goes_to_the_more_accurate():
    from fluxshard.tiles.profile import choose_setting

    rows = [_row("low", 4, 1.0, 0.98, 0.5), _row("low", 8, 1.0, 0.99, 0.5)]
    assert choose_setting(rows)[0]["settings"] == dict(threshold=8)


def test_expand_grid_and_bad_knobs():
    from fluxshard.tiles.profile import expand_grid

    settings = expand_grid({"threshold": (4, 8), "halo": (32, 64), "refresh_interval": 15})
    assert len(settings) == 4 and all(s["refresh_interval"] == 15 for s in settings)
    assert {(s["threshold"], s["halo"]) for s in settings} == {(4, 32), (4, 64), (8, 32), (8, 64)}
    with pytest.raises(ValueError, match="unknown tile executor knobs.*'speed'"):
        expand_grid({"speed": (1, 2)})
    with pytest.raises(ValueError, match="no values"):
        expand_grid({"halo": ()})
    with pytest.raises(ValueError, match="non-empty"):
        expand_grid({})


def test_sweep_rows_every_setting_per_level_and_picks_by_the_rule(swept):
    from fluxshard.tiles.profile import choose_setting

    assert [lv["name"] for lv in swept.levels] and {lv["name"] for lv in swept.levels} == \
        {"low", "high"}
    assert len(swept.sweep) == 2 * 2  # levels x settings
    for level in swept.levels:
        rows = [r for r in swept.sweep if r["level"] == level["name"]]
        assert sorted(r["settings"]["threshold"] for r in rows) == [4, 8]
        for r in rows:
            assert r["frames"] == 4  # every frame counts, the key frame too
            assert 0 < r["crop_area_fraction"] <= 1
            # the step clock: each executor frame and each dense frame spans whole steps
            assert r["tiles_ms"] > 0 and r["dense_ms"] > 0
            assert r["speedup"] == pytest.approx(r["dense_ms"] / r["tiles_ms"])
            # no real clip tuned it: the level's rows are the synthetic ones
            assert r["agreement"] is None and r["real_clips"] == [] and r["real_ms_ratio"] is None
            assert r["dense_map50"] > 0  # the demo detector finds the synthetic objects
            assert r["map50_ratio"] == pytest.approx(r["map50"] / r["dense_map50"])
        row, meets = choose_setting(rows)
        assert level["settings"] == row["settings"] and level["meets_accuracy"] == meets
        assert level["speedup"] == row["speedup"]
    low, high = swept.levels
    assert low["motion"] < high["motion"] and low["motion_max"] < high["motion_max"]
    assert high["motion_max"] == float("inf")
    assert swept.size == [320, 192] and swept.model["weights"] == "embedded demo detector"
    assert swept.executor["best_dense"] in ("fused_channels_last", "onnxruntime")
    synthetic = swept.tuned_on["synthetic"]
    assert set(synthetic["seeds"]) == {"low", "high"} and synthetic["frames"] == 4
    assert synthetic["seeds"]["low"] != synthetic["seeds"]["high"]
    assert swept.tuned_on["real"]["clips"] == [] and swept.real_sweep == []


def test_the_table_round_trips_and_picks_by_motion(swept, tmp_path):
    from fluxshard.tiles.profile import TilesTable

    path = swept.save(tmp_path / "t" / "tiles_table.json")
    again = TilesTable.load(path)
    assert again == swept
    low, high = again.levels
    for level, motion in ((low, 0.0), (low, low["motion_max"]), (high, low["motion_max"] + 1e-3),
                          (high, 1e6)):
        assert again.settings_for(motion) == level["settings"]
    settings = again.settings_for(0.0)
    settings["halo"] = -1  # a copy: the table stays as loaded
    assert again.settings_for(0.0) == low["settings"]


def test_settings_for_builds_the_executor_the_level_asks_for(model, swept):
    """ProfiledTileExecutor: the level of each frame's field; a key frame runs dense."""
    from fluxshard.motion.field import motion_statistic
    from fluxshard.tiles import TileStreamState
    from fluxshard.tiles.profile import ProfiledTileExecutor, TilesTable

    table = TilesTable(size=[320, 192], model={}, levels=[
        dict(name="still", motion=0.0, motion_max=1.0, settings=dict(threshold=4, halo=32)),
        dict(name="moving", motion=5.0, motion_max=float("inf"),
             settings=dict(threshold=8, halo=64, refresh_interval=15))])
    ex = ProfiledTileExecutor(model, table, engine="torch")
    assert ex.executors["moving"].halo == 64 and ex.executors["moving"].refresh_interval == 15
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (192, 320, 3), dtype=np.uint8)
    still = np.zeros((192 // 4, 320 // 4, 2), np.float32)
    moving = np.full_like(still, 3.0)
    assert motion_statistic(moving) > 1.0 >= motion_statistic(still)
    state = TileStreamState()
    _, report = ex.run(state, frame, None, key=True)
    assert report.dense and ex.last_level == "still"
    ex.run(state, frame, still)
    assert ex.last_level == "still"
    ex.run(state, frame, moving)
    assert ex.last_level == "moving"


def _write(tmp_path, data) -> str:
    path = tmp_path / "table.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_bad_table_files_are_refused_clearly(swept, tmp_path):
    from dataclasses import asdict

    from fluxshard.tiles.profile import TilesTable

    good = asdict(swept)
    with pytest.raises(ValueError, match="is not a tiles table"):
        TilesTable.load(_write(tmp_path, "not json"))
    with pytest.raises(ValueError, match="is not a tiles table"):
        TilesTable.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="looks like a truncation table"):
        TilesTable.load(_write(tmp_path, dict(alpha=0.99, levels=[])))
    with pytest.raises(ValueError, match="version 0.*reads version 1.*profile again"):
        TilesTable.load(_write(tmp_path, {**good, "version": 0}))
    with pytest.raises(ValueError, match="no levels"):
        TilesTable.load(_write(tmp_path, {**good, "levels": []}))
    with pytest.raises(ValueError, match="missing or malformed"):
        TilesTable.load(_write(tmp_path, {k: v for k, v in good.items() if k != "size"}))
    bad_level = dict(good["levels"][0], settings=dict(threshold=4, speed=2))
    with pytest.raises(ValueError, match="unknown tile executor knobs \\['speed'\\]"):
        TilesTable.load(_write(tmp_path, {**good, "levels": [bad_level]}))
    no_bound = {k: v for k, v in good["levels"][0].items() if k != "motion_max"}
    with pytest.raises(ValueError, match="needs name, motion_max and settings"):
        TilesTable.load(_write(tmp_path, {**good, "levels": [no_bound]}))


def test_the_truncation_table_still_picks_by_the_shared_level_rule():
    from fluxshard.tau import TruncationTable, level_for

    levels = [dict(name="a", motion_max=1.0, tau=0.1), dict(name="b", motion_max=float("inf"),
                                                            tau=0.2)]
    assert level_for(levels, 0.5)["name"] == "a" and level_for(levels, 7)["name"] == "b"
    assert level_for([], 1.0) is None
    table = TruncationTable(alpha=0.99, levels=levels)
    assert table.tau_for(1.0) == pytest.approx(26 / 255) and table.tau_for(2.0) == \
        pytest.approx(51 / 255)
    assert TruncationTable(alpha=0.99).tau_for(3.0) == 0.0


def test_cli_writes_the_table_and_the_plot(tmp_path, capsys):
    from fluxshard.cli import main
    from fluxshard.tiles.profile import PLOT_NAME, TABLE_NAME, TilesTable

    out = tmp_path / "profile"
    rc = main(["profile", "accuracy", "--executor", "tiles", "--frames", "3", "--imgsz", "native",
               "--size", "320",
               "192", "--thresholds", "6", "--halos", "32", "--refresh-intervals", "30",
               "--budgets", "0.45", "--synthetic-only", "--out", str(out)])
    assert rc == 0
    table = TilesTable.load(out / TABLE_NAME)
    assert (out / PLOT_NAME).stat().st_size > 0
    assert [lv["settings"] for lv in table.levels] == \
        [dict(threshold=6.0, halo=32, refresh_interval=30, budget=0.45)] * len(MOTION_LEVELS)
    assert table.model["weights"] == "embedded demo detector"
    printed = capsys.readouterr().out
    assert "chosen setting" in printed
    assert "threshold=6.0 halo=32 refresh_interval=30 budget=0.45" in printed


def test_cli_help_names_the_module_grids():
    """The grids are named in truncation.py's help (it must not import torch); keep them equal."""
    from fluxshard import cli
    from fluxshard.tiles.profile import DEFAULT_GRID, QUICK_GRID

    parser = cli.build_parser(["profile"]).verbs["profile"]
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices
               and "accuracy" in a.choices).choices["accuracy"]
    helps = {a.dest: a.help for a in sub._actions}
    for dest, knob in (("thresholds", "threshold"), ("halos", "halo"),
                       ("refresh_intervals", "refresh_interval"), ("budgets", "budget")):
        assert f"default {' '.join(map(str, DEFAULT_GRID[knob]))}" in helps[dest]
        if QUICK_GRID[knob] != DEFAULT_GRID[knob]:
            assert f"--quick {' '.join(map(str, QUICK_GRID[knob]))}" in helps[dest]


def test_run_executor_tiles_takes_the_tiles_table(swept, tmp_path):
    from fluxshard.cli import main

    table = swept.save(tmp_path / "tiles_table.json")
    out = tmp_path / "run"
    rc = main(["run", "--imgsz", "native",
               "--demo", "--frames", "4", "--size", "320", "192", "--out", str(out),
               "--dispatch", "edge", "--no-progress", "--executor", "tiles", "--tiles-table",
               str(table)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"] == "tiles" and summary["tiles_table"] == str(table)
    # the table without --executor: it implies tiles
    implied = tmp_path / "implied"
    rc = main(["run", "--imgsz", "native",
               "--demo", "--frames", "2", "--size", "320", "192", "--out", str(implied),
               "--dispatch", "edge", "--no-progress", "--tiles-table", str(table)])
    assert rc == 0 and json.loads((implied / "summary.json").read_text())["executor"] == "tiles"
    # the table with another executor: one line, exit 1, before anything runs
    rc = main(["run", "--imgsz", "native",
               "--demo", "--frames", "2", "--size", "320", "192", "--out",
               str(tmp_path / "exact"), "--dispatch", "edge", "--no-progress", "--executor",
               "exact", "--tiles-table", str(table)])
    assert rc == 1 and not (tmp_path / "exact").exists()


# ------------------------------------------------------------------- the real tuning clips

def test_the_corpus_split_is_disjoint_and_covers_the_corpus():
    from fluxshard import footage

    tuning, heldout = set(footage.TUNING_CLIPS), set(footage.HELDOUT_CLIPS)
    assert not tuning & heldout
    assert tuning | heldout == set(footage.CORPUS_NAMES)
    assert len(footage.TUNING_CLIPS) == len(tuning) and len(footage.HELDOUT_CLIPS) == len(heldout)
    assert {"vtest.avi", "carphone_pristine.mp4"} <= heldout
    assert {"bikes.mp4", "box.mp4", "tree.avi", "bigbuckbunny.mp4"} <= tuning
    # each half holds a still camera and a moving one
    for half in (tuning, heldout):
        cameras = {footage.corpus_entry(name).camera for name in half}
        assert "static" in cameras and cameras - {"static"}, half
    assert footage.clip_split("vtest") == "heldout" and footage.clip_split("bikes.mp4") == "tuning"
    with pytest.raises(ValueError, match="unknown packaged clip"):
        footage.clip_split("nope")


@pytest.fixture(scope="module")
def real_detector():
    from fluxshard.models import load_model

    return load_model("yolov3-tiny", fused=True)


@pytest.fixture(scope="module")
def bikes_stream(tmp_path_factory):
    from fluxshard.footage import camera_stream

    return camera_stream("bikes", tmp_path_factory.mktemp("footage"), frames=20)


def test_real_clip_scoring_pairs_every_setting_with_dense_frame_by_frame(real_detector,
                                                                         bikes_stream):
    """A refresh every frame (K=1) runs the same frames dense: it must agree with dense on
    every confident box; K=30 runs dense on the key frame alone."""
    from fluxshard.tiles.profile import AGREEMENT_WINDOW
    from fluxshard.tools.profile import score_real_clip

    frames = 20
    scored = score_real_clip(real_detector, bikes_stream, [dict(refresh_interval=1),
                                                           dict(refresh_interval=30)],
                             name="bikes", frames=frames, adaptive=False)
    assert scored["clip"] == "bikes" and scored["frames"] == frames
    assert scored["size"] == [640, 288]  # 640x272 letterboxed at --imgsz 640: stride-32 rows
    assert scored["motion"] > 0  # the pan
    every, once = scored["rows"]
    assert every["settings"] == dict(refresh_interval=1) and once["settings"] == \
        dict(refresh_interval=30)
    for row in (every, once):
        assert row["source"] == "real" and row["clip"] == "bikes" and row["frames"] == frames
        assert row["agreement_count"] > 0  # yolov3-tiny finds the street's bikes and cars
        assert row["agreement"] == row["agreement_found"] / row["agreement_count"]
        # the worst window of a pooled share is at most the share
        assert row["agreement_worst_window"] <= row["agreement"]
        assert row["ms_ratio"] == pytest.approx(row["tiles_ms"] / row["dense_ms"])
    assert every["agreement"] == 1.0 and every["dense_share"] == 1.0
    assert every["crop_area_fraction"] == 1.0
    assert once["dense_share"] == pytest.approx(1 / frames)
    assert 0 < once["crop_area_fraction"] < 1
    assert AGREEMENT_WINDOW == 30
    with pytest.raises(ValueError, match="no settings"):
        score_real_clip(real_detector, bikes_stream, [])


def _synthetic(threshold, map50_ratio=1.0, map50_95_ratio=1.0, ms_ratio=0.5):
    return dict(_row("low", threshold, map50_ratio, map50_95_ratio, ms_ratio), source="synthetic")


def _real(threshold, clip, found, count, worst, ms_ratio):
    return dict(source="real", clip=clip, level="low", settings=dict(threshold=threshold),
                agreement=found / count if count else None, agreement_found=found,
                agreement_count=count, agreement_worst_window=worst, ms_ratio=ms_ratio)


def test_the_rule_with_real_rows():
    from fluxshard.tiles.profile import choose_setting, level_rows

    synthetic = [_synthetic(4, ms_ratio=0.9), _synthetic(8, ms_ratio=0.5),
                 _synthetic(12, ms_ratio=0.3), _synthetic(16, ms_ratio=0.2)]
    real = [
        # threshold 4: keeps everything, the slowest
        _real(4, "bikes", 99, 100, 0.98, 0.8), _real(4, "box", 10, 10, 1.0, 0.6),
        # threshold 8: both clips keep it
        _real(8, "bikes", 98, 100, 0.96, 0.5), _real(8, "box", 10, 10, 1.0, 0.4),
        # threshold 12: pooled agreement 0.973, but one window of bikes falls to 0.9
        _real(12, "bikes", 97, 100, 0.90, 0.3), _real(12, "box", 10, 10, 1.0, 0.3),
        # threshold 16: each clip's windows hold, but pooled agreement is 96 / 110
        _real(16, "bikes", 90, 100, 0.96, 0.2), _real(16, "box", 6, 10, 0.96, 0.2),
        # another level's clip never counts here
        dict(_real(8, "tree", 0, 10, 0.0, 0.1), level="high")]
    rows = level_rows(synthetic, [r for r in real if r["level"] == "low"])
    by = {r["settings"]["threshold"]: r for r in rows}
    assert by[16]["agreement"] == pytest.approx(96 / 110)  # pooled over frames, not averaged
    assert by[12]["agreement_worst_window"] == 0.90  # the worst window of any clip
    assert by[8]["real_clips"] == ["bikes", "box"]
    # the ms ratio: the mean over the level's clips, synthetic and real alike
    assert by[8]["ms_ratio"] == pytest.approx((0.5 + 0.5 + 0.4) / 3)
    assert by[8]["real_ms_ratio"] == pytest.approx(0.45)
    assert by[8]["synthetic_ms_ratio"] == 0.5
    assert by[8]["speedup"] == pytest.approx(1 / by[8]["ms_ratio"])
    row, meets = choose_setting(rows)
    assert meets and row["settings"] == dict(threshold=8)
    # the floors are arguments: without the window floor, threshold 12 is the fastest kept
    row, meets = choose_setting(rows, min_worst_window=0.0)
    assert meets and row["settings"] == dict(threshold=12)
    # synthetic mAP still counts: threshold 8 losing mAP@0.5 leaves threshold 4
    synthetic[1] = _synthetic(8, map50_ratio=0.98, ms_ratio=0.5)
    row, meets = choose_setting(level_rows(synthetic, real[:8]))
    assert meets and row["settings"] == dict(threshold=4)
    # none keeps agreement: the most accurate on the real clips, said so
    worse = [dict(r, agreement_found=r["agreement_found"] - 5) for r in real[:8]]
    row, meets = choose_setting(level_rows(synthetic, worse))
    assert not meets and row["settings"] == dict(threshold=4)


def test_cli_tunes_on_a_real_clip_and_names_what_tuned_it(tmp_path, capsys):
    from fluxshard.cli import main
    from fluxshard.footage import HELDOUT_CLIPS
    from fluxshard.tiles.profile import TABLE_NAME, TilesTable

    out = tmp_path / "profile"
    rc = main(["profile", "accuracy", "--executor", "tiles", "--frames", "3", "--imgsz", "native",
               "--size", "320",
               "192", "--thresholds", "6", "10", "--halos", "32", "--refresh-intervals", "30",
               "--budgets", "0.45", "--clips", "bikes", "--real-frames", "8", "--footage-dir",
               str(tmp_path / "footage"), "--out", str(out)])
    assert rc == 0
    table = TilesTable.load(out / TABLE_NAME)
    assert table.model["weights"] == "yolov3-tiny" and table.model["nc"] == 80
    assert table.tuned_on["synthetic"]["weights"] == "embedded demo detector"
    (clip,) = table.tuned_on["real"]["clips"]
    assert clip["clip"] == "bikes" and clip["frames"] == 8
    assert clip["level"] in [lv["name"] for lv in table.levels]
    assert table.tuned_on["heldout_clips"] == list(HELDOUT_CLIPS)
    assert len(table.real_sweep) == 2 and {r["clip"] for r in table.real_sweep} == {"bikes"}
    # the clip's rows join the level its motion falls in, and only that one
    level = next(lv for lv in table.levels if lv["name"] == clip["level"])
    assert level["real_clips"] == ["bikes"]
    assert all(lv["real_clips"] == [] for lv in table.levels if lv is not level)
    printed = capsys.readouterr().out
    assert "bikes" in printed and "held out (perf/bench_real.py): vtest" in printed


def test_cli_refuses_a_held_out_clip_before_anything_loads(tmp_path, capsys):
    from fluxshard.cli import main

    out = tmp_path / "profile"
    rc = main(["profile", "accuracy", "--executor", "tiles", "--clips", "bikes", "vtest",
               "--footage-dir", str(tmp_path / "footage"), "--out", str(out)])
    assert rc == 1
    assert "vtest: held out for perf/bench_real.py" in capsys.readouterr().err
    assert not (tmp_path / "footage").exists() and not (out / "tiles_table.json").exists()
    rc = main(["profile", "accuracy", "--executor", "tiles", "--clips", "nope", "--out", str(out)])
    assert rc == 1 and "unknown packaged clip 'nope'" in capsys.readouterr().err
