"""The cloud uplink through a real video codec: one low-latency H.264 encoder per cloud stream on
the edge, one decoder per stream on the cloud (and one on the edge for its mirror).

The edge feeds its encoder only the frames it dispatches to the cloud, so each P-frame codes
exactly the change since the cloud last ran: the codec's motion field and transform-coded
residual, with skipped macroblocks nearly free. Key frames (first frame, resync, scene cut) are
IDR frames. The cloud takes the decoded frame as its input and the decoder's motion vectors as
the accumulated field (backward, to the cloud's previous input: the only reference).

Determinism: H.264 decoding is bit-exact by the standard (every conforming decoder, any SIMD
path, gives the same YUV), and the YUV -> RGB conversion uses swscale's bit-exact flags
(:class:`fluxshard.motion.decode.RGBConverter`), so edge and cloud decoding the same packets hold
the same pixels and the digest check holds across CPUs. The *encoder* need not be reproducible
(the edge mirrors what it sent, not what it meant to send), so it runs x264's SIMD kernels at
real-time speed instead of ``asm=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

DEFAULT_CRF = 21  # quality per link: lower is better and larger (x264's constant rate factor)
CRF_RANGE = (10, 45)
DEFAULT_PRESET = "veryfast"


class H264DecodeError(ValueError):
    """A packet the stream's decoder cannot decode (corrupt, or not following the last one)."""


def encoder_options(crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET) -> dict[str, str]:
    """libx264 options for the uplink: no B-frames and one reference (every P-frame predicts from
    the cloud's previous input only, so the decoder's vectors are the accumulated field), zero
    latency (one packet out per frame in), no key frames of its own (the edge decides: first
    frame, resync, scene cut), one thread (the edge's cores run the executor)."""
    if not CRF_RANGE[0] <= int(crf) <= CRF_RANGE[1]:
        raise ValueError(f"H.264 uplink quality (crf) must be in {CRF_RANGE}, got {crf}")
    return {"crf": str(int(crf)), "preset": preset, "tune": "zerolatency",
            "forced-idr": "1",
            "x264-params": "ref=1:bframes=0:keyint=infinite:min-keyint=infinite:scenecut=0:"
                           "threads=1:repeat-headers=1:log-level=error"}


class H264Encoder:
    """One cloud stream's encoder. ``encode(frame, idr)`` -> the frame's packet (Annex B bytes,
    SPS/PPS in front of every IDR so a fresh decoder can start there)."""

    def __init__(self, crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET):
        self.options = encoder_options(crf, preset)
        self.crf, self.preset = int(crf), preset
        self.opened_crf: int | None = None  # the crf the open encoder codes at
        self._ctx = None
        self._shape: tuple[int, int] | None = None
        self._pts = 0

    def _open(self, height: int, width: int) -> None:
        import av

        if height % 2 or width % 2:
            raise ValueError(f"the H.264 uplink needs even frame sides (yuv420p), got "
                             f"{width}x{height}")
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base = Fraction(1, 30)
        ctx.thread_count = 1
        ctx.options = dict(self.options)
        ctx.open()
        self._ctx, self._shape, self._pts = ctx, (height, width), 0
        self.opened_crf = self.crf

    def set_crf(self, crf: int) -> None:
        """Code at ``crf`` from the next frame on. FFmpeg reconfigures x264's crf only through a
        private option PyAV cannot set on an open encoder, so a change reopens it: the next
        frame is an IDR (:class:`LinkRate` weighs that)."""
        self.options = encoder_options(crf, self.preset)
        self.crf = int(crf)

    def encode(self, frame: np.ndarray, idr: bool) -> tuple[bytes, bool]:
        """-> (packet bytes, whether it is an IDR). A new frame size reopens the encoder (IDR)."""
        import av

        import cv2

        h, w = frame.shape[:2]
        if self._ctx is None or self._shape != (h, w) or self.opened_crf != self.crf:
            self._open(h, w)
            idr = True
        if idr:
            self._pts = 0  # nothing before an IDR is referenced
        # OpenCV's BT.601 I420 (the limited range the decoder's RGB conversion assumes): 10x
        # faster than swscale's bit-exact path, and the encoder's input need not be reproducible
        yuv = av.VideoFrame.from_ndarray(cv2.cvtColor(np.ascontiguousarray(frame),
                                                      cv2.COLOR_RGB2YUV_I420), format="yuv420p")
        yuv.pts = self._pts
        yuv.pict_type = av.video.frame.PictureType.I if idr else av.video.frame.PictureType.NONE
        self._pts += 1
        packets = self._ctx.encode(yuv)
        if len(packets) != 1:  # zero latency: exactly one packet per frame (checked, not assumed)
            raise RuntimeError(f"the H.264 encoder returned {len(packets)} packets for one frame")
        packet = packets[0]
        return bytes(packet), bool(packet.is_keyframe)

    def close(self) -> None:
        self._ctx = None


