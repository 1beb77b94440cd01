"""The uplink payload between the edge and the cloud: compact, versioned, validated.

A request is one frame of one stream, either

* a **key frame**: the full RGB frame, lossless, which resets the receiver's input cache; or
* a **residual frame**: the accumulated motion field from the receiver's cache to this frame plus
  the pixels of the residual blocks. The receiver aligns its cache with the field and overwrites the
  residual blocks (see :mod:`fluxshard.receive`).

Layout (little endian)::

    header  magic "FXS" | version u8 | flags u8 | codec u8 | block u8 | tau u8
            frame_index u64 | height u16 | width u16 | body_len u32 | raw_len u32 | crc32 u32
    body    codec-compressed bytes that decompress to exactly raw_len bytes:
            key frame:      the (H, W, 3) frame, 2-D differenced
            residual frame: field int16 (Hf, Wf, 2) quarter-pel
                            | block bitmap (packbits of the (Hr, Wr) mask, row-major)
                            | one (block, block, 3) tile per residual block, row-major block order,
                              each 2-D differenced; edge tiles are padded by edge replication

2-D differencing (``x - left - up + upleft``, mod 256; undone by two cumulative sums) turns smooth
image content into small values: a 640x384 synthetic key frame takes 0.48 of the raw bytes against
0.80 for plain zlib and 0.55 for PNG, and residual tiles 39% fewer bytes than undifferenced
(perf/wire_size.py). The field needs no such step: it compresses to ~2 kB as it is.

Codecs (header byte): ``ZLIB`` (the default: lossless as above), ``RAW`` (no compression) and
``JPEG``: the pixels (the key frame, or the residual tiles laid out in a mosaic of whole tiles)
travel as one baseline JPEG (quality :data:`JPEG_QUALITY`, Pillow); field and bitmap stay as above
and the body is zlib'ed as a whole. JPEG is lossy, so the edge's mirror of the cloud's cache must
apply the *decoded* payload (``decode_request(payload)``), which the client does; both ends then
hold the same pixels, and the digest check catches any decoder that disagrees (resync).

``H264`` (:mod:`fluxshard.uplink_h264`): the body is ``packet_seq u32 | one H.264 packet`` (Annex
B, not zlib'ed: it is entropy-coded already). The key flag marks an IDR (``packet_seq`` 0); a
P-frame's ``packet_seq`` counts the encoder's packets since that IDR, so the receiver's decoder
sees a lost or repeated packet and asks for a resync. The header is unchanged (wire version 2): a
peer that predates the codec refuses it as an unknown codec. The receiver decodes with its
stream's own decoder and fills in the request's frame, field (the decoder's vectors) and mask
(intra-coded blocks) in :meth:`fluxshard.receive.ReceiveState.apply`; the edge runs the
same decoder on its own packets for its mirror.

Loss (lossless codecs): the motion field travels as int16 quarter-pel (``round(4 d) / 4``), the only lossy step.
The receiver must apply exactly the field the edge's mirror applies, so the edge quantizes its field
with :func:`quantize_field` *before* it aligns its mirror and picks residual blocks; then both ends
apply bit-identical fields. Codec MVs are quarter-pel already, so for them this changes nothing.

tau (``fluxshard.tau``) travels in whole grey levels (0..255 = tau 0..1): the receiver's executor
truncates with exactly the tau the edge's dispatch layer picked the residual blocks with.

The response (Triton output tensors, see :func:`response_tensors`): DETECTIONS float32 (N, 6)
``x1, y1, x2, y2, score, class``, STATS JSON (uint8 bytes), DIGEST uint8 (16,) xxh3-128 of the
rebuilt input cache, which the edge compares with its mirror to detect divergence, and MASKS uint8
bytes: a segment model's instance masks (:func:`encode_masks`: each mask's box in the frame the
server ran on, then one bit per pixel inside the boxes, zlib-compressed: a few hundred bytes an
object), empty for a detect model.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass, field as dataclass_field

import numpy as np
import xxhash

MAGIC = b"FXS"
VERSION = 3  # 2: the reserved header byte carries tau; 3: digests are xxh3-128
HEADER = struct.Struct("<3sBBBBBQHHIII")
HEADER_SIZE = HEADER.size

FLAG_KEY = 0x01  # key frame: the body is the full frame
KNOWN_FLAGS = FLAG_KEY

MV_BLOCK = 4  # motion field: one vector per 4x4 pixel block (docs/CONVENTIONS.md)
FIELD_SCALE = 4  # quarter-pel
FIELD_LIMIT = np.iinfo(np.int16).max / FIELD_SCALE  # largest |displacement| the wire carries (px)

# Caps that bound what a hostile payload can make the receiver allocate (decompression bombs).
MAX_SIDE = 4096
MAX_PIXELS = 4096 * 2304
ALLOWED_BLOCKS = (4, 8, 16, 32, 64)
DIGEST_SIZE = 16
ZLIB_LEVEL = 3  # on a differenced 640x384 frame: 7% more bytes than level 6 at 1/4 the time


class Codec(enum.IntEnum):
    RAW = 0  # no compression (debugging, or links where CPU is scarcer than bytes)
    ZLIB = 1
    JPEG = 2  # pixels as JPEG (lossy: mirror the decoded payload), field and bitmap zlib'ed
    H264 = 3  # one H.264 packet per frame, decoded by a per-stream decoder (stateful)

    @property
    def lossy(self) -> bool:
        return self in (Codec.JPEG, Codec.H264)

    @property
    def compressed_body(self) -> bool:
        """Whether the body is zlib'ed (RAW and H.264 bodies travel as they are)."""
        return self not in (Codec.RAW, Codec.H264)


