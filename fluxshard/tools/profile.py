"""`fluxshard profile SUB-VERB`: the offline profiles the runtime loads.

* ``latency``: the dispatcher's latency tables (edge: the in-process sparse executor; cloud: the
  Triton ``fluxshard`` model's server time) at a few active residual-block fractions, and the other
  edge executors' (tiles: against the crop area share it reports; dense: flat), written as
  JSON (default ``out/profile/latency.json``, which `fluxshard run` and ``FluxShardStream`` load
  when present).
* ``accuracy``: the truncation table (tau per motion level), ``fluxshard.truncation``.

Each sub-verb is one entry in :data:`SUB_VERBS`: (add its arguments, run it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from fluxshard import cli_common
from fluxshard.tools import args as shared
from fluxshard.tools.args import EDGE_EXECUTORS

DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


# ------------------------------------------------------------------------------ latency tables

def _profile_frames(width: int, height: int, fraction: float, block: int, seed: int):
    """(base frame, next frame, residual mask): the next frame is the base with ``fraction`` of
    its blocks changed (noise) and no motion, so exactly those blocks are active. The changed
    blocks form one centred rectangle, as objects and uncovered regions do (scattered blocks would
    dilate to the whole map within a few layers and measure only the worst case)."""
    from fluxshard import synth, wire

    base = synth.Scene(synth.SceneSpec(width=width, height=height, seed=seed)).render(0).image
    rng = np.random.default_rng(seed)
    grid = wire.residual_grid(height, width, block)
    mask = np.zeros(grid, bool)
    n = int(round(fraction * mask.size))
    if n:
        rows = min(grid[0], max(1, int(round(grid[0] * fraction ** 0.5))))
        cols = min(grid[1], -(-n // rows))
        y0, x0 = (grid[0] - rows) // 2, (grid[1] - cols) // 2
        region = np.zeros((rows, cols), bool)
        region.flat[:n] = True
        mask[y0:y0 + rows, x0:x0 + cols] = region
    pixels = np.repeat(np.repeat(mask, block, 0), block, 1)[:height, :width]
    noise = rng.integers(40, 90, base.shape, dtype=np.int16)
    changed = np.where(pixels[..., None], (base.astype(np.int16) + noise) % 256, base)
    return base, changed.astype(np.uint8), mask


def profile_latency(*, width: int = 640, height: int = 384, fractions=DEFAULT_FRACTIONS,
                    repeats: int = 5, cloud_url: str | None = None, cloud: bool = True,
                    threads: int | None = None, block: int = 16, progress: bool = True,
                    out: str | Path | None = None, weights: str | Path | None = None,
                    executors=EDGE_EXECUTORS, clock=time.perf_counter, predict=None):
    """Measure both tables; returns the :class:`fluxshard_client.LatencyProfile` (saved to
    ``out`` when given). ``cloud=False`` keeps the built-in cloud table. ``weights``: the
    detector on both sides (None: the embedded demo one). ``executors``: the edge executors to
    measure besides the exact one, whose table is always measured (one that cannot be built is
    left out with a note). ``clock``: seconds, what the edge runs are timed with.
    ``threads``: the other edge executors' engines' (torch's own are the process's: the entry
    point sets them). ``predict``: fluxshard.predict's options (None: ultralytics' defaults);
    ``width`` x ``height`` is the model's input size (:func:`input_size`), a local cloud gets
    them as its parameters."""
    import torch
    from tqdm import tqdm

    from fluxshard import wire
    from fluxshard.sessions import yolo_session_factory
    from fluxshard_client import FluxShardClient, LatencyProfile, LatencyTable

    if repeats < 1 or not fractions:
        raise ValueError("need repeats >= 1 and at least one fraction")
    fractions = sorted(set(float(f) for f in fractions))
    if fractions[0] < 0 or fractions[-1] > 1:
        raise ValueError(f"fractions must lie in [0, 1], got {fractions}")
    unknown = set(executors) - set(EDGE_EXECUTORS)
    if unknown:
        raise ValueError(f"unknown edge executors {sorted(unknown)}; choose from {EDGE_EXECUTORS}")
    from fluxshard.models import YOLO11
    from fluxshard.sessions import load_dense_model

    model = load_dense_model(str(weights) if weights else None)
    # the exact executor's mask rules know YOLO11's ops; another family's edge table is its
    # dense one (measured below), and its local cloud runs the tile executor
    exact = isinstance(model, YOLO11)
    cases = [_profile_frames(width, height, f, block, seed=k) for k, f in enumerate(fractions)]
    field = np.zeros(wire.field_shape(height, width), np.float32)
    bar = tqdm(total=len(fractions) * repeats * (int(exact) + int(cloud)), desc="profile latency",
               unit="run", disable=not progress, dynamic_ncols=True)
    edge_ms = []
    if exact:
        session = yolo_session_factory("sparse", model=model,
                                       predict=_native(predict))(0)
        for base, changed, mask in cases:
            times = []
            for _ in range(repeats):
                session.infer(base, None, None, True)
                t0 = clock()
                session.infer(changed, field, mask, False)
                times.append((clock() - t0) * 1e3)
                bar.update(1)
            edge_ms.append(statistics.median(times))
    else:
        executors = tuple(dict.fromkeys((*executors, "dense")))
    edge_executors, notes = _profile_edge_executors(model, executors, cases,
                                                    field, repeats, threads or 1, clock)
    if not exact:
        edge_ms = list(edge_executors["dense"].ms)[:1] * len(fractions)
        notes.append(f"exact left out: it supports YOLO11 only ({type(model).__name__}); the "
                     "edge table is the dense one")
    cloud_ms, where = None, None
    if cloud:
        with _cloud_url(cloud_url, weights, None if exact else "tiles", predict) as url:
            where = cloud_url or "local tritonserver"
            with FluxShardClient(url) as client:
                stream = client.open_stream(7_000_001, block=block)
                cloud_ms, index = [], 0
                for base, changed, mask in cases:
                    times = []
                    for _ in range(repeats):
                        stream.send(base, key=True, frame_index=index)
                        result = stream.send(changed, field, mask, frame_index=index + 1)
                        index += 2
                        times.append(float(result.stats["server_ms"]))
                        bar.update(1)
                    cloud_ms.append(statistics.median(times))
                stream.close()
    bar.close()
    default = LatencyProfile.default()
    # More active blocks never cost less: on a shared machine a noisy point would otherwise
    # make the dispatcher prefer more work. The raw medians stay in meta.
    raw = {"edge_ms": edge_ms, "cloud_ms": cloud_ms}
    profile = LatencyProfile(
        edge=LatencyTable(fractions, np.maximum.accumulate(edge_ms).tolist()),
        cloud=(LatencyTable(fractions, np.maximum.accumulate(cloud_ms).tolist()) if cloud_ms
               else default.cloud),
        width=width, height=height, source="profiled", edge_executors=edge_executors,
        meta={"edge_executor_notes": notes,"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "repeats": repeats, "edge_threads": torch.get_num_threads(), "raw": raw,
              "cloud": where or "built-in default table",
              "what": "edge: in-process sparse executor (preprocess to detections); cloud: "
                      "server time of the fluxshard model (receive + compute); static content "
                      "with the given share of residual blocks changed; edge_executors: tiles "
                      "against the crop area share it reported (a key frame's dense pass "
                      "is share 1), dense flat"})
    if out is not None:
        profile.save(out)
    return profile


def _profile_edge_executors(model, executors, cases, field, repeats: int, threads: int,
                            clock=time.perf_counter):
    """{name: LatencyTable} of the tile and dense edge executors on ``cases``, and notes on any
    left out. Tiles: each case's median time at the crop area share it reported (rising; more
    area never cheaper); its key frames (dense passes) give share 1."""
    from fluxshard.sessions import best_dense_session_factory, tile_session_factory
    from fluxshard_client import LatencyTable

    tables, notes = {}, []
    if "tiles" in executors:
        try:
            tiles = tile_session_factory(model, threads=threads)(0)
        except ValueError as e:
            notes.append(f"tiles left out: {e}")
        else:
            by_share: dict[float, float] = {}
            key_ms = []
            for base, changed, mask in cases:
                times, shares = [], []
                for _ in range(repeats):
                    t0 = clock()
                    tiles.infer(base, None, None, True)
                    key_ms.append((clock() - t0) * 1e3)
                    t0 = clock()
                    stats = tiles.infer(changed, field, mask, False).stats
                    times.append((clock() - t0) * 1e3)
                    shares.append(float(stats["crop_area_fraction"]))
                share = round(statistics.median(shares), 4)
                by_share[share] = max(by_share.get(share, 0.0), statistics.median(times))
            by_share[1.0] = max(by_share.get(1.0, 0.0), statistics.median(key_ms))
            shares = sorted(by_share)
            tables["tiles"] = LatencyTable(
                shares, np.maximum.accumulate([by_share[x] for x in shares]).tolist())
    if "dense" in executors:
        dense = best_dense_session_factory(model, threads=threads)(0)
        dense.infer(cases[0][1], None, None, True)  # picks the engine for this size
        times = []
        for _ in range(repeats):
            for _base, changed, _mask in cases:
                t0 = clock()
                dense.infer(changed, None, None, True)
                times.append((clock() - t0) * 1e3)
        ms = statistics.median(times)
        tables["dense"] = LatencyTable([0.0, 1.0], [ms, ms])
    return tables, notes


@contextlib.contextmanager
def _cloud_url(cloud_url: str | None, weights=None, executor: str | None = None, predict=None):
    if cloud_url:
        yield cloud_url
        return
    from fluxshard.serving.tritonserver import TritonServer

    parameters = {**({"executor": executor} if executor else {}),
                  **(predict.parameters() if predict is not None else {})}
    with TritonServer(models=["fluxshard"], weights=weights,
                      parameters=parameters or None) as server:
        yield server.grpc_url


def _native(predict):
    """``predict``'s NMS options for a session fed frames at their input size already."""
    import dataclasses

    from fluxshard.sessions import NATIVE

    return NATIVE if predict is None else dataclasses.replace(predict, imgsz=None)


