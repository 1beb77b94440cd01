"""`fluxshard footage`: the real-footage corpus (fluxshard.footage): clips that registry packages
ship, fetched once into the per-user cache and never committed.

`fetch` gets every corpus clip (one download of the opencv-python sdist, nothing when cached) and
prints their paths; `list` prints one row per clip: its source, size, frames, rate, codec and the
motion path `fluxshard run` takes on it; `camera NAME --out DIR` re-encodes a clip as an IP
camera's H.264 stream (P-frames only, one reference frame).
"""

from __future__ import annotations

import argparse
import time

from fluxshard import cli_common
from fluxshard.tools import args as shared

LIST_COLUMNS = ("name", "source", "camera", "size", "MB", "frames", "fps", "codec", "B-frames",
                "motion path", "replaced")
DEFAULT_MOTION_FRAMES = 60  # enough for several GOPs of B/P structure, a second or so per clip


def frame_size(text: str) -> tuple[int, int]:
    """``WxH`` with even sides (yuv420p) of at least fluxshard.footage.MIN_SIDE."""
    from fluxshard.footage import MIN_SIDE

    width, sep, height = text.lower().partition("x")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected WxH (e.g. 320x240), got {text!r}")
    try:
        size = cli_common.even_int(width), cli_common.even_int(height)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None
    if min(size) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"{text}: sides must be at least {MIN_SIDE}")
    return size


def register(subparsers) -> None:
    from fluxshard import footage

    p = subparsers.add_parser("footage", help="fetch, list or re-encode the real-footage corpus",
                              description=cli_common.describe(__doc__, 2))
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = actions.add_parser(
        "fetch", help="fetch every corpus clip (cached) and print paths",
        description="Fetch every corpus clip that is not cached with its pinned sha256 (a copy "
                    "whose digest is wrong is fetched again) and print each clip's path.")
    shared.add_no_progress(fetch, help="no download messages (pip's own output included)")
    fetch.set_defaults(func=_fetch)
    listing = actions.add_parser(
        "list", help="one row per corpus clip",
        description="One row per corpus clip: its source package, camera, size, frames, rate, "
                    "codec, whether it has B-frames and the motion path `fluxshard run` takes "
                    "(codec, codec-validated or block-matching), as decoding reports them.")
    listing.add_argument("--motion-frames", type=cli_common.nonnegative_int,
                         default=DEFAULT_MOTION_FRAMES,
                         help="frames decoded to tell each clip's motion path (0: the whole clip)")
    shared.add_no_progress(listing)
    listing.set_defaults(func=_list)
    camera = actions.add_parser(
        "camera", help="re-encode a clip as an IP camera's H.264 stream",
        description="Re-encode the corpus clip NAME (fetched first when needed) as an IP "
                    "camera's H.264 stream: libx264 zerolatency, P-frames only, one reference "
                    "frame, bit-exact; a stream longer than the clip plays it ping-pong. A stream "
                    "made before with the same options is reused. Prints its path.")
    camera.add_argument("name", choices=footage.CORPUS_NAMES + tuple(
        c.stem for c in footage.CORPUS), metavar="NAME",
        help=f"corpus clip (file name or stem): {', '.join(footage.CORPUS_NAMES)}")
    camera.add_argument("--out", type=cli_common.output_folder, required=True,
                        help="folder for the stream (a stream made before is reused)")
    camera.add_argument("--size", type=frame_size, default=None, metavar="WxH",
                        help="scale to cover this size and centre-crop (default: the clip's)")
    camera.add_argument("--frames", type=cli_common.positive_int, default=None,
                        help="stream length; longer than the clip plays it ping-pong "
                             "(default: the clip's)")
    camera.add_argument("--gop", type=cli_common.positive_int, default=None,
                        help="a key frame every this many frames (default: only the first)")
    shared.add_no_progress(camera)
    camera.set_defaults(func=_camera)


def _fetch(args: argparse.Namespace) -> int:
    from fluxshard import footage

    for name, path in footage.fetch_corpus(progress=not args.no_progress).items():
        print(f"{name:<22} {path}")
    return 0


def list_rows(motion_frames: int | None = DEFAULT_MOTION_FRAMES, progress: bool = False
              ) -> list[dict]:
    """One dict per corpus clip with the LIST_COLUMNS (fetches what is not cached). "replaced":
    the share of inter-frame blocks whose vector validation or block matching supplied."""
    from tqdm import tqdm

    from fluxshard import footage

    rows = []
    for clip in tqdm(footage.CORPUS, desc="footage list", unit="clip", disable=not progress,
                     dynamic_ncols=True):
        path = footage.corpus_clip(clip.name)
        facts = footage.clip_facts(path)
        report = footage.motion_report(path, motion_frames or None)
        rows.append({"name": clip.name, "source": clip.package.split("==")[0]
                     + (" sdist" if clip.package != footage.PACKAGE else ""),
                     "camera": clip.camera, "size": f"{facts.width}x{facts.height}",
                     "MB": f"{facts.bytes / 1e6:.1f}", "frames": facts.frames,
                     "fps": f"{facts.fps:.2f}", "codec": facts.codec,
                     "B-frames": "yes" if report.b_frames else "no",
                     "motion path": report.path,
                     "replaced": f"{100 * report.replaced_fraction:.1f}%"})
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = list_rows(args.motion_frames, progress=not args.no_progress)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in LIST_COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in LIST_COLUMNS).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in LIST_COLUMNS).rstrip())
    seen = f"first {args.motion_frames} frames" if args.motion_frames else "whole clips"
    print(f"(B-frames and motion path as `fluxshard run` decodes them, {seen})")
    return 0


def _camera(args: argparse.Namespace) -> int:
    from fluxshard import footage

    started = time.perf_counter()
    path = footage.camera_stream(args.name, args.out, size=args.size, frames=args.frames,
                                 gop=args.gop, progress=not args.no_progress)
    print(f"camera stream: {path} ({time.perf_counter() - started:.1f} s)")
    return 0
