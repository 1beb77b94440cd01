"""`fluxshard demo [--out DIR]`: the main job on the embedded default. For now: synthesize the
default scene (640x384, pan, 60 frames) and run the motion verb on it, writing the clip, its
ground truth and the motion plot into DIR."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the main job on the embedded default",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    p.set_defaults(func=_main)


def run(out: Path) -> list[dict]:
    from fluxshard import synth
    from fluxshard.motion import cli as motion_cli

    out = Path(out)
    paths = synth.make_clip(synth.SceneSpec(), out, name="demo", progress=True)
    print(f"clip: {paths.video}\nground truth: {paths.ground_truth}")
    return motion_cli.run([str(paths.video)], out)


def _main(args: argparse.Namespace) -> int:
    run(args.out)
    return 0