def input_size(args: argparse.Namespace, who: str) -> tuple[int, int]:
    """(W, H) the model runs --size frames at under --imgsz, said when that differs."""
    w, h = args.size
    ih, iw = shared.predict_options(args).letterbox(h, w).input_hw
    if (iw, ih) != (w, h):
        print(f"{who}: size {w}x{h} letterboxed to {iw}x{ih} (--imgsz)")
    return iw, ih


def _add_latency_arguments(p: argparse.ArgumentParser) -> None:
    from fluxshard_client.dispatch import DEFAULT_PROFILE_PATH

    p.add_argument("--out", type=Path, default=DEFAULT_PROFILE_PATH, help="JSON file to write")
    shared.add_size(p, help="frame size the tables are measured at (letterboxed to --imgsz)")
    shared.add_predict(p)
    shared.add_weights(p, help=f"detector to profile: {shared.WEIGHTS_SOURCES} "
                               "(default: embedded demo detector)")
    p.add_argument("--fractions", type=cli_common.fraction, nargs="+",
                   default=list(DEFAULT_FRACTIONS),
                   help="active residual-block fractions to measure")
    p.add_argument("--repeats", type=cli_common.positive_int, default=5,
                   help="runs per fraction (median kept)")
    shared.add_cloud_url(p, help="gRPC host:port of the cloud (default: start a local "
                                 "tritonserver)")
    p.add_argument("--executors", nargs="+", choices=EDGE_EXECUTORS, default=list(EDGE_EXECUTORS),
                   help="edge executors to profile (exact always: it is the `edge` table)")
    p.add_argument("--no-cloud", action="store_true",
                   help="edge table only; keep the built-in cloud table")
    shared.add_no_progress(p)


