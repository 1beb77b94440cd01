"""Issue 14, fuzzing: every decoder of untrusted bytes, driven by hypothesis.

* wire payloads of every codec (random bytes; valid payloads with flipped, cut or added bytes;
  header fields set to anything; bodies rewritten with a consistent checksum so the mutation
  reaches the body parsers): a :class:`PayloadError` or a well-formed request, and what decoding
  allocates stays bounded by the frame the header declares, never by a size field;
* real H.264 packets (PyAV's libx264) mutated, dropped, repeated and spliced, fed through the
  server's :class:`ReceiveState`: a decoded frame or :class:`ResyncNeeded`, and the next IDR
  always recovers the exact picture;
* the response tensors the SDK parses: a :class:`PayloadError` or a well-formed response;
* :class:`SessionManager` with the real exact executor, hostile streams interleaved with a
  healthy one: only the documented errors, and the healthy stream's answers identical to its
  solo run.

Examples are derandomized and no example database is kept, so CI runs the same cases every time;
``max_examples`` keeps the file to well under two minutes on two cores.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from fluxshard import wire
from fluxshard.receive import ReceiveState, ResyncNeeded
from fluxshard.digest_scene import Scene, residual_mask
from fluxshard.uplink_h264 import H264Encoder
from fluxshard.wire import Codec, PayloadError

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SCENE = Scene(seed=5)
H, W, B = SCENE.height, SCENE.width, 16
HEADER_FIELDS = ("magic", "version", "flags", "codec", "block", "tau", "frame_index", "height",
                 "width", "body_len", "raw_len", "crc")
# struct format letter -> every value the header field can carry
FIELD_VALUES = {"B": st.integers(0, 2**8 - 1), "H": st.integers(0, 2**16 - 1),
                "I": st.integers(0, 2**32 - 1), "Q": st.integers(0, 2**64 - 1),
                "3s": st.binary(min_size=3, max_size=3)}
FIELD_FORMATS = ("3s", "B", "B", "B", "B", "B", "Q", "H", "H", "I", "I", "I")


def _h264_packets(frames: list[np.ndarray]) -> list[bytes]:
    encoder = H264Encoder()
    return [encoder.encode(f, idr=i == 0)[0] for i, f in enumerate(frames)]


FRAMES = [SCENE.frame(t) for t in range(6)]
PACKETS = _h264_packets(FRAMES)
# another camera at another size: its packets spliced into this stream must be refused
OTHER_PACKETS = _h264_packets([Scene(seed=9, height=32, width=48).frame(t) for t in range(2)])


def _seed_payloads() -> dict[str, bytes]:
    """Valid payloads of every codec and frame kind: what the mutations start from."""
    rng = np.random.default_rng(0)
    zero = np.zeros(wire.field_shape(H, W), np.float32)
    moving = np.round(rng.uniform(-8, 8, wire.field_shape(H, W)) * 4).astype(np.float32) / 4
    dense_mask = rng.random(wire.residual_grid(H, W, B)) < 0.5
    seeds = {}
    for codec in (Codec.RAW, Codec.ZLIB, Codec.JPEG):
        name = codec.name.lower()
        seeds[f"{name} key"] = wire.encode_key_frame(FRAMES[0], 0, B, codec=codec, tau=0.1)
        seeds[f"{name} residual"] = wire.encode_residual_frame(
            FRAMES[1], zero, residual_mask(FRAMES[0], FRAMES[1], zero), 1, B, codec=codec)
        seeds[f"{name} residual, moving field"] = wire.encode_residual_frame(
            FRAMES[2], moving, dense_mask, 2, B, codec=codec)
    seeds["h264 idr"] = wire.encode_h264_frame(PACKETS[0], 0, H, W, True, 0, B)
    seeds["h264 p"] = wire.encode_h264_frame(PACKETS[1], 1, H, W, False, 1, B)
    return seeds


SEEDS = _seed_payloads()


def _raw_body(payload: bytes) -> bytes:
    hdr = wire.peek_header(payload)
    body = payload[wire.HEADER_SIZE:]
    return zlib.decompress(body) if hdr["codec"].compressed_body else body


# ------------------------------------------------------------------------------ mutations

@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """Flip, overwrite, cut, insert or append bytes anywhere (header included)."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "append", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=256))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def header_mutations(draw, payload: bytes) -> bytes:
    """Any header fields set to any value they can carry; the body kept."""
    fields = list(wire.HEADER.unpack_from(payload))
    for i in draw(st.sets(st.integers(0, len(fields) - 1), min_size=1, max_size=4)):
        fields[i] = draw(FIELD_VALUES[FIELD_FORMATS[i]])
    return wire.HEADER.pack(*fields) + payload[wire.HEADER_SIZE:]


