"""Decode a video (file or live URL that FFmpeg opens, RTSP included) into RGB frames with a
per-frame backward motion field, as a generator.

Which path a frame takes (``MotionFrame.motion_source``):

* ``"none"``: key frame (I-frame, the first frame, or a size change); the field is zero.
* ``"codec"``: the H.264 decoder's exported vectors (``flags2=+export_mvs``), all accepted
  (or ``validate=False``).
* ``"validated"``: codec vectors with the blocks that failed validation (vectors to older
  reference frames, B-frame predictions, intra blocks) replaced by block matching.
* ``"block_matching"``: the stream exports no vectors (HEVC, VP9, AV1, MJPEG, ...): the whole
  field comes from block matching against the previous decoded frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fluxshard.motion.block_matching import DEFAULT_RADIUS, match_blocks
from fluxshard.motion.field import MV_BLOCK, field_shape
from fluxshard.motion.validation import validate_field

MOTION_SOURCES = ("codec", "validated", "block_matching", "none")
LIVE_TIMEOUT_S = 10.0  # open and read timeout for network sources


class MotionSourceError(ValueError):
    """The source cannot be opened or decoded as video (message says why)."""


@dataclass
class MotionFrame:
    index: int  # decoded frames from 0, presentation order
    image: np.ndarray  # (H, W, 3) uint8 RGB
    field: np.ndarray  # (ceil(H/4), ceil(W/4), 2) float32 backward motion to frame index-1
    is_key: bool  # I-frame / first frame / size change: no motion, caches must reset
    motion_source: str  # one of MOTION_SOURCES
    pict_type: str = "?"  # 'I', 'P', 'B', ... as the decoder reports it
    replaced_fraction: float = 0.0  # share of blocks whose vector came from block matching
    time: float | None = None  # presentation time in seconds, when the container knows it


def frame_motion_vectors(frame) -> np.ndarray | None:
    """A decoded PyAV frame's exported motion vectors (None: it carries none). Read through a
    side-data container of our own: the frame's own (``frame.side_data``) and the frame hold
    each other, a cycle only Python's cyclic collector frees, and rarely, while each such frame
    keeps its decoded picture alive; an endless stream grew by a picture per frame."""
    from av.sidedata.sidedata import SideDataContainer

    side = SideDataContainer(frame).get("MOTION_VECTORS")
    return side.to_ndarray() if side is not None else None


def codec_field(vectors: np.ndarray | None, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Exported codec vectors (PyAV ``MOTION_VECTORS`` structured array) -> per-4x4-block field and
    a ``covered`` mask. Only past-reference vectors (``source < 0``) are used; ``dst_x/dst_y`` is
    the block centre in the current frame and ``motion / motion_scale`` the displacement to the
    reference (pixel x came from x + d). Blocks without a vector stay uncovered. Where partitions
    overlap, the later one in the array wins."""
    hb, wb = field_shape(height, width)[:2]
    field = np.zeros((hb, wb, 2), np.float32)
    covered = np.zeros((hb, wb), bool)
    if vectors is None or len(vectors) == 0:
        return field, covered
    past = vectors["source"] < 0
    if past.all():  # P-frames: no copy of the whole record array
        past = slice(None)
    elif not past.any():
        return field, covered
    scale = vectors["motion_scale"][past].astype(np.float32)
    scale[scale == 0] = 1
    # int32 / float32 -> float64, rounded once to the field's float32
    vector = np.empty((len(scale), 2), np.float32)
    vector[:, 0] = vectors["motion_x"][past] / scale
    vector[:, 1] = vectors["motion_y"][past] / scale
    w = vectors["w"][past].astype(np.int32)
    h = vectors["h"][past].astype(np.int32)
    bw = np.maximum(w // MV_BLOCK, 1)
    bh = np.maximum(h // MV_BLOCK, 1)
    bx0 = (vectors["dst_x"][past].astype(np.int32) - w // 2) // MV_BLOCK
    by0 = (vectors["dst_y"][past].astype(np.int32) - h // 2) // MV_BLOCK
    inside = (by0.min() >= 0 and bx0.min() >= 0 and (by0 + bh).max() <= hb
              and (bx0 + bw).max() <= wb)
    if inside and max(bh.max(), bw.max()) <= _MAX_FAST_PARTITION:
        # Partitions up to 16 px wholly in the frame: a fixed 4x4 stencil of flat block indices
        # per partition, masked to its size, in the general path's order (partition by
        # partition, row-major inside one).
        keep = (_FAST_ROW < bh[:, None]) & (_FAST_COL < bw[:, None])
        at = ((by0 * wb + bx0)[:, None] + (_FAST_ROW * wb + _FAST_COL))[keep]
        counts = bh * bw
    else:
        ys, xs, owner = _partition_blocks(by0.astype(np.int64), bx0.astype(np.int64), bh, bw)
        inside = (ys >= 0) & (ys < hb) & (xs >= 0) & (xs < wb)  # macroblocks overhang the frame
        at = ys[inside] * wb + xs[inside]
        counts = np.bincount(owner[inside], minlength=len(bh))
    # Each (dx, dy) pair moves as one 8-byte item: one scatter into the flat grid, the same
    # writes in the same order as a 2-D scatter (the last of overlapping partitions wins).
    field.view(np.uint64).reshape(-1)[at] = np.repeat(vector.view(np.uint64).reshape(-1), counts)
    covered.reshape(-1)[at] = True
    return field, covered


_MAX_FAST_PARTITION = 4  # blocks per side: 16 px, the largest H.264 / MPEG partition
_FAST_ROW, _FAST_COL = (np.divmod(np.arange(_MAX_FAST_PARTITION ** 2, dtype=np.int32),
                                  _MAX_FAST_PARTITION))


def _partition_blocks(by0, bx0, bh, bw):
    """Every 4x4 block of every partition, partition by partition and row-major inside one:
    (block rows, block cols, owning partition)."""
    counts = bh * bw
    owner = np.repeat(np.arange(len(bh)), counts)
    offset = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return by0[owner] + offset // bw[owner], bx0[owner] + offset % bw[owner], owner


def open_source(source: str | Path, *, timeout_s: float = LIVE_TIMEOUT_S):
    """Open a file or URL with PyAV and return ``(container, video_stream)``; clear errors for
    missing, empty, non-video and unreadable inputs."""
    import av

    text = str(source)
    is_url = "://" in text
    if not is_url:
        path = Path(text)
        if not path.exists():
            raise MotionSourceError(f"{text}: no such file")
        if path.is_dir():
            raise MotionSourceError(f"{text}: is a folder, not a video")
        if path.stat().st_size == 0:
            raise MotionSourceError(f"{text}: empty file (0 bytes)")
    options = {"rtsp_transport": "tcp"} if text.startswith(("rtsp://", "rtsps://")) else {}
    try:
        container = av.open(text, options=options, timeout=timeout_s if is_url else None)
    except av.error.FFmpegError as exc:
        raise MotionSourceError(f"{text}: cannot open as video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise MotionSourceError(f"{text}: has no video stream")
    return container, container.streams.video[0]


# swscale's default yuv->rgb path picks SIMD kernels by CPU (C, SSE2, AVX2, AVX-512 ...) that
# round differently; with ACCURATE_RND + BITEXACT every CPU gives the C result (FFmpeg's own
# conversion tests hold all architectures to one checksum with these flags).
def _exact_interpolation():
    from av.video.reformatter import Interpolation

    return Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT


class RGBConverter:
    """Decoded frames -> (H, W, 3) uint8 RGB, the same on every CPU. Keeps one swscale context
    for a stream (rebuilt only when the frame geometry changes) and converts on the calling
    thread: swscale's automatic slice threads only contend for the cores the pipeline already
    uses, and the output does not depend on either."""

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()
        self._interpolation = _exact_interpolation()

    def __call__(self, frame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24", interpolation=self._interpolation,
                                          threads=1).to_ndarray()


def frame_rgb(frame) -> np.ndarray:
    """A decoded ``av.VideoFrame`` as (H, W, 3) uint8 RGB, the same on every CPU (one-off;
    :class:`RGBConverter` for a stream)."""
    return frame.to_ndarray(format="rgb24", interpolation=_exact_interpolation(), threads=1)


def decode_rgb_only(source: str | Path, threads: int = 1) -> int:
    """Decode ``source`` and convert every frame to RGB as ``iter_motion`` does, without motion
    vectors: the floor every motion path pays (benchmarks time the motion layer against it).
    Returns the number of frames."""
    container, stream = open_source(source)
    stream.codec_context.thread_count = threads
    to_rgb = RGBConverter()
    n = 0
    with container:
        for frame in container.decode(stream):
            to_rgb(frame)
            n += 1
    return n


def _luma(frame) -> np.ndarray:
    """The Y plane as (H, W) uint8 without a colour conversion when the frame is planar YUV."""
    if frame.format.name in ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"):
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        return rows[:frame.height, :frame.width]
    return frame.to_ndarray(format="gray", interpolation=_exact_interpolation())


# FFmpeg's AVPictureType; PyAV returns a plain int for it in some versions.
_PICTURE_TYPES = {0: "?", 1: "I", 2: "P", 3: "B", 4: "S", 5: "SI", 6: "SP", 7: "BI"}


def _picture_type(frame) -> str:
    value = frame.pict_type
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    try:
        return _PICTURE_TYPES.get(int(value), str(value))
    except (TypeError, ValueError):
        return str(value)


def iter_motion(source: str | Path, *, validate: bool = True, radius: int = DEFAULT_RADIUS,
                max_frames: int | None = None, timeout_s: float = LIVE_TIMEOUT_S,
                threads: int = 1) -> Iterator[MotionFrame]:
    """Stream ``MotionFrame``s from ``source`` (see the module doc for the motion paths).

    ``validate=False`` trusts codec vectors as they are (only right for single-reference P-only
    streams such as ``fluxshard synth`` clips); streams without codec vectors always use block
    matching. A stream that breaks off (truncated file, dropped connection) raises
    ``MotionSourceError`` after the frames decoded before the break.
    """
    import av

    container, stream = open_source(source, timeout_s=timeout_s)
    ctx = stream.codec_context
    ctx.options = {"flags2": "+export_mvs"}
    ctx.thread_count = threads
    name = str(source)
    to_rgb = RGBConverter()
    index = 0
    prev_luma = None
    prev_size = None
    prev_field = None
    try:
        frames = container.decode(stream)
        while max_frames is None or index < max_frames:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:
                raise MotionSourceError(f"{name}: stream broke off after {index} frames ({exc})") \
                    from exc
            height, width = frame.height, frame.width
            image = to_rgb(frame)
            luma = _luma(frame)
            pict = _picture_type(frame)
            is_key = (prev_luma is None or pict == "I" or bool(frame.key_frame)
                      or (height, width) != prev_size)
            replaced = 0.0
            if is_key:
                field = np.zeros(field_shape(height, width), np.float32)
                path = "none"
            else:
                vectors = frame_motion_vectors(frame)
                if vectors is None or len(vectors) == 0:
                    field, _ = match_blocks(luma, prev_luma, radius=radius)
                    path, replaced = "block_matching", 1.0
                else:
                    field, covered = codec_field(vectors, height, width)
                    path = "codec"
                    if validate:
                        result = validate_field(luma, prev_luma, field, covered, prev_field,
                                                radius=radius)
                        field = result.field
                        replaced = float(result.replaced.mean())
                        if replaced > 0:
                            path = "validated"
            time = float(frame.time) if frame.time is not None else None
            yield MotionFrame(index=index, image=image, field=field, is_key=is_key,
                              motion_source=path, pict_type=pict, replaced_fraction=replaced,
                              time=time)
            prev_field = None if is_key else field
            # A view of the Y plane keeps the frame's reference-counted buffer alive, so the
            # decoder cannot reuse it for the next frame: no copy needed.
            prev_luma = luma
            prev_size = (height, width)
            index += 1
    finally:
        container.close()
    if index == 0 and max_frames != 0:
        raise MotionSourceError(f"{name}: no decodable video frames")


__all__ = ["MotionFrame", "MotionSourceError", "MOTION_SOURCES", "RGBConverter", "codec_field",
           "decode_rgb_only", "frame_rgb", "iter_motion", "open_source"]
