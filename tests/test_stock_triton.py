"""The shipped model_repository/ under a plain tritonserver (docs/deploy.md, "The command").

The tritonserver binary is started directly with the command docs/deploy.md shows (read from
the page, so the page cannot drift from what runs), not through `fluxshard serve`; the python
stub gets this Python the way the page tells a Triton user to (the Python first on PATH, its
libpython on LD_LIBRARY_PATH, the checkout as working folder). Then the SDK, `tritonclient` and
perf_analyzer run against it over TLS, the admin protocols answer only the admin header, and a
killed stub shows what `fluxshard serve`'s supervision is for.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import load_script, require_triton, served_default_executor
from plain_tritonserver import plain_tritonserver

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
COMMAND_MARKER = "<!-- stock-tritonserver-command"
ADMIN_PROTOCOLS_HEADER = "triton-grpc-protocol-fluxshard-admin"
ONNXRUNTIME_CONFIG = ROOT / "model_repository" / "yolo11_dense" / "configs" / "onnxruntime.pbtxt"


def documented_command() -> str:
    """The bash block after the marker in docs/deploy.md."""
    text = DEPLOY_DOC.read_text()
    assert COMMAND_MARKER in text, f"{DEPLOY_DOC} lost its command block marker"
    block = text[text.index(COMMAND_MARKER):].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.lstrip().startswith('"$TRITON_HOME/bin/tritonserver"'), block[:200]
    return block.strip()


def load_test_module():
    return load_script("perf/load_test.py")


def host_python_environment(install) -> dict[str, str]:
    """docs/deploy.md, "The host's own Python": nothing of this process's environment but HOME."""
    libdir = sysconfig.get_config_var("LIBDIR")
    return {"HOME": os.environ.get("HOME", "/root"),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
            "LD_LIBRARY_PATH": os.pathsep.join([libdir] + [str(p) for p in install.lib_dirs])}


@pytest.fixture(scope="module")
def stock_server(tmp_path_factory):
    from fluxshard.serving.pki import make_pki
    from fluxshard.serving.tritonserver import find_triton, free_port

    require_triton()
    install = find_triton()
    folder = tmp_path_factory.mktemp("stock_triton")
    pki = make_pki(folder / "certs")
    http, grpc, metrics = free_port(), free_port(), free_port()
    secret = secrets.token_hex(24)
    env = host_python_environment(install)
    env.update(TRITON_HOME=str(install.binary.parent.parent), REPO=str(ROOT),
               ADMIN_SECRET=secret, CERTS=str(folder / "certs"))
    log = folder / "tritonserver.log"
    # the documented command as it stands, ports moved to free ones (the last flag wins)
    argv = ["bash", "-c", f'exec {documented_command()} "$@"', "tritonserver",
            f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    with plain_tritonserver(argv, env, ROOT, log, f"127.0.0.1:{http}") as process:
        yield SimpleNamespace(process=process, grpc_url=f"127.0.0.1:{grpc}",
                              http_url=f"127.0.0.1:{http}", secret=secret, ca=pki["ca"][0],
                              log=log)


def grpc_client(server, **kwargs):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True,
                                            root_certificates=str(server.ca), **kwargs)


@pytest.fixture(scope="module")
def dense_onnx(tmp_path_factory):
    """The dense graph `fluxshard export` writes (the embedded detector, 384x640)."""
    from fluxshard.models.export import export_onnx
    from fluxshard.sessions import load_dense_model

    return export_onnx(load_dense_model(None), tmp_path_factory.mktemp("dense") / "dense.onnx")