@st.composite
def body_mutations(draw, payload: bytes) -> bytes:
    """The decompressed body mutated (and maybe the frame's size, block, kind or codec changed),
    then re-framed with a matching length and checksum: the mutation reaches the body parsers."""
    fields = dict(zip(HEADER_FIELDS, wire.HEADER.unpack_from(payload)))

    def sometimes() -> bool:  # one change at a time mostly: most combinations are inconsistent
        return draw(st.integers(0, 3)) == 0

    raw = draw(byte_mutations(_raw_body(payload))) if draw(st.booleans()) else _raw_body(payload)
    if sometimes():
        fields["height"] = draw(st.sampled_from([1, 2, H - 1, H, H + 1, 2 * H, wire.MAX_SIDE]))
        fields["width"] = draw(st.sampled_from([1, 3, W - 1, W, W + 16, wire.MAX_SIDE]))
    if sometimes():
        fields["block"] = draw(st.sampled_from(wire.ALLOWED_BLOCKS))
    if sometimes():
        fields["flags"] = draw(st.sampled_from([0, wire.FLAG_KEY]))
    if sometimes():
        fields["codec"] = int(draw(st.sampled_from(list(Codec))))
    body = zlib.compress(raw, 1) if Codec(fields["codec"]).compressed_body else raw
    fields.update(body_len=len(body), raw_len=len(raw), crc=zlib.crc32(raw))
    return wire.HEADER.pack(*fields.values()) + body


@st.composite
def hostile_payloads(draw) -> bytes:
    seed = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    how = draw(st.sampled_from(["bytes", "header", "body", "body", "random"]))
    if how == "bytes":
        return draw(byte_mutations(seed))
    if how == "header":
        return draw(header_mutations(seed))
    if how == "body":
        return draw(body_mutations(seed))
    # random bytes behind a plausible start, so they get past the magic and version checks
    prefix = draw(st.sampled_from([b"", wire.MAGIC, wire.MAGIC + bytes([wire.VERSION])]))
    return prefix + draw(st.binary(max_size=2 * wire.HEADER_SIZE + 64))


# ------------------------------------------------------------------------------ wire payloads

@contextmanager
def traced_peak():
    """The peak of Python and numpy allocations (numpy reports its buffers to tracemalloc)."""
    peak = [0]
    tracemalloc.start()
    try:
        yield peak
        peak[0] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Decoding holds the payload, its decompressed body, the frame and its cumulative sums, and the
# receiver (primed with one key frame) an aligned copy and the new cache: a few frames' worth of
# the frame the header declares, with headroom, never anything sized by a length field.
FRAME_COPIES = 8
ALLOCATION_SLACK = 256 << 10


def allocation_bound(payload: bytes) -> int:
    """What decoding and applying ``payload`` may allocate: a few copies of the frame its header
    declares (capped by the largest frame the wire carries) plus copies of the payload."""
    try:
        hdr = wire.peek_header(payload)
        frame_bytes = hdr["height"] * hdr["width"] * 3
    except PayloadError:
        frame_bytes = 0
    return FRAME_COPIES * frame_bytes + 4 * len(payload) + ALLOCATION_SLACK


def check_request(req: wire.Request, payload: bytes) -> None:
    """A decoded request is internally consistent, whatever the payload was."""
    hdr = wire.peek_header(payload)
    assert (req.height, req.width, req.block, req.key, req.codec) == (
        hdr["height"], hdr["width"], hdr["block"], hdr["key"], hdr["codec"])
    assert req.wire_bytes == len(payload) and 0 <= req.tau <= 1
    if req.codec == Codec.H264:
        assert req.packet and (req.packet_seq == 0) == req.key
    elif req.key:
        assert req.frame.shape == (req.height, req.width, 3) and req.frame.dtype == np.uint8
    else:
        hr, wr = wire.residual_grid(req.height, req.width, req.block)
        assert req.field.shape == wire.field_shape(req.height, req.width)
        assert np.isfinite(req.field).all()
        assert req.residual_mask.shape == (hr, wr) and req.residual_mask.dtype == bool
        assert req.tiles.shape == (req.residual_mask.sum(), req.block, req.block, 3)


