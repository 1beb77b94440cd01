"""Bare frames from the application's own decoder against the codec path, on the same frames.

Each corpus clip (its IP-camera H.264 stream, ``fluxshard.footage.camera_stream``) is decoded by
OpenCV (``cv2.VideoCapture``), as an application would; every stream below gets those same RGB
frames, taking turns frame by frame (alternating which goes first):

* ``dense``: the edge's dense executor (the reference for agreement and speed);
  the others run the edge executor (``--executor``, default tiles, not adaptive unless
  ``--adaptive``: an adaptive one falls back to dense by its own clock, which on a loaded
  machine moves the recomputed share between runs);
* ``codec``: the edge executor fed the clip's H.264 motion vectors (PyAV decodes the same file
  beside OpenCV: ``fluxshard.motion.iter_motion``, validated, as ``fluxshard run`` reads them);
* ``bare_<estimator>``: the edge executor fed bare frames, ``stream.process(frame)``: the field
  estimated against the previous frame by each of ``fluxshard.motion.estimate.FIELD_ESTIMATORS``
  (``--estimators dis:fast`` picks a DIS preset, ``fluxshard.motion.estimate.DIS_PRESETS``).

Per stream: ``ms_mean`` (``FrameResult.latency_ms``: motion estimate of bare frames included,
the codec's vectors come with decoding, which is reported apart as ``decode_ms_mean`` of PyAV's
decode + vectors + validation and of OpenCV's decode), ``speedup_vs_dense``, ``recomputed_mean``
(the tile executor's crop area; the exact executor's computed share), ``agreement`` with dense
(``fluxshard.accuracy.box_agreement``) and, for bare streams, ``field_agreement``: the share of
4x4 blocks of inter frames whose integer vector is the codec's.

    python3 perf/bench_frame_source.py --quick     # 3 clips, 60 frames
    python3 perf/bench_frame_source.py             # 5 clips, 300 frames
    python3 perf/bench_frame_source.py --quick --estimators dis dis:fast dis:medium

Writes out/perf/bench_frame_source.json ({"header": ..., "rows": [...]}).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxshard import cli_common  # noqa: E402 (the repository first on the path)

CLIPS = ("vtest", "cup", "box", "carphone_pristine", "bikes")
QUICK_CLIPS = ("vtest", "cup", "bikes")
FRAMES, QUICK_FRAMES = 300, 60
DEFAULT_WEIGHTS = "yolov3-tiny"
ROW_FIELDS = ("clip", "stream", "frames", "ms_mean", "speedup_vs_dense", "recomputed_mean",
              "agreement", "field_agreement", "estimated_frames")


def opencv_frames(video: Path):
    """(RGB frame, decode seconds, timestamp in seconds) of ``video`` as OpenCV decodes it."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise RuntimeError(f"OpenCV cannot open {video}")
    try:
        while True:
            t0 = time.perf_counter()
            ok, bgr = capture.read()
            if not ok:
                return
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield rgb, time.perf_counter() - t0, capture.get(cv2.CAP_PROP_POS_MSEC) / 1e3
    finally:
        capture.release()


def codec_frames(video: Path, frames: int):
    """(MotionFrame, decode + vectors seconds) on the edge's motion path."""
    from fluxshard.motion import iter_motion

    source = iter_motion(str(video), max_frames=frames)
    while True:
        t0 = time.perf_counter()
        mf = next(source, None)
        if mf is None:
            return
        yield mf, time.perf_counter() - t0


class StreamRun:
    """What one stream produced, frame by frame."""

    def __init__(self):
        self.ms, self.detections, self.recomputed = [], [], []
        self.estimated = 0  # frames whose field the stream estimated

    def add(self, result) -> None:
        self.ms.append(result.latency_ms)
        rows = result.detections
        self.detections.append(dict(boxes=rows[:, :4], scores=rows[:, 4],
                                    classes=rows[:, 5].astype(np.int64)))
        self.recomputed.append(float(result.stats.get("recomputed_fraction", 1.0)))
        self.estimated += result.motion == "estimated"


def estimator(spec: str):
    """A ``FrameMotion`` from ``name`` or ``dis:<preset>``."""
    from fluxshard.motion.estimate import DEFAULT_DIS_PRESET, FrameMotion

    name, _, preset = spec.partition(":")
    return FrameMotion(name, dis_preset=preset or DEFAULT_DIS_PRESET)


