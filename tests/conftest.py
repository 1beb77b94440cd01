"""Shared, session-scoped test inputs. Each fixture builds its files once per test session into a
temporary folder with the real tools (PyAV encoders, the synthetic scene generator)."""

from __future__ import annotations

import os
import shutil
import contextlib
import importlib.util
import subprocess
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def served_default_executor() -> str:
    """The executor the shipped ``fluxshard`` model runs unless told otherwise (its config's
    ``executor`` parameter)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (REPO_ROOT / "model_repository" / "fluxshard" / "config.pbtxt").read_text(),
        model_config_pb2.ModelConfig())
    return config.parameters["executor"].string_value


def load_script(relative: str):
    """A script of the repository (``perf/bench_real.py``, ``export/triton_config.py``, ...)
    loaded as a module from its path: scripts are not packages, tests call their functions."""
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# Small, short clips keep the suite fast; 320x192 is a multiple of 16, 330x198 is not.
CLIP_FRAMES = 30


def _synth_spec(**overrides):
    from fluxshard import synth

    base = dict(width=320, height=192, frames=CLIP_FRAMES, gop=CLIP_FRAMES, seed=0, num_objects=5,
                camera="pan")
    base.update(overrides)
    return synth.SceneSpec(**base)


# name -> (spec overrides, make_clip keyword arguments)
SYNTH_CLIPS = {
    "pan": ({}, {}),
    "pan_integer": ({"pan_angle": 0.0, "pan_speed": 2.0}, {}),
    "pan_zoom": ({"camera": "pan+zoom", "seed": 1}, {}),
    "multiref": ({}, {"ref": 4}),
    "bframes": ({}, {"bframes": 2}),
    "hevc": ({}, {"codec": "libx265"}),
    "odd_size": ({"width": 330, "height": 198, "seed": 2}, {}),
}


@pytest.fixture(scope="session")
def synth_clips(tmp_path_factory):
    """Lazily made synthetic clips: ``synth_clips(name) -> (ClipPaths, SceneSpec)``."""
    from fluxshard import synth

    folder = tmp_path_factory.mktemp("synth_clips")
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            spec_overrides, clip_kwargs = SYNTH_CLIPS[name]
            spec = _synth_spec(**spec_overrides)
            made[name] = (synth.make_clip(spec, folder, name=name, **clip_kwargs), spec)
        return made[name]

    return get


def require_triton() -> None:
    """Fail, saying how to fix it, when tritonserver is missing: scripts/install.sh installs
    it, so a missing server is a broken set-up, not a reason to skip the serving tests."""
    from fluxshard.serving.tritonserver import TritonNotInstalled, find_triton

    try:
        find_triton()
    except TritonNotInstalled as e:
        pytest.fail(f"{e} (scripts/install.sh installs it)", pytrace=False)


@pytest.fixture
def triton_installed():
    """For tests that start their own server."""
    require_triton()


@pytest.fixture(scope="session")
def tritonserver():
    """A real tritonserver on free local ports serving model_repository/, started once per session."""
    from fluxshard.serving.tritonserver import TritonServer

    require_triton()
    with TritonServer() as server:
        yield server


PLUGINS_ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0"))


@pytest.fixture(scope="session")
def plugin_build():
    """(plugin library, self-test binary), built once per session by scripts/build_plugins.sh."""
    # named one by one, so a skip says which tool to install
    tools = ((f"nvcc (the CUDA toolkit under {CUDA_HOME}, or set CUDA_HOME)",
              (CUDA_HOME / "bin" / "nvcc").exists()),
             ("cmake (apt-get install cmake, or pip install cmake)", shutil.which("cmake")),
             ("ninja (pip install ninja; scripts/install.sh does)", shutil.which("ninja")))
    missing = [what for what, found in tools if not found]
    if missing:
        pytest.skip("plugins_trt/ needs " + ", ".join(missing))
    done = subprocess.run(["bash", str(PLUGINS_ROOT / "scripts" / "build_plugins.sh")],
                          cwd=PLUGINS_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    library = Path(done.stdout.strip().splitlines()[-1])
    selftest = library.parent / "fluxshard_plugins_selftest"
    assert library.is_file() and selftest.is_file()
    return library, selftest


class TickingClock:
    """A clock that moves ``step`` seconds at every reading: whatever runs between two readings,
    the duration measured is exactly ``step`` (timed code tested without the machine's clock)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@contextlib.contextmanager
def crash_and_restart(server, log_file):
    """Kill ``server`` (a crash: no drain, no goodbye) and start a new one on its ports on a
    thread; inside the block a client's next send waits for it. Stopped on the way out."""
    from fluxshard.serving.tritonserver import TritonServer

    server.kill()
    restarted = TritonServer(http_port=server.http_port, grpc_port=server.grpc_port,
                             metrics_port=server.metrics_port, log_file=log_file,
                             models=server.models)
    starter = threading.Thread(target=restarted.start)
    starter.start()
    try:
        yield restarted
    finally:
        starter.join()
        restarted.stop()


def run_in_threads(work, keys) -> None:
    """Run ``work(key)`` for every key on a thread of its own, all at once; fail with every
    exception raised (concurrent streams against one server)."""
    errors = []

    def worker(key):
        try:
            work(key)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(key,)) for key in keys]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


class Scrape:
    """One scrape of a Prometheus endpoint (``/metrics``), as the text format says it."""

    def __init__(self, url: str):
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(url, timeout=10) as response:
            self.text = response.read().decode()
        self.samples = [(s.name, s.labels, s.value)
                        for family in text_string_to_metric_families(self.text)
                        for s in family.samples]

    def value(self, name: str, **labels) -> float | None:
        """The sum of sample ``name`` over the series whose labels include ``labels`` (None:
        no such series)."""
        found = [value for sample, have, value in self.samples
                 if sample == name and all(have.get(k) == str(want)
                                           for k, want in labels.items())]
        return sum(found) if found else None


@contextlib.contextmanager
def delay_proxy(target_port: int, delay_s: float, **proxy_kwargs):
    """``fluxshard.serving.netshape``'s proxy on loopback, in a thread, in front of
    ``target_port``: both directions held ``delay_s`` (a round trip of twice that); yields the
    proxy's port. ``proxy_kwargs`` go to ``serve_proxy`` (loss, stats)."""
    import asyncio

    from fluxshard.serving import netshape

    ready = threading.Event()
    proxy_port = netshape.free_port()
    loop = asyncio.new_event_loop()

    async def run_proxy():
        try:
            await netshape.serve_proxy(("127.0.0.1", proxy_port), ("127.0.0.1", target_port),
                                       delay_s, ready=ready.set, **proxy_kwargs)
        except asyncio.CancelledError:  # how it is stopped
            pass

    runner = threading.Thread(target=loop.run_until_complete, daemon=True, args=(run_proxy(),))
    runner.start()
    ready.wait()
    try:
        yield proxy_port
    finally:
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        runner.join()
        loop.close()