JPEG_QUALITY = 90
PACKET_SEQ = struct.Struct("<I")  # H264 body prefix: packets since the last IDR
MOSAIC_COLUMNS = 32  # residual tiles per mosaic row (JPEG codec)


class PayloadError(ValueError):
    """A payload that is not a valid FluxShard request; the message says what is wrong."""


@dataclass
class Request:
    """A decoded request. ``field`` is the dequantized float32 field (None on key frames);
    ``residual_mask`` is (Hr, Wr) bool; ``tiles`` the residual blocks' pixels, uint8
    (N, block, block, 3) in row-major block order, edge tiles padded (None on key frames);
    ``frame`` the full frame on key frames."""

    frame_index: int
    height: int
    width: int
    block: int
    key: bool
    frame: np.ndarray | None = None
    field: np.ndarray | None = None
    residual_mask: np.ndarray | None = None
    tiles: np.ndarray | None = None
    wire_bytes: int = 0
    tau: float = 0.0  # on the [0, 1] input scale, a multiple of 1/255 (fluxshard.tau)
    codec: Codec = Codec.ZLIB
    packet: bytes | None = None  # H264: the packet, until the receiver's decoder fills frame/field
    packet_seq: int = 0  # H264: packets since the last IDR (0 on the IDR)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass
class Response:
    """What the cloud answers for one frame."""

    detections: np.ndarray  # (N, 6) float32 x1, y1, x2, y2, score, class
    digest: bytes  # xxh3-128 of the rebuilt input cache (cache_digest)
    stats: dict = dataclass_field(default_factory=dict)
    masks: np.ndarray | None = None  # (N, H, W) bool in the rebuilt frame's pixels; seg only

    @property
    def frame_index(self) -> int:
        return int(self.stats.get("frame_index", -1))


