"""The one path into an endpoint (fluxshard.endpoint): what the edge measures is what the cloud
rebuilds, the cache is warped once per residual frame, and the transport's own path (a caller's
field and mask) sends the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fluxshard import receive, wire
from fluxshard.endpoint import EndpointPath, Uplink
from fluxshard.motion.field import source_validity
from fluxshard.motion.state import invalid_blocks
from fluxshard.receive import ReceiveState
from fluxshard.wire import Codec

H, W, B = 72, 104, 16  # not multiples of the block: edge blocks are partial
TAU = 12 / 255


def panning_clip(frames: int = 6, step: int = 3):
    """Frames of a textured scene panning ``step`` px right per frame, with their fields (pixel
    x came from x + d in the previous frame) and, on frame 2, a changed patch."""
    rng = np.random.default_rng(7)
    width = W + step * frames
    coarse = rng.uniform(0, 255, (H // 8 + 1, width // 8 + 1, 1)).repeat(3, 2)  # grey
    scene = np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:H, :width]
    for axis in (0, 1):  # smooth enough that JPEG q90 stays within tau
        for _ in range(3):
            scene = (scene + np.roll(scene, 1, axis) + np.roll(scene, -1, axis)) / 3
    scene = scene.astype(np.uint8)
    field = np.zeros(wire.field_shape(H, W), np.float32)
    field[..., 0] = -step
    for t in range(frames):
        image = np.ascontiguousarray(scene[:, step * (frames - t): step * (frames - t) + W])
        if t == 2:
            image = image.copy()
            image[20:40, 30:60] = 255 - image[20:40, 30:60]
        yield image, (None if t == 0 else field + 0.3)  # sub-pel: quantized on the wire


@pytest.mark.parametrize("codec", [Codec.ZLIB, Codec.JPEG])
def test_remote_path_mirror_is_what_the_receiver_rebuilds(codec):
    path = EndpointPath(TAU, B, uplink=Uplink(B, codec, codec))
    receiver = ReceiveState()
    for t, (image, field) in enumerate(panning_clip()):
        step = path.step(image, field, key=t == 0, index=t)
        rebuilt = receiver.apply(wire.decode_request(step.sent.payload))
        np.testing.assert_array_equal(rebuilt, step.image)
        assert receiver.digest == path.uplink.mirror.digest
        assert step.key == (t == 0)
        if t:
            # the field the residual set used is the one the wire carries
            np.testing.assert_array_equal(step.field, wire.quantize_field(step.field))
            assert step.residual.mask.any() and not step.residual.mask.all()
        assert path.cache is path.uplink.mirror.cache  # one cache: the mirror's


def test_local_path_input_equals_lossless_cloud_rebuild():
    """The edge's assembled input is bit for bit what a lossless cloud rebuilds from the wire."""
    local = EndpointPath(TAU, B)
    remote = EndpointPath(TAU, B, uplink=Uplink(B))
    for t, (image, field) in enumerate(panning_clip()):
        a, b = local.step(image, field, t == 0, t), remote.step(image, field, t == 0, t)
        np.testing.assert_array_equal(a.image, b.image)
        assert a.tau == b.tau and a.key == b.key


def test_a_residual_frame_warps_the_cache_once(monkeypatch):
    calls = []
    real_warp = receive.warp
    monkeypatch.setattr(receive, "warp", lambda *a: calls.append(1) or real_warp(*a))
    import fluxshard.motion.state as state

    real_state_warp = state._warp
    monkeypatch.setattr(state, "_warp", lambda *a: calls.append(1) or real_state_warp(*a))
    path = EndpointPath(TAU, B, uplink=Uplink(B))
    frames = list(panning_clip())
    path.step(*frames[0], key=True, index=0)
    calls.clear()
    path.step(*frames[1], index=1)
    assert len(calls) == 1


def test_callers_field_and_mask_send_the_residual_sets_bytes():
    """Stream.send(frame, field, mask) and the SDK's residual set make the same payload and
    mirror (the first adds the invalid blocks itself)."""
    frames = list(panning_clip())
    path = EndpointPath(TAU, B, uplink=Uplink(B))
    path.step(*frames[0], key=True, index=0)
    path.accumulate(frames[1][1])
    residual, tau = path.residual_at_tau(frames[1][0])
    by_set = path.uplink.encode(frames[1][0], 1, tau=tau, residual=residual)
    raw_mask = residual.block_max_diff > residual.threshold
    raw_mask &= residual.block_max_diff < 256  # the caller's own mask: no invalid blocks
    by_caller = path.uplink.encode(frames[1][0], 1, tau=tau, field=path.field,
                                   residual_mask=raw_mask)
    assert by_set.payload == by_caller.payload
    assert by_set.mirror.digest == by_caller.mirror.digest


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 60), st.sampled_from(wire.ALLOWED_BLOCKS),
       st.integers(0, 2**32 - 1))
def test_invalid_blocks_from_the_field_match_per_pixel_validity(h, w, block, seed):
    field = np.random.default_rng(seed).uniform(-12, 12, wire.field_shape(h, w))
    field = field.astype(np.float32)
    valid = source_validity(field, h, w)
    hr, wr = wire.residual_grid(h, w, block)
    padded = np.ones((hr * block, wr * block), bool)
    padded[:h, :w] = valid
    per_pixel = ~padded.reshape(hr, block, wr, block).all(axis=(1, 3))
    np.testing.assert_array_equal(invalid_blocks(field, h, w, block), per_pixel)
