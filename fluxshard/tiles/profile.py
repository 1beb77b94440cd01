"""The tile executor's knobs per motion level: `fluxshard profile accuracy --executor tiles`.

:func:`sweep_tiles` runs every setting of a knob grid (threshold, halo, refresh interval, budget,
...) of :class:`fluxshard.tiles.TileExecutor` on two kinds of footage:

* synthetic seeds: the truncation profile's held-out synthetic clips
  (``fluxshard.synth.heldout_spec``), one motion level at a time, with a detector of their
  synthetic classes (the embedded demo one). Per setting: mAP@0.5 and mAP@0.5:0.95 against ground
  truth as ratios to dense.
* real tuning clips (``fluxshard.footage.TUNING_CLIPS`` as camera streams; the held-out half is
  left to perf/bench_real.py), with a real detector: ``score_real`` (the tools layer's
``fluxshard.tools.profile.score_real_clip``, which builds the product's edge stream) runs dense and every
  setting in the stream the product's edge builds (``edge_runtime.run``: one thread, the
  onnxruntime tile engine, adaptive, the edge's motion path) on the same decoded frames. Per
  setting: agreement with dense (``fluxshard.accuracy.box_agreement``), pooled and over the worst
  30-frame window. A real clip belongs to the motion level its mean motion statistic falls in
  (``fluxshard.tau.level_for`` over the synthetic levels' bounds), as the runtime picks a level.

Every clip is decoded once and every setting runs on it in lockstep with dense, frame by frame,
taking turns in a rotating order (machine drift hits all alike, so the ratios mean something).
Time per frame is the mean over every frame, key frames and dense refreshes included. A level's
ms ratio is the mean over its clips (synthetic and real) of tiles ms / dense ms. Per level the
rule (:func:`choose_setting`) picks the fastest setting that keeps both mAP ratios (0.99 / 0.97)
and, on the level's real clips, agreement >= 0.97 and worst window >= 0.95; else the most
accurate one, marked ``meets_accuracy: false``.

The result is a :class:`TilesTable` (JSON); the runtime reads it per frame by the motion statistic
of the field since the stream last ran, exactly as the truncation table picks tau
(``fluxshard.tau.level_for``): :class:`ProfiledTileExecutor`, ``fluxshard run --executor tiles
--tiles-table F``.
"""

from __future__ import annotations

import inspect
import itertools
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fluxshard.tau import level_for

TABLE_KIND = "fluxshard tiles table"
TABLE_VERSION = 1
TABLE_NAME, PLOT_NAME = "tiles_table.json", "tiles_profile.png"
DEFAULT_GRID = {"threshold": (4, 6, 10, 16), "halo": (16, 32), "refresh_interval": (15, 30, 60),
                "budget": (0.3, 0.5)}
QUICK_GRID = {"threshold": (6, 10, 16), "halo": (16, 32), "refresh_interval": (30, 60),
              "budget": (0.3, 0.5)}
DEFAULT_FRAMES, QUICK_FRAMES = 60, 30  # synthetic clips: two refresh intervals of K 30
# real clips: the slowest K refreshes at least twice by default, the faster once in --quick
REAL_FRAMES, QUICK_REAL_FRAMES = 150, 60
MIN_MAP50_RATIO, MIN_MAP50_95_RATIO = 0.99, 0.97
MIN_AGREEMENT, MIN_WORST_WINDOW = 0.97, 0.95
AGREEMENT_WINDOW = 30  # frames per agreement window, as perf/bench_real.py
REAL_DETECTOR = "yolov3-tiny"  # accuracy on real footage counts only with a real detector
EVAL_CONF = 0.001  # mAP wants the full ranked list, as the truncation profile evaluates
# constructor arguments that are not knobs of the profile (the runtime picks them)
_NOT_KNOBS = {"self", "model", "engine", "threads", "clock"}


def tile_knobs() -> tuple[str, ...]:
    """The TileExecutor keyword arguments a grid may sweep and a table may set."""
    from fluxshard.tiles.executor import TileExecutor

    params = inspect.signature(TileExecutor.__init__).parameters
    return tuple(n for n, p in params.items() if n not in _NOT_KNOBS
                 and p.kind is inspect.Parameter.KEYWORD_ONLY)


