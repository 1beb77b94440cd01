"""Find, start and stop a Triton Inference Server.

The binary comes from the ``nvidia-pytriton`` wheel that ``scripts/install.sh`` unpacks into
``.cache/tritonserver/`` (never into our environment: the wheel pins numpy<2), or from a Triton
install named by ``FLUXSHARD_TRITON_HOME`` (a directory with ``bin/tritonserver`` and
``backends/``), e.g. ``/opt/tritonserver`` in NVIDIA's containers.

The python-backend stub embeds libpython: we put *this* interpreter's libpython first on
LD_LIBRARY_PATH so the models run in the same Python, with our site-packages and this repository
importable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
PYTRITON_VERSION = "0.7.0"
CACHE_DIR = REPO_ROOT / ".cache" / "tritonserver"
WHEEL_SITE = CACHE_DIR / "site"  # pip install --no-deps --target of the nvidia-pytriton wheel


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
                 parameters: dict[str, str] | None = None):
        self.model_repository = Path(model_repository).resolve()
        # the models' `weights` parameter (absolute: the server's working folder is not ours)
        self.weights = Path(weights).resolve() if weights else None
        # model parameters to set (e.g. {"executor": "tiles"}), in every model that has them
        self.parameters = {str(k): str(v) for k, v in (parameters or {}).items()}
        self._weights_repository: tempfile.TemporaryDirectory | None = None
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.host = host
        self.models = models
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

    def command(self, install: TritonInstall) -> list[str]:
        repository = (Path(self._weights_repository.name) if self._weights_repository
                      else self.model_repository)
        cmd = [str(install.binary), f"--model-repository={repository}",
               f"--backend-directory={install.backend_dir}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", f"--http-address={self.host}",
               f"--grpc-address={self.host}", f"--log-verbose={self.log_verbose}",
               "--allow-metrics=true", "--exit-on-error=true", "--strict-readiness=true"]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        if self.models is not None:
            cmd += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in self.models]
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> "TritonServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("server already running")
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository not found: {self.model_repository}")
        install = find_triton()
        if (self.weights is not None or self.parameters) and self._weights_repository is None:
            if self.weights is not None and not self.weights.is_file():
                raise FileNotFoundError(f"weights file not found: {self.weights}")
            parameters = dict(self.parameters)
            if self.weights is not None:
                parameters["weights"] = str(self.weights)
            self._weights_repository = tempfile.TemporaryDirectory(prefix="fluxshard-models-")
            repository_with_parameters(self.model_repository, parameters,
                                       Path(self._weights_repository.name))
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

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL after ``grace`` seconds."""
        if self.process is None:
            return None
        try:
            return self._stop(grace)
        finally:
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

    def kill(self) -> None:
        """Die abruptly (tests: a crashed server)."""
        if self.is_running():
            self._signal(signal.SIGKILL)
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


def repository_with_weights(source: Path, weights: Path, folder: Path) -> Path:
    """A model repository in ``folder`` that serves ``source``'s models with ``weights`` (see
    :func:`repository_with_parameters`)."""
    return repository_with_parameters(source, {"weights": str(weights)}, folder)


def repository_with_parameters(source: Path, parameters: dict[str, str], folder: Path) -> Path:
    """A model repository in ``folder`` that serves ``source``'s models with ``parameters`` set:
    each model's files are linked, its configs (``config.pbtxt``, ``configs/*.pbtxt``) rewritten
    with each parameter set where the model has one. A parameter no model has is an error (a
    typo would otherwise serve the defaults silently)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    unused = set(parameters)
    for model_dir in sorted(p for p in Path(source).iterdir() if p.is_dir()):
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
            written = target / config.relative_to(model_dir)
            written.parent.mkdir(parents=True, exist_ok=True)
            written.write_text(text_format.MessageToString(message))
    if unused:
        raise ValueError(f"no model in {source} has the parameter(s) {sorted(unused)}")
    return folder


# ------------------------------------------------------------------------------------ CLI verb

def register(subparsers) -> None:
    from fluxshard import cli_common

    p = subparsers.add_parser("serve", help="run the Triton server with the FluxShard models",
                              description="Start tritonserver on the FluxShard model repository "
                                          "and serve until Ctrl-C.")
    p.add_argument("--model-repository", type=cli_common.existing_folder,
                   default=str(DEFAULT_MODEL_REPOSITORY), help="Triton model repository")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 to serve other machines)")
    port = cli_common.int_range(1, 65535)
    p.add_argument("--http-port", type=port, default=8000, help="HTTP/REST port")
    p.add_argument("--grpc-port", type=port, default=8001,
                   help="gRPC port (what `fluxshard run --cloud-url HOST:PORT` connects to)")
    p.add_argument("--metrics-port", type=port, default=8002, help="Prometheus metrics port")
    p.add_argument("--model-config-name", default=None,
                   help="config variant: 'gpu' loads <model>/configs/gpu.pbtxt (GPU / Jetson)")
    p.add_argument("--weights", default=None,
                   help="detector the models serve: our checkpoint, an ultralytics state dict "
                        "or converted .pt (default: embedded demo detector)")
    p.add_argument("--executor", choices=("exact", "tiles", "dense"), default=None,
                   help="the fluxshard model's compute: exact (sparse executor), tiles (v2 tile "
                        "executor, detect models only) or dense (default: the config's "
                        "`executor` parameter, exact)")
    p.add_argument("--log-file", default=None, help="server log (default: a temporary file)")
    p.add_argument("--timeout", type=cli_common.positive_float, default=300.0,
                   help="seconds to wait for readiness")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.weights:
        from fluxshard.models import load_model

        # a file that is no detector fails here, in one line, not in the server's log
        model = load_model(args.weights)
        if args.executor == "tiles" and model.task != "detect":
            print(f"fluxshard serve: --executor tiles handles detect models only; "
                  f"{args.weights} is a {model.task} model", file=sys.stderr)
            return 2
        print(f"weights {args.weights}: yolo11{model.scale}-{model.task}, {model.nc} classes "
              f"({', '.join(model.names[k] for k in range(min(model.nc, 8)))}"
              f"{', ...' if model.nc > 8 else ''})")
    server = TritonServer(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                          args.log_file, host=args.host, model_config_name=args.model_config_name,
                          weights=args.weights,
                          parameters={"executor": args.executor} if args.executor else None)
    try:
        server.start(args.timeout)
    except (TritonNotInstalled, TritonStartError, FileNotFoundError, ValueError) as e:
        print(f"fluxshard serve: {e}", file=sys.stderr)
        return 1
    print(f"tritonserver ready (pid {server.process.pid})\n  gRPC    {server.grpc_url}\n"
          f"  HTTP    http://{server.http_url}\n  metrics {server.metrics_url}\n"
          f"  log     {server.log_file}\nCtrl-C to stop.", flush=True)
    try:
        while server.is_running():
            time.sleep(0.5)
        print(f"tritonserver exited with code {server.process.returncode}\n{server.log_tail()}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        return 0 if server.stop() in (0, None) else 1
