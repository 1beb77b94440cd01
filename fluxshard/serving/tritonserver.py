"""Find, start and stop a Triton Inference Server.

The binary comes from the ``nvidia-pytriton`` wheel that ``scripts/install.sh`` unpacks into
``.cache/tritonserver/`` (never into our environment: the wheel pins numpy<2), or from a Triton
install named by ``FLUXSHARD_TRITON_HOME`` (a directory with ``bin/tritonserver`` and
``backends/``), e.g. ``/opt/tritonserver`` in NVIDIA's containers.

The python-backend stub embeds libpython: we put *this* interpreter's libpython first on
LD_LIBRARY_PATH so the models run in the same Python, with our site-packages and this repository
importable.

Every server runs hardened (issue 14): model control ``none`` (the repository is loaded at start;
no client can load, unload or upload a model), the admin protocol groups (model repository,
shared memory, trace, logging) answer only requests carrying a header with a secret made per
server (:meth:`TritonServer.admin_headers`), a short exit timeout, its own process group, and
orphaned python-backend stubs and their ``/dev/shm`` regions from crashed servers are cleaned up
(:func:`clean_leftovers`).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fluxshard.protocol import GRPC_RESTRICTED_HEADER_PREFIX, restricted_header

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
PYTRITON_VERSION = "0.7.0"
CACHE_DIR = REPO_ROOT / ".cache" / "tritonserver"
WHEEL_SITE = CACHE_DIR / "site"  # pip install --no-deps --target of the nvidia-pytriton wheel

# Protocol groups only the launching process may use. health, metadata, inference, model-config
# and statistics stay open: clients and perf_analyzer read them, and none of them changes anything.
ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "fluxshard-admin"
# what `--auth-header` closes to clients without it: all but health (load balancers, probes)
AUTH_PROTOCOLS = ("inference", "metadata", "model-config", "statistics")
AUTH_HEADER_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]*")  # gRPC metadata keys are lowercase
AUTH_HEADER_VALUE = re.compile(r"[A-Za-z0-9._~+/-]+")  # no separators of Triton's flag syntax
SHM_DIR = Path("/dev/shm")
STUB_REGION_PREFIX = "triton_python_backend_shm_region_"
STUB_NAME = "triton_python_backend_stub"


class TritonNotInstalled(RuntimeError):
    pass


class TritonStartError(RuntimeError):
    pass


@dataclass
class TritonInstall:
    binary: Path
    backend_dir: Path
    lib_dirs: list[Path]

    @property
    def python_stub(self) -> Path:
        return self.backend_dir / "python" / "triton_python_backend_stub"


def find_triton() -> TritonInstall:
    """The Triton install to use; raises :class:`TritonNotInstalled` with the fix."""
    home = os.environ.get("FLUXSHARD_TRITON_HOME")
    candidates = [Path(home)] if home else [WHEEL_SITE / "pytriton" / "tritonserver",
                                            Path("/opt/tritonserver")]
    for root in candidates:
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            libs = [p for p in (WHEEL_SITE / "nvidia_pytriton.libs", root / "lib") if p.is_dir()]
            install = TritonInstall(binary, root / "backends", libs)
            _ensure_python_stub(root, install)
            return install
    raise TritonNotInstalled(
        f"no tritonserver found (looked in {', '.join(map(str, candidates))}); run "
        "scripts/install.sh, or set FLUXSHARD_TRITON_HOME to a Triton install")


def _ensure_python_stub(root: Path, install: TritonInstall) -> None:
    """The pytriton wheel ships one stub per Python; the backend expects it beside itself."""
    if install.python_stub.is_file() or not (install.backend_dir / "python").is_dir():
        return
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotInstalled(f"no python-backend stub for Python {version} in {root}")
    shutil.copy2(stub, install.python_stub)


def server_environment(install: TritonInstall, base: dict | None = None) -> dict[str, str]:
    """Environment for tritonserver: bundled libs, our libpython first, our packages importable."""
    env = dict(os.environ if base is None else base)
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    lib_path = ([libpython_dir] if libpython_dir else []) + [str(p) for p in install.lib_dirs]
    if env.get("LD_LIBRARY_PATH"):
        lib_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_path)
    py_path = [str(REPO_ROOT)] + [p for p in sys.path if p.endswith("-packages")]
    if env.get("PYTHONPATH"):
        py_path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(py_path))
    # one server process serves many streams on few cores: do not let torch grab them all
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for gRPC over TLS: the server's certificate and key, and with ``root`` (the CA
    that signs client certificates) mutual TLS."""

    cert: Path
    key: Path
    root: Path | None = None

    def __post_init__(self):
        for what, path in (("certificate", self.cert), ("key", self.key), ("root", self.root)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"TLS {what} file not found: {path}")

    def args(self) -> list[str]:
        args = [f"--grpc-server-cert={Path(self.cert).resolve()}",
                f"--grpc-server-key={Path(self.key).resolve()}"]
        if self.root is not None:
            return ["--grpc-use-ssl-mutual=true",
                    f"--grpc-root-cert={Path(self.root).resolve()}"] + args
        return ["--grpc-use-ssl=true"] + args


