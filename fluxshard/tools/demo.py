"""`fluxshard demo [--out DIR]`: the main job on the embedded default, an alias of
`fluxshard run --demo` (synthesize the default clip, start a local tritonserver as the cloud,
dispatch every frame, write detections, annotated video, report and summary into DIR)."""

from __future__ import annotations

from fluxshard import cli_common
from fluxshard.tools.run import add_run_arguments, main


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the main job on the embedded default",
                              description=cli_common.describe(__doc__))
    add_run_arguments(p, demo_default=True, out_default="out/demo")
    p.set_defaults(func=main)