def expand_grid(grid: dict) -> list[dict]:
    """Every setting of ``grid`` ({knob: values}) as TileExecutor kwargs, in product order."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"the knob grid must be a non-empty {{knob: values}} dict, got {grid!r}")
    known = tile_knobs()
    unknown = sorted(set(grid) - set(known))
    if unknown:
        raise ValueError(f"unknown tile executor knobs {unknown}; choose from {list(known)}")
    names = list(grid)
    values = []
    for name in names:
        vals = list(grid[name]) if isinstance(grid[name], (list, tuple)) else [grid[name]]
        if not vals:
            raise ValueError(f"knob {name!r} has no values to sweep")
        values.append(vals)
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _ratio(value: float, reference: float) -> float:
    # a reference that found nothing leaves nothing to lose
    return float(value) / float(reference) if reference > 0 else 1.0


def _real(row: dict, key: str) -> float:
    # no real clip at the level, or dense found nothing confident on them: nothing to lose
    value = row.get(key)
    return 1.0 if value is None else float(value)


def _accuracy_key(row: dict):
    # real footage first (the product's detector on camera streams), then the stricter metric:
    # mAP@0.5 barely moves while boxes shift by a few pixels
    return (_real(row, "agreement"), _real(row, "agreement_worst_window"),
            row["map50_95_ratio"], row["map50_ratio"], -row["ms_ratio"])


def choose_setting(rows: list[dict], min_map50_ratio: float = MIN_MAP50_RATIO,
                   min_map50_95_ratio: float = MIN_MAP50_95_RATIO,
                   min_agreement: float = MIN_AGREEMENT,
                   min_worst_window: float = MIN_WORST_WINDOW) -> tuple[dict, bool]:
    """(chosen row, whether it keeps accuracy) among one level's ``rows``: the lowest
    ``ms_ratio`` among rows with ``map50_ratio`` >= ``min_map50_ratio``, ``map50_95_ratio`` >=
    ``min_map50_95_ratio`` and, where a row has real clips (``agreement`` not None),
    ``agreement`` >= ``min_agreement`` and ``agreement_worst_window`` >= ``min_worst_window``
    (ties: the more accurate); when none keeps accuracy, the most accurate (agreement, worst
    window, mAP@0.5:0.95 ratio, mAP@0.5 ratio, then speed)."""
    if not rows:
        raise ValueError("no sweep rows to choose from")
    feasible = [r for r in rows if r["map50_ratio"] >= min_map50_ratio
                and r["map50_95_ratio"] >= min_map50_95_ratio
                and _real(r, "agreement") >= min_agreement
                and _real(r, "agreement_worst_window") >= min_worst_window]
    if feasible:
        return min(feasible, key=lambda r: (r["ms_ratio"],) + tuple(
            -v for v in _accuracy_key(r)[:-1])), True
    return max(rows, key=_accuracy_key), False


# ------------------------------------------------------------------------------------- table

@dataclass
class TilesTable:
    """motion level -> TileExecutor settings, with the sweep they were chosen from. ``levels``
    are sorted by ``motion_max`` (``fluxshard.truncation.bound_levels``); a frame with motion
    statistic m uses the first level with m <= motion_max, the last beyond."""

    size: list[int]  # [width, height] of the synthetic clips
    model: dict  # the detector it is for (the real clips'): {"weights", "scale", "nc"}
    # {"name", "motion", "motion_max", "settings", "meets_accuracy", ...}
    levels: list[dict] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)  # one row per (level, setting): level_rows
    thresholds: dict = field(default_factory=lambda: {
        "map50_ratio": MIN_MAP50_RATIO, "map50_95_ratio": MIN_MAP50_95_RATIO,
        "agreement": MIN_AGREEMENT, "agreement_worst_window": MIN_WORST_WINDOW})
    executor: dict = field(default_factory=dict)  # engine, threads, best dense, frames, grid
    # what tuned it: {"synthetic": {"weights", "size", "frames", "seeds": {level: [seed]}},
    # "real": {"weights", "clips": [{"clip", "level", "motion", "frames", "size"}]},
    # "heldout_clips": [...]} (empty in tables written before real clips tuned them)
    tuned_on: dict = field(default_factory=dict)
    real_sweep: list[dict] = field(default_factory=list)  # one row per (real clip, setting)
    kind: str = TABLE_KIND
    version: int = TABLE_VERSION

    def level_for(self, motion: float) -> dict:
        level = level_for(self.levels, float(motion))
        if level is None:
            raise ValueError("the tiles table has no levels")
        return level

    def settings_for(self, motion: float) -> dict:
        """TileExecutor kwargs for a frame whose field has motion statistic ``motion``
        (``fluxshard.motion.motion_statistic``)."""
        return dict(self.level_for(motion)["settings"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TilesTable":
        what = "fluxshard profile accuracy --executor tiles"
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a tiles table: {exc}") from exc
        if not isinstance(data, dict) or data.get("kind") != TABLE_KIND:
            hint = (" (it looks like a truncation table: give it to --tau-table)"
                    if isinstance(data, dict) and "alpha" in data else "")
            raise ValueError(f"{path} is not a tiles table{hint}; write one with `{what}`")
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"{path}: tiles table version {data.get('version')!r}, this FluxShard "
                             f"reads version {TABLE_VERSION}; profile again with `{what}`")
        try:
            table = cls(size=[int(v) for v in data["size"]], model=dict(data["model"]),
                        levels=[dict(lv) for lv in data["levels"]],
                        sweep=list(data.get("sweep", [])),
                        thresholds=dict(data.get("thresholds", {})),
                        executor=dict(data.get("executor", {})),
                        tuned_on=dict(data.get("tuned_on", {})),
                        real_sweep=list(data.get("real_sweep", [])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a tiles table: missing or malformed {exc}") from exc
        if not table.levels:
            raise ValueError(f"{path}: the tiles table has no levels")
        known = set(tile_knobs())
        for level in table.levels:
            if not {"name", "motion_max", "settings"} <= set(level):
                raise ValueError(f"{path}: every level needs name, motion_max and settings")
            if not isinstance(level["settings"], dict):
                raise ValueError(f"{path}: level {level['name']!r} settings must be a dict")
            unknown = sorted(set(level["settings"]) - known)
            if unknown:
                raise ValueError(f"{path}: level {level['name']!r} sets unknown tile executor "
                                 f"knobs {unknown}; profile again with `{what}`")
        table.levels.sort(key=lambda lv: lv["motion_max"])
        return table


class ProfiledTileExecutor:
    """A TileExecutor whose knobs follow a :class:`TilesTable`: each frame runs with the settings
    of the level its field's motion statistic falls in (the field since the stream last ran, as
    the truncation table is read). One executor per level shares one engine; all keep their
    caches in the caller's ``TileStreamState``, so switching level keeps the stream's cache. A key
    frame runs dense whatever the knobs; it uses the lowest level. Same ``run`` as TileExecutor."""

    def __init__(self, model, table: TilesTable, *, engine="onnxruntime", threads: int = 1,
                 clock=time.perf_counter, adaptive: bool = False, dense_runner=None):
        from fluxshard.tiles.engine import make_engine
        from fluxshard.tiles.executor import TileExecutor

        if not table.levels:
            raise ValueError("the tiles table has no levels")
        shared = make_engine(model, engine, threads=threads) if isinstance(engine, str) else engine
        self.table = table
        self.executors = {lv["name"]: TileExecutor(model, engine=shared, threads=threads,
                                                   clock=clock, adaptive=adaptive,
                                                   dense_runner=dense_runner, **lv["settings"])
                          for lv in table.levels}
        self.last_level = table.levels[0]["name"]

    def prepare(self, input_hw: tuple[int, int]) -> None:
        """TileExecutor.prepare (the levels share the dense runner)."""
        next(iter(self.executors.values())).prepare(input_hw)

    def level_name(self, field) -> str:
        from fluxshard.motion import motion_statistic

        if field is None:
            return self.table.levels[0]["name"]
        return self.table.level_for(motion_statistic(field))["name"]

    def run(self, state, frame, field=None, *, key: bool = False):
        self.last_level = self.level_name(None if key else field)
        return self.executors[self.last_level].run(state, frame, field, key=key)


# ------------------------------------------------------------------------------------- sweep

def _as_tensor(out):
    import torch

    if isinstance(out, (list, tuple)) and not isinstance(out, torch.Tensor):
        out = out[0]
    return torch.from_numpy(out) if isinstance(out, np.ndarray) else out


def _level_clips(level: str, levels: dict, *, clips: int, frames: int, width: int, height: int,
                 workdir: Path):
    """The truncation profile's held-out clips of one level, decoded once: [(frames, truths)]."""
    from fluxshard import synth
    from fluxshard.motion import iter_motion
    decoded = []
    for c in range(clips):
        spec = synth.heldout_spec(level, c, width=width, height=height, frames=frames,
                                  levels=levels)
        paths = synth.make_clip(spec, workdir, name=f"tiles-{level}{c}")
        gt = synth.load_ground_truth(paths.ground_truth)
        truths = [dict(boxes=b, classes=k) for b, k in zip(gt.boxes, gt.classes)]
        # synth clips are single-reference P-only streams: their codec vectors need no check
        motion_frames = list(iter_motion(paths.video, validate=False))
        if len(motion_frames) < 2:
            raise RuntimeError(f"{paths.video} decoded to {len(motion_frames)} frames; "
                               "the sweep needs at least 2")
        decoded.append((motion_frames, [truths[mf.index] for mf in motion_frames]))
    return decoded


