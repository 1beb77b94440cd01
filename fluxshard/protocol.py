"""What the SDK and the server agree on beyond the payload (:mod:`fluxshard.wire`): the request
parameter carrying a stream's secret, stream ids, the header keys of restricted protocols, and
the gRPC channel options of our clients. Below both the SDK and the server, so neither imports
the other for them."""

from __future__ import annotations

import secrets

# the request parameter the fluxshard model reads the stream's secret from (the SDK sets it on
# every request)
SECRET_PARAMETER = "fluxshard_stream_secret"
# tritonserver expects a restricted gRPC protocol's header key with this prefix
GRPC_RESTRICTED_HEADER_PREFIX = "triton-grpc-protocol-"


def random_stream_id() -> int:
    """A stream id no other client can guess: uniform in [1, 2**63)."""
    return secrets.randbelow(2**63 - 1) + 1


def restricted_header(key: str, value: str, protocol: str = "grpc") -> dict[str, str]:
    """The request header a ``--grpc-restricted-protocol`` / ``--http-restricted-api`` restriction
    with ``key=value`` expects."""
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return {(GRPC_RESTRICTED_HEADER_PREFIX if protocol == "grpc" else "") + key: value}


def grpc_channel_args(own_connection: bool = False) -> list[tuple[str, int]]:
    """gRPC channel options for clients of our servers: tritonclient's defaults, but reconnect
    attempts at most a second apart, so a client notices a restarted server within a second
    instead of gRPC's default backoff of up to two minutes. ``own_connection``: a channel that
    shares no connection (nor its backoff) with other channels to the same address."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keepalive = KeepAliveOptions()
    args = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 1000)]
    if own_connection:
        args.append(("grpc.use_local_subchannel_pool", 1))
    return args