def field_shape(height: int, width: int) -> tuple[int, int, int]:
    return -(-height // MV_BLOCK), -(-width // MV_BLOCK), 2


def residual_grid(height: int, width: int, block: int) -> tuple[int, int]:
    return -(-height // block), -(-width // block)


def quantize_field(field: np.ndarray) -> np.ndarray:
    """The field exactly as the receiver will see it (quarter-pel, float32). The edge applies this
    to its own copy so both ends align with identical vectors."""
    return _field_to_int16(field).astype(np.float32) / FIELD_SCALE


def _field_to_int16(field: np.ndarray) -> np.ndarray:
    field = np.asarray(field)
    if not np.issubdtype(field.dtype, np.floating) and not np.issubdtype(field.dtype, np.integer):
        raise ValueError(f"motion field must be numeric, got {field.dtype}")
    if not np.all(np.isfinite(field)):
        raise ValueError("motion field has NaN or infinite vectors")
    if np.abs(field).max(initial=0) > FIELD_LIMIT:
        raise ValueError(f"motion field has a vector longer than {FIELD_LIMIT:.0f} px; the wire "
                         "carries int16 quarter-pel")
    return np.rint(field.astype(np.float64) * FIELD_SCALE).astype(np.int16)


def block_view(image: np.ndarray, block: int) -> np.ndarray:
    """(Hr*b, Wr*b, C) -> a (Hr, Wr, b, b, C) view of its blocks (writes go through)."""
    hp, wp, c = image.shape
    return image.reshape(hp // block, block, wp // block, block, c).swapaxes(1, 2)


def pad_to_blocks(image: np.ndarray, block: int, mode: str = "edge") -> np.ndarray:
    """Pad (H, W, C) bottom/right to whole blocks (edge replication: zero after differencing)."""
    h, w = image.shape[:2]
    ph, pw = -h % block, -w % block
    if ph == 0 and pw == 0:
        return image
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)


def residual_tiles(frame: np.ndarray, residual_mask: np.ndarray, block: int) -> np.ndarray:
    """The (N, b, b, 3) tiles of ``frame`` under ``residual_mask``, row-major block order."""
    return block_view(pad_to_blocks(frame, block), block)[residual_mask]


def diff2d(x: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """``x - left - up + upleft`` (uint8, mod 256) along ``axes`` (rows, columns)."""
    d = np.diff(x, axis=axes[1], prepend=np.zeros_like(x.take([0], axis=axes[1])))
    return np.diff(d, axis=axes[0], prepend=np.zeros_like(d.take([0], axis=axes[0])))


def undiff2d(d: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    return np.cumsum(np.cumsum(d, axis=axes[0], dtype=np.uint8), axis=axes[1], dtype=np.uint8)


# --------------------------------------------------------------------------------------- encode

def encode_key_frame(frame: np.ndarray, frame_index: int, block: int = 16,
                     codec: Codec = Codec.ZLIB, tau: float = 0.0) -> bytes:
    """A key frame: the full (H, W, 3) uint8 frame, lossless. ``tau``: see the module doc."""
    frame = _check_frame(frame)
    _check_block(block)
    h, w = frame.shape[:2]
    raw = jpeg_encode(frame) if Codec(codec).lossy else diff2d(frame, (0, 1)).tobytes()
    return _header(FLAG_KEY, codec, block, frame_index, h, w, raw, tau)


def encode_residual_frame(frame: np.ndarray, field: np.ndarray, residual_mask: np.ndarray,
                          frame_index: int, block: int = 16, codec: Codec = Codec.ZLIB,
                          tau: float = 0.0) -> bytes:
    """A residual frame: the accumulated field (quantized) and the pixels of ``frame`` inside the
    residual blocks of ``residual_mask`` ((Hr, Wr) bool, Hr = ceil(H / block))."""
    frame = _check_frame(frame)
    h, w = frame.shape[:2]
    _check_block(block)
    field = np.asarray(field)
    if field.shape != field_shape(h, w):
        raise ValueError(f"motion field shape {field.shape} does not fit a {h}x{w} frame "
                         f"(expected {field_shape(h, w)})")
    residual_mask = np.asarray(residual_mask)
    if residual_mask.dtype != bool or residual_mask.shape != residual_grid(h, w, block):
        raise ValueError(f"residual mask must be bool {residual_grid(h, w, block)} for a {h}x{w} "
                         f"frame and block {block}, got {residual_mask.dtype} {residual_mask.shape}")
    tiles = residual_tiles(frame, residual_mask, block)
    pixels = jpeg_encode(_mosaic(tiles)) if Codec(codec).lossy else diff2d(tiles, (1, 2)).tobytes()
    raw = (_field_to_int16(field).tobytes() + np.packbits(residual_mask, axis=None).tobytes()
           + pixels)
    return _header(0, codec, block, frame_index, h, w, raw, tau)


def encode_h264_frame(packet: bytes, frame_index: int, height: int, width: int, key: bool,
                      packet_seq: int, block: int = 16, tau: float = 0.0) -> bytes:
    """One H.264 packet (an IDR when ``key``) of a ``height`` x ``width`` frame; ``packet_seq``:
    the encoder's packets since that IDR (0 on it)."""
    _check_block(block)
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE and height * width <= MAX_PIXELS):
        raise ValueError(f"frame {height}x{width} is outside the wire's limits")
    if not packet:
        raise ValueError("an H.264 frame needs a non-empty packet")
    if not 0 <= packet_seq < 2**32 or (key and packet_seq != 0) or (not key and packet_seq == 0):
        raise ValueError(f"packet_seq {packet_seq} does not fit a {'key' if key else 'P'} frame "
                         "(0 exactly on IDRs)")
    raw = PACKET_SEQ.pack(packet_seq) + bytes(packet)
    return _header(FLAG_KEY if key else 0, Codec.H264, block, frame_index, height, width, raw, tau)


def _mosaic(tiles: np.ndarray) -> np.ndarray:
    """(N, b, b, 3) tiles -> one image of whole tiles, MOSAIC_COLUMNS a row, zero-filled (tiles
    of 16 px are whole JPEG MCUs, so one tile's pixels never bleed into another's)."""
    n, b = tiles.shape[:2]
    cols = max(1, min(n, MOSAIC_COLUMNS))
    rows = -(-n // cols)
    grid = np.zeros((rows * cols, b, b, 3), np.uint8)
    grid[:n] = tiles
    return grid.reshape(rows, cols, b, b, 3).swapaxes(1, 2).reshape(rows * b, cols * b, 3)


def _unmosaic(image: np.ndarray, n: int, b: int) -> np.ndarray:
    rows, cols = image.shape[0] // b, image.shape[1] // b
    return image.reshape(rows, b, cols, b, 3).swapaxes(1, 2).reshape(rows * cols, b, b, 3)[:n]


def jpeg_encode(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 RGB -> baseline JPEG bytes (Pillow); empty for an empty image."""
    import io

    from PIL import Image

    if image.size == 0:
        return b""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def jpeg_decode(data: bytes, height: int, width: int) -> np.ndarray:
    """Decode a JPEG that must be exactly height x width RGB (checked before decoding, so a
    hostile header cannot make us allocate more)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if height * width == 0:
        if data:
            raise PayloadError("pixel bytes present where no pixels are expected")
        return np.zeros((height, width, 3), np.uint8)
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            if image.size != (width, height) or image.mode not in ("RGB", "L", "YCbCr"):
                raise PayloadError(f"JPEG is {image.size[0]}x{image.size[1]} {image.mode}, "
                                   f"expected {width}x{height} RGB")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise PayloadError(f"pixels are not a valid JPEG: {e}") from None
    except Image.DecompressionBombError as e:  # Pillow's own size guard, hit while opening
        raise PayloadError(f"JPEG header claims an absurd size: {e}") from None


def _header(flags, codec, block, frame_index, h, w, raw: bytes, tau: float = 0.0) -> bytes:
    """Header + compressed body."""
    from fluxshard.tau import quantize_tau, tau_levels

    if not 0 <= frame_index < 2**63:
        raise ValueError(f"frame index {frame_index} out of range")
    levels = tau_levels(quantize_tau(tau))  # refuses a tau off the [0, 1] scale
    codec = Codec(codec)
    body = zlib.compress(raw, ZLIB_LEVEL) if codec.compressed_body else raw
    return HEADER.pack(MAGIC, VERSION, flags, int(codec), block, levels, frame_index, h, w, len(body),
                       len(raw), zlib.crc32(raw)) + body


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 \
            or frame.shape[2] != 3:
        desc = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"frame must be uint8 (H, W, 3) RGB, got {desc}")
    h, w = frame.shape[:2]
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and h * w <= MAX_PIXELS):
        raise ValueError(f"frame {h}x{w} is outside the wire's limits ({MAX_SIDE} px a side, "
                         f"{MAX_PIXELS} pixels)")
    return np.ascontiguousarray(frame)


def _check_block(block: int) -> None:
    if block not in ALLOWED_BLOCKS:
        raise ValueError(f"residual block {block} not supported; choose from {ALLOWED_BLOCKS}")


# --------------------------------------------------------------------------------------- decode

def peek_header(payload: bytes) -> dict:
    """The header fields, validated, without touching the body."""
    if len(payload) < HEADER_SIZE:
        raise PayloadError(f"payload of {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte "
                           "header (truncated, or not a FluxShard request)")
    magic, version, flags, codec, block, tau_levels, frame_index, h, w, body_len, raw_len, crc = \
        HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {magic!r}: not a FluxShard request")
    if version != VERSION:
        raise PayloadError(f"wire version {version} is not supported (this end speaks {VERSION})")
    if flags & ~KNOWN_FLAGS:
        raise PayloadError(f"unknown flags 0x{flags:02x}")
    try:
        codec = Codec(codec)
    except ValueError:
        raise PayloadError(f"unknown codec {codec}") from None
    key = bool(flags & FLAG_KEY)
    if block not in ALLOWED_BLOCKS:
        raise PayloadError(f"residual block {block} not supported ({ALLOWED_BLOCKS})")
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and h * w <= MAX_PIXELS):
        raise PayloadError(f"frame size {h}x{w} outside the limits ({MAX_SIDE} px a side, "
                           f"{MAX_PIXELS} pixels)")
    if frame_index >= 2**63:
        raise PayloadError(f"frame index {frame_index} out of range")
    if len(payload) != HEADER_SIZE + body_len:
        raise PayloadError(f"payload is {len(payload)} bytes, header says {HEADER_SIZE + body_len} "
                           "(truncated or trailing bytes)")
    cap = max_raw_len(h, w, block, key, codec)
    if raw_len > cap:
        raise PayloadError(f"declared body size {raw_len} exceeds the {cap} bytes a {h}x{w} frame "
                           "can need")
    return dict(key=key, codec=codec, block=block, frame_index=frame_index, height=h, width=w,
                body_len=body_len, raw_len=raw_len, crc=crc, tau=tau_levels / 255)


def max_raw_len(h: int, w: int, block: int, key: bool, codec: Codec) -> int:
    if codec == Codec.H264:  # one coded picture never needs more than its raw RGB (+ headers)
        return PACKET_SEQ.size + h * w * 3 + 4096
    # a JPEG of noise at high quality can exceed the raw pixels; never by 2x (+ headers)
    pixels = (lambda n: 2 * n + 4096) if codec.lossy else (lambda n: n)
    if key:
        return pixels(h * w * 3)
    fh, fw, _ = field_shape(h, w)
    rh, rw = residual_grid(h, w, block)
    return fh * fw * 2 * 2 + -(-rh * rw // 8) + pixels(rh * rw * block * block * 3)


def decode_request(payload: bytes | bytearray | memoryview | np.ndarray) -> Request:
    """Parse and validate a request; raises :class:`PayloadError` on anything malformed."""
    if isinstance(payload, np.ndarray):
        payload = payload.tobytes()
    payload = bytes(payload)
    hdr = peek_header(payload)
    body = payload[HEADER_SIZE:]
    h, w, block = hdr["height"], hdr["width"], hdr["block"]
    common = dict(frame_index=hdr["frame_index"], height=h, width=w, block=block, key=hdr["key"],
                  wire_bytes=len(payload), tau=hdr["tau"], codec=hdr["codec"])
    raw = _decompress(body, hdr["codec"], hdr["raw_len"])
    if zlib.crc32(raw) != hdr["crc"]:
        raise PayloadError("body checksum mismatch (corrupted payload)")
    if hdr["codec"] == Codec.H264:
        if len(raw) <= PACKET_SEQ.size:
            raise PayloadError(f"H.264 body of {len(raw)} bytes holds no packet")
        (seq,) = PACKET_SEQ.unpack_from(raw)
        if (seq == 0) != hdr["key"]:
            raise PayloadError(f"H.264 packet_seq {seq} on a {'key' if hdr['key'] else 'P'} "
                               "frame (0 exactly on IDRs)")
        return Request(packet=raw[PACKET_SEQ.size:], packet_seq=seq, **common)
    lossy = hdr["codec"].lossy
    if hdr["key"]:
        if lossy:
            return Request(frame=jpeg_decode(raw, h, w), **common)
        if len(raw) != h * w * 3:
            raise PayloadError(f"key frame body is {len(raw)} bytes, a {h}x{w} RGB frame is "
                               f"{h * w * 3}")
        frame = undiff2d(np.frombuffer(raw, np.uint8).reshape(h, w, 3), (0, 1))
        return Request(frame=frame, **common)
    fh, fw, _ = field_shape(h, w)
    rh, rw = residual_grid(h, w, block)
    n_field = fh * fw * 2 * 2
    n_bitmap = -(-rh * rw // 8)
    if len(raw) < n_field + n_bitmap:
        raise PayloadError(f"residual body of {len(raw)} bytes is shorter than its field and "
                           f"bitmap ({n_field + n_bitmap} bytes)")
    q = np.frombuffer(raw, np.int16, count=fh * fw * 2).reshape(fh, fw, 2)
    field = q.astype(np.float32) / FIELD_SCALE
    bits = np.frombuffer(raw, np.uint8, count=n_bitmap, offset=n_field)
    all_bits = np.unpackbits(bits)
    if all_bits[rh * rw:].any():
        raise PayloadError("residual bitmap has bits set past the last block")
    mask = all_bits[:rh * rw].astype(bool).reshape(rh, rw)
    n_tiles = int(mask.sum())
    if lossy:
        cols = max(1, min(n_tiles, MOSAIC_COLUMNS))
        rows = -(-n_tiles // cols) if n_tiles else 0
        mosaic = jpeg_decode(raw[n_field + n_bitmap:], rows * block, cols * block if n_tiles else 0)
        tiles = _unmosaic(mosaic, n_tiles, block) if n_tiles else np.zeros((0, block, block, 3),
                                                                             np.uint8)
        return Request(field=field, residual_mask=mask, tiles=np.ascontiguousarray(tiles),
                       **common)
    tiles = np.frombuffer(raw, np.uint8, offset=n_field + n_bitmap)
    if tiles.size != n_tiles * block * block * 3:
        raise PayloadError(f"residual pixels are {tiles.size} bytes, the bitmap's {n_tiles} "
                           f"blocks need {n_tiles * block * block * 3}")
    tiles = undiff2d(tiles.reshape(n_tiles, block, block, 3), (1, 2))
    return Request(field=field, residual_mask=mask, tiles=tiles, **common)


def _decompress(body: bytes, codec: Codec, raw_len: int) -> bytes:
    if not codec.compressed_body:
        if len(body) != raw_len:
            raise PayloadError(f"raw body is {len(body)} bytes, header says {raw_len}")
        return body
    d = zlib.decompressobj()
    try:
        # max_length caps what we inflate: a bomb stops at raw_len + 1 bytes
        raw = d.decompress(body, raw_len + 1)
    except zlib.error as e:
        raise PayloadError(f"body does not decompress: {e}") from None
    if len(raw) != raw_len or d.unconsumed_tail or not d.eof:
        raise PayloadError(f"body decompresses to {'more than ' if len(raw) > raw_len else ''}"
                           f"{len(raw)} bytes{' (incomplete stream)' if not d.eof else ''}, "
                           f"header says {raw_len}")
    if d.unused_data:
        raise PayloadError("trailing bytes after the compressed body")
    return raw


# ------------------------------------------------------------------------------------- response

def cache_digest(cache: np.ndarray) -> bytes:
    """xxh3-128 of an input cache (an RGB frame, or an H.264 picture's YUV planes), shape
    included. It detects a mirror that drifted from the cloud, not tampering, so a
    non-cryptographic hash does: it runs on every frame at both ends, at memory speed."""
    h = xxhash.xxh3_128()
    h.update(struct.pack(f"<{1 + cache.ndim}I", cache.ndim, *cache.shape))
    h.update(np.ascontiguousarray(cache).data)
    return h.digest()


MASKS_HEADER = struct.Struct("<III")  # masks, height, width
MASK_BOX = struct.Struct("<HHHH")  # per mask: top, left, height, width of the box its bits fill


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, 4) top, left, height, width of each mask's set pixels (zeros for an empty mask)."""
    boxes = np.zeros((len(masks), 4), np.int64)
    rows, cols = masks.any(2), masks.any(1)
    for k, (r, c) in enumerate(zip(rows, cols)):
        if r.any():
            ys, xs = np.flatnonzero(r), np.flatnonzero(c)
            boxes[k] = ys[0], xs[0], ys[-1] + 1 - ys[0], xs[-1] + 1 - xs[0]
    return boxes


def encode_masks(masks: np.ndarray | None) -> bytes:
    """(N, H, W) bool masks -> bytes: the count and frame size, each mask's box (the rectangle
    around its set pixels), then the bits inside the boxes (one per pixel, row-major, mask after
    mask) zlib-compressed. Masks are cropped to their detections' boxes, so the bits scale with
    the objects' area, not the frame's. None (a detect model) -> no bytes."""
    if masks is None:
        return b""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype != bool:
        raise ValueError(f"masks must be (N, H, W) bool, got {masks.dtype} {masks.shape}")
    boxes = _mask_boxes(masks)
    inside = [m[y:y + h, x:x + w].ravel() for m, (y, x, h, w) in zip(masks, boxes)]
    bits = np.packbits(np.concatenate(inside)) if inside else np.zeros(0, np.uint8)
    return (MASKS_HEADER.pack(*masks.shape) + b"".join(MASK_BOX.pack(*b) for b in boxes)
            + zlib.compress(bits.tobytes(), 1))


def decode_masks(data: bytes, count: int) -> np.ndarray | None:
    """:func:`encode_masks`' bytes -> (``count``, H, W) bool (``count``: the detections they
    belong to), or None when there are none (a detect model). The frame size is bounded like a
    request's, every box must lie in the frame, and the body must inflate to exactly the bits
    the boxes name."""
    if not data:
        return None
    if len(data) < MASKS_HEADER.size:
        raise PayloadError(f"MASKS: {len(data)} bytes, shorter than its header")
    n, h, w = MASKS_HEADER.unpack_from(data)
    if n != count:
        raise PayloadError(f"MASKS holds {n} masks for {count} detections")
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and h * w <= MAX_PIXELS):
        raise PayloadError(f"MASKS frame {h}x{w} outside the limits ({MAX_SIDE} px a side, "
                           f"{MAX_PIXELS} pixels)")
    body = MASKS_HEADER.size + n * MASK_BOX.size
    if len(data) < body:
        raise PayloadError(f"MASKS: {len(data)} bytes, shorter than the boxes of {n} masks")
    boxes = np.array([MASK_BOX.unpack_from(data, MASKS_HEADER.size + k * MASK_BOX.size)
                      for k in range(n)], np.int64).reshape(n, 4)
    if ((boxes[:, 0] + boxes[:, 2]) > h).any() or ((boxes[:, 1] + boxes[:, 3]) > w).any():
        raise PayloadError(f"MASKS: a mask's box reaches outside the {h}x{w} frame")
    areas = boxes[:, 2] * boxes[:, 3]
    want = -(-int(areas.sum()) // 8)
    inflate = zlib.decompressobj()
    try:
        bits = inflate.decompress(data[body:], want)
    except zlib.error as e:
        raise PayloadError(f"MASKS body is not zlib: {e}") from None
    if len(bits) != want or inflate.unconsumed_tail or not inflate.eof:
        raise PayloadError(f"MASKS body does not inflate to the {want} bytes its {n} boxes name")
    flat = np.unpackbits(np.frombuffer(bits, np.uint8), count=int(areas.sum())).view(bool)
    masks = np.zeros((n, h, w), bool)
    start = 0
    for m, (y, x, bh, bw), area in zip(masks, boxes, areas):
        m[y:y + bh, x:x + bw] = flat[start:start + area].reshape(bh, bw)
        start += area
    return masks


def response_tensors(response: Response) -> dict[str, np.ndarray]:
    """The Triton output tensors of a response."""
    det = np.ascontiguousarray(response.detections, dtype=np.float32).reshape(-1, 6)
    stats = np.frombuffer(json.dumps(response.stats, separators=(",", ":")).encode(), np.uint8)
    digest = np.frombuffer(response.digest, np.uint8)
    if digest.size != DIGEST_SIZE:
        raise ValueError(f"digest must be {DIGEST_SIZE} bytes")
    masks = np.frombuffer(encode_masks(response.masks), np.uint8)
    return {"DETECTIONS": det, "STATS": stats.copy(), "DIGEST": digest.copy(),
            "MASKS": masks.copy()}


def response_from_tensors(detections: np.ndarray, stats: np.ndarray, digest: np.ndarray,
                          masks: np.ndarray | None = None) -> Response:
    """Parse the output tensors (batch dimension of 1 allowed) into a :class:`Response`;
    ``masks`` None or empty: no masks (a detect model, or a server from before masks)."""
    tensors = (("DETECTIONS", detections), ("STATS", stats), ("DIGEST", digest))
    if masks is not None:
        tensors += (("MASKS", masks),)
    for name, tensor in tensors:
        if np.asarray(tensor).dtype.kind not in "biuf":
            raise PayloadError(f"{name} must be a numeric tensor, got {np.asarray(tensor).dtype}")
    det = np.asarray(detections, dtype=np.float32)
    if det.ndim == 3 and det.shape[0] == 1:
        det = det[0]
    if det.ndim != 2 or det.shape[1] != 6:
        raise PayloadError(f"DETECTIONS must be (N, 6), got {det.shape}")
    digest = np.asarray(digest, np.uint8).reshape(-1)
    if digest.size != DIGEST_SIZE:
        raise PayloadError(f"DIGEST must be {DIGEST_SIZE} bytes, got {digest.size}")
    try:
        stats_dict = json.loads(np.asarray(stats, np.uint8).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PayloadError(f"STATS is not JSON: {e}") from None
    if not isinstance(stats_dict, dict):
        raise PayloadError(f"STATS must be a JSON object, got {type(stats_dict).__name__}")
    frame_index = stats_dict.get("frame_index", -1)
    if type(frame_index) is not int:
        raise PayloadError(f"STATS frame_index must be an integer, got {frame_index!r:.40}")
    mask_bytes = b"" if masks is None else np.asarray(masks, np.uint8).reshape(-1).tobytes()
    return Response(detections=det, digest=digest.tobytes(), stats=stats_dict,
                    masks=decode_masks(mask_bytes, len(det)))


__all__ = ["MAGIC", "VERSION", "Codec", "PayloadError", "Request", "Response", "quantize_field",
           "encode_key_frame", "encode_residual_frame", "encode_h264_frame", "decode_request", "peek_header",
           "cache_digest", "response_tensors", "response_from_tensors", "encode_masks", "decode_masks", "residual_tiles", "block_view", "pad_to_blocks",
           "field_shape", "residual_grid", "jpeg_encode", "jpeg_decode"]
