"""`fluxshard motion CLIP... [--out DIR]`: decode each clip through the motion layer, keep one
endpoint's dispatch state (reset on key frames and every ``--reset-every`` frames, as if that
endpoint ran inference then), print a per-clip table and plot per-frame motion statistic,
residual fraction and motion path."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluxshard import cli_common
from fluxshard.motion.stats import DEFAULT_RESET_EVERY, run
from fluxshard.tau import DEFAULT_TAU
from fluxshard.tools import args as shared


def register(subparsers) -> None:
    p = subparsers.add_parser("motion", help="motion and residual statistics of a clip",
                              description=cli_common.describe(__doc__))
    p.add_argument("clips", nargs="+", metavar="CLIP", type=cli_common.video_source,
                   help="video file(s) or URL(s)")
    p.add_argument("--out", type=cli_common.output_folder, default=Path("out/motion"),
                   help="folder for the plots and per-clip JSON")
    shared.add_tau(p, default=DEFAULT_TAU,
                   help="tau on the [0, 1] input scale (fluxshard.tau): a block is residual when "
                        "its max abs difference exceeds tau * 255 grey levels (default: 40/255)")
    p.add_argument("--reset-every", type=cli_common.positive_int, default=DEFAULT_RESET_EVERY,
                   help="reset the endpoint state every N frames (and on key frames)")
    p.add_argument("--no-validate", action="store_true",
                   help="trust codec vectors without checking them against the previous frame")
    p.add_argument("--max-frames", type=cli_common.positive_int, default=None,
                   help="decode at most this many frames per clip (default: all)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    # a clip that cannot be decoded is a runtime failure (exit 1, fluxshard.cli) that leaves
    # no plots behind
    with cli_common.clean_up_on_failure(args.out):
        run(args.clips, args.out, tau=args.tau, reset_every=args.reset_every,
            validate=not args.no_validate, max_frames=args.max_frames)
    return 0