def primed_receiver() -> ReceiveState:
    state = ReceiveState()
    state.apply(wire.decode_request(SEEDS["zlib key"]))
    return state


def decode_and_apply(payload: bytes) -> str:
    """Decode ``payload`` and apply it to a receiver holding this scene's key frame; -> outcome."""
    try:
        req = wire.decode_request(payload)
    except PayloadError:
        return "refused"
    check_request(req, payload)
    state = primed_receiver()
    try:
        cache = state.apply(req)
    except ResyncNeeded:
        return "resync"
    assert cache.shape == (req.height, req.width, 3) and cache.dtype == np.uint8
    assert len(state.digest) == wire.DIGEST_SIZE
    if req.codec != Codec.H264:  # an H.264 stream's digest is of the decoder's own picture
        assert state.digest == wire.cache_digest(cache)
    return "applied"


def test_every_seed_payload_decodes_and_applies():
    """The mutations start from valid payloads of every codec and frame kind (an H.264 P-frame
    needs its stream's IDR first)."""
    outcomes = {name: decode_and_apply(p) for name, p in SEEDS.items()}
    assert outcomes.pop("h264 p") == "resync" and set(outcomes.values()) == {"applied"}


def _bomb() -> bytes:
    """A largest key frame whose body inflates past its declared size."""
    raw_len = wire.MAX_PIXELS * 3
    body = zlib.compress(bytes(raw_len + (1 << 20)), 9)
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.FLAG_KEY, int(Codec.ZLIB), 16, 0, 0,
                            2304, 4096, len(body), raw_len, 0) + body


def _jpeg_claiming(height: int, width: int) -> bytes:
    """A JPEG key frame payload for this scene whose JPEG header claims another size."""
    jpeg = bytearray(wire.jpeg_encode(FRAMES[0]))
    sof = jpeg.index(b"\xff\xc0")  # baseline start of frame: length u16, precision u8, h, w
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    body = zlib.compress(jpeg)
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.FLAG_KEY, int(Codec.JPEG), B, 0, 0, H, W,
                            len(body), len(jpeg), zlib.crc32(jpeg)) + body


@settings(FUZZ, max_examples=1500)
@given(payload=hostile_payloads())
@example(payload=_bomb())
@example(payload=_jpeg_claiming(65535, 65535))  # Pillow's decompression-bomb limit, not ours
@example(payload=_jpeg_claiming(H, W + 1))
def test_hostile_payloads_are_refused_or_decoded_within_bounded_memory(payload):
    with traced_peak() as peak:
        outcome = decode_and_apply(payload)
    event(outcome)
    assert peak[0] <= allocation_bound(payload), (
        f"decoding a {len(payload)}-byte payload allocated {peak[0]} bytes")


# ------------------------------------------------------------------------------ H.264 packets

def _reference_decode() -> list[tuple[np.ndarray, bytes]]:
    """(picture, digest) of every packet, decoded in order by a fresh receiver."""
    state = ReceiveState()
    return [(state.apply(wire.decode_request(wire.encode_h264_frame(p, i, H, W, i == 0, i, B))),
             state.digest) for i, p in enumerate(PACKETS)]


REFERENCE = _reference_decode()


@st.composite
def packet_sends(draw):
    """One send: which packet (this stream's or another camera's), how it is damaged, and
    what the header claims about it."""
    source = draw(st.sampled_from(["this", "this", "this", "other"]))
    packets = PACKETS if source == "this" else OTHER_PACKETS
    i = draw(st.integers(0, len(packets) - 1))
    packet = packets[i]
    damage = draw(st.sampled_from(["none", "none", "bytes", "splice", "cut"]))
    if damage == "bytes":
        packet = draw(byte_mutations(packet))
    elif damage == "splice":
        other = draw(st.sampled_from(PACKETS + OTHER_PACKETS))
        packet = packet[:draw(st.integers(0, len(packet)))] + other[draw(
            st.integers(0, len(other) - 1)):]
    elif damage == "cut":
        packet = packet[:draw(st.integers(1, max(1, len(packet) - 1)))]
    packet = packet or b"\x00"
    key = draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else i == 0  # a lying key flag
    seq = 0 if key else draw(st.sampled_from([max(i, 1), max(i, 1), i + 1, 2**32 - 1]))
    height, width = draw(st.sampled_from([(H, W), (H, W), (32, 48), (H + 2, W)]))
    index_step = draw(st.sampled_from([1, 1, 1, 0, -1, 5]))
    return packet, key, seq, height, width, index_step, damage == "none" and source == "this"