@dataclass
class DecodedFrame:
    digest: bytes  # of the decoded picture's YUV planes (wire.cache_digest): equal at both ends
    key: bool
    shape: tuple[int, int]  # (H, W)
    # with pixels (the cloud's decoder); None in the edge's mirror, which needs only the digest
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB, bit-exact on every CPU
    field: np.ndarray | None = None  # (ceil(H/4), ceil(W/4), 2) float32: backward to the previous input
    intra: np.ndarray | None = None  # (ceil(H/4), ceil(W/4)) bool: 4x4 blocks without a vector


class H264Decoder:
    """One stream's decoder (the cloud's, and the edge's mirror). Decodes one packet per call and
    returns the frame's digest, and with ``pixels`` (the cloud) its RGB image and the codec's
    motion field. The edge's mirror passes ``pixels=False``: it only checks that the cloud holds
    the same picture, so it skips the RGB conversion and the motion vectors. Any decoder error,
    or a packet that does not produce exactly one frame, raises :class:`H264DecodeError`; the
    decoder is then unusable until the next IDR (a fresh decoder). ``max_pixels``: pictures
    larger than this are refused before they are allocated."""

    def __init__(self, pixels: bool = True, max_pixels: int | None = None):
        import av

        from fluxshard.motion.decode import RGBConverter

        ctx = av.CodecContext.create("h264", "r")
        ctx.thread_count = 1  # frame threads would delay output by a frame
        # report damaged bitstreams instead of concealing them
        ctx.options = {"err_detect": "explode", **({"flags2": "+export_mvs"} if pixels else {}),
                       # a stream header declaring a larger picture than the request's header
                       # is refused before the decoder allocates it
                       **({"max_pixels": str(int(max_pixels))} if max_pixels else {})}
        self._ctx = ctx
        self.pixels = pixels
        self._to_rgb = RGBConverter() if pixels else None
        self.broken = False

    def decode(self, packet: bytes) -> DecodedFrame:
        import av

        from fluxshard.motion.decode import codec_field, frame_motion_vectors
        from fluxshard.wire import cache_digest

        if self.broken:
            raise H264DecodeError("the decoder failed earlier; it needs an IDR")
        try:
            frames = self._ctx.decode(av.Packet(packet))
        except av.error.FFmpegError as e:
            self.broken = True
            raise H264DecodeError(f"H.264 packet does not decode: {e}") from None
        if len(frames) != 1:
            self.broken = True
            raise H264DecodeError(f"H.264 packet decoded to {len(frames)} frames, expected 1")
        frame = frames[0]
        if frame.format.name != "yuv420p":
            self.broken = True
            raise H264DecodeError(f"H.264 picture in {frame.format.name}, the uplink sends "
                                  "yuv420p")
        key = bool(frame.key_frame)
        # the planes as the standard defines them (to_ndarray drops the line padding)
        decoded = DecodedFrame(cache_digest(frame.to_ndarray()), key, (frame.height, frame.width))
        if self.pixels:
            vectors = frame_motion_vectors(frame)
            decoded.field, covered = codec_field(vectors, frame.height, frame.width)
            decoded.intra = np.ones_like(covered) if key else ~covered
            decoded.image = self._to_rgb(frame)
        return decoded


# P-frame sizes are learned per bin of the residual fraction (share of blocks changed since the
# cloud last ran): a P-frame's bytes grow with it, roughly, and per scene
FRACTION_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7)


# x264's rate factor: about +6 crf halves a frame's bytes (the quantizer step doubles)
CRF_PER_HALVING = 6.0
DEFAULT_MAX_CRF = 35  # the worst quality the link may push the uplink to
DEFAULT_TRANSFER_BUDGET_S = 0.015  # a P-frame should cross the link within half a 30 fps frame
CRF_HYSTERESIS = 3  # better quality only when the link fits it with this much room


def crf_scale(crf_from: float, crf_to: float) -> float:
    """Bytes at ``crf_to`` over bytes at ``crf_from``, by x264's rule of thumb."""
    return 2.0 ** ((crf_from - crf_to) / CRF_PER_HALVING)