def test_grpc_needs_tls_and_the_admin_protocols_need_the_header(stock_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    admin = {ADMIN_PROTOCOLS_HEADER: stock_server.secret}
    with grpc_client(stock_server) as client:
        assert client.is_server_ready() and client.is_model_ready("fluxshard")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
        index = client.get_model_repository_index(headers=admin)
        assert {m.name: m.state for m in index.models} == {"fluxshard": "READY",
                                                           "yolo11_dense": "READY"}
        # model control none: not even the admin can unload (or load, or upload) a model
        with pytest.raises(InferenceServerException, match="(?i)explicit model load / unload"):
            client.unload_model("yolo11_dense", headers=admin)
    with httpclient.InferenceServerClient(stock_server.http_url) as http:
        with pytest.raises(InferenceServerException, match="restricted"):
            http.get_model_repository_index()
        assert len(http.get_model_repository_index(headers={"fluxshard-admin":
                                                            stock_server.secret})) == 2
    with grpcclient.InferenceServerClient(stock_server.grpc_url) as plaintext:
        with pytest.raises(InferenceServerException):
            plaintext.is_server_live(client_timeout=10)


def test_sdk_streams_through_the_plain_server(stock_server, synth_clips):
    from fluxshard import wire
    from fluxshard.motion import iter_motion
    from fluxshard_client import FluxShardClient

    paths, _spec = synth_clips("pan")
    frames = [mf.image for mf in iter_motion(paths.video, max_frames=6)]
    with FluxShardClient(stock_server.grpc_url, ssl=True,
                         root_certificates=str(stock_server.ca)) as client:
        stream = client.open_stream(key_codec=wire.Codec.H264, residual_codec=wire.Codec.H264)
        results = [stream.send(frame, end=k == len(frames) - 1) for k, frame in enumerate(frames)]
    assert [r.frame_index for r in results] == list(range(len(frames)))
    assert [r.resyncs for r in results] == [[]] * len(frames)  # every digest matched the mirror
    assert results[0].key and not any(r.key for r in results[1:])
    assert {r.stats["executor"] for r in results} == {served_default_executor()}


def test_tritonclient_yolo11_dense_runs_onnxruntime(stock_server, dense_onnx, synth_clips):
    """The served dense model is the onnxruntime engine: its answer equals the exported graph's
    run here, decoded alike."""
    import cv2
    import torch
    import tritonclient.grpc as grpcclient

    from fluxshard.models import postprocess, preprocess
    from fluxshard.models.export import onnxruntime_session
    from fluxshard.motion import iter_motion
    from fluxshard.sessions import detection_rows

    paths, _spec = synth_clips("pan")
    decoded = next(iter(iter_motion(paths.video, max_frames=1))).image
    frame = np.ascontiguousarray(cv2.resize(decoded, (640, 384)))  # the prepared input size
    with grpc_client(stock_server) as client:
        inp = grpcclient.InferInput("FRAME", list(frame.shape), "UINT8")
        inp.set_data_from_numpy(frame)
        served = client.infer("yolo11_dense", [inp]).as_numpy("DETECTIONS")
    x = preprocess(frame)
    raw = onnxruntime_session(dense_onnx, threads=1).run(None, {"images": x.numpy()})[0]
    expected = detection_rows(postprocess(torch.from_numpy(raw), x.shape[-2:], frame.shape[:2],
                                          conf_thres=0.25, iou_thres=0.7)[0])
    assert served.shape == expected.shape and served.shape[1] == 6
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_perf_analyzer_runs_both_models(stock_server, tmp_path):
    load_test = load_test_module()
    found = load_test.find_perf_analyzer()
    if found is None:
        pytest.skip("perf_analyzer is not installed (scripts/install_perf_tools.sh)")
    binary, env = found
    frames: list[np.ndarray] = []
    sequences = load_test.sequence_payloads(16, 8, 12 / 255, 16, 320, 192, tmp_path,
                                            keep_frames=frames)
    files = load_test.write_input_data(tmp_path / "input", sequences, frames)
    commands = load_test.perf_analyzer_commands(stock_server.grpc_url, files, 8,
                                                requests_per_window=8,
                                                root_certificates=stock_server.ca)
    for model, command in commands.items():
        report = tmp_path / f"{model}.csv"
        # three windows, each taken as stable: this checks that it runs, not its numbers (on a
        # shared machine max/min of three windows can be anything)
        done = subprocess.run([binary, *command[1:], "--max-trials", "3",
                               "--stability-percentage", "100000", "-f", str(report)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{model}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        row = next(csv.DictReader(io.StringIO(report.read_text())))
        assert float(row["Inferences/Second"]) > 0, row
    with grpc_client(stock_server) as client:
        for model in commands:
            stats = client.get_inference_statistics(model).model_stats[0].inference_stats
            assert stats.fail.count == 0 and stats.success.count > 0, (model, stats)


def flags(command: str) -> dict[str, str]:
    """``--name=value`` flags of a command line -> {name: value}."""
    return dict(re.findall(r"(--[a-z-]+)=(\S+)", command.replace('"', "")))


def test_the_dockerfile_runs_the_documented_command():
    """deploy/Dockerfile cannot be built here (no docker daemon): its command is at least the
    documented one, with the image's paths, the GPU configs and gRPC on all addresses."""
    documented = flags(documented_command())
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    # exec form, continuation lines joined as docker joins them: ["/bin/sh", "-c", "exec ..."]
    command = json.loads(dockerfile[dockerfile.index("CMD") + 3:].replace("\\\n", ""))[-1]
    for spelled in ("${ADMIN_SECRET:?set ADMIN_SECRET}", "${ADMIN_SECRET}"):
        command = command.replace(spelled, "$ADMIN_SECRET")  # the shell's spellings of it
    image = flags(command)
    paths = {"--model-repository": "/models", "--grpc-server-cert": "/certs/server.pem",
             "--grpc-server-key": "/certs/server.key"}
    expected = {name: paths.get(name, value) for name, value in documented.items()
                if name != "--backend-directory"}  # the image's default
    expected["--model-config-name"] = "gpu"
    assert image == expected


def test_onnxruntime_backend_config_matches_the_exported_graph(dense_onnx):
    """configs/onnxruntime.pbtxt (Triton's onnxruntime backend, not in the bundled server): its
    tensors are the exported graph's, names, types and shapes."""
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(ONNXRUNTIME_CONFIG.read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "onnxruntime" and config.max_batch_size == 0
    graph = onnx.load(str(dense_onnx)).graph
    onnx_types = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32}

    def signature(values):
        return {v.name: (onnx_types[v.type.tensor_type.elem_type],
                         [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values}

    assert {t.name: (t.data_type, list(t.dims)) for t in config.input} == signature(graph.input)
    assert {t.name: (t.data_type, list(t.dims)) for t in config.output} == signature(graph.output)


def test_a_killed_stub_leaves_health_ready_while_its_model_fails(stock_server):
    """What `fluxshard serve`'s supervisor is for (Triton issues 8604, 7230): runs last, it
    leaves yolo11_dense dead."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from fluxshard.serving.tritonserver import process_alive, python_stubs

    stubs = [s.pid for s in python_stubs() if s.parent_pid == stock_server.process.pid
             and s.model_instance.startswith("yolo11_dense")]
    assert len(stubs) == 1, stubs
    os.kill(stubs[0], signal.SIGKILL)
    while process_alive(stubs[0]):
        time.sleep(0.05)
    frame = np.zeros((64, 96, 3), np.uint8)
    with grpc_client(stock_server) as client:
        inp = grpcclient.InferInput("FRAME", list(frame.shape), "UINT8")
        inp.set_data_from_numpy(frame)
        with pytest.raises(InferenceServerException, match="(?i)stub"):
            client.infer("yolo11_dense", [inp], client_timeout=60)
    with httpclient.InferenceServerClient(stock_server.http_url) as http:
        assert http.is_server_ready() and http.is_model_ready("yolo11_dense")
