"""The tile executor's knobs per motion level: `fluxshard profile accuracy --executor tiles`.

:func:`sweep_tiles` runs every setting of a knob grid (threshold, halo, refresh interval, ...) of
:class:`fluxshard.tiles.TileExecutor` on the truncation profile's held-out synthetic clips
(``fluxshard.synth.heldout_spec``), one motion level at a time. Each clip
is decoded once; the best dense runner gives the reference detections once per clip and is timed
again right after every tile frame (machine drift hits both alike, so the ratio means something).
Per setting it records mAP@0.5 and mAP@0.5:0.95 against ground truth as ratios to dense, the mean
crop area share and both executors' ms per frame; per level it picks the fastest setting (lowest
median ms ratio) that keeps both accuracy ratios above their thresholds, else the most accurate
one, marked ``meets_accuracy: false``.

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
DEFAULT_GRID = {"threshold": (4, 6, 8), "halo": (16, 32, 48), "refresh_interval": (15, 30)}
QUICK_GRID = {"threshold": (4, 8), "halo": (16, 32), "refresh_interval": (15, 30)}
DEFAULT_FRAMES, QUICK_FRAMES = 60, 30  # two refresh intervals of the slower K fit the default
MIN_MAP50_RATIO, MIN_MAP50_95_RATIO = 0.99, 0.97
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


def _accuracy_key(row: dict):
    # the stricter metric first: mAP@0.5 barely moves while boxes shift by a few pixels
    return (row["map50_95_ratio"], row["map50_ratio"], -row["ms_ratio"])


def choose_setting(rows: list[dict], min_map50_ratio: float = MIN_MAP50_RATIO,
                   min_map50_95_ratio: float = MIN_MAP50_95_RATIO) -> tuple[dict, bool]:
    """(chosen row, whether it keeps accuracy) among one level's ``rows``: the lowest
    ``ms_ratio`` among rows with ``map50_ratio`` >= ``min_map50_ratio`` and ``map50_95_ratio`` >=
    ``min_map50_95_ratio`` (ties: the more accurate); when none keeps accuracy, the most accurate
    (mAP@0.5:0.95 ratio, then mAP@0.5 ratio, then speed)."""
    if not rows:
        raise ValueError("no sweep rows to choose from")
    feasible = [r for r in rows if r["map50_ratio"] >= min_map50_ratio
                and r["map50_95_ratio"] >= min_map50_95_ratio]
    if feasible:
        return min(feasible, key=lambda r: (r["ms_ratio"], -r["map50_95_ratio"],
                                            -r["map50_ratio"])), True
    return max(rows, key=_accuracy_key), False


# ------------------------------------------------------------------------------------- table

@dataclass
class TilesTable:
    """motion level -> TileExecutor settings, with the sweep they were chosen from. ``levels``
    are sorted by ``motion_max`` (``fluxshard.truncation.bound_levels``); a frame with motion
    statistic m uses the first level with m <= motion_max, the last beyond."""

    size: list[int]  # [width, height] of the profiled clips
    model: dict  # which detector: {"weights", "scale", "nc"}
    levels: list[dict] = field(default_factory=list)  # {"name", "motion", "motion_max", "settings", "meets_accuracy", ...}
    sweep: list[dict] = field(default_factory=list)  # one row per (level, setting)
    thresholds: dict = field(default_factory=lambda: {"map50_ratio": MIN_MAP50_RATIO,
                                                      "map50_95_ratio": MIN_MAP50_95_RATIO})
    executor: dict = field(default_factory=dict)  # engine, threads, best dense, frames, grid
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
                        executor=dict(data.get("executor", {})))
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
                 clock=time.perf_counter, adaptive: bool = False):
        from fluxshard.tiles.engine import make_engine
        from fluxshard.tiles.executor import TileExecutor

        if not table.levels:
            raise ValueError("the tiles table has no levels")
        shared = make_engine(model, engine, threads=threads) if isinstance(engine, str) else engine
        self.table = table
        self.executors = {lv["name"]: TileExecutor(model, engine=shared, threads=threads,
                                                   clock=clock, adaptive=adaptive,
                                                   **lv["settings"])
                          for lv in table.levels}
        self.last_level = table.levels[0]["name"]

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


def sweep_tiles(model, levels: dict | None = None, grid: dict | None = None,
                frames: int = DEFAULT_FRAMES, *, width: int = 640, height: int = 384,
                clips_per_level: int = 1, threads: int = 2, tiles_engine: str = "onnxruntime",
                min_map50_ratio: float = MIN_MAP50_RATIO,
                min_map50_95_ratio: float = MIN_MAP50_95_RATIO, weights: str | None = None,
                dense_kinds: tuple[str, ...] = ("fused_channels_last", "onnxruntime"),
                clock=time.perf_counter, progress: bool = True,
                workdir: str | Path | None = None) -> TilesTable:
    """Sweep ``grid`` ({knob: values}; default :data:`DEFAULT_GRID`) of the tile executor on
    ``levels`` ({name: synth.SceneSpec overrides}; default ``fluxshard.synth.MOTION_LEVELS``) with
    ``frames`` per clip at ``width`` x ``height`` (see the module doc). ``model``: a loaded,
    fused detect YOLO11; ``weights`` only names it in the table. ``clock``: what both executors
    are timed with (seconds). Returns the table (not saved)."""
    import torch
    from tqdm import tqdm

    from fluxshard.accuracy import evaluate_detections
    from fluxshard.models import postprocess, preprocess
    from fluxshard.models.dense import best_dense_runner
    from fluxshard.models.ops import padded_size
    from fluxshard.motion import motion_statistic
    from fluxshard.tiles.engine import make_engine
    from fluxshard.tiles.executor import TileExecutor, TileStreamState
    from fluxshard.synth import MOTION_LEVELS
    from fluxshard.truncation import bound_levels

    levels = MOTION_LEVELS if levels is None else levels
    grid = DEFAULT_GRID if grid is None else grid
    if not levels:
        raise ValueError("no motion levels to sweep")
    if frames < 2 or clips_per_level < 1:
        raise ValueError(f"need frames >= 2 and clips_per_level >= 1, got {frames}, "
                         f"{clips_per_level}")
    if getattr(model, "task", None) != "detect":
        raise ValueError("the tile executor handles detect models only; this model is a "
                         f"{getattr(model, 'task', type(model).__name__)} model")
    settings = expand_grid(grid)
    model_w, model_h = padded_size(width, height, who="fluxshard profile accuracy --executor tiles")
    engine = make_engine(model, tiles_engine, threads=threads)
    executors = [TileExecutor(model, engine=engine, threads=threads, clock=clock, **s)
                 for s in settings]  # a bad knob value fails here, before any clip is made
    sweep, chosen_levels = [], []
    bar = tqdm(total=len(levels) * clips_per_level * (len(settings) + 1) * frames,
               disable=not progress, desc="profile tiles", unit="frame", dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="fluxshard-tiles-profile-") as tmp, \
            torch.inference_mode():
        tmp = Path(workdir) if workdir is not None else Path(tmp)
        best, medians = best_dense_runner(model, (model_h, model_w), threads=threads,
                                          kinds=dense_kinds, workdir=tmp)
        for level in levels:
            clips = _level_clips(level, levels, clips=clips_per_level, frames=frames,
                                 width=width, height=height, workdir=tmp)
            truths = [t for _frames, clip_truths in clips for t in clip_truths]
            motions = [motion_statistic(mf.field) for mfs, _ in clips for mf in mfs
                       if not mf.is_key and mf.field is not None]
            dense_preds = []  # the reference: dense once per clip
            for mfs, _ in clips:
                for mf in mfs:
                    x = preprocess(mf.image)
                    dense_preds.append(postprocess(_as_tensor(best.run(x)), x.shape[-2:],
                                                   mf.image.shape[:2], conf_thres=EVAL_CONF)[0])
                    bar.update(1)
            dense = evaluate_detections(dense_preds, truths)
            rows = []
            for setting, executor in zip(settings, executors):
                preds, tiles_s, dense_s, crop, ran_dense = [], [], [], [], []
                for mfs, _ in clips:
                    state = TileStreamState()
                    for mf in mfs:
                        key = mf.is_key or mf.field is None
                        out, report = executor.run(state, mf.image, None if key else mf.field,
                                                   key=key)
                        x_shape = (model_h, model_w)
                        preds.append(postprocess(out, x_shape, mf.image.shape[:2],
                                                 conf_thres=EVAL_CONF)[0])
                        if not key:
                            # the baseline on the same frame, right after
                            t0 = clock()
                            best.run(preprocess(mf.image))
                            dense_s.append(clock() - t0)
                            tiles_s.append(report.seconds)
                            crop.append(report.crop_area_fraction)
                            ran_dense.append(report.dense)
                        bar.update(1)
                acc = evaluate_detections(preds, truths)
                rows.append(_row(level, setting, acc, dense, tiles_s, dense_s, crop, ran_dense))
            sweep += rows
            row, meets = choose_setting(rows, min_map50_ratio, min_map50_95_ratio)
            chosen_levels.append(dict(
                name=level, motion=float(np.mean(motions)) if motions else 0.0,
                settings=dict(row["settings"]), meets_accuracy=meets,
                **{k: row[k] for k in ("map50_ratio", "map50_95_ratio", "speedup", "ms_ratio",
                                       "tiles_ms", "dense_ms", "crop_area_fraction",
                                       "map50", "map50_95", "dense_map50", "dense_map50_95")}))
    bar.close()
    bound_levels(chosen_levels)
    return TilesTable(
        size=[width, height],
        model=dict(weights=str(weights) if weights else "embedded demo detector",
                   scale=getattr(model, "scale", None), nc=int(getattr(model, "nc", 0))),
        levels=chosen_levels, sweep=sweep,
        thresholds=dict(map50_ratio=min_map50_ratio, map50_95_ratio=min_map50_95_ratio),
        executor=dict(engine=tiles_engine, threads=threads, best_dense=best.name,
                      dense_runner_ms={k: float(v) for k, v in medians.items()}, frames=frames,
                      clips_per_level=clips_per_level,
                      grid={k: list(v) if isinstance(v, (list, tuple)) else [v]
                            for k, v in grid.items()},
                      measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))


def _row(level, setting, acc, dense, tiles_s, dense_s, crop, ran_dense) -> dict:
    tiles_ms = 1e3 * float(np.median(tiles_s)) if tiles_s else float("nan")
    dense_ms = 1e3 * float(np.median(dense_s)) if dense_s else float("nan")
    ms_ratio = tiles_ms / dense_ms if dense_ms > 0 else float("inf")
    return dict(level=level, settings=dict(setting),
                map50=acc["map50"], map50_95=acc["map50_95"], dense_map50=dense["map50"],
                dense_map50_95=dense["map50_95"],
                map50_ratio=_ratio(acc["map50"], dense["map50"]),
                map50_95_ratio=_ratio(acc["map50_95"], dense["map50_95"]),
                crop_area_fraction=float(np.mean(crop)) if crop else 1.0,
                dense_share=float(np.mean(ran_dense)) if ran_dense else 1.0,
                tiles_ms=tiles_ms, dense_ms=dense_ms,
                # the mean carries the refresh frames the median hides
                tiles_ms_mean=1e3 * float(np.mean(tiles_s)) if tiles_s else float("nan"),
                dense_ms_mean=1e3 * float(np.mean(dense_s)) if dense_s else float("nan"),
                ms_ratio=ms_ratio, speedup=1.0 / ms_ratio if ms_ratio > 0 else float("inf"),
                frames=len(tiles_s))


# --------------------------------------------------------------------------- report and CLI

def describe_setting(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def plot_tiles_table(table: TilesTable, path: str | Path) -> Path:
    """Accuracy ratio vs speedup per setting (one panel per metric), chosen settings starred."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    metrics = (("map50_ratio", "mAP@0.5"), ("map50_95_ratio", "mAP@0.5:0.95"))
    for ax, (key, label) in zip(axes, metrics):
        for level in table.levels:
            rows = [r for r in table.sweep if r["level"] == level["name"]]
            points = ax.scatter([r["speedup"] for r in rows], [r[key] for r in rows], s=22,
                                alpha=0.7, label=f"{level['name']} (motion {level['motion']:.1f} px)")
            ax.scatter([level["speedup"]], [level[key]], marker="*", s=260,
                       color=points.get_facecolor()[0], edgecolor="black", zorder=3)
        ax.axhline(table.thresholds.get(key, 1.0), color="grey", ls=":", lw=1)
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set(xlabel=f"speedup vs {table.executor.get('best_dense', 'best dense')} (median ms)",
               ylabel=f"{label} / dense", title=f"{label} ratio (dotted: the floor; star: chosen)")
        ax.legend(fontsize=8)
    fig.suptitle(f"tile executor knobs per motion level, {table.size[0]}x{table.size[1]}, "
                 f"{table.executor.get('threads', '?')} threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_tiles_table(table: TilesTable) -> None:
    ex = table.executor
    floors = table.thresholds
    print(f"\nbest dense: {ex.get('best_dense')} at {table.size[0]}x{table.size[1]}, "
          f"{ex.get('threads')} threads; tiles engine {ex.get('engine')}; "
          f"{ex.get('frames')} frames x {ex.get('clips_per_level')} clip(s) per level")
    print(f"chosen: lowest median ms ratio keeping mAP@0.5 / dense >= {floors['map50_ratio']} "
          f"and mAP@0.5:0.95 / dense >= {floors['map50_95_ratio']}")
    for level in table.levels:
        print(f"\nlevel {level['name']} (motion {level['motion']:.2f} px, up to "
              f"{level['motion_max']:.2f})")
        print("| setting | mAP@0.5 / dense | mAP@0.5:0.95 / dense | crop area | tiles ms | "
              "dense ms | speedup | |\n|---|---|---|---|---|---|---|---|")
        for r in (r for r in table.sweep if r["level"] == level["name"]):
            mark = "chosen" if r["settings"] == level["settings"] else ""
            print(f"| {describe_setting(r['settings'])} | {r['map50_ratio']:.3f} | "
                  f"{r['map50_95_ratio']:.3f} | {r['crop_area_fraction']:.3f} | "
                  f"{r['tiles_ms']:.1f} | {r['dense_ms']:.1f} | {r['speedup']:.2f}x | {mark} |")
    print("\n| level | motion (px) | chosen setting | mAP@0.5 / dense | mAP@0.5:0.95 / dense | "
          "speedup | keeps accuracy |\n|---|---|---|---|---|---|---|")
    for level in table.levels:
        print(f"| {level['name']} | {level['motion']:.2f} | {describe_setting(level['settings'])} "
              f"| {level['map50_ratio']:.3f} | {level['map50_95_ratio']:.3f} | "
              f"{level['speedup']:.2f}x | {'yes' if level['meets_accuracy'] else 'NO'} |")


__all__ = ["DEFAULT_GRID", "QUICK_GRID", "ProfiledTileExecutor", "TilesTable",
           "choose_setting", "expand_grid", "plot_tiles_table",
           "sweep_tiles", "tile_knobs"]
