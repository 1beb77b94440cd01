"""Tiles against the best dense engine on real footage, on the product's own edge path.

For each corpus clip and variant, the two edge executors run exactly the stream
`fluxshard run CLIP --executor X --dispatch edge` builds (``edge_runtime.run.edge_only_stream``:
the same session on one thread, the edge's motion path, EndpointPath, dispatch), each with its
own stream state, on the same decoded frames:

* ``as_shipped``: the clip's file as it ships, through the product's decode and motion path
  (whatever its codec). A clip shorter than the run loops; each restart is a key frame (the
  header's ``restarts`` lists them).
* ``camera``: the clip re-encoded as an IP camera's stream (``fluxshard.footage.camera_stream``:
  H.264, P-frames only), played ping-pong to the length.

Timings on these machines drift by 20-40% within minutes, so the executors take turns frame by
frame on the same decoded frame, alternating which goes first. A frame's time is what `fluxshard
run` reports per frame (``FrameResult.latency_ms``: the edge path after decode: residual sets,
dispatch, the executor, postprocessing); the shared decode + motion time is reported apart
(``decode_ms_mean``). Means are over every frame: key frames, dense refreshes and fallbacks
included. Accuracy is agreement with dense (``fluxshard.accuracy.box_agreement``): the share of
dense's boxes with score >= 0.5 the executor also reports (IoU >= 0.5, same class).

    python3 perf/bench_real.py                       # every clip, both variants, 300 frames
    python3 perf/bench_real.py --quick --clips bikes vtest  # 90 frames

Writes out/perf/bench_real.json ({"header": ..., "rows": [...]}, one row per clip, variant and
executor) and out/perf/bench_real.png (per clip: agreement per 30-frame window, ms per frame).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxshard import cli_common  # noqa: E402 (the repository first on the path)

EXECUTORS = ("dense", "tiles")
VARIANTS = ("as_shipped", "camera")
FRAMES, QUICK_FRAMES = 300, 90
WINDOW = 30  # frames per agreement window
LATE = range(20, 30)  # frames after a dense frame of the tiles run that agreement_late pools
BOOKKEEPING_STAGES = ("warp", "change", "plan")  # TileReport stages besides engine and decode
DEFAULT_WEIGHTS = "yolov3-tiny"
DEMO_WEIGHTS = "demo"
ROW_FIELDS = ("clip", "split", "variant", "executor", "frames", "ms_mean", "ms_p50", "ms_p90",
              "speedup_mean_vs_dense", "agreement", "agreement_worst_window", "agreement_late",
              "crop_area_mean", "dense_frame_fraction", "motion_path", "bookkeeping_ms_mean",
              "bookkeeping_ms_tile_frames",
              "decode_ms_mean", "dense_boxes", "dense_boxes_late")


def default_clips() -> list[str]:
    from fluxshard import footage

    return [clip.stem for clip in footage.CORPUS]


def shipped_file(clip: str) -> Path:
    from fluxshard import footage

    return footage.corpus_clip(clip)


def camera_file(clip: str, frames: int, workdir: Path) -> Path:
    from fluxshard import footage

    return footage.camera_stream(clip, workdir, frames=frames)


def decoded_frames(video: Path, frames: int, loop: bool, restarts: list[int]):
    """(frame, decode + motion seconds) for ``frames`` frames of ``video`` on the edge's motion
    path; with ``loop`` the file starts over until there are enough (each start's index goes to
    ``restarts``)."""
    from edge_runtime.run import edge_frames

    produced = 0
    while produced < frames:
        source = iter(edge_frames(str(video), frames - produced))
        got = 0
        while True:
            t0 = time.perf_counter()
            mf = next(source, None)
            seconds = time.perf_counter() - t0
            if mf is None:
                break
            if got == 0 and produced:
                restarts.append(produced)
            got += 1
            produced += 1
            yield mf, seconds
        if got == 0:
            raise RuntimeError(f"{video}: no frames decoded")
        if not loop and produced < frames:
            raise RuntimeError(f"{video} decoded to {produced} frames, expected {frames}")


def detections_of(rows: np.ndarray) -> dict:
    """A FrameResult's (N, 6) rows as boxes / scores / classes."""
    return dict(boxes=rows[:, :4], scores=rows[:, 4], classes=rows[:, 5].astype(np.int64))


