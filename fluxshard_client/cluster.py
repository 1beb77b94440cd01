"""Several cloud servers: each stream homed on one by rendezvous (HRW) hashing, re-homed with a
key frame when its server leaves.

A stream's state (input cache, feature caches, H.264 decoder) lives on one server, so every frame
of a stream must reach the same one. :func:`rank` orders the servers for a stream id by
``blake2b(url, stream id)`` (highest random weight): every client computes the same home without
talking to the others, streams spread evenly, and a server leaving moves only its own streams,
each to its next server in the ranking (a server joining takes about 1/n of them).

:class:`ClusterClient` takes the list of cloud URLs; its streams are ordinary
:class:`fluxshard_client.Stream` objects (usable as ``FluxShardStream``'s cloud) whose requests
go to their home. When the home cannot be reached, it is marked down for ``down_for_s`` and the
stream re-homes at once to the next server up in its ranking: the frame is re-sent there as a key
frame that opens the stream (the resync reason names both servers), so no frame is lost. A stream
stays where it is until its server fails; new streams avoid servers marked down. With every
server down the stream waits like a single-server stream (its retry policy) and tries again in
ranking order.

Behind one address that already routes each client to one server (a sticky load balancer, a
Kubernetes Service with ``sessionAffinity: ClientIP``), a plain ``FluxShardClient`` is enough;
with the pods' own addresses (a headless Service), give them all to :class:`ClusterClient`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

from fluxshard import wire

from . import transport
from .transport import FluxShardClient, RetryPolicy, Stream


def weight(url: str, stream_id: int | str) -> int:
    """The rendezvous weight of ``url`` for ``stream_id``: a 64-bit hash of both."""
    digest = hashlib.blake2b(f"{url}\0{stream_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(stream_id: int | str, urls: Sequence[str]) -> list[str]:
    """``urls`` in the order ``stream_id`` prefers them (its home first); independent of the
    order ``urls`` are given in."""
    return sorted(dict.fromkeys(urls), key=lambda url: (weight(url, stream_id), url),
                  reverse=True)


def home(stream_id: int | str, urls: Sequence[str]) -> str:
    """The server ``stream_id`` lives on while every server in ``urls`` is up."""
    if not urls:
        raise ValueError("no cloud URLs")
    return rank(stream_id, urls)[0]


class ClusterClient:
    """Streams over several cloud servers (module doc). ``urls``: the servers' gRPC (or HTTP)
    addresses; ``client_kwargs`` go to each server's :class:`FluxShardClient` (protocol, TLS,
    headers, timeouts). ``down_for_s``: how long a server that failed is left out of new homes.
    ``clock``: for the down marks (tests inject one)."""

    def __init__(self, urls: Sequence[str], *, retry: RetryPolicy | None = None,
                 down_for_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 **client_kwargs):
        urls = list(dict.fromkeys(urls))
        if not urls:
            raise ValueError("ClusterClient needs at least one cloud URL")
        self.urls = urls
        self.retry = retry or RetryPolicy()
        self.down_for_s = float(down_for_s)
        self.clock = clock
        self.clients = {url: FluxShardClient(url, retry=self.retry, **client_kwargs)
                        for url in urls}
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def is_down(self, url: str) -> bool:
        with self._lock:
            return self._down_until.get(url, float("-inf")) > self.clock()

    def mark_down(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = self.clock() + self.down_for_s

    def up(self) -> list[str]:
        return [url for url in self.urls if not self.is_down(url)]

    def home_for(self, stream_id: int, exclude: Sequence[str] = ()) -> str | None:
        """The first server of the stream's ranking that is up and not excluded (None: none)."""
        return next((url for url in rank(stream_id, self.urls)
                     if url not in exclude and not self.is_down(url)), None)

    def open_stream(self, stream_id: int | None = None, block: int = 16,
                    key_codec: wire.Codec = wire.Codec.ZLIB,
                    residual_codec: wire.Codec = wire.Codec.ZLIB,
                    uplink_quality: int | None = None, secret: str | None = None) -> Stream:
        """A :class:`fluxshard_client.Stream` homed by its stream id; the options as for
        :meth:`FluxShardClient.open_stream` (no id: a random one; the secret goes to whichever
        server the stream lives on). Its ``client`` is a :class:`HomedRoute`:
        ``stream.client.home`` is where it lives now."""
        core = transport._StreamCore(stream_id, block, self.retry, key_codec, residual_codec,
                                     uplink_quality, secret)
        return Stream(HomedRoute(self, core.stream_id), core)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> "ClusterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HomedRoute:
    """What a cluster stream sends through: its home server's client, and the move to the next
    server when the home cannot be reached. ``rehomes``: (from, to, why) of every move."""

    def __init__(self, cluster: ClusterClient, stream_id: int):
        self.cluster = cluster
        self.stream_id = stream_id
        self.home: str | None = None
        self.rehomes: list[tuple[str, str, str]] = []

    def infer(self, payload: bytes, stream_id: int, start: bool, end: bool, *args, **kwargs):
        if self.home is None:  # first frame, or every server was down at the last try
            self.home = (self.cluster.home_for(stream_id)
                         or rank(stream_id, self.cluster.urls)[0])
        home = self.home
        try:
            return self.cluster.clients[home].infer(payload, stream_id, start, end, *args,
                                                    **kwargs)
        except Exception as e:  # noqa: BLE001 - only unreachability re-homes
            kind = e if isinstance(e, transport._Unavailable) else transport._classify(e)
            if not isinstance(kind, transport._Unavailable):
                raise
            self.cluster.mark_down(home)
            nxt = self.cluster.home_for(stream_id, exclude=[home])
            if nxt is None:  # none left: wait as a single-server stream would
                self.home = None
                raise kind from e
            self.home = nxt
            self.rehomes.append((home, nxt, str(kind)))
            # the stream's state is on the old server: a key frame opens it on the new one
            raise transport._Resync(f"re-homed from {home} to {nxt}: {kind}") from e

    @property
    def url(self) -> str | None:
        return self.home

    def close(self) -> None:
        """The cluster owns the connections."""