@settings(FUZZ, max_examples=300)
@given(sends=st.lists(packet_sends(), min_size=1, max_size=8))
def test_damaged_h264_packets_decode_or_ask_for_a_resync_and_the_next_idr_recovers(sends):
    state = ReceiveState()
    index = 0
    for packet, key, seq, height, width, step, _intact in sends:
        index = max(0, index + step)
        req = wire.decode_request(wire.encode_h264_frame(packet, index, height, width, key, seq, B))
        try:
            image = state.apply(req)
        except ResyncNeeded:
            event("resync")
            continue
        event("decoded" if _intact else "damaged or spliced, yet decoded")
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert len(state.digest) == wire.DIGEST_SIZE and req.frame is image
        if not key:
            assert req.field.shape == wire.field_shape(height, width)
            assert req.residual_mask.shape == wire.residual_grid(height, width, B)
    # whatever happened, an intact IDR and the P-frames after it decode to the exact pictures
    for seq, packet in enumerate(PACKETS):
        index += 1
        req = wire.decode_request(wire.encode_h264_frame(packet, index, H, W, seq == 0, seq, B))
        picture, digest = REFERENCE[seq]
        np.testing.assert_array_equal(state.apply(req), picture)
        assert state.digest == digest


# ------------------------------------------------------------------------------ responses

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4), max_leaves=12)
numeric_dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32,
                                  np.uint8, np.int8, np.bool_])


def tensors(dtypes, max_dims: int = 3, max_side: int = 20):
    shapes = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side)
    return hnp.arrays(dtypes, shapes)


@st.composite
def stats_tensors(draw):
    how = draw(st.sampled_from(["json", "object", "object", "object", "bytes", "nested",
                                "other dtype", "strings"]))
    if how == "json":
        text = json.dumps(draw(json_values))
    elif how == "object":
        stats = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
        if draw(st.booleans()):
            stats["frame_index"] = draw(st.integers() | json_values)
        text = json.dumps(stats)
    elif how == "nested":  # deeper than json's recursion limit
        text = "[" * draw(st.integers(10, 20_000))
    else:
        text = None
    if text is not None:
        return np.frombuffer(text.encode(), np.uint8)
    if how == "bytes":
        return np.frombuffer(draw(st.binary(max_size=64)), np.uint8)
    if how == "strings":  # what Triton hands back for a BYTES tensor
        return np.array(draw(st.lists(st.binary(max_size=8), max_size=3)), dtype=object)
    return draw(tensors(numeric_dtypes, max_dims=2))


@st.composite
def detection_tensors(draw):
    if draw(st.booleans()):  # the right shape, any values
        return draw(hnp.arrays(np.float32, st.tuples(
            st.sampled_from([(), (1,)]), st.integers(0, 5)).map(lambda s: s[0] + (s[1], 6))))
    if draw(st.integers(0, 5)) == 0:
        return np.array([b"x1", b"y1"], dtype=object)
    return draw(tensors(numeric_dtypes))


@st.composite
def digest_tensors(draw):
    if draw(st.booleans()):
        return np.frombuffer(draw(st.binary(min_size=16, max_size=16)), np.uint8)
    if draw(st.integers(0, 5)) == 0:
        return np.array([b"0" * 16], dtype=object)
    return draw(tensors(numeric_dtypes, max_side=17))


@pytest.mark.filterwarnings("ignore:.*encountered in cast:RuntimeWarning")
@settings(FUZZ, max_examples=400)
@given(detections=detection_tensors(), stats=stats_tensors(), digest=digest_tensors())
@example(detections=np.zeros((1, 0, 6), np.float32), stats=np.frombuffer(b"[]", np.uint8),
         digest=np.zeros(16, np.uint8))
@example(detections=np.zeros((0, 6), np.float32),
         stats=np.frombuffer(b'{"frame_index": NaN}', np.uint8), digest=np.zeros(16, np.uint8))
def test_response_tensors_parse_to_a_response_or_a_clear_error(detections, stats, digest):
    try:
        response = wire.response_from_tensors(detections, stats, digest)
    except PayloadError as e:
        assert str(e)
        event("refused")
        return
    event("parsed")
    assert response.detections.dtype == np.float32 and response.detections.ndim == 2
    assert response.detections.shape[1] == 6
    assert isinstance(response.digest, bytes) and len(response.digest) == wire.DIGEST_SIZE
    assert isinstance(response.stats, dict) and isinstance(response.frame_index, int)