class ExecutorRun:
    """What one executor's stream produced, frame by frame."""

    def __init__(self):
        self.ms, self.detections, self.dense, self.crop, self.bookkeeping_ms = [], [], [], [], []
        self.refresh_fraction, self.stages = [], []  # tiles: TileReport's (empty dict otherwise)
        # a segment model's: per frame the segmented area (the union of its masks) and the
        # bytes its masks take on the wire (fluxshard.wire.encode_masks); None for detect
        self.segmented, self.mask_wire_bytes = [], []

    def add(self, result, report) -> None:
        if result.endpoint != "edge":
            raise RuntimeError(f"frame {result.index} ran on {result.endpoint}, not the edge")
        self.ms.append(result.latency_ms)
        self.detections.append(detections_of(result.detections))
        stats = result.stats
        self.dense.append(bool(stats.get("dense_pass", stats.get("executor") == "dense")))
        self.crop.append(float(stats.get("crop_area_fraction", 1.0)))
        stages = dict(getattr(report, "stages", {}) or {})
        self.stages.append(stages)
        self.refresh_fraction.append(float(getattr(report, "refresh_fraction", 0.0)))
        self.bookkeeping_ms.append(1e3 * sum(stages.get(k, 0.0) for k in BOOKKEEPING_STAGES))
        masks = getattr(result, "masks", None)
        if masks is not None:
            from fluxshard.wire import encode_masks

            self.segmented.append(masks.any(0))
            self.mask_wire_bytes.append(len(encode_masks(masks)))

    def timing(self, dense: "ExecutorRun", frames=slice(None)) -> dict:
        """ms_mean / ms_p50 / ms_p90 over ``frames`` and the speedup of the means over
        ``dense`` on the same frames."""
        ms = np.asarray(self.ms)[frames]
        mean = float(ms.mean())
        return dict(ms_mean=mean, ms_p50=float(np.percentile(ms, 50)),
                    ms_p90=float(np.percentile(ms, 90)),
                    speedup_mean_vs_dense=float(np.mean(np.asarray(dense.ms)[frames])) / mean)


def interleaved(streams: dict, frames, total: int | None = None, desc: str = "",
                progress: bool = True) -> tuple[dict[str, ExecutorRun], list[float], list]:
    """Every stream on the same decoded frames, taking turns frame by frame and alternating
    which goes first (machine drift hits all alike). ``frames`` yields (MotionFrame, decode
    seconds); each stream is an ``edge_only_stream``. Closes the streams. Returns the runs, the
    decode + motion ms per frame and per frame (motion source, picture type, key, share of
    blocks block matching supplied)."""
    from tqdm import tqdm

    runs = {name: ExecutorRun() for name in streams}
    names = list(streams)
    decode_ms, decoded = [], []
    try:
        for index, (mf, seconds) in enumerate(tqdm(frames, total=total, unit="frame", desc=desc,
                                                   leave=False, disable=not progress,
                                                   dynamic_ncols=True)):
            decode_ms.append(1e3 * seconds)
            decoded.append((mf.motion_source, mf.pict_type, mf.is_key, mf.replaced_fraction))
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                # a restart of a looping file is a key frame: iter_motion says so
                result = streams[name].process(mf.image, None if mf.is_key else mf.field,
                                               mf.is_key, index)
                runs[name].add(result, getattr(streams[name].edge.session, "last_report", None))
    finally:
        for stream in streams.values():
            stream.close()
    return runs, decode_ms, decoded


def late_frames(dense_flags: list[bool]) -> np.ndarray:
    """Frames LATE frames after the most recent dense frame (bool mask)."""
    late = np.zeros(len(dense_flags), bool)
    since = None
    for i, dense in enumerate(dense_flags):
        since = 0 if dense else (None if since is None else since + 1)
        late[i] = since in LATE
    return late


