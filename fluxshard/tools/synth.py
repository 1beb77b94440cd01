"""`fluxshard synth`: a synthetic clip with ground truth (fluxshard.synth, whose first docstring
paragraph is the verb's description)."""

from __future__ import annotations

import argparse

from fluxshard import cli_common, synth
from fluxshard.tools import args as shared


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="make a synthetic H.264 clip with ground truth",
                              description=cli_common.describe(synth.__doc__, 1))
    d = synth.SceneSpec()
    p.add_argument("out_dir", nargs="?", type=cli_common.output_folder, default="out/synth",
                   help="output folder for the clip (.mp4) and its ground truth (.npz)")
    p.add_argument("--width", type=cli_common.even_int, default=d.width,
                   help="frame width in pixels (even, at least 32)")
    p.add_argument("--height", type=cli_common.even_int, default=d.height,
                   help="frame height in pixels (even, at least 32)")
    p.add_argument("--fps", type=cli_common.positive_int, default=d.fps, help="frames per second")
    p.add_argument("--frames", type=cli_common.positive_int, default=d.frames,
                   help="clip length in frames")
    p.add_argument("--gop", type=cli_common.positive_int, default=d.gop,
                   help="a key frame every this many frames")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="random seed: the same seed makes the same clip")
    p.add_argument("--objects", type=cli_common.nonnegative_int, default=d.num_objects,
                   help="moving objects in the scene")
    p.add_argument("--camera", choices=synth.CAMERAS, default=d.camera, help="camera motion")
    p.add_argument("--pan-speed", type=cli_common.nonnegative_float, default=d.pan_speed,
                   help="camera pan in px/frame at zoom 1")
    p.add_argument("--pan-angle", type=float, default=None,
                   help="pan direction in degrees, 0 = the camera moves right (default: drawn "
                        "from the seed)")
    p.add_argument("--zoom-speed", type=float, default=d.zoom_speed,
                   help="relative zoom-in per frame, below 0.05 either way")
    p.add_argument("--object-speed", type=cli_common.nonnegative_float, default=d.object_speed,
                   help="typical object speed in px/frame (each object's is drawn around it)")
    p.add_argument("--codec", choices=synth.CODECS, default="libx264",
                   help="libx264 (H.264: the decoder exports motion vectors) or libx265 (HEVC: "
                        "motion comes from block matching)")
    p.add_argument("--ref", type=cli_common.int_range(1, 16), default=1,
                   help="reference frames (x264 ref; above 1 the motion layer validates vectors)")
    p.add_argument("--bframes", type=cli_common.int_range(0, 16), default=0,
                   help="B-frames between reference frames")
    p.add_argument("--crf", type=cli_common.int_range(0, 51), default=18,
                   help="encoder constant rate factor (lower: better quality, more bytes)")
    shared.add_no_progress(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        spec = synth.SceneSpec(width=args.width, height=args.height, fps=args.fps,
                               frames=args.frames, gop=args.gop, seed=args.seed,
                               num_objects=args.objects, camera=args.camera,
                               pan_speed=args.pan_speed, pan_angle=args.pan_angle,
                               zoom_speed=args.zoom_speed, object_speed=args.object_speed)
    except ValueError as exc:
        raise cli_common.UsageError(str(exc)) from None
    with cli_common.clean_up_on_failure(args.out_dir):  # a failed encode leaves no files
        paths = synth.make_clip(spec, args.out_dir, codec=args.codec, ref=args.ref,
                                bframes=args.bframes, crf=args.crf,
                                progress=not args.no_progress)
    print(f"video:        {paths.video}")
    print(f"ground truth: {paths.ground_truth}")
    return 0