@st.composite
def mask_payloads(draw):
    """A MASKS body: encode_masks' bytes of random masks, then bytes flipped, cut or appended;
    or bytes of nothing in particular."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    shape = (draw(st.integers(0, 3)), draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    data = bytearray(wire.encode_masks(draw(hnp.arrays(np.bool_, shape))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


@settings(FUZZ, max_examples=400)
@given(data=mask_payloads(), count=st.integers(0, 4))
def test_mask_bytes_decode_to_masks_or_a_clear_error(data, count):
    try:
        masks = wire.decode_masks(data, count)
    except PayloadError as e:
        assert str(e)
        event("refused")
        return
    event("parsed")
    if masks is None:
        assert data == b""
        return
    assert masks.dtype == bool and masks.ndim == 3 and len(masks) == count
    assert masks.shape[1] * masks.shape[2] <= wire.MAX_PIXELS


# ------------------------------------------------------------------------------ the model's requests

@pytest.fixture(scope="module")
def exact_sessions():
    from fluxshard.sessions import yolo_session_factory

    return yolo_session_factory("exact", threads=1)


HEALTHY, HEALTHY_SECRET = 7, "the healthy stream's own secret"
TIMING_STATS = ("server_ms", "compute_ms")


def healthy_payloads() -> list[bytes]:
    zero = np.zeros(wire.field_shape(H, W), np.float32)
    payloads = [wire.encode_key_frame(FRAMES[0], 0, B)]
    for t in range(1, 4):
        mask = residual_mask(FRAMES[t - 1], FRAMES[t], zero)
        payloads.append(wire.encode_residual_frame(FRAMES[t], zero, mask, t, B))
    return payloads


def answer(response: wire.Response) -> tuple:
    """What a response says, without its timings."""
    stats = {k: v for k, v in response.stats.items() if k not in TIMING_STATS}
    return response.detections.tobytes(), response.digest, json.dumps(stats, sort_keys=True)


@st.composite
def hostile_requests(draw):
    """A stranger's request: any stream id (the healthy one's too), its own secrets."""
    corrid = draw(st.sampled_from([0, 1, 2, HEALTHY, HEALTHY + 1, 2**64 - 1]))
    secret = draw(st.sampled_from(["", "a", "b"]))
    payload = draw(st.sampled_from(sorted(SEEDS)).map(SEEDS.get) | hostile_payloads())
    return corrid, draw(st.booleans()), draw(st.booleans()), payload, secret


@pytest.fixture(scope="module")
def healthy_solo(exact_sessions):
    """The healthy stream's answers when it has the server to itself."""
    from fluxshard.serving.session import SessionManager

    payloads = healthy_payloads()
    solo = SessionManager(exact_sessions, clock=lambda: 0.0)
    return [answer(solo.handle(HEALTHY, t == 0, t == len(payloads) - 1, p,
                               secret=HEALTHY_SECRET)) for t, p in enumerate(payloads)]


@settings(FUZZ, max_examples=30)
@given(hostile=st.lists(st.tuples(st.integers(0, 3), hostile_requests()), max_size=10))
def test_session_manager_answers_hostile_streams_with_documented_errors_only(
        exact_sessions, healthy_solo, hostile):
    from fluxshard.serving.session import ServerFull, SessionManager

    payloads = healthy_payloads()
    last = len(payloads) - 1
    # few slots, so hostile streams also run into the cap
    manager = SessionManager(exact_sessions, max_streams=3, clock=lambda: 0.0)
    answers = []
    for t, p in enumerate(payloads):
        answers.append(answer(manager.handle(HEALTHY, t == 0, t == last, p,
                                             secret=HEALTHY_SECRET)))
        for _after, (corrid, start, end, payload, secret) in (h for h in hostile if h[0] == t):
            try:
                manager.handle(corrid, start, end, payload, secret=secret)
            except (PayloadError, ResyncNeeded, ServerFull) as e:
                assert str(e)
            held = manager.streams.get(corrid)
            assert not (end and held is not None and held.secret == secret), "END kept a session"
            assert len(manager.streams) <= manager.max_streams
    assert answers == healthy_solo
    assert HEALTHY not in manager.streams