def motion_path(decoded: list[tuple]) -> str:
    """How the edge read the run's frames' motion (fluxshard.footage.MotionReport.path), from
    what decoding and validation reported on them: no second decode."""
    from fluxshard.footage import MotionReport

    inter = [d for d in decoded if not d[2]]
    report = MotionReport(len(decoded), len(decoded) - len(inter),
                          dict(Counter(d[1] for d in decoded)), dict(Counter(d[0] for d in decoded)),
                          float(np.mean([d[3] for d in inter])) if inter else 0.0)
    return report.path


def run_clip(clip: str, variant: str, video: Path, frames: int, model, progress: bool,
             restarts: list[int], tile_options: dict | None = None) -> tuple[list[dict], dict]:
    """Both executors on the same decoded frames of ``video``: rows and per-frame series;
    with ``tile_options`` a third stream, the tile executor with those knobs (its row's
    executor: ``tiles[k=v,...]``)."""
    from edge_runtime.run import edge_only_stream
    from fluxshard.sessions import NATIVE  # the clips' own size, as measured before --imgsz
    from fluxshard.accuracy import box_agreement
    from fluxshard.footage import clip_split

    streams = {name: edge_only_stream(name, str(video), model, predict=NATIVE)
               for name in EXECUTORS}
    if tile_options:
        streams[variant_name(tile_options)] = edge_only_stream(
            "tiles", str(video), model, predict=NATIVE, tile_options=tile_options)
    frames_iter = decoded_frames(video, frames, loop=variant == "as_shipped", restarts=restarts)
    runs, decode_ms, decoded = interleaved(streams, frames_iter, frames, f"{clip} {variant}",
                                           progress)
    late = late_frames(runs["tiles"].dense)
    path = motion_path(decoded)
    rows, series = [], {"windows": {}, "ms": {}}
    for name in runs:
        r = runs[name]
        agree = box_agreement(r.detections, runs["dense"].detections)
        windows = agree.windows(WINDOW)
        defined = [w for w in windows if w is not None]
        rows.append(dict(
            clip=clip, split=clip_split(clip), variant=variant, executor=name, frames=len(r.ms),
            **r.timing(runs["dense"]), agreement=agree.value,
            agreement_worst_window=min(defined) if defined else None,
            agreement_late=agree.over(late), crop_area_mean=float(np.mean(r.crop)),
            dense_frame_fraction=float(np.mean(r.dense)), motion_path=path,
            bookkeeping_ms_mean=float(np.mean(r.bookkeeping_ms)),
            # what a frame that ran crops paid (dense frames pay none or the change test only)
            bookkeeping_ms_tile_frames=_mean_or_none(
                [b for b, dense in zip(r.bookkeeping_ms, r.dense) if not dense]),
            decode_ms_mean=float(np.mean(decode_ms)),
            # how many boxes each agreement rests on: a clip where dense is confident about
            # few objects gives an agreement that one box moves a lot
            dense_boxes=int(agree.dense.sum()), dense_boxes_late=int(agree.dense[late].sum())))
        series["windows"][name] = windows
        series["ms"][name] = r.ms
    return rows, series


def parse_tile_options(items: list[str]) -> dict:
    """``["canvas=false", "halo=48"]`` -> {"canvas": False, "halo": 48} (Python literals;
    true/false/none in any case)."""
    import ast
    import inspect

    from fluxshard.tiles import TileExecutor

    known = set(inspect.signature(TileExecutor.__init__).parameters) - {"self", "model"}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--tiles-option {item!r}: expected KNOB=VALUE with KNOB one of "
                             f"{sorted(known)}")
        text = {"true": "True", "false": "False", "none": "None"}.get(text.lower(), text)
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--tiles-option {item!r}: {text!r} is not a value") from None
    return out


def variant_name(tile_options: dict) -> str:
    return "tiles[" + ",".join(f"{k}={v}" for k, v in tile_options.items()) + "]"


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count()}


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    cols = [c for c in ROW_FIELDS]
    table = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