def estimator_spec(text: str) -> str:
    """argparse type: an estimator name, or ``dis:<preset>``."""
    try:
        estimator(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def field_agreement(estimated: np.ndarray, codec: np.ndarray) -> float:
    """Share of 4x4 blocks whose integer (rounded) vectors are equal."""
    return float((np.rint(estimated) == np.rint(codec)).all(-1).mean())


def run_clip(clip: str, video: Path, frames: int, model, executor: str, estimators,
             progress: bool, adaptive: bool = False) -> tuple[list[dict], dict]:
    from tqdm import tqdm

    from edge_runtime.run import edge_only_stream
    from fluxshard.accuracy import box_agreement
    from fluxshard.sessions import NATIVE  # the clips' own size, as measured before --imgsz

    # the tile executor not adaptive (unless asked): what it recomputes then depends on the
    # fields alone, not on how fast this machine ran each stream's frames
    options = {"tile_options": {"adaptive": False}} if executor == "tiles" and not adaptive else {}
    options["predict"] = NATIVE
    streams = {"dense": edge_only_stream("dense", str(video), model, predict=NATIVE),
               "codec": edge_only_stream(executor, str(video), model, **options)}
    probes = {}  # a second estimator per bare stream: the same fields, compared with the codec's
    for name in estimators:
        stream = edge_only_stream(executor, str(video), model, **options)
        stream.core.motion = estimator(name)  # the bare stream's estimator
        streams[f"bare_{name}"] = stream
        probes[name] = estimator(name)
    runs = {name: StreamRun() for name in streams}
    agreement = {name: [] for name in estimators}
    decode_ms = {"pyav_codec": [], "opencv": []}
    order = list(streams)
    pixel_diff = 0
    try:
        pairs = zip(codec_frames(video, frames), opencv_frames(video))
        for index, ((mf, codec_s), (rgb, opencv_s, timestamp)) in enumerate(
                tqdm(pairs, total=frames, desc=clip, unit="frame", leave=False,
                     disable=not progress, dynamic_ncols=True)):
            decode_ms["pyav_codec"].append(1e3 * codec_s)
            decode_ms["opencv"].append(1e3 * opencv_s)
            if rgb.shape != mf.image.shape:
                raise RuntimeError(f"{video}: OpenCV and PyAV frame {index} differ in size")
            pixel_diff = max(pixel_diff, int(np.abs(rgb.astype(np.int16) - mf.image).max()))
            for name in estimators:  # outside the timed streams
                estimate = probes[name].field(rgb)
                if estimate is not None and not mf.is_key:
                    agreement[name].append(field_agreement(estimate, mf.field))
            shift = index % len(order)
            for name in order[shift:] + order[:shift]:
                stream = streams[name]
                if name == "codec":
                    result = stream.process(rgb, None if mf.is_key else mf.field, mf.is_key,
                                            index, timestamp=timestamp)
                elif name == "dense":
                    result = stream.process(rgb, is_key=True, index=index, timestamp=timestamp)
                else:
                    result = stream.process(rgb, index=index, timestamp=timestamp)
                runs[name].add(result)
    finally:
        for stream in streams.values():
            stream.close()
    dense = runs["dense"]
    rows = []
    for name, run in runs.items():
        mean = float(np.mean(run.ms))
        spec = name.removeprefix("bare_")
        rows.append(dict(
            clip=clip, stream=name, frames=len(run.ms), ms_mean=mean,
            speedup_vs_dense=float(np.mean(dense.ms)) / mean,
            recomputed_mean=float(np.mean(run.recomputed)),
            agreement=box_agreement(run.detections, dense.detections).value,
            field_agreement=(float(np.mean(agreement[spec])) if agreement.get(spec) else None),
            estimated_frames=run.estimated))
    facts = dict(decode_ms_mean={k: float(np.mean(v)) for k, v in decode_ms.items()},
                 max_pixel_difference_opencv_vs_pyav=pixel_diff)
    return rows, facts


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    table = [list(ROW_FIELDS)] + [[fmt(r[c]) for c in ROW_FIELDS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(ROW_FIELDS))]
    for line in table:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    from fluxshard.motion.estimate import FIELD_ESTIMATORS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"clips {' '.join(QUICK_CLIPS)}, {QUICK_FRAMES} frames each")
    p.add_argument("--clips", nargs="+", default=None, help=f"corpus clips (default {CLIPS})")
    p.add_argument("--frames", type=cli_common.positive_int, default=None)
    p.add_argument("--estimators", nargs="+", type=estimator_spec,
                   default=list(FIELD_ESTIMATORS),
                   help="bare streams: estimator names, or dis:PRESET (default: %(default)s)")
    p.add_argument("--executor", choices=("tiles", "exact"), default="tiles",
                   help="the edge executor of the codec and bare streams (default %(default)s)")
    p.add_argument("--adaptive", action="store_true",
                   help="the tile executor adaptive, as `fluxshard run` runs it (default off: "
                        "its dense fallbacks follow the machine's timing, not the fields)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="as `fluxshard run --weights` (default %(default)s); 'demo': the embedded "
                        "demo detector (synthetic classes: for tests)")
    p.add_argument("--footage-dir", type=Path, default=Path("out/footage"))
    p.add_argument("--out", type=Path, default=Path("out/perf"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    frames = args.frames or (QUICK_FRAMES if args.quick else FRAMES)
    from fluxshard import footage

    try:
        clips = [footage.corpus_entry(c).stem
                 for c in (args.clips or (QUICK_CLIPS if args.quick else CLIPS))]
    except ValueError as e:
        p.error(str(e))
    import cv2

    from edge_runtime.run import edge_model

    weights = None if args.weights == "demo" else args.weights
    model = edge_model(weights)
    rows, facts = [], {}
    for clip in clips:
        video = footage.camera_stream(clip, args.footage_dir, frames=frames)
        clip_rows, facts[clip] = run_clip(clip, video, frames, model, args.executor,
                                          args.estimators, not args.no_progress, args.adaptive)
        rows += clip_rows
    header = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  weights=args.weights, executor=args.executor, adaptive=args.adaptive,
                  frames=frames,
                  opencv=cv2.__version__, clips=facts,
                  clock="FrameResult.latency_ms (bare frames: motion estimate included); "
                        "streams interleaved frame by frame, alternating first")
    print(f"{frames} frames per clip, weights {args.weights}, edge executor {args.executor}")
    print_table(rows)
    for clip, f in facts.items():
        print(f"{clip}: decode ms {f['decode_ms_mean']}, OpenCV vs PyAV max pixel difference "
              f"{f['max_pixel_difference_opencv_vs_pyav']}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "bench_frame_source.json"
    out.write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