class LinkRate:
    """The uplink's quality follows the link (ApproxBit: the payload adapts to the link): the
    best crf, from the stream's own quality up to ``max_crf``, at which the P-frames the encoder
    has been producing cross the link within ``budget_s``. A change costs an IDR
    (:meth:`H264Encoder.set_crf`), so it happens at once only when an IDR is due anyway (first
    frame, resync); otherwise the link must call for it ``patience`` cloud frames in a row, and
    for better quality with ``CRF_HYSTERESIS`` to spare, so a noisy estimate does not flap.
    Better quality also waits until ``settle`` P-frames have followed the last IDR (even when
    an IDR is due): the first P-frames after one refer to a sharper picture than later ones and
    come out smaller, which would read as room on the link and switch back at once."""

    def __init__(self, base_crf: int = DEFAULT_CRF, max_crf: int = DEFAULT_MAX_CRF,
                 budget_s: float = DEFAULT_TRANSFER_BUDGET_S, patience: int = 4,
                 alpha: float = 0.3, settle: int = 8):
        if not CRF_RANGE[0] <= base_crf <= max_crf <= CRF_RANGE[1]:
            raise ValueError(f"need {CRF_RANGE[0]} <= base_crf <= max_crf <= {CRF_RANGE[1]}, got "
                             f"{base_crf}, {max_crf}")
        if not budget_s > 0 or patience < 1:
            raise ValueError("budget_s must be > 0 and patience >= 1")
        self.base_crf, self.max_crf = int(base_crf), int(max_crf)
        self.budget_s, self.patience, self.alpha, self.settle = budget_s, patience, alpha, settle
        self.p_frames_since_key = 0
        self.crf = self.base_crf
        self.changes = 0  # quality switches so far (each cost an IDR unless one was due)
        self.p_bytes_at_base: float | None = None  # EWMA of P-frame bytes, rescaled to base_crf
        self._streak = 0

    def observe(self, key: bool, nbytes: int, crf: int) -> None:
        """A packet the encoder produced at ``crf``."""
        if key:
            self.p_frames_since_key = 0
            return
        self.p_frames_since_key += 1
        at_base = nbytes * crf_scale(crf, self.base_crf)
        self.p_bytes_at_base = (at_base if self.p_bytes_at_base is None else
                                self.p_bytes_at_base + self.alpha * (at_base - self.p_bytes_at_base))

    def fitting_crf(self, link_bytes_per_s: float) -> int:
        """The best crf whose P-frames fit the budget on this link (max_crf if none does)."""
        if self.p_bytes_at_base is None or not link_bytes_per_s > 0:
            return self.crf
        budget = link_bytes_per_s * self.budget_s
        excess = np.log2(max(self.p_bytes_at_base, 1.0) / budget) * CRF_PER_HALVING
        return int(np.clip(self.base_crf + np.ceil(max(excess, 0.0)), self.base_crf, self.max_crf))

    def decide(self, link_bytes_per_s: float | None, idr_due: bool) -> int:
        """The crf for the next cloud frame."""
        if link_bytes_per_s is None:
            return self.crf
        wanted = self.fitting_crf(link_bytes_per_s)
        if self.p_frames_since_key < self.settle:  # not better yet, not even at a due IDR
            wanted = max(wanted, self.crf)
        if idr_due:
            self._switch(wanted)
        elif wanted > self.crf or wanted <= self.crf - CRF_HYSTERESIS:
            self._streak += 1
            if self._streak >= self.patience:
                self._switch(wanted)
        else:
            self._streak = 0
        return self.crf

    def _switch(self, crf: int) -> None:
        self.changes += crf != self.crf
        self.crf, self._streak = crf, 0


class BytesModel:
    """What an H.264 frame will cost on the wire, before it is encoded: bytes per pixel of IDRs,
    and of P-frames per bin of the residual fraction, each an EWMA of what the encoder produced
    (``observe``), kept at the default crf and rescaled to the crf asked for. The priors are
    rough guesses the first frames replace."""

    def __init__(self, alpha: float = 0.3, key_bpp: float = 0.25,
                 p_bpp: tuple[float, float] = (0.005, 0.06)):
        self.alpha = alpha
        self.key_bpp = key_bpp
        self.p_bpp = [p_bpp[0] + p_bpp[1] * f for f in FRACTION_BINS]

    @staticmethod
    def _bin(fraction: float) -> int:
        return max(0, int(np.searchsorted(FRACTION_BINS, float(fraction), side="right")) - 1)

    def estimate(self, key: bool, fraction: float, pixels: int, crf: int = DEFAULT_CRF) -> int:
        bpp = self.key_bpp if key else self.p_bpp[self._bin(fraction)]
        return int(bpp * pixels * crf_scale(DEFAULT_CRF, crf))

    def observe(self, key: bool, fraction: float, pixels: int, nbytes: int,
                crf: int = DEFAULT_CRF) -> None:
        """A frame of ``nbytes`` coded at ``crf`` (learned as its equivalent at the default)."""
        if pixels <= 0:
            return
        bpp = nbytes / pixels * crf_scale(crf, DEFAULT_CRF)
        if key:
            self.key_bpp += self.alpha * (bpp - self.key_bpp)
        else:
            i = self._bin(fraction)
            self.p_bpp[i] += self.alpha * (bpp - self.p_bpp[i])


__all__ = ["BytesModel", "LinkRate", "crf_scale", "FRACTION_BINS", "DEFAULT_CRF", "DEFAULT_MAX_CRF",
           "DEFAULT_PRESET", "DEFAULT_TRANSFER_BUDGET_S", "CRF_RANGE", "H264DecodeError",
           "H264Encoder", "H264Decoder", "DecodedFrame", "encoder_options"]
