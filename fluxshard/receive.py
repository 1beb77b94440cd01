"""The cloud receive layer: rebuild a stream's input exactly as the edge's mirror predicts.

One function, :func:`rebuild_input`, used by both ends: the server applies each request to its
per-stream cache, and the edge client applies the same request to its mirror of that cache, so the
two stay bit-identical and their digests (:func:`fluxshard.wire.cache_digest`) agree.

H.264 requests (``Codec.H264``) carry a packet instead: :class:`ReceiveState` keeps the stream's
decoder (``fluxshard.uplink_h264.H264Decoder``), and the edge's mirror keeps its own, fed the same
packets, so both hold the same decoded pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.motion.field import warp  # the motion layer owns alignment semantics
from fluxshard.wire import Codec, Request, block_view, cache_digest


class ResyncNeeded(RuntimeError):
    """The receiver cannot apply this frame (unknown stream, no cache, frame out of order, size
    change); the sender must send a key frame. The message always contains 'resync needed'."""

    def __init__(self, reason: str):
        super().__init__(f"resync needed: {reason}")
        self.reason = reason


def rebuild_input(cache: np.ndarray | None, request: Request,
                  aligned: np.ndarray | None = None) -> np.ndarray:
    """The new input cache after ``request``: the key frame itself, or ``cache`` aligned with the
    request's field and overwritten by its residual blocks. Never modifies ``cache``.
    ``aligned``: ``cache`` already warped with the request's field (a sender's residual set)."""
    if request.key:
        return request.frame
    if cache is None:
        raise ResyncNeeded("a residual frame arrived with no cached input")
    if cache.shape != (request.height, request.width, 3):
        raise ResyncNeeded(f"frame size {request.height}x{request.width} differs from the cached "
                           f"{cache.shape[0]}x{cache.shape[1]}")
    if aligned is None:
        aligned = warp(cache, request.field)
    b = request.block
    padded = np.zeros((-(-request.height // b) * b, -(-request.width // b) * b, 3), np.uint8)
    padded[:request.height, :request.width] = aligned
    block_view(padded, b)[request.residual_mask] = request.tiles
    return np.ascontiguousarray(padded[:request.height, :request.width])


@dataclass
class ReceiveState:
    """One endpoint's view of a stream's input cache (the server's, or the edge's mirror)."""

    cache: np.ndarray | None = None
    frame_index: int = -1
    digest: bytes = b""
    decoder: object | None = None  # H264: this stream's decoder (an IDR starts a fresh one)
    packet_seq: int = -1  # H264: the last packet decoded since its IDR
    # H264: decode the pixels (the cloud) or only the picture's digest (the edge's mirror, which
    # then holds the frame it sent as its cache: the reference its next residual is measured to)
    pixels: bool = True

    def apply(self, request: Request, aligned: np.ndarray | None = None) -> np.ndarray:
        """Check order, rebuild, commit; returns the new cache. A failed apply leaves the state as
        it was (an H.264 decoder that failed is dropped: the next frame must be an IDR). An H.264
        request gets its decoded ``frame``, ``field`` and ``residual_mask`` filled in.
        ``aligned``: the cache already warped with the request's field (see rebuild_input)."""
        if request.codec == Codec.H264:
            return self._apply_h264(request)
        if not request.key:
            if self.cache is None:
                raise ResyncNeeded("no key frame received for this stream")
            if request.frame_index <= self.frame_index:
                raise ResyncNeeded(f"frame {request.frame_index} is out of order (last applied "
                                   f"frame {self.frame_index})")
        new_cache = rebuild_input(self.cache, request, aligned)
        self.cache, self.frame_index = new_cache, request.frame_index
        self.digest = cache_digest(new_cache)
        return new_cache

    def _apply_h264(self, request: Request) -> np.ndarray:
        from fluxshard.uplink_h264 import H264DecodeError, H264Decoder

        if not self.pixels and (request.frame is None or
                                request.frame.shape[:2] != (request.height, request.width)):
            raise ValueError("the mirror of an H.264 stream needs the frame it sent in "
                             "request.frame")
        if request.key:
            # the bound has room for the decoder's own padding (it checks aligned sizes); the
            # exact size is checked after decoding
            decoder = H264Decoder(self.pixels, max_pixels=(request.height + 128)
                                  * (request.width + 128))
        else:
            if self.cache is None or self.decoder is None:
                raise ResyncNeeded("no IDR decoded for this stream (or its decoder failed)")
            if request.frame_index <= self.frame_index:
                raise ResyncNeeded(f"frame {request.frame_index} is out of order (last applied "
                                   f"frame {self.frame_index})")
            if request.packet_seq != self.packet_seq + 1:
                raise ResyncNeeded(f"H.264 packet {request.packet_seq} does not follow packet "
                                   f"{self.packet_seq} (a packet was lost or repeated)")
            decoder = self.decoder
        try:
            decoded = decoder.decode(request.packet)
        except H264DecodeError as e:
            self.decoder = None
            raise ResyncNeeded(str(e)) from None
        if decoded.key != request.key or decoded.shape != (request.height, request.width):
            self.decoder = None
            raise ResyncNeeded(f"H.264 packet decoded to a {decoded.shape[1]}x{decoded.shape[0]} "
                               f"{'IDR' if decoded.key else 'P'} frame; the header says "
                               f"{request.width}x{request.height} {'IDR' if request.key else 'P'}")
        if self.pixels:
            request.frame = decoded.image
            if not request.key:
                request.field = decoded.field
                request.residual_mask = _any_in_blocks(decoded.intra, request.block // 4)
        self.decoder, self.packet_seq = decoder, request.packet_seq
        self.cache, self.frame_index = request.frame, request.frame_index
        self.digest = decoded.digest
        return request.frame

    def reset(self) -> None:
        self.cache, self.frame_index, self.digest = None, -1, b""
        self.decoder, self.packet_seq = None, -1


def _any_in_blocks(mask: np.ndarray, factor: int) -> np.ndarray:
    """(H4, W4) bool at 4 px -> (ceil(H4/f), ceil(W4/f)): any set in each f x f group."""
    h, w = mask.shape
    padded = np.zeros((-(-h // factor) * factor, -(-w // factor) * factor), bool)
    padded[:h, :w] = mask
    return padded.reshape(padded.shape[0] // factor, factor, -1, factor).any(axis=(1, 3))

