"""Shaped links to a cloud server: a network namespace, a veth pair, ``tc`` and a delay proxy.

:class:`ShapedLink` (a context manager, root or CAP_NET_ADMIN + CAP_SYS_ADMIN) creates a network
namespace joined to ours by a veth pair on a private /30, shapes both directions with a ``tbf``
qdisc at ``rate_mbit`` (this kernel has no ``netem``), starts a tritonserver inside the namespace
(``ip netns exec``) and, in front of its gRPC port, a user-space proxy that holds every chunk for
the one-way delay in each direction (order kept), so the link has a round trip of ``rtt_ms``.
``set_rate`` re-shapes it (``tc qdisc change``); a :class:`RateTrace` does so on a schedule.
Everything is torn down on exit, on errors and on KeyboardInterrupt::

    with ShapedLink(rate_mbit=25, rtt_ms=20) as link:
        server = link.start_server(models=["fluxshard"])
        client = FluxShardClient(link.grpc_url)        # through the proxy and the shaper

Traffic stays between our namespace and the one made here. Without the privileges, or without
``ip`` / ``tc``, :func:`check_privileges` raises :class:`ShapingUnavailable` saying what is
missing, before anything is created.

Lossy links (:class:`LossSpec`, ``ShapedLink(loss=...)`` or :meth:`ShapedLink.set_loss`): this
kernel has neither ``netem`` nor a dropping tc action (``gact``), so loss is modelled in the proxy,
on the edge -> cloud byte stream cut into TCP segments (:data:`MSS` bytes). A seeded
Gilbert-Elliott chain (:class:`GilbertElliott`: a good state that loses nothing, a bad state that
loses every segment; the set loss rate and mean burst length fix its two transitions) decides
which segments are lost. The uplink is gRPC over TCP, so a lost packet never loses bytes for the
application; what it does is what the proxy does, by ``effect``:

* ``retransmit`` (what TCP does): the lost segment arrives one retransmission timeout later
  (``rto_s``, Linux's minimum 200 ms; doubled for each further loss of the same segment: a
  retransmission, sent long after the burst, is lost at the long-run rate), and every byte
  behind it waits (in-order delivery, head-of-line);
* ``reset``: the loss kills the connection (both sides aborted, RST), as a middlebox or a dying
  link does; the call in flight fails and gRPC reconnects.

The proxy counts what it carried (:meth:`ShapedLink.proxy_stats`: bytes each way, segments,
segments lost, retransmitted bytes, resets).

``python3 -m fluxshard.serving.netshape proxy --listen H:P --target H:P --delay-ms D`` is the
proxy (the link starts it inside the namespace); ``--loss RATE --burst N --loss-seed S
--loss-effect retransmit|reset --rto-ms MS --stats-file PATH`` make it lossy.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluxshard.serving.tritonserver import TritonServer, free_port

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
# the /30 blocks links are made on: private, and skipped where an interface already uses one
LINK_POOL = ipaddress.ip_network("10.213.0.0/16")
NAME_PREFIX = "fsh"  # namespaces and interfaces made here start with it
_counter = itertools.count()
# the throughput sink (run inside the namespace): counts bytes until EOF, answers the count
_SINK = """
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as srv:
    print("listening", flush=True)
    conn, _ = srv.accept()
    total = 0
    while data := conn.recv(1 << 16):
        total += len(data)
    conn.sendall(str(total).encode())
    conn.close()
