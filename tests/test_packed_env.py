"""The packed python-backend environment (docs/deploy.md, route (b)).

scripts/pack_env.py packs this Python with FluxShard into conda-pack's layout; a plain
tritonserver, started with an empty environment (no PATH to this Python, no LD_LIBRARY_PATH to
its libpython, no PYTHONPATH) in a folder without FluxShard, serves both shipped models from it
through `EXECUTION_ENV_PATH`: the python backend unpacks the .tar.gz and activates it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_triton
from plain_tritonserver import plain_tritonserver

ROOT = Path(__file__).resolve().parents[1]
PACK_ENV = ROOT / "scripts" / "pack_env.py"
ENV_PARAMETER = "$$TRITON_MODEL_DIRECTORY/../fluxshard_env.tar.gz"
EXTRACTED_PREFIX = "/tmp/python_env_"  # where the python backend unpacks environments


def mapped_files(pid: int) -> set[str]:
    rows = (line.split(maxsplit=5) for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    return {row[5] for row in rows if len(row) == 6 and row[5].startswith("/")}


def repository_with_environment(folder: Path) -> Path:
    """Both shipped models, each config with EXECUTION_ENV_PATH set as docs/deploy.md shows."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for model in ("fluxshard", "yolo11_dense"):
        source = ROOT / "model_repository" / model
        (folder / model).mkdir(parents=True)
        (folder / model / "1").symlink_to(source / "1")
        config = text_format.Parse((source / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        config.parameters["EXECUTION_ENV_PATH"].string_value = ENV_PARAMETER
        (folder / model / "config.pbtxt").write_text(text_format.MessageToString(config))
    return folder


def test_pack_env_refuses_a_stub_of_another_python(tmp_path, triton_installed):
    from fluxshard.serving.tritonserver import find_triton

    other = "3.10" if sys.version_info[:2] != (3, 10) else "3.12"
    stub = (find_triton().binary.parent.parent / "python_backend_stubs" / other
            / "triton_python_backend_stub")
    done = subprocess.run([sys.executable, str(PACK_ENV), "--out", str(tmp_path / "e.tar.gz"),
                           "--stub", str(stub)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"embeds Python {other}" in done.stderr, done.stderr
    assert not (tmp_path / "e.tar.gz").exists()


@pytest.mark.slow
def test_both_models_serve_from_the_packed_environment(tmp_path):
    from fluxshard.serving.supervisor import ModelProbe
    from fluxshard.serving.tritonserver import CACHE_DIR, find_triton, free_port, python_stubs

    require_triton()
    install = find_triton()
    repository = repository_with_environment(tmp_path / "repository")
    packed = subprocess.run([sys.executable, str(PACK_ENV), "--out",
                             str(repository / "fluxshard_env.tar.gz"), "--stub",
                             str(install.python_stub)], capture_output=True, text=True,
                            timeout=900)
    assert packed.returncode == 0, packed.stderr
    workdir = tmp_path / "workdir"  # the stub's sys.path starts here: no FluxShard in it
    workdir.mkdir()
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {"HOME": str(workdir), "PATH": "/usr/bin:/bin",  # the bundled server's own libraries
           "LD_LIBRARY_PATH": os.pathsep.join(str(p) for p in install.lib_dirs)}
    argv = [str(install.binary), f"--model-repository={repository}",
            f"--backend-directory={install.backend_dir}", "--model-control-mode=none",
            "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=5",
            "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
            f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    extracted: set[Path] = set()
    try:
        with plain_tritonserver(argv, env, workdir, tmp_path / "tritonserver.log",
                                f"127.0.0.1:{http}", timeout_s=600) as process:
            stubs = [s for s in python_stubs() if s.parent_pid == process.pid]
            assert sorted(re.sub(r"(_\d+)+$", "", s.model_instance) for s in stubs) == \
                ["fluxshard", "yolo11_dense"], stubs
            # the server's own files (stub, bundled libraries) may map; nothing of this Python
            # or this checkout may
            server_files = tuple(str(p.resolve()) + "/" for p in (CACHE_DIR, install.lib_dirs[0],
                                                                  install.backend_dir))
            ours = tuple(str(Path(p).resolve()) + "/" for p in (sys.prefix, ROOT))
            for stub in stubs:
                files = mapped_files(stub.pid)
                libraries = {Path(f).name.split(".so")[0]: f for f in files if ".so" in f}
                for library in ("libpython3", "libtorch_cpu"):
                    found = next(f for name, f in libraries.items() if name.startswith(library))
                    assert found.startswith(EXTRACTED_PREFIX), (stub.model_instance, found)
                    extracted.add(Path(found[:found.index("/", len(EXTRACTED_PREFIX))]))
                strays = [f for f in files if f.startswith(ours)
                          and not f.startswith(server_files)]
                assert not strays, (stub.model_instance, strays)
            ModelProbe(f"127.0.0.1:{grpc}")()  # fluxshard: a key frame, its digest checked
            import tritonclient.grpc as grpcclient

            frame = np.full((384, 640, 3), 114, np.uint8)
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}") as client:
                inp = grpcclient.InferInput("FRAME", list(frame.shape), "UINT8")
                inp.set_data_from_numpy(frame)
                detections = client.infer("yolo11_dense", [inp]).as_numpy("DETECTIONS")
            assert detections.ndim == 2 and detections.shape[1] == 6
    finally:
        for folder in extracted:  # a graceful stop removes them; a killed server does not
            shutil.rmtree(folder, ignore_errors=True)
        # hundreds of MB that pytest would keep with the last runs' temporary folders
        (repository / "fluxshard_env.tar.gz").unlink(missing_ok=True)
