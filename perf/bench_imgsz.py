"""What `--imgsz` makes a 1080p camera cost: per-frame latency of one camera at 1920x1080 run at
``--imgsz 640`` against the same footage encoded at 640x360 run as it is (``--imgsz native``, the
model input 640x384 either way), and the 1080p camera at ``--imgsz native`` (1920x1088), in one
run.

The 1080p and 640x360 clips are the same frames of a corpus clip (out/footage, else a synthetic
scene), scaled with PyAV and encoded alike. Every stream is the one `fluxshard run CLIP
--dispatch edge --executor X --imgsz N` builds (``edge_runtime.run.edge_only_stream``); they
take turns frame by frame, rotating who goes first, on their own decoded frames; the clock is
``FrameResult.latency_ms`` (the whole edge path after decode, letterboxing included).
``ratio_imgsz640_vs_640_native`` near 1 is the claim: a 1080p camera at --imgsz 640 costs what a
640-wide camera costs.

    python3 perf/bench_imgsz.py --quick        # 12 frames (native 1080p on the first 4)
    python3 perf/bench_imgsz.py --weights yolo11n.pt --executor dense

Writes out/perf/bench_imgsz.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CORPUS_CLIP = Path("out/footage/bigbuckbunny-native-60f-gopinf-crf18-v1.mp4")


def scaled_clips(folder: Path, frames: int) -> tuple[Path, Path]:
    """(1920x1080 clip, 640x360 clip) of the same ``frames`` frames."""
    import av

    from fluxshard import synth

    if CORPUS_CLIP.is_file():
        with av.open(str(CORPUS_CLIP)) as container:
            source = [f.to_ndarray(format="rgb24")
                      for _, f in zip(range(frames), container.decode(video=0))]
    else:
        scene = synth.Scene(synth.SceneSpec(width=1920, height=1080, frames=frames, seed=7,
                                            camera="static"))
        source = [scene.render(t).image for t in range(frames)]
    paths = []
    for width, height in ((1920, 1080), (640, 360)):
        path = folder / f"camera-{width}x{height}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = synth.x264_options(gop=frames, preset="veryfast")
            for t, image in enumerate(source):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                    width, height, format="yuv420p")
                frame.pts = t
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--native-frames", type=int, default=10,
                   help="frames of the 1080p camera at --imgsz native (8x the pixels)")
    p.add_argument("--quick", action="store_true", help="12 frames, native 1080p on 4")
    p.add_argument("--weights", default=None)
    p.add_argument("--executor", default="exact", choices=("exact", "tiles", "dense"))
    p.add_argument("--out", type=Path, default=Path("out/perf/bench_imgsz.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.native_frames = 12, 4

    from edge_runtime.run import edge_frames, edge_model, edge_only_stream
    from fluxshard.predict import PredictOptions

    model = edge_model(args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        hd, sd = scaled_clips(Path(tmp), args.frames)
        streams = {
            "1080p_imgsz640": (edge_only_stream(args.executor, str(hd), model,
                                                predict=PredictOptions(imgsz=640)), hd),
            "640x360_native": (edge_only_stream(args.executor, str(sd), model,
                                                predict=PredictOptions(imgsz=None)), sd),
            "1080p_native": (edge_only_stream(args.executor, str(hd), model,
                                              predict=PredictOptions(imgsz=None)), hd),
        }
        sources = {name: iter(edge_frames(str(video), args.frames))
                   for name, (_, video) in streams.items()}
        ms = {name: [] for name in streams}
        for index in range(args.frames):
            names = list(streams)
            names = names[index % len(names):] + names[:index % len(names)]
            for name in names:
                if name == "1080p_native" and index >= args.native_frames:
                    continue
                mf = next(sources[name])
                result = streams[name][0].process(mf.image, None if mf.is_key else mf.field,
                                                  mf.is_key, mf.index)
                ms[name].append(result.latency_ms)
        for stream, _ in streams.values():
            stream.close()
    n = args.native_frames
    rows = {name: {"frames": len(v), "ms_mean": round(float(np.mean(v)), 2),
                   "ms_mean_first_frames": round(float(np.mean(v[:n])), 2)}
            for name, v in ms.items()}
    report = {"executor": args.executor, "weights": args.weights or "embedded demo detector",
              "frames": args.frames, "native_frames": n, "rows": rows,
              "ratio_imgsz640_vs_640_native": round(rows["1080p_imgsz640"]["ms_mean"]
                                                    / rows["640x360_native"]["ms_mean"], 3),
              # over the frames all three ran
              "ratio_1080p_native_vs_imgsz640": round(
                  rows["1080p_native"]["ms_mean_first_frames"]
                  / rows["1080p_imgsz640"]["ms_mean_first_frames"], 3)}
    print(f"| stream | frames | ms/frame mean | first {n} frames |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['frames']} | {row['ms_mean']} | {row['ms_mean_first_frames']} |")
    print(f"1080p at --imgsz 640 / 640x360 native: {report['ratio_imgsz640_vs_640_native']}x; "
          f"1080p native / 1080p at --imgsz 640: {report['ratio_1080p_native_vs_imgsz640']}x "
          f"(first {n} frames)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
