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

``python3 -m fluxshard.serving.netshape proxy --listen H:P --target H:P --delay-ms D`` is the
proxy (the link starts it inside the namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    proxy adds (half each way) to the gRPC port. ``check``: the privilege check (tests inject
    one)."""

    def __init__(self, rate_mbit: float, rtt_ms: float = 20.0,
                 return_rate_mbit: float | None = None,
                 check: Callable[[], None] = check_privileges):
        tbf_args(rate_mbit)  # a bad rate is refused before anything is made
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms}")
        self.rate_mbit = float(rate_mbit)
        self.return_rate_mbit = self.rate_mbit if return_rate_mbit is None else return_rate_mbit
        self.rtt_ms = float(rtt_ms)
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
        if self.proxy is not None:
            if self.proxy.poll() is None:
                self.proxy.terminate()
                try:
                    self.proxy.wait(5)
                except subprocess.TimeoutExpired:
                    self.proxy.kill()
                    self.proxy.wait()
            self.proxy = None
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
        address; returns the port it listens on (there)."""
        self.proxy_port = free_port()  # any port is free in a namespace of our own
        self.proxy = subprocess.Popen(
            self.netns_command(sys.executable, "-m", "fluxshard.serving.netshape", "proxy",
                               "--listen", f"{self.cloud_address}:{self.proxy_port}",
                               "--target", f"{self.cloud_address}:{target_port}",
                               "--delay-ms", str(self.rtt_ms / 2)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=str(Path(__file__).resolve().parents[2]))
        line = self.proxy.stdout.readline()  # "listening" once bound
        if not line.startswith("listening"):
            self.proxy.wait(timeout)
            raise RuntimeError(f"delay proxy did not start: {self.proxy.stderr.read()[-2000:]}")
        return self.proxy_port

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


# ---------------------------------------------------------------------------- the delay proxy

async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                clock: Callable[[], float]) -> None:
    """Forward what ``reader`` gives to ``writer``, each chunk ``delay_s`` after it arrived, in
    order; the reading side never waits for the writing side (a delayed link still carries
    bytes at its rate)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read():
        try:
            while chunk := await reader.read(1 << 16):
                queue.put_nowait((clock() + delay_s, chunk))
        finally:
            queue.put_nowait((clock() + delay_s, b""))

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


async def serve_proxy(listen: tuple[str, int], target: tuple[str, int], delay_s: float,
                      clock: Callable[[], float] = time.monotonic,
                      ready: Callable[[], None] | None = None) -> None:
    """A TCP proxy from ``listen`` to ``target`` that delays both directions by ``delay_s``."""

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer, delay_s, clock),
                             _pipe(server_reader, client_writer, delay_s, clock))
        for writer in (server_writer, client_writer):
            try:
                writer.close()
            except (ConnectionError, OSError):
                pass

    server = await asyncio.start_server(handle, *listen)
    if ready is not None:
        ready()
    async with server:
        await server.serve_forever()


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
    args = ap.parse_args(argv)
    if args.delay_ms < 0:
        ap.error("--delay-ms must be >= 0")
    try:
        asyncio.run(serve_proxy(args.listen, args.target, args.delay_ms / 1e3,
                                ready=lambda: print("listening", flush=True)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