def auth_header(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--auth-header`` (an argparse type): a lowercase header key and a
    token value (letters, digits, ``._~+/-``)."""
    key, sep, value = str(text).partition("=")
    if not sep or not AUTH_HEADER_KEY.fullmatch(key) or not AUTH_HEADER_VALUE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with a lowercase key (a-z 0-9 _ . -) and a token value "
            f"(letters, digits, ._~+/-), got {text!r}")
    if key == ADMIN_HEADER:
        raise argparse.ArgumentTypeError(f"{ADMIN_HEADER!r} is the admin protocols' header; "
                                         "pick another key")
    return key, value


def auth_header_of(pair) -> tuple[str, str]:
    """A (key, value) auth header, checked like ``--auth-header``; ValueError otherwise."""
    try:
        key, value = pair
        return auth_header(f"{key}={value}")
    except (TypeError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"auth header: {e}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver subprocess. Use as a context manager::

        with TritonServer() as server:       # free ports, waits until ready
            client = FluxShardClient(server.grpc_url)

    Ports default to free ones. ``start`` raises :class:`TritonStartError` with the log tail when
    the server exits or is not ready within ``timeout`` seconds.
    """

    def __init__(self, model_repository: str | os.PathLike = DEFAULT_MODEL_REPOSITORY,
                 http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_file: str | os.PathLike | None = None,
                 host: str = "127.0.0.1", models: list[str] | None = None,
                 extra_args: list[str] | None = None, log_verbose: int = 0,
                 model_config_name: str | None = None,
                 weights: str | os.PathLike | None = None,
                 parameters: dict[str, str] | None = None, exit_timeout_s: int = 5,
                 tls: TlsFiles | None = None, auth_header: tuple[str, str] | None = None,
                 idle_timeout_s: float | None = None):
        self.model_repository = Path(model_repository).resolve()
        # the sequence models' idle timeout, when not their configs' (Triton frees a silent
        # stream's slot after it; the fluxshard model sweeps its session with the same value)
        self.idle_timeout_s = idle_timeout_s
        # the models' `weights` parameter (absolute: the server's working folder is not ours),
        # or the name of registered pretrained weights, which the models look up themselves
        self.weights = weights_parameter(weights)
        # model parameters to set (e.g. {"executor": "tiles"}), in every model that has them
        self.parameters = {str(k): str(v) for k, v in (parameters or {}).items()}
        self._weights_repository: tempfile.TemporaryDirectory | None = None
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.host = host
        # the models to serve (None: all of the repository's); the server loads them at start
        self.models = list(models) if models is not None else None
        # Triton counts an open sequence as an in-flight inference and waits this long for it on
        # a graceful stop; frames themselves finish well within it
        self.exit_timeout_s = int(exit_timeout_s)
        self.tls = tls
        # (key, value) every client request but health must carry (AUTH_PROTOCOLS)
        self.auth_header = auth_header if auth_header is None else auth_header_of(auth_header)
        # the restricted protocols' header value: only this process knows it
        self.admin_secret = secrets.token_urlsafe(24)
        self.extra_args = list(extra_args or [])
        self.log_verbose = log_verbose
        self.model_config_name = model_config_name  # e.g. "gpu": <model>/configs/gpu.pbtxt
        self._own_log = log_file is None
        self.log_file = Path(log_file) if log_file else Path(
            tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers that open the restricted protocol groups (:data:`ADMIN_PROTOCOLS`)."""
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        key = (GRPC_RESTRICTED_HEADER_PREFIX if protocol == "grpc" else "") + ADMIN_HEADER
        return {key: self.admin_secret}

    def command(self, install: TritonInstall) -> list[str]:
        repository = (Path(self._weights_repository.name) if self._weights_repository
                      else self.model_repository)
        restricted = f"{','.join(ADMIN_PROTOCOLS)}:{ADMIN_HEADER}={self.admin_secret}"
        cmd = [str(install.binary), f"--model-repository={repository}",
               f"--backend-directory={install.backend_dir}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", f"--http-address={self.host}",
               f"--grpc-address={self.host}", f"--log-verbose={self.log_verbose}",
               "--allow-metrics=true", "--exit-on-error=true", "--strict-readiness=true",
               # no model uploads, loads or unloads over the network: what is served is fixed
               "--model-control-mode=none", f"--exit-timeout-secs={self.exit_timeout_s}",
               f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        if self.tls is not None:
            cmd += self.tls.args()
        if self.auth_header is not None:
            auth = f"{','.join(AUTH_PROTOCOLS)}:{'='.join(self.auth_header)}"
            cmd += [f"--grpc-restricted-protocol={auth}", f"--http-restricted-api={auth}"]
        return cmd + self.extra_args

    def client_headers(self, protocol: str = "grpc") -> dict[str, str] | None:
        """The auth header its clients send (None: it requires none)."""
        return None if self.auth_header is None else restricted_header(*self.auth_header,
                                                                        protocol)

    def start(self, timeout: float = 180.0) -> "TritonServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("server already running")
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository not found: {self.model_repository}")
        install = find_triton()
        clean_leftovers()  # stubs and shared memory of servers that were killed
        needs_own_repository = (self.weights is not None or self.parameters
                                or self.models is not None or self.idle_timeout_s is not None)
        if needs_own_repository and self._weights_repository is None:
            if isinstance(self.weights, Path) and not self.weights.is_file():
                raise FileNotFoundError(f"weights file not found: {self.weights}")
            parameters = dict(self.parameters)
            if self.weights is not None:
                parameters["weights"] = str(self.weights)
            self._weights_repository = tempfile.TemporaryDirectory(prefix="fluxshard-models-")
            repository_with_parameters(self.model_repository, parameters,
                                       Path(self._weights_repository.name), models=self.models,
                                       idle_timeout_s=self.idle_timeout_s)
        with open(self.log_file, "ab") as log:
            # own process group: a Ctrl-C in the terminal reaches us, and we stop the server
            self.process = subprocess.Popen(self.command(install), stdout=log,
                                            stderr=subprocess.STDOUT,
                                            env=server_environment(install),
                                            start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + timeout
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0,
                                                  network_timeout=5.0)
        try:
            while True:
                if self.process.poll() is not None:
                    raise TritonStartError(f"tritonserver exited with code {self.process.returncode}"
                                           f"\n--- log tail ({self.log_file}) ---\n{self.log_tail()}")
                try:
                    if client.is_server_ready():
                        return
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TritonStartError(f"tritonserver not ready after {timeout:.0f} s"
                                           f"\n--- log tail ({self.log_file}) ---\n{self.log_tail()}")
                time.sleep(0.25)
        finally:
            client.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        # tritonserver prints wide tables of padding; keep the lines that say something
        kept = [l.rstrip() for l in text.splitlines()
                if l.strip() and not l.lstrip().startswith(("|", "+"))]
        return "\n".join(kept[-lines:])

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stub_pids(self) -> list[int]:
        """The python-backend stubs this server started (alive, orphaned or not)."""
        if self.process is None:
            return []
        return [stub.pid for stub in python_stubs() if stub.parent_pid == self.process.pid]

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests for ``exit_timeout_s``), then SIGKILL after
        ``grace`` seconds (default: the exit timeout and 10 s more); whatever is left of the
        process group (stubs of a server that crashed) is killed and its shared memory freed."""
        if self.process is None:
            return None
        if grace is None:
            grace = self.exit_timeout_s + 10.0
        stubs = self.stub_pids()  # read before the server goes: their parent is in their argv
        try:
            return self._stop(grace)
        finally:
            self._signal(signal.SIGKILL)  # stubs outlive a killed server, deadlocked
            # a stub killed just now still maps its region until it is gone: wait for it
            clean_leftovers(dying=stubs)
            if self._weights_repository is not None:
                self._weights_repository.cleanup()
                self._weights_repository = None

    def _stop(self, grace: float) -> int | None:
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def restart(self, timeout: float = 180.0) -> "TritonServer":
        """Kill the server and its stubs (no drain: this is for a server whose model is dead)
        and start it again on the same ports."""
        self.kill()
        self.stop()
        return self.start(timeout)

    def kill(self, whole_group: bool = True) -> None:
        """Die abruptly (tests: a crashed server). ``whole_group=False`` kills tritonserver only,
        as the OOM killer would, leaving its stubs behind."""
        if self.is_running():
            if whole_group:
                self._signal(signal.SIGKILL)
            else:
                self.process.kill()
            self.process.wait()

    def _signal(self, sig: int) -> None:
        # the whole group: the python-backend stubs are children of the server
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "TritonServer":
        return self.start() if not self.is_running() else self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_log and exc[0] is None:
            self.log_file.unlink(missing_ok=True)


def weights_parameter(weights) -> Path | str | None:
    """What the models' ``weights`` parameter carries: an absolute path, or, for a name that is
    no file here, registered pretrained weights (``yolov3-tiny``) by name."""
    if not weights:
        return None
    path = Path(weights)
    if not path.exists() and isinstance(weights, str):
        import fluxshard.models  # noqa: F401  (registers the named weights; imports torch)
        from fluxshard.models.families import named_weights_for

        if named_weights_for(weights) is not None:
            return weights
    return path.resolve()


def repository_with_weights(source: Path, weights: Path, folder: Path) -> Path:
    """A model repository in ``folder`` that serves ``source``'s models with ``weights`` (see
    :func:`repository_with_parameters`)."""
    return repository_with_parameters(source, {"weights": str(weights)}, folder)


def repository_with_parameters(source: Path, parameters: dict[str, str], folder: Path,
                               models: list[str] | None = None,
                               idle_timeout_s: float | None = None) -> Path:
    """A model repository in ``folder`` that serves ``source``'s models (only ``models`` when
    given) with ``parameters`` set: each model's files are linked, its configs (``config.pbtxt``,
    ``configs/*.pbtxt``) rewritten with each parameter set where the model has one, and with
    ``idle_timeout_s`` as the sequence models' idle timeout. A parameter no model has, or a model
    the source lacks, is an error (a typo would otherwise serve the defaults silently)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    model_dirs = sorted(p for p in Path(source).iterdir() if p.is_dir())
    if models is not None:
        missing = sorted(set(models) - {p.name for p in model_dirs})
        if missing:
            raise ValueError(f"no model {missing} in {source}")
        model_dirs = [p for p in model_dirs if p.name in models]
    unused = set(parameters)
    for model_dir in model_dirs:
        target = folder / model_dir.name
        target.mkdir(parents=True)
        configs = [model_dir / "config.pbtxt", *sorted(model_dir.glob("configs/*.pbtxt"))]
        for entry in model_dir.iterdir():
            if entry.name not in ("config.pbtxt", "configs"):
                (target / entry.name).symlink_to(entry.resolve())
        for config in (c for c in configs if c.is_file()):
            message = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
            for key, value in parameters.items():
                if key in message.parameters:
                    message.parameters[key].string_value = str(value)
                    unused.discard(key)
            if idle_timeout_s is not None and message.HasField("sequence_batching"):
                message.sequence_batching.max_sequence_idle_microseconds = \
                    int(idle_timeout_s * 1e6)
            written = target / config.relative_to(model_dir)
            written.parent.mkdir(parents=True, exist_ok=True)
            written.write_text(text_format.MessageToString(message))
    if unused:
        raise ValueError(f"no model in {source} has the parameter(s) {sorted(unused)}")
    return folder


# --------------------------------------------------------------------------- leftovers of crashes

@dataclass(frozen=True)
class StubProcess:
    """A running python-backend stub, from its command line (model path, shared-memory region,
    default and growth sizes, parent tritonserver's pid, ...)."""

    pid: int
    region: str
    parent_pid: int
    real_parent_pid: int
    model_instance: str


def _read_proc(pid: int | str, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours to read
        return None


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...] (None: no such process)."""
    stat = _read_proc(pid, "stat")
    if not stat:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return stat[stat.rindex(b")") + 2:].split()


def process_alive(pid: int | str) -> bool:
    """A process that exists and is no zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


def _parent_pid(pid: int | str) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == b"Z" else int(fields[1])


def python_stubs() -> list[StubProcess]:
    """Every live python-backend stub on this machine that we may read."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = (_read_proc(entry.name, "cmdline") or b"").split(b"\0")
        if len(argv) < 9 or Path(argv[0].decode(errors="replace")).name != STUB_NAME:
            continue
        real_parent = _parent_pid(entry.name)
        if real_parent is None or not argv[5].isdigit():
            continue
        stubs.append(StubProcess(int(entry.name), argv[2].decode(errors="replace"),
                                 int(argv[5]), real_parent, argv[8].decode(errors="replace")))
    return stubs


def _is_tritonserver(pid: int) -> bool:
    argv0 = (_read_proc(pid, "cmdline") or b"").split(b"\0")[0]
    return Path(argv0.decode(errors="replace")).name == "tritonserver"


def _shm_in_use() -> set[str]:
    """Names of /dev/shm files some live process maps or holds open."""
    used = set()
    prefix = f"{SHM_DIR}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        maps = _read_proc(entry.name, "maps") or b""
        for line in maps.decode(errors="replace").splitlines():
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if path.startswith(prefix):
                used.add(path[len(prefix):].removesuffix(" (deleted)"))
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(prefix):
                used.add(target[len(prefix):])
    return used


@dataclass
class Leftovers:
    killed_stubs: list[int]
    removed_regions: list[str]


def clean_leftovers(shm_dir: Path | None = None, settle_s: float = 5.0,
                    dying: Sequence[int] = ()) -> Leftovers:
    """Kill python-backend stubs whose tritonserver is gone (they deadlock holding their memory)
    and remove the stubs' shared-memory regions no live process uses. Only our own user's
    processes and files are touched; stubs of live servers (anyone's) are left alone.
    ``dying``: processes already sent SIGKILL, waited for like the ones killed here."""
    shm_dir = SHM_DIR if shm_dir is None else Path(shm_dir)
    uid = os.getuid()
    killed = []
    for stub in python_stubs():
        orphaned = stub.real_parent_pid != stub.parent_pid or not _is_tritonserver(stub.parent_pid)
        try:
            if orphaned and os.stat(f"/proc/{stub.pid}").st_uid == uid:
                os.kill(stub.pid, signal.SIGKILL)
                killed.append(stub.pid)
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            pass
    # a killed stub unmaps its region when it is gone; its new parent reaps it
    waiting = killed + list(dying)
    deadline = time.monotonic() + settle_s
    while waiting and time.monotonic() < deadline and any(
            _parent_pid(pid) is not None for pid in waiting):
        time.sleep(0.05)
    removed = []
    try:
        regions = [p for p in shm_dir.iterdir() if p.name.startswith(STUB_REGION_PREFIX)]
    except OSError:
        regions = []
    if regions:
        used = _shm_in_use()
        for region in regions:
            try:
                if region.name not in used and region.stat().st_uid == uid:
                    region.unlink()
                    removed.append(region.name)
            except OSError:
                pass
    return Leftovers(killed, removed)


def _probe_ssl(tls: TlsFiles | None) -> dict:
    """The supervisor's probe connects like a client: TLS with the server's own certificate as the
    trusted root and, under mutual TLS, the server's certificate and key as its identity."""
    if tls is None:
        return {}
    options = {"ssl": True, "root_certificates": str(tls.cert)}
    if tls.root is not None:
        options.update(private_key=str(tls.key), certificate_chain=str(tls.cert))
    return options