def plot(series: dict, path: Path) -> None:
    """One column per clip and variant: agreement with dense per 30-frame window (top) and
    ms per frame (bottom), both executors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(series)
    fig, axes = plt.subplots(2, len(keys), figsize=(4.5 * len(keys), 6.5), squeeze=False)
    colors = {"dense": "tab:blue", "tiles": "tab:orange"}
    for col, key in enumerate(keys):
        s = series[key]
        top, bottom = axes[0][col], axes[1][col]
        for name in s["ms"]:
            windows = s["windows"][name]
            n = len(s["ms"][name])  # the last window may be shorter: plot at its middle
            xs = [(WINDOW * k + min(WINDOW * (k + 1), n)) / 2 for k, w in enumerate(windows)
                  if w is not None]
            top.plot(xs, [w for w in windows if w is not None], "o-",
                     color=colors.get(name, "tab:green"), label=name)
            bottom.plot(s["ms"][name], lw=0.8, color=colors.get(name, "tab:green"), label=name)
        top.set_title(key, fontsize=9)
        top.set_ylim(0, 1.05)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        bottom.set_xlabel("frame")
        if col == 0:
            top.set_ylabel(f"agreement with dense ({WINDOW}-frame windows)")
            bottom.set_ylabel("edge path ms / frame")
            top.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_FRAMES} frames per clip "
                                                        f"(default {FRAMES})")
    p.add_argument("--clips", nargs="+", default=None,
                   help="corpus clips (default: all of them)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--frames", type=cli_common.positive_int, default=None,
                   help="frames per clip, overriding --quick's and the default")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="the detector, as `fluxshard run --weights` (default %(default)s: a real "
                        f"COCO detector); {DEMO_WEIGHTS!r}: the embedded demo detector (synthetic "
                        "classes: its agreement on real footage means nothing; for tests)")
    p.add_argument("--footage-dir", type=Path, default=Path("out/footage"),
                   help="cache of the re-encoded camera streams (default out/footage)")
    p.add_argument("--out", type=Path, default=Path("out/perf"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tiles-option", action="append", default=[], metavar="KNOB=VALUE",
                   help="also run the tile executor with this knob (TileExecutor's keyword; "
                        "repeat for several) as a third stream on the same frames: an A/B of a "
                        "knob in one run")
    args = p.parse_args(argv)
    try:
        tile_options = parse_tile_options(args.tiles_option)
    except ValueError as e:
        p.error(str(e))
    frames = args.frames or (QUICK_FRAMES if args.quick else FRAMES)
    from fluxshard.footage import corpus_entry

    try:  # a wrong name is told before the model loads
        clips = [corpus_entry(name).stem for name in args.clips] if args.clips else default_clips()
    except ValueError as e:
        p.error(str(e))

    from tqdm import tqdm

    from edge_runtime.run import edge_model

    weights = None if args.weights == DEMO_WEIGHTS else args.weights
    model = edge_model(weights)
    rows, series, restarts = [], {}, {}
    runs = [(clip, variant) for clip in clips for variant in args.variants]
    for clip, variant in tqdm(runs, desc="bench_real", unit="clip", disable=args.no_progress,
                              dynamic_ncols=True):
        video = (shipped_file(clip) if variant == "as_shipped"
                 else camera_file(clip, frames, args.footage_dir))
        starts: list[int] = []
        clip_rows, clip_series = run_clip(clip, variant, video, frames, model,
                                          not args.no_progress, starts, tile_options)
        rows += clip_rows
        series[f"{clip} {variant}"] = clip_series
        if starts:
            restarts[f"{clip} {variant}"] = starts
    header = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine(), threads=1,
        weights=args.weights if weights else "embedded demo detector",
        frames=frames, window=WINDOW, late_frames=[LATE.start, LATE.stop - 1],
        clock="FrameResult.latency_ms of `fluxshard run --dispatch edge`, after decode; "
              "executors interleaved frame by frame, alternating first",
        restarts=restarts,
        restarts_note="as_shipped clips shorter than the run loop: each restart (frame index "
                      "listed) is a key frame")
    print(f"{frames} frames per clip, weights {header['weights']}, 1 thread, "
          f"{header['machine']['cpu']} x{header['machine']['cores']}")
    print_table(rows)
    if restarts:
        print("as_shipped restarts (key frames):", restarts)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "bench_real.json"
    out.write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    plot(series, args.out / "bench_real.png")
    print("wrote", out, "and", args.out / "bench_real.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
