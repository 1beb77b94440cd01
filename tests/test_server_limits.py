"""Issue 14, what one hostile client may cost the server: frame-size limit, stream ownership
(per-stream secret), END that always frees the session, a session cap with a clear "server full",
and memory handed back after END. In-process SessionManager where that is the whole story, a
real tritonserver where Triton's part (slots, request parameters, error codes) matters."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import require_triton

from fluxshard import wire
from fluxshard.serving.limits import (FrameLimits, FrameTooLarge, derived_max_streams,
                                      max_streams_from_parameters, release_memory, rss_mb)
from fluxshard.receive import ResyncNeeded
from fluxshard.digest_scene import Scene, residual_mask
from perf.reliability_kit import StreamDriver
from fluxshard.serving.session import ServerFull, SessionManager
from fluxshard.serving.tritonserver import TritonServer

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


class NullSession:
    """The cheapest compute: no detections (the limits are about what happens around it)."""

    full_frame = False
    executor_kind = "null"

    def infer(self, rebuilt_frame, field, residual_mask, key, tau=0.0):
        return np.zeros((0, 6), np.float32), {}

    def close(self):
        pass


def manager(**kwargs) -> SessionManager:
    return SessionManager(lambda corrid: NullSession(), **kwargs)


def key_payload(t: int = 0, seed: int = 1) -> bytes:
    return wire.encode_key_frame(Scene(seed).frame(t), t)


def residual_payload(t: int, seed: int = 1) -> bytes:
    scene = Scene(seed)
    prev, frame = scene.frame(t - 1), scene.frame(t)
    zero = np.zeros(wire.field_shape(*frame.shape[:2]), np.float32)
    return wire.encode_residual_frame(frame, zero, residual_mask(prev, frame, zero), t)


def oversized_payload(height: int, width: int) -> bytes:
    """A flat key frame of height x width whose body checksum is wrong: refused from its header,
    it never gets as far as the checksum (decoding it would say "checksum mismatch")."""
    payload = bytearray(wire.encode_key_frame(np.zeros((height, width, 3), np.uint8), 0))
    payload[28:32] = (zlib.crc32(b"not the body") & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(payload)


# ----------------------------------------------------------------------------- in-process

def test_frames_over_the_limit_are_refused_from_the_header_before_decoding():
    sessions = manager()
    for h, w in ((1090, 1920), (1088, 1922), (2304, 4096)):
        with pytest.raises(FrameTooLarge, match=rf"frame {w}x{h} is larger than this server "
                                                r"accepts.*max_frame_side / max_frame_pixels"):
            sessions.handle(1, True, False, oversized_payload(h, w), "s")
    assert sessions.streams == {}
    with pytest.raises(wire.PayloadError, match="checksum"):  # within limits: decoded, refused
        sessions.handle(1, True, False, oversized_payload(1088, 1920), "s")
    # both orientations of the default camera size fit; a smaller limit is honoured
    for h, w in ((1088, 1920), (1920, 1088)):
        FrameLimits().check(h, w)
    small = manager(frame_limits=FrameLimits(max_side=96, max_pixels=64 * 96))
    small.handle(1, True, False, key_payload(), "s")
    with pytest.raises(FrameTooLarge):
        small.handle(2, True, False, wire.encode_key_frame(np.zeros((64, 97, 3), np.uint8), 0))


def test_a_stranger_gets_the_unknown_stream_answer_and_cannot_read_reset_or_end():
    sessions = manager()
    sessions.handle(7, True, False, key_payload(0), "owner")
    sessions.handle(7, False, False, residual_payload(1), "owner")
    unknown = None
    with pytest.raises(ResyncNeeded) as nobody:
        sessions.handle(8, False, False, residual_payload(2), "stranger")
    unknown = str(nobody.value).replace(" 8 ", " 7 ")
    for start, end, payload in ((False, False, residual_payload(2)),  # read its next answer
                                (False, False, key_payload(2)),  # re-open it
                                (True, False, key_payload(2)),  # reset it
                                (False, True, residual_payload(2)),  # end it
                                (False, True, b"garbage")):  # end it with a bad payload
        with pytest.raises((ResyncNeeded, wire.PayloadError)) as refused:
            sessions.handle(7, start, end, payload, "stranger")
        if isinstance(refused.value, ResyncNeeded):
            assert str(refused.value) == unknown  # no frame counter, nothing of the stream's own
    # the owner's stream went on as if nothing happened
    assert set(sessions.streams) == {7} and sessions.streams[7].frames == 2
    response = sessions.handle(7, False, False, residual_payload(2), "owner")
    assert response.frame_index == 2 and response.digest == wire.cache_digest(Scene(1).frame(2))
    # a START by an id nobody holds and by a stream's owner both work; a residual START is
    # refused alike for held and free ids
    with pytest.raises(ResyncNeeded, match="must be a key frame"):
        sessions.handle(7, True, False, residual_payload(3), "stranger")
    with pytest.raises(ResyncNeeded, match="must be a key frame"):
        sessions.handle(9, True, False, residual_payload(3), "stranger")
    sessions.handle(7, True, False, key_payload(5), "owner")


def test_the_owner_reopens_a_stream_the_server_forgot_with_a_key_frame():
    now = [0.0]
    sessions = manager(idle_seconds=10, clock=lambda: now[0])
    sessions.handle(3, True, False, key_payload(0), "owner")
    now[0] = 11.0
    assert sessions.sweep() == [3]
    with pytest.raises(ResyncNeeded, match="unknown stream 3"):
        sessions.handle(3, False, False, residual_payload(1), "owner")
    assert sessions.handle(3, False, False, key_payload(1), "owner").frame_index == 1
    with pytest.raises(ResyncNeeded, match="unknown stream 3"):  # and it is the owner's again
        sessions.handle(3, True, False, key_payload(2), "stranger")


def test_end_frees_the_session_whatever_its_payload():
    sessions = manager(max_streams=3)
    for corrid in (1, 2, 3):
        sessions.handle(corrid, True, False, key_payload(), f"s{corrid}")
    with pytest.raises(ServerFull, match="server full.*max_streams.*retry later"):
        sessions.handle(4, True, False, key_payload(), "s4")
    for corrid, payload in ((1, b"not a payload"), (2, oversized_payload(2304, 4096)),
                            (3, residual_payload(1)[:-3])):
        with pytest.raises(wire.PayloadError):
            sessions.handle(corrid, False, True, payload, f"s{corrid}")
    assert sessions.streams == {}
    # a one-request sequence (START and END together, the supervisor's probe) needs no room
    for corrid in (4, 5, 6):
        sessions.handle(corrid, True, False, key_payload(), "s")
    assert sessions.handle(99, True, True, key_payload(), "probe").frame_index == 0
    assert set(sessions.streams) == {4, 5, 6}


def test_max_streams_is_derived_from_the_memory_budget():
    assert derived_max_streams(8192, 512) == 16 and derived_max_streams(100, 512) == 1
    assert max_streams_from_parameters({"max_streams": "auto", "memory_budget_mb": "4096",
                                        "session_memory_mb": "512"}) == 8
    assert max_streams_from_parameters({"max_streams": "5"}) == 5
    with pytest.raises(ValueError, match="needs the memory_budget_mb"):
        max_streams_from_parameters({"max_streams": "auto", "session_memory_mb": "512"})
    with pytest.raises(ValueError, match="must be > 0"):
        derived_max_streams(0, 512)


@pytest.mark.parametrize("config", ["config.pbtxt", "configs/gpu.pbtxt"])
def test_slots_idle_timeout_and_stream_cap_are_chosen_together(config):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    parsed = text_format.Parse((REPOSITORY / "fluxshard" / config).read_text(),
                               model_config_pb2.ModelConfig())
    params = {k: v.string_value for k, v in parsed.parameters.items()}
    max_streams = max_streams_from_parameters(params)
    # room for the probe and for refused starts beyond the model's own cap, per instance
    assert parsed.sequence_batching.oldest.max_candidate_sequences == max_streams + 4
    assert parsed.sequence_batching.max_sequence_idle_microseconds == 30_000_000
    assert FrameLimits.from_parameters(params) == FrameLimits()


def test_sdk_streams_get_unguessable_ids_and_secrets_unless_given():
    from fluxshard_client import FluxShardClient

    client = FluxShardClient("127.0.0.1:1")  # connects lazily: nothing is sent here
    a, b = client.open_stream(), client.open_stream()
    assert a.stream_id != b.stream_id and all(0 < s.stream_id < 2**63 for s in (a, b))
    assert a.core.secret != b.core.secret and len(a.core.secret) >= 32
    explicit = client.open_stream(42, secret="mine")
    assert explicit.stream_id == 42 and explicit.core.secret == "mine"
    client.close()


def test_memory_a_session_held_is_returned_after_end():
    """A 640x384 session on the default executor, opened and ended three times: what it held
    comes back (glibc trim), and ending sessions does not ratchet the process up. Bounds from
    runs here: a session holds about 40 MB over the ended state, and the ended state moves by a
    few MB between rounds; the bounds leave 2-4x margin."""
    from fluxshard.sessions import yolo_session_factory

    sessions = SessionManager(yolo_session_factory("exact"))
    h, w = 384, 640
    scene = Scene(5, h, w)
    zero = np.zeros(wire.field_shape(h, w), np.float32)

    def one_session(corrid: int) -> tuple[float, float]:
        prev = None
        for t in range(3):
            frame = scene.frame(t)
            payload = (wire.encode_key_frame(frame, t) if prev is None else
                       wire.encode_residual_frame(frame, zero, residual_mask(prev, frame, zero), t))
            sessions.handle(corrid, prev is None, False, payload, "s")
            prev = frame
        release_memory()
        held = rss_mb()
        with pytest.raises(wire.PayloadError):
            sessions.handle(corrid, False, True, b"END with a bad payload", "s")
        return held, rss_mb()

    one_session(1)  # one-off allocations of this frame size (executor plans, allocator pools)
    rounds = [one_session(corrid) for corrid in (2, 3, 4)]
    assert sessions.streams == {}
    for held, after in rounds:
        assert held - after > 20, rounds  # the session's memory went back
    afters = [after for _, after in rounds]
    assert max(afters) - min(afters) < 12, rounds


# ----------------------------------------------------------------------------- real server

@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """The fluxshard model with room for 2 streams an instance (slots stay at the config's)."""
    require_triton()
    log = tmp_path_factory.mktemp("limits") / "server.log"
    with TritonServer(models=["fluxshard"], log_file=log,
                      parameters={"max_streams": "2"}) as server:
        yield server


def raw_infer(client, payload: bytes, stream_id: int, start: bool, end: bool, secret: str):
    return client.infer(payload, stream_id, start, end, secret=secret)


def test_server_refuses_an_oversized_frame_while_a_healthy_stream_keeps_its_results(small_server):
    from fluxshard_client import FluxShardClient
    from tritonclient.utils import InferenceServerException

    healthy = StreamDriver(small_server.grpc_url, 5101, seed=3)
    for _ in range(2):
        healthy.send_next()
    with FluxShardClient(small_server.grpc_url) as attacker:
        huge = wire.encode_key_frame(np.zeros((2304, 4096, 3), np.uint8), 0)
        with pytest.raises(InferenceServerException,
                           match="bad payload: frame 4096x2304 is larger than this server accepts"):
            raw_infer(attacker, huge, 5102, True, False, "a")
    for _ in range(2):
        healthy.send_next()
    report = healthy.stop()
    assert report.frames_answered == 4 and report.unaffected, report


def test_server_stranger_cannot_touch_a_stream_and_end_always_frees(small_server):
    from fluxshard_client import FluxShardClient
    from tritonclient.utils import InferenceServerException

    url = small_server.grpc_url
    owner = StreamDriver(url, 5201, seed=4)  # an explicit id: the one a stranger guessed
    for _ in range(2):
        owner.send_next()
    with FluxShardClient(url) as stranger:
        with pytest.raises(InferenceServerException) as nobody:
            raw_infer(stranger, residual_payload(3, seed=4), 5299, True, False, "x")
        messages = []
        for start, end, payload in ((False, False, residual_payload(2, seed=4)),
                                    (True, False, key_payload(2, seed=4)),
                                    (False, True, key_payload(2, seed=4))):
            with pytest.raises(InferenceServerException) as refused:
                raw_infer(stranger, payload, 5201, start, end, "stranger")
            messages.append(refused.value.message())
        assert "must be a key frame" in nobody.value.message()
        unknown = ("resync needed: unknown stream 5201 (server restarted, stream timed out, or "
                   "the stream secret does not match)")
        assert messages == [unknown] * 3
        # the owner's frames are all answered from the right input (the stranger's END freed
        # Triton's slot, so one frame re-opens the sequence with START, its own secret)
        for _ in range(3):
            owner.send_next()
        report = owner.stop()
        assert report.frames_lost == 0 and report.frames_answered == 5, report

        # room for 2 streams: fill it, get a clear "server full", END both with bad payloads,
        # and the room is back
        for corrid in (5211, 5212):
            raw_infer(stranger, key_payload(0), corrid, True, False, f"s{corrid}")
        with pytest.raises(InferenceServerException, match="server full") as full:
            raw_infer(stranger, key_payload(0), 5213, True, False, "s5213")
        assert "UNAVAILABLE" in str(full.value.status())
        for corrid in (5211, 5212):
            with pytest.raises(InferenceServerException, match="bad payload"):
                raw_infer(stranger, b"\0" * 8, corrid, False, True, f"s{corrid}")
        for corrid in (5214, 5215):
            raw_infer(stranger, key_payload(0), corrid, True, False, f"s{corrid}")
        for corrid in (5213, 5214, 5215):  # 5213's refused START holds a slot until this END
            raw_infer(stranger, key_payload(1), corrid, False, True, f"s{corrid}")


def test_a_server_idle_timeout_is_written_into_the_sequence_models_configs(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from fluxshard.serving.tritonserver import (DEFAULT_MODEL_REPOSITORY,
                                                repository_with_parameters)

    repo = repository_with_parameters(DEFAULT_MODEL_REPOSITORY, {}, tmp_path / "repo",
                                      idle_timeout_s=2.5)
    read = {}
    for config in sorted(repo.glob("*/config.pbtxt")) + sorted(repo.glob("*/configs/*.pbtxt")):
        message = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        read[str(config.relative_to(repo))] = (message.HasField("sequence_batching"),
                                              message.sequence_batching
                                              .max_sequence_idle_microseconds)
    assert read["fluxshard/config.pbtxt"] == (True, 2_500_000)
    assert all(us == 2_500_000 for sequence, us in read.values() if sequence)
    assert any(not sequence for sequence, _ in read.values())  # the dense model stays stateless