"""


class ShapingUnavailable(RuntimeError):
    """Shaped links cannot be made here (privileges or tools missing)."""


def effective_capabilities(status_file: str | os.PathLike = "/proc/self/status") -> int:
    """This process's effective capability bits (``CapEff``)."""
    for line in Path(status_file).read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(capabilities: Callable[[], int] = effective_capabilities,
                     which: Callable[[str], str | None] = shutil.which) -> None:
    """Raise :class:`ShapingUnavailable` unless namespaces, veths and qdiscs can be made."""
    missing_tools = [tool for tool in ("ip", "tc") if which(tool) is None]
    if missing_tools:
        raise ShapingUnavailable(
            f"shaped links need {' and '.join(missing_tools)} (iproute2: apt-get install "
            "iproute2)")
    caps = capabilities()
    missing = [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"),
                                      (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
               if not caps >> bit & 1]
    if missing:
        raise ShapingUnavailable(
            f"shaped links need root (or {' and '.join(missing)}: network namespaces, veth pairs "
            f"and tc qdiscs); this process (uid {os.geteuid()}) lacks them: run it as root, e.g. "
            "with sudo")


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")
    return done


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    nets = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            nets.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    blocks = list(LINK_POOL.subnets(new_prefix=30))
    start = (os.getpid() * 7 + next(_counter) * 13) % len(blocks)
    for k in range(len(blocks)):
        block = blocks[(start + k) % len(blocks)]
        if not any(block.overlaps(net) for net in used):
            return block
    raise RuntimeError(f"no free /30 left in {LINK_POOL}")


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf parameters for ``rate_mbit``: a bucket that holds a few GSO-sized packets (veth hands
    the qdisc up to 64 KiB at a time; a smaller bucket drops them) and a queue of 100 ms."""
    if not rate_mbit > 0:
        raise ValueError(f"rate must be > 0 Mbit/s, got {rate_mbit}")
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(128 * 1024, int(rate_bytes * 0.004))
    return ["rate", f"{rate_mbit * 1000:.0f}kbit", "burst", str(burst), "latency", "100ms"]


@dataclass(frozen=True)
class RateTrace:
    """A rate schedule: ``steps`` of (seconds, Mbit/s), each rate held for its seconds, repeated
    from the start when ``loop``."""

    steps: tuple[tuple[float, float], ...]
    loop: bool = True

    def __post_init__(self):
        if not self.steps or any(not (s > 0 and r > 0) for s, r in self.steps):
            raise ValueError(f"a rate trace needs steps of (seconds > 0, Mbit/s > 0), got "
                             f"{self.steps}")

    @property
    def period_s(self) -> float:
        return sum(s for s, _ in self.steps)

    def rate_at(self, t: float) -> float:
        """The rate ``t`` seconds after the trace started."""
        if self.loop:
            t %= self.period_s
        for seconds, rate in self.steps:
            if t < seconds:
                return rate
            t -= seconds
        return self.steps[-1][1]

    def changes(self):
        """(seconds from the start, rate) of every change, endlessly when ``loop``."""
        t = 0.0
        while True:
            for seconds, rate in self.steps:
                yield t, rate
                t += seconds
            if not self.loop:
                return

    def mean_mbit(self) -> float:
        return sum(s * r for s, r in self.steps) / self.period_s


class _NamespacedServer(TritonServer):
    """A tritonserver started inside a network namespace (``ip netns exec`` execs it: the pid,
    and so the process group the server stops by, is the server's)."""

    def __init__(self, namespace: str, **kwargs):
        super().__init__(**kwargs)
        self.namespace = namespace

    def command(self, install):
        return ["ip", "netns", "exec", self.namespace] + super().command(install)


class ShapedLink:
    """A shaped, delayed link from this namespace to a namespace of its own (module doc).

    ``rate_mbit``: edge -> cloud rate; ``return_rate_mbit`` cloud -> edge (default the same;
    0 leaves it unshaped). ``rtt_ms``: round trip the
    proxy adds (half each way) to the gRPC port. ``loss``: what the proxy loses edge -> cloud
    (:class:`LossSpec`; None: nothing). ``check``: the privilege check (tests inject one)."""

    def __init__(self, rate_mbit: float, rtt_ms: float = 20.0,
                 return_rate_mbit: float | None = None, loss: LossSpec | None = None,
                 check: Callable[[], None] = check_privileges):
        tbf_args(rate_mbit)  # a bad rate is refused before anything is made
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms}")
        self.rate_mbit = float(rate_mbit)
        self.return_rate_mbit = self.rate_mbit if return_rate_mbit is None else return_rate_mbit
        self.rtt_ms = float(rtt_ms)
        self.loss = loss
        self._check = check
        tag = f"{os.getpid() % 100000}{next(_counter)}"
        self.namespace = f"{NAME_PREFIX}ns{tag}"
        self.veth_edge = f"{NAME_PREFIX}{tag}e"[:15]  # our side: shapes edge -> cloud
        self.veth_cloud = f"{NAME_PREFIX}{tag}c"[:15]  # in the namespace: cloud -> edge
        self.subnet: ipaddress.IPv4Network | None = None
        self.edge_address = self.cloud_address = ""
        self.server: TritonServer | None = None
        self.proxy: subprocess.Popen | None = None
        self.proxy_port: int | None = None
        self._proxy_target: int | None = None
        self._stats_dir: str | None = None
        self._made: list[str] = []  # what exists, for teardown: "netns", "veth"
        self._trace_stop = threading.Event()
        self._trace_thread: threading.Thread | None = None
        self.rate_log: list[tuple[float, float]] = []  # (monotonic time, rate) of each change

    # ------------------------------------------------------------------ set up and tear down
    def __enter__(self) -> "ShapedLink":
        self._check()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        self.subnet = _free_subnet()
        edge, cloud = list(self.subnet.hosts())
        self.edge_address, self.cloud_address = str(edge), str(cloud)
        prefix = self.subnet.prefixlen
        _run(["ip", "netns", "add", self.namespace])
        self._made.append("netns")
        _run(["ip", "link", "add", self.veth_edge, "type", "veth", "peer", "name",
              self.veth_cloud])
        self._made.append("veth")
        _run(["ip", "link", "set", self.veth_cloud, "netns", self.namespace])
        _run(["ip", "addr", "add", f"{edge}/{prefix}", "dev", self.veth_edge])
        _run(["ip", "link", "set", self.veth_edge, "up"])
        ns = ["ip", "netns", "exec", self.namespace]
        _run(ns + ["ip", "addr", "add", f"{cloud}/{prefix}", "dev", self.veth_cloud])
        _run(ns + ["ip", "link", "set", self.veth_cloud, "up"])
        _run(ns + ["ip", "link", "set", "lo", "up"])
        _run(["tc", "qdisc", "add", "dev", self.veth_edge, "root", "tbf"]
             + tbf_args(self.rate_mbit))
        if self.return_rate_mbit:
            _run(ns + ["tc", "qdisc", "add", "dev", self.veth_cloud, "root", "tbf"]
                 + tbf_args(self.return_rate_mbit))
        self.rate_log.append((time.monotonic(), self.rate_mbit))

    def close(self) -> None:
        """Stop the trace, the proxy and the server, delete the namespace and the veth pair
        (their qdiscs go with them). Safe to call twice and after a partial set-up."""
        self.stop_trace()
        self.stop_proxy()
        if self._stats_dir is not None:
            shutil.rmtree(self._stats_dir, ignore_errors=True)
            self._stats_dir = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if "veth" in self._made:  # deleting one end deletes the pair
            _run(["ip", "link", "del", self.veth_edge], check=False)
            self._made.remove("veth")
        if "netns" in self._made:
            _run(["ip", "netns", "del", self.namespace], check=False)
            self._made.remove("netns")

    def exists(self) -> dict[str, bool]:
        """Whether the namespace and our veth end exist (tests: teardown left nothing)."""
        namespaces = _run(["ip", "netns", "list"], check=False).stdout.split()
        link = _run(["ip", "link", "show", self.veth_edge], check=False)
        return {"namespace": self.namespace in namespaces, "veth": link.returncode == 0}

    def qdisc(self) -> str:
        """``tc qdisc show`` of our veth end."""
        return _run(["tc", "qdisc", "show", "dev", self.veth_edge]).stdout

    # --------------------------------------------------------------------------- the cloud
    def netns_command(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *cmd]

    def start_server(self, timeout: float = 300.0, **server_kwargs) -> TritonServer:
        """A tritonserver inside the namespace on its veth address, and the delay proxy in front
        of its gRPC port (:attr:`grpc_url`). Stopped by :meth:`close`."""
        if not self._made:
            raise RuntimeError("the link is not set up: use it as a context manager")
        self.server = _NamespacedServer(self.namespace, host=self.cloud_address, **server_kwargs)
        self.server.start(timeout)
        self.start_proxy(self.server.grpc_port)
        return self.server

    def start_proxy(self, target_port: int, timeout: float = 30.0) -> int:
        """The delay proxy in the namespace, forwarding to ``target_port`` on the namespace's
        address and losing what :attr:`loss` says; returns the port it listens on (there, the
        same one again when the proxy is restarted)."""
        if self.proxy_port is None:
            self.proxy_port = free_port()  # any port is free in a namespace of our own
        if self._stats_dir is None:
            self._stats_dir = tempfile.mkdtemp(prefix="fluxshard-proxy-")
        self._proxy_target = target_port
        stats_file = self.proxy_stats_file
        stats_file.unlink(missing_ok=True)
        self.proxy = subprocess.Popen(
            self.netns_command(sys.executable, "-m", "fluxshard.serving.netshape", "proxy",
                               "--listen", f"{self.cloud_address}:{self.proxy_port}",
                               "--target", f"{self.cloud_address}:{target_port}",
                               "--delay-ms", str(self.rtt_ms / 2), "--stats-file",
                               str(stats_file), *(self.loss.args() if self.loss else [])),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=str(Path(__file__).resolve().parents[2]))
        line = self.proxy.stdout.readline()  # "listening" once bound
        if not line.startswith("listening"):
            self.proxy.wait(timeout)
            raise RuntimeError(f"delay proxy did not start: {self.proxy.stderr.read()[-2000:]}")
        return self.proxy_port

    def stop_proxy(self) -> None:
        if self.proxy is None:
            return
        if self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(5)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        self.proxy = None

    def set_loss(self, loss: LossSpec | None) -> None:
        """Restart the proxy (same port, counters from zero) losing by ``loss`` from now on;
        connections through the old proxy are cut."""
        if self._proxy_target is None:
            raise RuntimeError("no proxy: call start_server (or start_proxy) first")
        self.loss = loss
        self.stop_proxy()
        self.start_proxy(self._proxy_target)

    @property
    def proxy_stats_file(self) -> Path:
        return Path(self._stats_dir or ".") / "proxy-stats.json"

    def proxy_stats(self, settle_s: float = 0.3) -> ProxyStats:
        """What the proxy carried since it started (it rewrites its counters every 0.1 s:
        ``settle_s`` lets the last ones land)."""
        time.sleep(settle_s)
        try:
            return ProxyStats(**json.loads(self.proxy_stats_file.read_text()))
        except FileNotFoundError:
            return ProxyStats()

    @property
    def grpc_url(self) -> str:
        """The cloud's gRPC address through the shaper and the delay proxy."""
        if self.proxy_port is None:
            raise RuntimeError("no proxy: call start_server (or start_proxy) first")
        return f"{self.cloud_address}:{self.proxy_port}"

    # ---------------------------------------------------------------------------- the rate
    def set_rate(self, rate_mbit: float, return_rate_mbit: float | None = None) -> None:
        """Re-shape both directions (``return_rate_mbit`` default: the same as the uplink)."""
        _run(["tc", "qdisc", "change", "dev", self.veth_edge, "root", "tbf"]
             + tbf_args(rate_mbit))
        back = rate_mbit if return_rate_mbit is None else return_rate_mbit
        if self.return_rate_mbit and back:
            _run(self.netns_command("tc", "qdisc", "change", "dev", self.veth_cloud, "root", "tbf",
                                    *tbf_args(back)))
        self.rate_mbit = float(rate_mbit)
        self.rate_log.append((time.monotonic(), self.rate_mbit))

    def follow(self, trace: RateTrace) -> None:
        """Re-shape on ``trace``'s schedule from now, on a thread, until :meth:`stop_trace`."""
        self.stop_trace()
        self._trace_stop.clear()
        started = time.monotonic()

        def apply():
            for at, rate in trace.changes():
                if self._trace_stop.wait(max(0.0, started + at - time.monotonic())):
                    return
                try:
                    self.set_rate(rate)
                except RuntimeError as e:  # the link went away under us
                    print(f"rate trace stopped: {e}", file=sys.stderr)
                    return

        self._trace_thread = threading.Thread(target=apply, daemon=True, name="rate-trace")
        self._trace_thread.start()

    def stop_trace(self) -> None:
        self._trace_stop.set()
        if self._trace_thread is not None:
            self._trace_thread.join()
            self._trace_thread = None

    def measure_mbit(self, nbytes: int = 2_000_000, timeout_s: float = 120.0) -> float:
        """Edge -> cloud throughput (Mbit/s) of ``nbytes`` sent over TCP to a sink inside the
        namespace, timed from the first byte sent to the sink's receipt of the last."""
        port = free_port()
        sink = subprocess.Popen(
            self.netns_command(sys.executable, "-c", _SINK, self.cloud_address, str(port)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if sink.stdout.readline().strip() != "listening":
                raise RuntimeError(f"throughput sink did not start: {sink.stderr.read()}")
            chunk = b"\0" * 65536
            with socket.create_connection((self.cloud_address, port), timeout=timeout_s) as s:
                t0 = time.perf_counter()
                left = nbytes
                while left > 0:
                    s.sendall(chunk[:min(left, len(chunk))])
                    left -= min(left, len(chunk))
                s.shutdown(socket.SHUT_WR)
                received = int(s.recv(64).decode() or 0)  # the sink answers once it has all
                seconds = time.perf_counter() - t0
            if received != nbytes:
                raise RuntimeError(f"throughput sink received {received} of {nbytes} bytes")
            return nbytes * 8 / seconds / 1e6
        finally:
            sink.kill()
            sink.wait()

    def mean_rate_since(self, since: float, until: float | None = None) -> float:
        """Time-weighted mean rate (Mbit/s) over [since, until] from :attr:`rate_log`."""
        until = time.monotonic() if until is None else until
        total = 0.0
        log = self.rate_log + [(until, 0.0)]
        for (t0, rate), (t1, _) in zip(log, log[1:]):
            lo, hi = max(t0, since), min(t1, until)
            if hi > lo:
                total += rate * (hi - lo)
        return total / (until - since) if until > since else self.rate_mbit


# ------------------------------------------------------------------------------------ loss

MSS = 1448  # bytes of one TCP segment on a 1500-byte MTU path (IP, TCP and timestamp headers off)
TCP_RTO_MIN_S = 0.2  # Linux's minimum retransmission timeout
LOSS_EFFECTS = ("retransmit", "reset")


class GilbertElliott:
    """A two-state burst loss chain: the good state loses nothing, the bad state every segment.
    ``p`` (good -> bad) and ``r`` (bad -> good) follow from the long-run loss ``rate``
    (= p / (p + r)) and the mean number of segments lost in a row, ``mean_burst`` (= 1 / r).
    Seeded: the same seed loses the same segments of the same sequence."""

    def __init__(self, rate: float, mean_burst: float = 1.0, seed: int = 0):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"loss rate must be in [0, 1), got {rate}")
        if mean_burst < 1.0:
            raise ValueError(f"mean burst must be >= 1 segment, got {mean_burst}")
        self.rate = rate
        self.r = 1.0 / mean_burst
        self.p = rate * self.r / (1.0 - rate)
        if self.p > 1.0:
            raise ValueError(f"a loss rate of {rate} needs bursts longer than {mean_burst} "
                             f"segments (at most {1.0 / (1.0 + self.r):.2f} with this burst)")
        self._rng = random.Random(seed)
        self.bad = False

    def lost(self) -> bool:
        """Step the chain by one segment: whether that segment is lost."""
        if self.bad:
            self.bad = self._rng.random() >= self.r
        else:
            self.bad = self._rng.random() < self.p
        return self.bad

    def retransmission_lost(self) -> bool:
        """Whether a retransmission is lost: it is sent a timeout later, long after the burst
        that lost the original, so it sees the link's long-run rate and not the burst."""
        return self._rng.random() < self.rate


@dataclass(frozen=True)
class LossSpec:
    """Loss on the edge -> cloud direction of a link's proxy (module doc): ``rate`` of the
    segments, in bursts of ``mean_burst`` segments on average, from a chain seeded with
    ``seed``; ``effect`` ``retransmit`` (the segment and what follows it arrive ``rto_s`` late)
    or ``reset`` (the connection is aborted)."""

    rate: float
    mean_burst: float = 1.0
    seed: int = 0
    effect: str = "retransmit"
    rto_s: float = TCP_RTO_MIN_S

    def __post_init__(self):
        if self.effect not in LOSS_EFFECTS:
            raise ValueError(f"loss effect must be one of {LOSS_EFFECTS}, got {self.effect!r}")
        if not self.rto_s > 0:
            raise ValueError(f"retransmission timeout must be > 0 s, got {self.rto_s}")
        self.chain()  # a bad rate or burst is refused here

    def chain(self) -> GilbertElliott:
        return GilbertElliott(self.rate, self.mean_burst, self.seed)

    def args(self) -> list[str]:
        """The proxy's command-line options for this loss."""
        return ["--loss", repr(self.rate), "--burst", repr(self.mean_burst), "--loss-seed",
                str(self.seed), "--loss-effect", self.effect, "--rto-ms", repr(self.rto_s * 1e3)]


@dataclass
class ProxyStats:
    """What a proxy carried: application bytes each way (``up``: client -> target), the
    upstream segments the loss chain saw, those it lost, the bytes re-sent for them
    (``retransmit``) and the connections aborted (``reset``)."""

    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    segments_up: int = 0
    segments_lost: int = 0
    retransmitted_bytes: int = 0
    resets: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Loss:
    """One proxy's loss: the spec, its one chain (a property of the link, shared by every
    connection) and the counters."""

    spec: LossSpec
    chain: GilbertElliott = field(init=False)

    def __post_init__(self):
        self.chain = self.spec.chain()

    def segment_delays(self, chunk: bytes, stats: ProxyStats) -> list[tuple[bytes, float]] | None:
        """(segment, extra seconds) for each MSS segment of ``chunk``; None: a segment was lost
        and the effect is ``reset``."""
        out = []
        for k in range(0, len(chunk), MSS):
            segment = chunk[k:k + MSS]
            stats.segments_up += 1
            extra, timeout = 0.0, self.spec.rto_s
            lost = self.chain.lost()
            while lost:
                stats.segments_lost += 1
                if self.spec.effect == "reset":
                    return None
                stats.retransmitted_bytes += len(segment)
                extra += timeout
                timeout *= 2  # TCP's exponential backoff
                lost = self.chain.retransmission_lost()
            out.append((segment, extra))
        return out


# ---------------------------------------------------------------------------- the delay proxy

async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                clock: Callable[[], float], stats: ProxyStats | None = None, up: bool = True,
                loss: _Loss | None = None, abort: Callable[[], None] | None = None) -> None:
    """Forward what ``reader`` gives to ``writer``, each chunk ``delay_s`` after it arrived, in
    order; the reading side never waits for the writing side (a delayed link still carries
    bytes at its rate). ``loss`` (upstream only) delays lost segments or calls ``abort``."""
    stats = stats if stats is not None else ProxyStats()
    queue: asyncio.Queue = asyncio.Queue()

    async def read():
        try:
            await forward()
        except (ConnectionError, OSError):
            pass  # the connection was aborted (by a reset, or by its other end)
        finally:
            queue.put_nowait((clock() + delay_s, b""))

    async def forward():
        while chunk := await reader.read(1 << 16):
            now = clock()
            if up:
                stats.bytes_up += len(chunk)
            else:
                stats.bytes_down += len(chunk)
            if loss is None:
                queue.put_nowait((now + delay_s, chunk))
                continue
            segments = loss.segment_delays(chunk, stats)
            if segments is None:
                stats.resets += 1
                abort()
                return
            for segment, extra in segments:  # later segments wait behind a late one
                queue.put_nowait((now + delay_s + extra, segment))

    reading = asyncio.ensure_future(read())
    try:
        while True:
            due, chunk = await queue.get()
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:  # half-close: the other direction may still carry answers
                if writer.can_write_eof():
                    writer.write_eof()
                break
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()


async def _write_stats(stats: ProxyStats, path: Path, interval_s: float = 0.1) -> None:
    """Keep ``path`` holding ``stats`` (JSON, replaced atomically), rewritten when they change."""
    last = None
    tmp = path.with_name(path.name + ".tmp")
    while True:
        now = stats.as_dict()
        if now != last:
            tmp.write_text(json.dumps(now))
            os.replace(tmp, path)
            last = now
        await asyncio.sleep(interval_s)


async def serve_proxy(listen: tuple[str, int], target: tuple[str, int], delay_s: float,
                      clock: Callable[[], float] = time.monotonic,
                      ready: Callable[[], None] | None = None, loss: LossSpec | None = None,
                      stats: ProxyStats | None = None, stats_file: Path | None = None) -> None:
    """A TCP proxy from ``listen`` to ``target`` that delays both directions by ``delay_s`` and
    loses upstream segments by ``loss``; ``stats`` (or a fresh one) counts what it carried,
    mirrored into ``stats_file``."""
    stats = stats if stats is not None else ProxyStats()
    link_loss = _Loss(loss) if loss is not None and loss.rate > 0 else None

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        stats.connections += 1

        def abort():
            for writer in (client_writer, server_writer):
                writer.transport.abort()

        await asyncio.gather(_pipe(client_reader, server_writer, delay_s, clock, stats, True,
                                   link_loss, abort),
                             _pipe(server_reader, client_writer, delay_s, clock, stats, False))
        for writer in (server_writer, client_writer):
            try:
                writer.close()
            except (ConnectionError, OSError):
                pass

    server = await asyncio.start_server(handle, *listen)
    writing = (asyncio.ensure_future(_write_stats(stats, Path(stats_file)))
               if stats_file is not None else None)
    if ready is not None:
        ready()
    try:
        async with server:
            await server.serve_forever()
    finally:
        if writing is not None:
            writing.cancel()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m fluxshard.serving.netshape",
                                 description="delay proxy of a shaped link")
    sub = ap.add_subparsers(dest="verb", required=True)
    proxy = sub.add_parser("proxy", help="TCP proxy that delays both directions")
    proxy.add_argument("--listen", type=_address, required=True)
    proxy.add_argument("--target", type=_address, required=True)
    proxy.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    proxy.add_argument("--loss", type=float, default=0.0,
                       help="share of upstream TCP segments lost, [0, 1) (default: none)")
    proxy.add_argument("--burst", type=float, default=1.0,
                       help="mean segments lost in a row (Gilbert-Elliott; default: 1)")
    proxy.add_argument("--loss-seed", type=int, default=0)
    proxy.add_argument("--loss-effect", choices=LOSS_EFFECTS, default="retransmit",
                       help="retransmit: a lost segment and what follows arrive an RTO late; "
                            "reset: the connection is aborted")
    proxy.add_argument("--rto-ms", type=float, default=TCP_RTO_MIN_S * 1e3,
                       help="retransmission timeout of a lost segment (default: %(default)s)")
    proxy.add_argument("--stats-file", type=Path, default=None,
                       help="keep this JSON file holding what the proxy carried")
    args = ap.parse_args(argv)
    if args.delay_ms < 0:
        ap.error("--delay-ms must be >= 0")
    try:
        loss = LossSpec(args.loss, args.burst, args.loss_seed, args.loss_effect,
                        args.rto_ms / 1e3)
    except ValueError as e:
        ap.error(str(e))
    try:
        asyncio.run(serve_proxy(args.listen, args.target, args.delay_ms / 1e3,
                                ready=lambda: print("listening", flush=True), loss=loss,
                                stats_file=args.stats_file))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