def _run_latency(args: argparse.Namespace) -> int:
    import torch

    from fluxshard.models.ops import padded_size

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)  # once, here at the entry point

    width, height = input_size(args, "fluxshard profile latency")
    padded_size(width, height, who="fluxshard profile latency")  # the frames' model input size
    try:
        profile = profile_latency(width=width, height=height,
                                  predict=shared.predict_options(args),
                                  fractions=args.fractions, repeats=args.repeats,
                                  cloud_url=args.cloud_url, cloud=not args.no_cloud,
                                  progress=not args.no_progress, out=args.out,
                                  weights=args.weights, executors=args.executors)
    except Exception as e:  # noqa: BLE001 - a CLI reports, it does not trace back
        print(f"fluxshard profile latency: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"\n| active fraction | edge ms | cloud ms |\n|---|---|---|")
    for f, e, c in zip(profile.edge.fractions, profile.edge.ms, profile.cloud.ms):
        print(f"| {f:.2f} | {e:.1f} | {c:.1f} |")
    for name, table in profile.edge_executors.items():
        what = "crop area share" if name == "tiles" else "share"
        print(f"\nedge {name}: " + ", ".join(f"{what} {f:.2f}: {m:.1f} ms"
                                             for f, m in zip(table.fractions, table.ms)))
    for note in profile.meta.get("edge_executor_notes", []):
        print(f"note: {note}")
    print(f"\n{profile.width}x{profile.height}; cloud: {profile.meta['cloud']}; written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- accuracy (tau)

def add_accuracy_arguments(p: argparse.ArgumentParser) -> None:
    """`fluxshard profile accuracy`'s options (also perf/bench_truncation.py's)."""
    from fluxshard.tau import METRICS, tau_argument
    from fluxshard.truncation import DEFAULT_TAUS

    shared.add_weights(p, help="checkpoint (default: embedded demo detector; --executor tiles: "
                               "the detector of the real tuning clips, default yolov3-tiny, "
                               "while the synthetic seeds run the demo detector, whose classes "
                               "they draw; with --synthetic-only the synthetic seeds' detector)")
    p.add_argument("--alpha", type=cli_common.positive_float, default=0.99,
                   help="a tau is feasible while its accuracy stays >= alpha x dense accuracy")
    p.add_argument("--metric", choices=METRICS, default=METRICS[0],
                   help="the accuracy a tau must keep >= alpha x dense (default: %(default)s)")
    p.add_argument("--taus", type=tau_argument, nargs="+", default=list(DEFAULT_TAUS),
                   help="taus to sweep, on the [0, 1] input scale (fluxshard.tau; rounded to "
                        "whole grey levels)")
    shared.add_executor(p, choices=("exact", "tiles"),
                        help="what to profile: exact (tau per motion level, the truncation table) "
                             "or tiles (the tile executor's knobs per motion level, the tiles "
                             "table; fluxshard.tiles.profile)")
    p.add_argument("--frames", type=cli_common.positive_int, default=None,
                   help="frames per held-out synthetic clip (default 30; tiles: 60, --quick "
                        "30)")
    p.add_argument("--clips-per-level", type=cli_common.positive_int, default=1,
                   help="held-out synthetic clips per motion level")
    shared.add_size(p, help="clip size (synthetic clips are rendered at its --imgsz letterbox "
                            "size)")
    shared.add_predict(p)
    p.add_argument("--strict-rfap", action="store_true",
                   help="RFAP Cond. 1 at every spatial layer (less reuse, exact receptive fields)")
    p.add_argument("--grid-snap", action="store_true",
                   help="relax RFAP Cond. 2 to the nearest grid displacement (reuse under pans)")
    p.add_argument("--out", type=cli_common.output_folder, default=Path("out/profile"),
                   help="folder for truncation_table.json and truncation_profile.png (tiles: "
                        "tiles_table.json and tiles_profile.png)")
    p.add_argument("--no-bypass", action="store_true",
                   help="never hand unreusable frames to the best dense runner")
    p.add_argument("--adaptive", action="store_true",
                   help="also bypass reusable frames while the dense runner measures faster")
    p.add_argument("--quick", action="store_true",
                   help="4 taus, 12 frames, 320x192 (tiles: a 3x2x2x2 knob grid, 30 synthetic "
                        "frames at --size, 60 frames per real clip)")
    # --executor tiles (fluxshard.tiles.profile; its grids are named here, not imported: the
    # tiles package imports torch, and a bad argument is refused before anything heavy loads)
    p.add_argument("--thresholds", type=cli_common.positive_float, nargs="+", default=None,
                   help="tiles: change thresholds to sweep, grey levels (default 4 6 10 16; "
                        "--quick 6 10 16)")
    p.add_argument("--halos", type=cli_common.nonnegative_int, nargs="+", default=None,
                   help="tiles: crop halos to sweep, pixels (default 16 32)")
    p.add_argument("--refresh-intervals", type=cli_common.positive_int, nargs="+", default=None,
                   help="tiles: full dense refresh intervals K to sweep, frames (default 15 30 "
                        "60; --quick 30 60)")
    p.add_argument("--budgets", type=cli_common.fraction, nargs="+", default=None,
                   help="tiles: crop budgets to sweep, shares of the frame in (0, 1] (default "
                        "0.3 0.5)")
    p.add_argument("--clips", nargs="+", default=None, metavar="CLIP",
                   help="tiles: real tuning clips, as camera streams (default: all of "
                        "fluxshard.footage.TUNING_CLIPS: bikes box tree bigbuckbunny; the "
                        "held-out half is refused)")
    p.add_argument("--synthetic-only", action="store_true",
                   help="tiles: tune on the synthetic seeds alone (no real clips)")
    p.add_argument("--real-frames", type=cli_common.positive_int, default=None,
                   help="tiles: frames per real clip (default 150, --quick 60; a longer stream "
                        "than the clip plays it ping-pong)")
    p.add_argument("--footage-dir", type=Path, default=Path("out/footage"),
                   help="tiles: cache of the re-encoded camera streams (default out/footage)")
    p.add_argument("--min-map50-ratio", type=cli_common.fraction, default=0.99,
                   help="tiles: a setting keeps accuracy while its mAP@0.5 / dense stays >= this")
    p.add_argument("--min-map50-95-ratio", type=cli_common.fraction, default=0.97,
                   help="tiles: ... and its mAP@0.5:0.95 / dense stays >= this")
    p.add_argument("--min-agreement", type=cli_common.fraction, default=0.97,
                   help="tiles: ... and its agreement with dense on the level's real clips")
    p.add_argument("--min-worst-window", type=cli_common.fraction, default=0.95,
                   help="tiles: ... and its agreement over the worst 30-frame window")


def run_accuracy(args: argparse.Namespace) -> int:
    """`fluxshard profile accuracy`: sweep, print, write the table and its plot."""
    import torch

    from fluxshard.truncation import METRIC_NAMES, profile_accuracy

    torch.set_num_threads(getattr(args, "threads", None) or 2)  # once, here at the entry point
    if getattr(args, "executor", "exact") == "tiles":
        return run_tiles_accuracy(args)
    if args.quick:
        args.taus, args.frames, args.size = [0.0, 0.06, 0.25, 0.6], 12, (320, 192)
    args.frames = args.frames or 30
    width, height = input_size(args, "fluxshard profile accuracy")
    t0 = time.perf_counter()
    table = profile_accuracy(args.weights, taus=args.taus, alpha=args.alpha, frames=args.frames,
                             clips_per_level=args.clips_per_level, width=width,
                             height=height, strict_rfap=args.strict_rfap,
                             grid_snap=args.grid_snap, out_dir=args.out,
                             bypass=not args.no_bypass, adaptive=args.adaptive,
                             metric=args.metric)
    ex = table.executor
    print(f"\nbest dense: {ex['best_dense']} {ex['dense_ms']:.1f} ms at {ex['size'][0]}x"
          f"{ex['size'][1]}, {ex['threads']} threads")
    print(f"\nchosen: largest tau keeping {METRIC_NAMES[table.metric]} >= {table.alpha} x dense")
    print(f"\n| level | motion (px) | chosen tau | mAP@0.5 / dense | mAP@0.5:0.95 / dense |"
          f" cache hit | speedup |\n|---|---|---|---|---|---|---|")
    for lv in table.levels:
        print(f"| {lv['name']} | {lv['motion']:.2f} | {lv['tau']} | {lv['map50']:.3f} / "
              f"{lv['dense_map50']:.3f} | {lv['map50_95']:.3f} / {lv['dense_map50_95']:.3f} | "
              f"{lv['cache_hit']:.3f} | {lv['speedup']:.2f}x |")
    print(f"\n| level | tau | mAP@0.5 / dense | mAP@0.5:0.95 / dense | cache hit | bypassed | ms |"
          f" speedup |\n|---|---|---|---|---|---|---|---|")
    for p in table.sweep:
        print(f"| {p['level']} | {p['tau']} | {p['map50'] / max(p['dense_map50'], 1e-9):.3f} | "
              f"{p['map50_95'] / max(p['dense_map50_95'], 1e-9):.3f} | {p['cache_hit']:.3f} | "
              f"{p['bypassed']:.2f} | {p['sparse_ms']:.1f} | {p['speedup']:.2f}x |")
    print(f"\ntable: {args.out / 'truncation_table.json'}  plot: {args.out / 'truncation_profile.png'}"
          f"  ({time.perf_counter() - t0:.0f} s)")
    return 0


def tuning_clips(args: argparse.Namespace) -> list[str]:
    """The real clips --clips names (stems; default every tuning clip), none with
    --synthetic-only. Raises ValueError for an unknown or held-out clip."""
    from fluxshard import footage

    if getattr(args, "synthetic_only", False):
        if getattr(args, "clips", None):
            raise ValueError("--clips names real clips; --synthetic-only tunes on none")
        return []
    names = getattr(args, "clips", None) or footage.TUNING_CLIPS
    clips = [footage.corpus_entry(name) for name in names]
    held_out = [c.stem for c in clips if c.name in footage.HELDOUT_CLIPS]
    if held_out:
        raise ValueError(f"{', '.join(held_out)}: held out for perf/bench_real.py "
                         "(fluxshard.footage.HELDOUT_CLIPS); tune on "
                         f"{', '.join(footage.corpus_entry(n).stem for n in footage.TUNING_CLIPS)}")
    return list(dict.fromkeys(c.stem for c in clips))


def run_tiles_accuracy(args) -> int:
    """`fluxshard profile accuracy --executor tiles`: sweep, print, write table and plot."""
    from fluxshard.tiles.profile import (DEFAULT_FRAMES, PLOT_NAME, QUICK_FRAMES,
                                         QUICK_REAL_FRAMES, REAL_DETECTOR, REAL_FRAMES,
                                         TABLE_NAME, plot_tiles_table, print_tiles_table,
                                         sweep_tiles)

    what = "fluxshard profile accuracy --executor tiles"
    frames = args.frames or (QUICK_FRAMES if args.quick else DEFAULT_FRAMES)
    real_frames = getattr(args, "real_frames", None) or (QUICK_REAL_FRAMES if args.quick
                                                         else REAL_FRAMES)
    try:  # a wrong clip name is told before anything loads
        clips = tuning_clips(args)
    except ValueError as e:
        print(f"{what}: {e}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        from fluxshard import footage
        from fluxshard.models import load_model

        # real clips: --weights is their detector; the synthetic seeds keep the demo detector
        real_weights = (args.weights or REAL_DETECTOR) if clips else None
        synthetic_weights = None if clips else args.weights
        model = load_model(synthetic_weights, fused=True)
        real_model = load_model(real_weights, fused=True) if clips else None
        videos = {name: footage.camera_stream(name, args.footage_dir, frames=real_frames,
                                              progress=not getattr(args, "no_progress", False))
                  for name in clips}
        width, height = input_size(args, what)
        predict = shared.predict_options(args)
        table = sweep_tiles(model, grid=tiles_grid(args), frames=frames, width=width,
                            height=height, clips_per_level=args.clips_per_level,
                            threads=getattr(args, "threads", None) or 2,
                            min_map50_ratio=args.min_map50_ratio,
                            min_map50_95_ratio=args.min_map50_95_ratio,
                            weights=synthetic_weights,
                            progress=not getattr(args, "no_progress", False),
                            real_clips=videos, real_model=real_model, real_weights=real_weights,
                            real_frames=real_frames,
                            score_real=functools.partial(score_real_clip, predict=predict),
                            min_agreement=getattr(args, "min_agreement", 0.97),
                            min_worst_window=getattr(args, "min_worst_window", 0.95))
    except (ValueError, RuntimeError, FileNotFoundError, NotImplementedError) as e:
        print(f"{what}: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    table_path = table.save(out / TABLE_NAME)
    plot_path = plot_tiles_table(table, out / PLOT_NAME)
    print_tiles_table(table)
    print(f"\ntable: {table_path}  plot: {plot_path}  ({time.perf_counter() - t0:.0f} s)")
    return 0


def tiles_grid(args: argparse.Namespace) -> dict:
    """The knob grid --thresholds/--halos/--refresh-intervals/--budgets ask for, the rest from
    --quick's or the default grid."""
    from fluxshard.tiles.profile import DEFAULT_GRID, QUICK_GRID

    base = QUICK_GRID if args.quick else DEFAULT_GRID
    return {"threshold": tuple(args.thresholds or base["threshold"]),
            "halo": tuple(args.halos or base["halo"]),
            "refresh_interval": tuple(args.refresh_intervals or base["refresh_interval"]),
            "budget": tuple(getattr(args, "budgets", None) or base["budget"])}


# sub-verb -> (help, add arguments, run). A sub-verb whose module cannot be imported reports that
# when used and does not take the others down.
SUB_VERBS = {
    "latency": ("latency tables (edge/cloud vs active residual fraction) for the dispatcher",
                _add_latency_arguments, _run_latency),
    "accuracy": ("truncation table: largest tau per motion level within alpha x dense accuracy",
                 add_accuracy_arguments, run_accuracy),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="offline profiles: latency tables, accuracy",
                              description=cli_common.describe(__doc__, 2))
    sub = p.add_subparsers(dest="profile_verb", metavar="SUB-VERB")
    for name, (help_text, add_arguments, run) in SUB_VERBS.items():
        q = sub.add_parser(name, help=help_text, description=f"{help_text[0].upper()}"
                                                             f"{help_text[1:]}.")
        try:
            add_arguments(q)
        except ImportError as e:  # that sub-verb's module is not here: say so when it is used
            q.set_defaults(func=lambda args, e=e, name=name: _unavailable(name, e))
            continue
        q.set_defaults(func=run)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _unavailable(name: str, error: Exception) -> int:
    print(f"fluxshard profile {name} is not available here: {error}", file=sys.stderr)
    return 1


def score_real_clip(model, video, settings: list[dict], *, name: str | None = None,
                    frames: int | None = None, engine="onnxruntime", adaptive: bool = True,
                    clock=time.perf_counter, bar=None, predict=None) -> dict:
    """Dense and the tile executor at every one of ``settings`` on the same decoded frames of
    ``video`` (its first ``frames``; None: all), each in the stream the product's edge builds
    (``edge_runtime.run``: ``edge_only_stream("dense")``; for tiles the edge's tile session on
    one thread, ``adaptive`` as the edge, one executor per setting on one shared ``engine``).
    They take turns frame by frame, rotating who goes first. Returns {"clip", "video", "frames",
    "size" [w, h], "motion" (mean motion statistic of its fields), "dense_ms", "rows": one per
    setting: agreement with dense (``fluxshard.accuracy.box_agreement``: pooled, found / count,
    worst :data:`AGREEMENT_WINDOW`-frame window), mean ms per frame of both (every frame,
    ``FrameResult.latency_ms``) and their ratio, crop area and dense-frame shares}.
    ``predict``: fluxshard.predict's options, as `fluxshard run` takes them (None: its
    defaults); "size" and "motion" are at the model's input size, where the table is used."""
    import torch

    from edge_runtime.run import edge_frames, edge_only_stream, edge_policies, edge_stream
    from fluxshard.accuracy import box_agreement
    from fluxshard.tiles.profile import AGREEMENT_WINDOW, rotated
    from fluxshard.motion import motion_statistic
    from fluxshard.sessions import TileYoloSession
    from fluxshard.tiles.engine import make_engine
    from fluxshard.tiles.executor import TileExecutor
    from fluxshard_client import LocalEndpoint

    if not settings:
        raise ValueError("no settings to score")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the edge's (edge_runtime.run.edge_model)
    streams = []
    try:
        shared = make_engine(model, engine, threads=1) if isinstance(engine, str) else engine
        tau_policy, _options, profile = edge_policies()
        streams.append(edge_only_stream("dense", str(video), model, predict=predict))
        for setting in settings:
            executor = TileExecutor(model, engine=shared, threads=1, adaptive=adaptive,
                                    clock=clock, **setting)
            streams.append(edge_stream(LocalEndpoint(TileYoloSession(executor,
                                                                     predict=_native(predict))),
                                       tau_policy=tau_policy, profile=profile, predict=predict))
        ms = [[] for _ in streams]
        found = [[] for _ in streams]
        dense_flags, crops = [[] for _ in streams], [[] for _ in streams]
        motions, size = [], None
        for index, mf in enumerate(edge_frames(str(video), frames)):
            box = streams[0].predict.letterbox(*mf.image.shape[:2])
            size = [int(box.input_hw[1]), int(box.input_hw[0])]
            if not mf.is_key and mf.field is not None:
                motions.append(motion_statistic(box.field(mf.field)))
            for k in rotated(list(range(len(streams))), index):
                result = streams[k].process(mf.image, None if mf.is_key else mf.field,
                                            mf.is_key, index)
                if result.endpoint != "edge":
                    raise RuntimeError(f"frame {index} ran on {result.endpoint}, not the edge")
                ms[k].append(float(result.latency_ms))
                d = result.detections
                found[k].append(dict(boxes=d[:, :4], scores=d[:, 4],
                                     classes=d[:, 5].astype(np.int64)))
                dense_flags[k].append(bool(result.stats.get("dense_pass", k == 0)))
                crops[k].append(float(result.stats.get("crop_area_fraction", 1.0)))
                if bar is not None:
                    bar.update(1)
    finally:
        for stream in streams:
            stream.close()
        torch.set_num_threads(threads)
    if not ms[0]:
        raise RuntimeError(f"{video}: no frames decoded")
    dense_ms = float(np.mean(ms[0]))
    rows = []
    for k, setting in enumerate(settings, start=1):
        agree = box_agreement(found[k], found[0])
        windows = [w for w in agree.windows(AGREEMENT_WINDOW) if w is not None]
        tiles_ms = float(np.mean(ms[k]))
        ms_ratio = tiles_ms / dense_ms if dense_ms > 0 else float("inf")
        rows.append(dict(
            source="real", clip=name or Path(video).stem, settings=dict(setting),
            frames=len(ms[k]), agreement=agree.value, agreement_found=int(agree.found.sum()),
            agreement_count=int(agree.dense.sum()),
            agreement_worst_window=min(windows) if windows else None,
            tiles_ms=tiles_ms, dense_ms=dense_ms, tiles_ms_p50=float(np.median(ms[k])),
            dense_ms_p50=float(np.median(ms[0])), ms_ratio=ms_ratio,
            speedup=1.0 / ms_ratio if ms_ratio > 0 else float("inf"),
            crop_area_fraction=float(np.mean(crops[k])),
            dense_share=float(np.mean(dense_flags[k]))))
    return dict(clip=name or Path(video).stem, video=str(video), frames=len(ms[0]), size=size,
                motion=float(np.mean(motions)) if motions else 0.0, dense_ms=dense_ms,
                rows=rows)
