"""`fluxshard profile accuracy --executor tiles`: the tile executor's knobs per motion level
(fluxshard.tiles.profile). Tiny clips (320x192, a few frames) and tiny grids with the embedded
demo detector; timings come from an injected clock, so nothing here depends on the machine's
speed."""

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
            assert r["frames"] == 3  # the non-key frames of the 4-frame clip
            assert 0 < r["crop_area_fraction"] <= 1
            # the step clock: each executor frame and each dense frame spans whole steps
            assert r["tiles_ms"] > 0 and r["dense_ms"] > 0
            assert r["speedup"] == pytest.approx(r["dense_ms"] / r["tiles_ms"])
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
    rc = main(["profile", "accuracy", "--executor", "tiles", "--frames", "3", "--size", "320",
               "192", "--thresholds", "6", "--halos", "32", "--refresh-intervals", "30",
               "--out", str(out)])
    assert rc == 0
    table = TilesTable.load(out / TABLE_NAME)
    assert (out / PLOT_NAME).stat().st_size > 0
    assert [lv["settings"] for lv in table.levels] == \
        [dict(threshold=6.0, halo=32, refresh_interval=30)] * len(MOTION_LEVELS)
    printed = capsys.readouterr().out
    assert "chosen setting" in printed and "threshold=6.0 halo=32 refresh_interval=30" in printed


def test_cli_help_names_the_module_grids():
    """The grids are named in truncation.py's help (it must not import torch); keep them equal."""
    from fluxshard import cli
    from fluxshard.tiles.profile import DEFAULT_GRID, QUICK_GRID

    parser = cli.build_parser(["profile"]).verbs["profile"]
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices
               and "accuracy" in a.choices).choices["accuracy"]
    helps = {a.dest: a.help for a in sub._actions}
    for dest, knob in (("thresholds", "threshold"), ("halos", "halo"),
                       ("refresh_intervals", "refresh_interval")):
        assert f"default {' '.join(map(str, DEFAULT_GRID[knob]))}" in helps[dest]
        if QUICK_GRID[knob] != DEFAULT_GRID[knob]:
            assert f"--quick {' '.join(map(str, QUICK_GRID[knob]))}" in helps[dest]


def test_run_executor_tiles_takes_the_tiles_table(swept, tmp_path):
    from fluxshard.cli import main

    table = swept.save(tmp_path / "tiles_table.json")
    out = tmp_path / "run"
    rc = main(["run", "--demo", "--frames", "4", "--size", "320", "192", "--out", str(out),
               "--dispatch", "edge", "--no-progress", "--executor", "tiles", "--tiles-table",
               str(table)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"] == "tiles" and summary["tiles_table"] == str(table)
    # the table without --executor tiles: one line, exit 1, before anything runs
    rc = main(["run", "--demo", "--frames", "2", "--size", "320", "192", "--out",
               str(tmp_path / "exact"), "--dispatch", "edge", "--no-progress", "--tiles-table",
               str(table)])
    assert rc == 1 and not (tmp_path / "exact").exists()
