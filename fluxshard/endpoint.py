"""The path into one endpoint of one stream, as it ships (docs/DESIGN.md, "Per frame, on the edge",
steps 2-4).

:class:`EndpointPath` owns, for one (stream, endpoint): the input cache the endpoint last ran on,
the motion accumulated since (sent quantized to the wire's quarter-pel, so the sender and the
receiver align with identical vectors), the residual set at the tau its policy picks (invalid
blocks folded in; the cache is warped once per frame), and for a remote endpoint its
:class:`Uplink`: the wire payload and the mirror of what the receiver rebuilds.

The SDK's dispatch (``fluxshard_client.stream``) and transport (``fluxshard_client.transport``),
the benchmarks, the truncation profile, the load test and ``export --verify`` all go through
these two classes, so what is measured is what ships. To change the uplink sequence
(accumulate -> quantize -> residual blocks -> invalid blocks -> encode -> mirror), change it here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fluxshard import wire
from fluxshard.motion.field import motion_statistic
from fluxshard.motion.state import RESIDUAL_BLOCK, EndpointState, ResidualSet, invalid_blocks
from fluxshard.receive import ReceiveState


@dataclass
class Sent:
    """One encoded frame: the payload, the mirror once the receiver applied it, key or not."""

    payload: bytes
    mirror: ReceiveState
    key: bool


class Uplink:
    """The sender's side of the wire for one stream: its codecs (``fluxshard.wire.Codec``), the
    mirror of the receiver's input cache, and with the H.264 uplink the stream's x264 encoder
    (``fluxshard.uplink_h264``), its packet numbering and the quality that follows the link.

    ``encode`` builds a payload and the mirror the receiver will hold after applying it without
    touching the current mirror; ``commit`` adopts that mirror once the receiver answered."""

    def __init__(self, block: int = RESIDUAL_BLOCK, key_codec: wire.Codec = wire.Codec.ZLIB,
                 residual_codec: wire.Codec = wire.Codec.ZLIB, quality: int | None = None):
        self.block = block
        self.key_codec = wire.Codec(key_codec)
        self.residual_codec = wire.Codec(residual_codec)
        self.encoder = self.link_rate = None
        if wire.Codec.H264 in (self.key_codec, self.residual_codec):
            if self.key_codec != self.residual_codec:
                raise ValueError("the H.264 uplink codes key and P-frames alike: pass "
                                 "key_codec=residual_codec=Codec.H264")
            from fluxshard.uplink_h264 import DEFAULT_CRF, DEFAULT_MAX_CRF, H264Encoder, LinkRate

            crf = DEFAULT_CRF if quality is None else quality
            self.encoder = H264Encoder(crf)
            self.link_rate = LinkRate(crf, max(crf, DEFAULT_MAX_CRF))
        # the uplink's bytes/s as the dispatcher measures it: the H.264 quality follows it
        self.link_bytes_per_s: float | None = None
        self.encoder_seq = 0  # packets the encoder produced since its last IDR
        # what the receiver's input cache holds, as far as we know (H.264: the picture's digest,
        # and the frame sent as the reference the next residual is measured to)
        self.mirror = ReceiveState(pixels=self.encoder is None)

    def encode(self, frame: np.ndarray, index: int, key: bool = False, tau: float = 0.0, *,
               field: np.ndarray | None = None, residual_mask: np.ndarray | None = None,
               residual: ResidualSet | None = None) -> Sent:
        """Encode ``frame`` (the full decoded frame) as frame ``index``: a key frame when asked,
        when the mirror cannot take a residual frame, or when no field and mask are given; else
        a residual frame from ``residual`` (an :class:`EndpointPath`'s set: its quantized field
        and mask, and its aligned cache when it was aligned from this mirror) or from ``field``
        and ``residual_mask`` (the field is quantized and invalid blocks are added here). The
        H.264 uplink needs neither: the codec finds the motion itself."""
        if residual is not None:
            field, residual_mask = residual.field, residual.mask
        key = key or (self.encoder is None and (field is None or residual_mask is None))
        if not key and self.mirror.cache is not None and self.mirror.cache.shape != frame.shape:
            key = True  # the resolution changed
        predicted = dataclasses.replace(self.mirror)
        if self.encoder is not None:
            return self._encode_h264(frame, key, index, tau, predicted)
        aligned = None
        if key:
            payload = wire.encode_key_frame(frame, index, self.block, codec=self.key_codec,
                                            tau=tau)
            request = wire.Request(index, frame.shape[0], frame.shape[1], self.block, True,
                                   frame=np.array(frame, copy=True, order="C"))
        else:
            h, w = frame.shape[:2]
            if (residual is not None and residual.reference is not None
                    and residual.reference is self.mirror.cache and residual.block == self.block):
                # picked on this mirror: the field is the wire's, invalid blocks are in the mask,
                # and the aligned cache is the receiver's (no second warp)
                field_q, mask, aligned = residual.field, residual.mask, residual.aligned
            else:
                field_q = wire.quantize_field(field)
                mask = np.asarray(residual_mask, bool) | invalid_blocks(field_q, h, w, self.block)
            payload = wire.encode_residual_frame(frame, field_q, mask, index, self.block,
                                                 codec=self.residual_codec, tau=tau)
            request = wire.Request(index, h, w, self.block, False, field=field_q,
                                   residual_mask=mask,
                                   tiles=wire.residual_tiles(frame, mask, self.block))
        if (self.key_codec if key else self.residual_codec).lossy:
            request = wire.decode_request(payload)  # the receiver will hold the decoded pixels
        predicted.apply(request, aligned)
        return Sent(payload, predicted, key)

    def _encode_h264(self, frame, key, index, tau, predicted: ReceiveState) -> Sent:
        frame = np.ascontiguousarray(frame)
        # an encoded packet the mirror never committed (its send failed) is the encoder's
        # reference now, but not the receiver's: start over from an IDR
        key = key or self.mirror.decoder is None or self.mirror.packet_seq != self.encoder_seq
        crf = self.link_rate.decide(self.link_bytes_per_s, idr_due=key)
        if crf != self.encoder.crf:
            self.encoder.set_crf(crf)  # the next packet is an IDR at the new quality
        packet, key = self.encoder.encode(frame, idr=key)
        self.link_rate.observe(key, len(packet), crf)
        self.encoder_seq = 0 if key else self.encoder_seq + 1
        payload = wire.encode_h264_frame(packet, index, frame.shape[0], frame.shape[1], key,
                                         self.encoder_seq, self.block, tau)
        # the mirror decodes our own packet with the decoder the receiver runs, and keeps the
        # frame it sent as the reference the next residual is measured to
        request = wire.decode_request(payload)
        request.frame = np.array(frame, copy=True)
        predicted.apply(request)
        return Sent(payload, predicted, key)

    def commit(self, mirror: ReceiveState) -> None:
        """The receiver applied the frame: the mirror becomes what ``encode`` predicted."""
        self.mirror = mirror


@dataclass
class Step:
    """One frame along an :class:`EndpointPath`."""

    image: np.ndarray  # the input the endpoint runs on (remote: what its receiver rebuilt)
    field: np.ndarray | None  # the accumulated field, quantized as sent (None: key frame)
    key: bool
    tau: float  # the tau the residual set was picked at (the endpoint's executor truncates with it)
    residual: ResidualSet | None = None
    sent: Sent | None = None  # remote: the payload and the mirror after it


class EndpointPath:
    """One (stream, endpoint): its input cache, the field accumulated since it last ran, the
    residual set at its policy's tau and, for a remote endpoint (``uplink``), what goes on the
    wire and the mirror of what its receiver rebuilds.

    ``tau``: a number on the [0, 1] input scale, a :class:`fluxshard.tau.TruncationTable` or a
    :class:`fluxshard.tau.TauPolicy`. ``motion=False`` ignores the motion (a pixel-aligned cache:
    the DeltaCNN-like baseline). Endpoints that run on every frame call :meth:`step`; the SDK's
    dispatch, which runs one endpoint per frame, calls :meth:`accumulate`,
    :meth:`residual_at_tau` and :meth:`reset` (and :meth:`forget`) itself."""

    def __init__(self, tau=None, block: int = RESIDUAL_BLOCK, *, uplink: Uplink | None = None,
                 motion: bool = True):
        from fluxshard.tau import DEFAULT_TAU, TauPolicy

        self.policy = TauPolicy.of(DEFAULT_TAU if tau is None else tau)
        self.block = block
        self.state = EndpointState(block)
        self.uplink = uplink
        self.motion = motion
        self.tau = self.policy.tau_for(0.0)  # the value the last frame used

    # the dispatch state, as EndpointState has it
    @property
    def cache(self) -> np.ndarray | None:
        return self.state.cache

    @property
    def field(self) -> np.ndarray | None:
        """The accumulated field (unquantized; :meth:`residual_at_tau` sends it quantized)."""
        return self.state.field

    @property
    def frames_since_reset(self) -> int:
        return self.state.frames_since_reset

    def forget(self) -> None:
        """The motion since the cache is unknown (or the endpoint is left out): its next frame
        is a key frame."""
        self.state.cache = self.state.field = None

    def accumulate(self, field: np.ndarray) -> None:
        self.state.accumulate(field if self.motion else np.zeros_like(field))

    def residual_at_tau(self, frame: np.ndarray) -> tuple[ResidualSet, float]:
        """The accumulated field quantized as the wire carries it (what a receiver applies), tau
        picked by the policy from that field's motion, and the residual set at that tau (its
        ``aligned`` is the one warp of the cache this frame). -> (set, tau)."""
        if self.state.cache is None:
            raise RuntimeError("EndpointPath has no cache yet: reset(image) on a key frame first")
        applied = wire.quantize_field(self.state.field)
        tau = self.policy.tau_for(motion_statistic(applied))
        residual = self.state.residual(frame, self.policy.dispatch_threshold(tau), self.block,
                                       field=applied)
        return residual, tau

    def motion_at_tau(self, frame: np.ndarray) -> tuple[ResidualSet, float]:
        """:meth:`residual_at_tau` for an endpoint that runs on the whole frame and finds its own
        change (the tile and dense executors): the same field and tau, the block comparison
        left out (the frame's costliest bookkeeping). The set marks every block, and its
        ``aligned`` is ``frame`` itself (nothing was warped)."""
        if self.state.cache is None:
            raise RuntimeError("EndpointPath has no cache yet: reset(image) on a key frame first")
        applied = wire.quantize_field(self.state.field)
        tau = self.policy.tau_for(motion_statistic(applied))
        h, w = frame.shape[:2]
        grid = (-(-h // self.block), -(-w // self.block))
        return ResidualSet(mask=np.ones(grid, bool), aligned=frame, field=applied,
                           block_max_diff=np.full(grid, 256, np.int16), block=self.block,
                           threshold=self.policy.dispatch_threshold(tau)), tau

    def reset(self, image: np.ndarray) -> None:
        """The endpoint ran on ``image``: it becomes the cache, the motion starts at zero. A
        remote endpoint's image is its mirror's cache, kept as is (the next residual set is then
        aligned from the very array the uplink rebuilds from)."""
        mirrored = self.uplink is not None and image is self.uplink.mirror.cache
        self.state.reset(image, copy=not mirrored)

    def step(self, frame: np.ndarray, field: np.ndarray | None, key: bool = False,
             index: int | None = None) -> Step:
        """One frame for an endpoint that runs on every frame: the residual set at tau and the
        input it runs on (local: the aligned cache with the residual blocks from ``frame``;
        remote: the payload, committed as delivered, and what the receiver rebuilds). ``frame``:
        (H, W, 3) uint8, the full decoded frame; ``field``: its motion (None on key frames);
        ``index``: the wire's frame index (remote; default: the one after the mirror's)."""
        frame = np.asarray(frame)
        key = (key or field is None or self.state.cache is None
               or self.state.cache.shape != frame.shape)
        residual = None
        if key:
            self.tau = self.policy.tau_for(0.0)
        else:
            self.accumulate(field)
            residual, self.tau = self.residual_at_tau(frame)
        if self.uplink is None:
            image = frame if key else residual.assemble(frame)
            self.reset(image)
            return Step(image, None if key else residual.field, key, self.tau, residual)
        index = self.uplink.mirror.frame_index + 1 if index is None else int(index)
        sent = self.uplink.encode(frame, index, key, self.tau, residual=residual)
        self.uplink.commit(sent.mirror)
        self.reset(sent.mirror.cache)
        return Step(sent.mirror.cache, None if sent.key else residual.field, sent.key, self.tau,
                    residual, sent)

    def step_decoded(self, mf) -> Step:
        """:meth:`step` for one decoded :class:`fluxshard.motion.MotionFrame` (its index is the
        wire's)."""
        return self.step(mf.image, None if mf.is_key else mf.field, mf.is_key, mf.index)


def edge_inputs(video, tau, **kwargs):
    """(MotionFrame, input, field or None, key) for every frame of ``video`` along a local
    :class:`EndpointPath` at ``tau`` (``kwargs``: its options)."""
    from fluxshard.motion.decode import iter_motion

    path = EndpointPath(tau, **kwargs)
    for mf in iter_motion(video):
        step = path.step_decoded(mf)
        yield mf, step.image, step.field, step.key