def rotated(items: list, index: int) -> list:
    # who goes first turns frame by frame, so drift within a frame favours no one
    shift = index % len(items)
    return items[shift:] + items[:shift]


def sweep_tiles(model, levels: dict | None = None, grid: dict | None = None,
                frames: int = DEFAULT_FRAMES, *, width: int = 640, height: int = 384,
                clips_per_level: int = 1, threads: int = 2, tiles_engine: str = "onnxruntime",
                min_map50_ratio: float = MIN_MAP50_RATIO,
                min_map50_95_ratio: float = MIN_MAP50_95_RATIO, weights: str | None = None,
                dense_kinds: tuple[str, ...] = ("fused_channels_last", "onnxruntime"),
                clock=time.perf_counter, progress: bool = True,
                workdir: str | Path | None = None, real_clips: dict | None = None,
                real_model=None, real_weights: str | None = None, real_frames: int | None = None,
                real_adaptive: bool = True, min_agreement: float = MIN_AGREEMENT,
                min_worst_window: float = MIN_WORST_WINDOW, score_real=None) -> TilesTable:
    """Sweep ``grid`` ({knob: values}; default :data:`DEFAULT_GRID`) of the tile executor on
    ``levels`` ({name: synth.SceneSpec overrides}; default ``fluxshard.synth.MOTION_LEVELS``) with
    ``frames`` per clip at ``width`` x ``height``, and on ``real_clips`` ({name: camera stream};
    their first ``real_frames``, None: all) with ``real_model`` (see the module doc). ``model``:
    a loaded, fused detect model of the synthetic classes; ``weights`` / ``real_weights`` only
    name the two in the table. ``clock``: what the synthetic runs and every executor's own
    latency table are timed with (seconds); real clips report the edge path's own clock
    (``FrameResult.latency_ms``). ``real_adaptive``: the edge's adaptive tile executor on real
    clips (as ``fluxshard run`` builds it). Returns the table (not saved)."""
    import torch
    from tqdm import tqdm

    from fluxshard.accuracy import evaluate_detections
    from fluxshard.footage import HELDOUT_CLIPS, TUNING_CLIPS, corpus_entry
    from fluxshard.models import postprocess, preprocess
    from fluxshard.models.dense import best_dense_runner
    from fluxshard.models.ops import padded_size
    from fluxshard.motion import motion_statistic
    from fluxshard.tiles.engine import make_engine
    from fluxshard.tiles.executor import TileExecutor, TileStreamState
    from fluxshard.synth import MOTION_LEVELS, heldout_spec
    from fluxshard.truncation import bound_levels

    levels = MOTION_LEVELS if levels is None else levels
    grid = DEFAULT_GRID if grid is None else grid
    real_clips = dict(real_clips or {})
    if not levels:
        raise ValueError("no motion levels to sweep")
    if frames < 2 or clips_per_level < 1:
        raise ValueError(f"need frames >= 2 and clips_per_level >= 1, got {frames}, "
                         f"{clips_per_level}")
    for m, what in ((model, "model"), (real_model if real_clips else None, "real_model")):
        if m is not None and getattr(m, "task", None) != "detect":
            raise ValueError(f"the tiles table is measured on detect models; {what} is a "
                             f"{getattr(m, 'task', type(m).__name__)} model")
    if real_clips and score_real is None:
        raise ValueError("real clips need score_real (fluxshard.tools.profile.score_real_clip: "
                         "the product's edge stream)")
    if real_clips and real_model is None:
        raise ValueError("real clips need real_model (a real detector such as yolov3-tiny)")
    held_out = [corpus_entry(name).stem for name in real_clips
                if corpus_entry(name).name in HELDOUT_CLIPS]
    if held_out:
        raise ValueError(f"{', '.join(held_out)}: in the held-out half of the corpus "
                         "(fluxshard.footage.HELDOUT_CLIPS), which the profile never tunes on; "
                         f"tuning clips: {', '.join(Path(c).stem for c in TUNING_CLIPS)}")
    settings = expand_grid(grid)
    model_w, model_h = padded_size(width, height, who="fluxshard profile accuracy --executor tiles")
    engine = make_engine(model, tiles_engine, threads=threads)
    executors = [TileExecutor(model, engine=engine, threads=threads, clock=clock, **s)
                 for s in settings]  # a bad knob value fails here, before any clip is made
    real_engine = make_engine(real_model, tiles_engine, threads=1) if real_clips else None
    synthetic_rows, motions, seeds = {}, {}, {}
    bar = tqdm(total=(len(levels) * clips_per_level * frames
                      + len(real_clips) * (real_frames or 0)) * (len(settings) + 1),
               disable=not progress, desc="profile tiles", unit="frame", dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="fluxshard-tiles-profile-") as tmp, \
            torch.inference_mode():
        tmp = Path(workdir) if workdir is not None else Path(tmp)
        best, medians = best_dense_runner(model, (model_h, model_w), threads=threads,
                                          kinds=dense_kinds, workdir=tmp)
        for level in levels:
            seeds[level] = [heldout_spec(level, c, width=width, height=height, frames=frames,
                                         levels=levels).seed for c in range(clips_per_level)]
            clips = _level_clips(level, levels, clips=clips_per_level, frames=frames,
                                 width=width, height=height, workdir=tmp)
            truths = [t for _frames, clip_truths in clips for t in clip_truths]
            motions[level] = [motion_statistic(mf.field) for mfs, _ in clips for mf in mfs
                              if not mf.is_key and mf.field is not None]
            dense_preds, dense_s = [], []
            preds = [[] for _ in settings]
            tiles_s, crop, ran_dense = ([[] for _ in settings] for _ in range(3))
            for mfs, _ in clips:
                states = [TileStreamState() for _ in settings]
                for index, mf in enumerate(mfs):
                    key = mf.is_key or mf.field is None
                    for k in rotated([None] + list(range(len(settings))), index):
                        if k is None:  # dense: the reference and the baseline, in the turn
                            t0 = clock()
                            x = preprocess(mf.image)
                            out = best.run(x)
                            dense_s.append(clock() - t0)
                            dense_preds.append(postprocess(_as_tensor(out), x.shape[-2:],
                                                           mf.image.shape[:2],
                                                           conf_thres=EVAL_CONF)[0])
                        else:
                            out, report = executors[k].run(states[k], mf.image,
                                                           None if key else mf.field, key=key)
                            preds[k].append(postprocess(out, (model_h, model_w),
                                                        mf.image.shape[:2],
                                                        conf_thres=EVAL_CONF)[0])
                            tiles_s[k].append(report.seconds)
                            crop[k].append(report.crop_area_fraction)
                            ran_dense[k].append(report.dense)
                        bar.update(1)
            dense = evaluate_detections(dense_preds, truths)
            synthetic_rows[level] = [
                _row(level, setting, evaluate_detections(preds[k], truths), dense, tiles_s[k],
                     dense_s, crop[k], ran_dense[k], seeds[level])
                for k, setting in enumerate(settings)]
        bounds = bound_levels([dict(name=level, motion=float(np.mean(motions[level]))
                                    if motions[level] else 0.0) for level in levels])
        tuned_clips, real_rows = [], []
        for name, video in real_clips.items():
            scored = score_real(real_model, video, settings, name=corpus_entry(name).stem,
                                frames=real_frames, engine=real_engine,
                                adaptive=real_adaptive, clock=clock, bar=bar)
            scored["level"] = level_for(bounds, scored["motion"])["name"]
            for row in scored.pop("rows"):
                real_rows.append(dict(row, level=scored["level"]))
            tuned_clips.append(scored)
    bar.close()
    sweep, chosen_levels = [], []
    for bound in bounds:
        level = bound["name"]
        rows = level_rows(synthetic_rows[level], [r for r in real_rows if r["level"] == level])
        sweep += rows
        row, meets = choose_setting(rows, min_map50_ratio, min_map50_95_ratio, min_agreement,
                                    min_worst_window)
        chosen_levels.append(dict(
            name=level, motion=bound["motion"], settings=dict(row["settings"]),
            meets_accuracy=meets,
            **{k: row[k] for k in ("map50_ratio", "map50_95_ratio", "agreement",
                                   "agreement_worst_window", "speedup", "ms_ratio",
                                   "synthetic_ms_ratio", "real_ms_ratio", "real_clips",
                                   "tiles_ms", "dense_ms", "crop_area_fraction", "map50",
                                   "map50_95", "dense_map50", "dense_map50_95")}))
    bound_levels(chosen_levels)
    synthetic_name = str(weights) if weights else "embedded demo detector"
    table_model = real_model if real_clips else model
    return TilesTable(
        size=[width, height],
        model=dict(weights=str(real_weights or REAL_DETECTOR) if real_clips else synthetic_name,
                   scale=getattr(table_model, "scale", None),
                   nc=int(getattr(table_model, "nc", 0))),
        levels=chosen_levels, sweep=sweep, real_sweep=real_rows,
        thresholds=dict(map50_ratio=min_map50_ratio, map50_95_ratio=min_map50_95_ratio,
                        agreement=min_agreement, agreement_worst_window=min_worst_window),
        executor=dict(engine=tiles_engine, threads=threads, best_dense=best.name,
                      dense_runner_ms={k: float(v) for k, v in medians.items()}, frames=frames,
                      clips_per_level=clips_per_level,
                      grid={k: list(v) if isinstance(v, (list, tuple)) else [v]
                            for k, v in grid.items()},
                      real=dict(threads=1, engine=tiles_engine, adaptive=real_adaptive,
                                frames=real_frames, window=AGREEMENT_WINDOW,
                                clock="FrameResult.latency_ms of the edge path") if real_clips
                      else None,
                      measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        tuned_on=dict(
            synthetic=dict(weights=synthetic_name, size=[width, height], frames=frames,
                           seeds=seeds),
            real=dict(weights=str(real_weights or REAL_DETECTOR) if real_clips else None,
                      clips=tuned_clips),
            heldout_clips=list(HELDOUT_CLIPS)))


def _row(level, setting, acc, dense, tiles_s, dense_s, crop, ran_dense, seeds=()) -> dict:
    # means over every frame: the dense refreshes a median would hide are part of the cost
    tiles_ms = 1e3 * float(np.mean(tiles_s)) if tiles_s else float("nan")
    dense_ms = 1e3 * float(np.mean(dense_s)) if dense_s else float("nan")
    ms_ratio = tiles_ms / dense_ms if dense_ms > 0 else float("inf")
    return dict(source="synthetic", level=level, settings=dict(setting), seeds=list(seeds),
                map50=acc["map50"], map50_95=acc["map50_95"], dense_map50=dense["map50"],
                dense_map50_95=dense["map50_95"],
                map50_ratio=_ratio(acc["map50"], dense["map50"]),
                map50_95_ratio=_ratio(acc["map50_95"], dense["map50_95"]),
                crop_area_fraction=float(np.mean(crop)) if crop else 1.0,
                dense_share=float(np.mean(ran_dense)) if ran_dense else 1.0,
                tiles_ms=tiles_ms, dense_ms=dense_ms,
                tiles_ms_p50=1e3 * float(np.median(tiles_s)) if tiles_s else float("nan"),
                dense_ms_p50=1e3 * float(np.median(dense_s)) if dense_s else float("nan"),
                ms_ratio=ms_ratio, speedup=1.0 / ms_ratio if ms_ratio > 0 else float("inf"),
                frames=len(tiles_s))


def level_rows(synthetic: list[dict], real: list[dict]) -> list[dict]:
    """One row per setting of a level, what :func:`choose_setting` reads: its synthetic row
    (mAP ratios; ``synthetic_ms_ratio``) with its real clips' rows of the same setting
    (``real_clips``; ``agreement`` pooled over their frames, ``agreement_worst_window`` the
    worst window of any; None without real clips or confident dense boxes) and ``ms_ratio``
    the mean over all those clips of tiles ms / dense ms (``real_ms_ratio``: over the real
    ones)."""
    rows = []
    for s_row in synthetic:
        mine = [r for r in real if r["settings"] == s_row["settings"]]
        found = sum(r["agreement_found"] for r in mine)
        count = sum(r["agreement_count"] for r in mine)
        worst = [r["agreement_worst_window"] for r in mine
                 if r["agreement_worst_window"] is not None]
        real_ratios = [r["ms_ratio"] for r in mine]
        ms_ratio = float(np.mean([s_row["ms_ratio"]] + real_ratios))
        rows.append(dict(
            s_row, synthetic_ms_ratio=s_row["ms_ratio"], ms_ratio=ms_ratio,
            speedup=1.0 / ms_ratio if ms_ratio > 0 else float("inf"),
            real_ms_ratio=float(np.mean(real_ratios)) if real_ratios else None,
            real_clips=[r["clip"] for r in mine], agreement=found / count if count else None,
            agreement_worst_window=min(worst) if worst else None))
    return rows


# --------------------------------------------------------------------------- report and CLI

def describe_setting(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def plot_tiles_table(table: TilesTable, path: str | Path) -> Path:
    """Accuracy vs speedup per setting, one panel per measure (mAP ratios on the synthetic
    seeds, agreement with dense on the real tuning clips), chosen settings starred."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    metrics = [("map50_ratio", "mAP@0.5 / dense", "synthetic"),
               ("map50_95_ratio", "mAP@0.5:0.95 / dense", "synthetic")]
    if any(r.get("agreement") is not None for r in table.sweep):
        metrics.append(("agreement", "agreement with dense", "real tuning clips"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    colors = {level["name"]: f"C{k}" for k, level in enumerate(table.levels)}  # alike in panels
    for ax, (key, label, where) in zip(axes[0], metrics):
        for level in table.levels:
            rows = [r for r in table.sweep if r["level"] == level["name"]
                    and r.get(key) is not None]
            if not rows:
                continue
            clips = ", ".join(level.get("real_clips") or []) if key == "agreement" else ""
            color = colors[level["name"]]
            ax.scatter([r["speedup"] for r in rows], [r[key] for r in rows], s=22, alpha=0.7,
                       color=color, label=f"{level['name']} (motion {level['motion']:.1f} px)"
                                          f"{': ' + clips if clips else ''}")
            if level.get(key) is not None:
                ax.scatter([level["speedup"]], [level[key]], marker="*", s=260, color=color,
                           edgecolor="black", zorder=3)
        ax.axhline(table.thresholds.get(key, 1.0), color="grey", ls=":", lw=1)
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set(xlabel="speedup vs dense (mean ms per frame, mean over the level's clips)",
               ylabel=label, title=f"{label}, {where} (dotted: the floor; star: chosen)")
        ax.legend(fontsize=8)
    fig.suptitle(f"tile executor knobs per motion level; synthetic {table.size[0]}x"
                 f"{table.size[1]}, {table.executor.get('threads', '?')} threads; real: "
                 f"{table.model.get('weights')}, 1 thread")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_tiles_table(table: TilesTable) -> None:
    ex = table.executor
    floors = table.thresholds
    real = (table.tuned_on.get("real") or {}).get("clips") or []
    print(f"\nsynthetic seeds: best dense {ex.get('best_dense')} at {table.size[0]}x"
          f"{table.size[1]}, {ex.get('threads')} threads; tiles engine {ex.get('engine')}; "
          f"{ex.get('frames')} frames x {ex.get('clips_per_level')} clip(s) per level")
    if real:
        print(f"real tuning clips ({table.model.get('weights')}, the edge path on 1 thread): "
              + ", ".join(f"{c['clip']} ({c['size'][0]}x{c['size'][1]}, {c['frames']} frames, "
                          f"motion {c['motion']:.2f} px: level {c['level']})" for c in real))
        print("held out (perf/bench_real.py): "
              + ", ".join(Path(c).stem for c in table.tuned_on.get("heldout_clips", [])))
    print(f"chosen: lowest mean ms ratio keeping mAP@0.5 / dense >= {floors['map50_ratio']}, "
          f"mAP@0.5:0.95 / dense >= {floors['map50_95_ratio']}"
          + (f", agreement >= {floors.get('agreement')} and worst "
             f"{AGREEMENT_WINDOW}-frame window >= {floors.get('agreement_worst_window')} on the "
             "level's real clips" if real else ""))
    for level in table.levels:
        print(f"\nlevel {level['name']} (motion {level['motion']:.2f} px, up to "
              f"{level['motion_max']:.2f}; real clips: "
              f"{', '.join(level.get('real_clips') or []) or 'none'})")
        print("| setting | mAP@0.5 / dense | mAP@0.5:0.95 / dense | agreement | worst window | "
              "crop area | ms ratio synthetic | ms ratio real | speedup | |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for r in (r for r in table.sweep if r["level"] == level["name"]):
            mark = "chosen" if r["settings"] == level["settings"] else ""
            print(f"| {describe_setting(r['settings'])} | {r['map50_ratio']:.3f} | "
                  f"{r['map50_95_ratio']:.3f} | {_fmt(r.get('agreement'))} | "
                  f"{_fmt(r.get('agreement_worst_window'))} | {r['crop_area_fraction']:.3f} | "
                  f"{_fmt(r.get('synthetic_ms_ratio', r['ms_ratio']), '.2f')} | "
                  f"{_fmt(r.get('real_ms_ratio'), '.2f')} | {r['speedup']:.2f}x | {mark} |")
    print("\n| level | motion (px) | chosen setting | mAP@0.5 / dense | mAP@0.5:0.95 / dense | "
          "agreement | worst window | ms ratio | speedup | keeps accuracy |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for level in table.levels:
        print(f"| {level['name']} | {level['motion']:.2f} | {describe_setting(level['settings'])} "
              f"| {level['map50_ratio']:.3f} | {level['map50_95_ratio']:.3f} | "
              f"{_fmt(level.get('agreement'))} | {_fmt(level.get('agreement_worst_window'))} | "
              f"{level['ms_ratio']:.2f} | {level['speedup']:.2f}x | "
              f"{'yes' if level['meets_accuracy'] else 'NO'} |")


__all__ = ["DEFAULT_GRID", "QUICK_GRID", "ProfiledTileExecutor", "TilesTable",
           "choose_setting", "expand_grid", "level_rows", "plot_tiles_table",
           "sweep_tiles", "tile_knobs"]
