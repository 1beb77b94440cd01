"""Issue 14, the server process: a locked-down server (model control none, admin protocols behind a
per-server secret), supervision that sees a dead python-backend stub and restarts the server, and
process hygiene (one process group, signals, orphaned stubs and shared memory cleaned up).
Every case runs a real tritonserver; streams are real SDK streams checked frame by frame."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_triton

from perf.reliability_kit import StreamDriver, kill_stub, try_model_upload, try_shared_memory
from fluxshard.serving.supervisor import ModelProbe, ProbeFailed, Supervisor, read_status
from fluxshard.serving.tritonserver import (SHM_DIR, TritonServer, clean_leftovers, find_triton,
                                            free_port, process_alive as alive, python_stubs)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory):
    require_triton()
    log = tmp_path_factory.mktemp("locked") / "server.log"
    with TritonServer(models=["fluxshard"], log_file=log) as server:
        yield server


def test_server_loads_its_models_at_start_and_refuses_admin_protocols(locked_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server = locked_server
    command = " ".join(server.command(find_triton()))
    assert "--model-control-mode=none" in command and "--load-model" not in command
    # our own admin calls still work with the secret: only the models asked for are served
    with httpclient.InferenceServerClient(server.http_url) as http:
        index = http.get_model_repository_index(headers=server.admin_headers("http"))
        assert [(m["name"], m["state"]) for m in index] == [("fluxshard", "READY")]
        with pytest.raises(Exception, match="restricted"):
            http.get_model_repository_index()
    with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
        grpc.get_system_shared_memory_status(headers=server.admin_headers("grpc"))
        with pytest.raises(Exception, match="restricted"):
            grpc.update_log_settings({"log_verbose_level": 1})
    # an upload, an unload, a look at or a registration of shared memory: all refused
    assert try_model_upload(server).count("restricted") == 2
    assert try_shared_memory(server).count("restricted") == 2
    # with the secret, model control none still refuses to change what is served
    assert "restricted" not in try_model_upload(server, server.admin_headers("grpc"))
    ModelProbe(server.grpc_url)()  # and inference is open to everyone


def test_admin_headers_name_the_protocols_header(locked_server):
    assert locked_server.admin_headers("http") == {"fluxshard-admin": locked_server.admin_secret}
    assert locked_server.admin_headers("grpc") == {
        "triton-grpc-protocol-fluxshard-admin": locked_server.admin_secret}
    with pytest.raises(ValueError, match="protocol"):
        locked_server.admin_headers("smtp")


@pytest.mark.slow
def test_supervisor_restarts_a_server_whose_stub_was_killed(tmp_path, triton_installed):
    import tritonclient.grpc as grpcclient

    server = TritonServer(models=["fluxshard"], log_file=tmp_path / "server.log")
    lines = []
    with server:
        supervisor = Supervisor(server, failures_before_restart=2,
                                status_file=tmp_path / "status.json", log=lines.append)
        assert supervisor.step().ready and read_status(tmp_path / "status.json")["ready"]
        driver = StreamDriver(server.grpc_url, 1401, seed=1)
        for _ in range(3):
            driver.send_next()
        old_pid = server.process.pid
        [stub] = kill_stub(server)
        # Triton still calls the server and the model ready: only a real inference tells
        with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
            assert grpc.is_server_ready() and grpc.is_model_ready("fluxshard")
        with pytest.raises(ProbeFailed, match="not healthy"):
            supervisor.probe()
        status = supervisor.step()  # the first failure: reported, not yet acted on
        assert status.state == "unhealthy" and not status.ready and status.restarts == 0
        assert read_status(tmp_path / "status.json")["ready"] is False
        status = supervisor.step()  # the second: restart on the same ports
        assert status.ready and status.restarts == 1 and server.process.pid != old_pid
        assert not alive(stub) and not alive(old_pid)
        for _ in range(4):
            driver.send_next()
        report = driver.stop()
    assert report.frames_sent == report.frames_answered == 7 and report.frames_lost == 0
    assert report.resyncs == 1  # the first frame after the restart went again as a key frame
    assert [s for s, _ in read_status(tmp_path / "status.json")["history"]] == [
        "ready", "unhealthy", "restarting", "ready"]
    assert any("restarting" in line for line in lines)


@pytest.mark.slow
def test_killed_tritonserver_leaves_no_stub_or_shared_memory(tmp_path, triton_installed):
    server = TritonServer(models=["fluxshard"], log_file=tmp_path / "server.log")
    with server:
        stubs = [s for s in python_stubs() if s.parent_pid == server.process.pid]
        assert stubs and all((SHM_DIR / s.region).exists() for s in stubs)
        server.kill(whole_group=False)  # what the OOM killer does to tritonserver
        assert all(alive(s.pid) for s in stubs)  # orphaned, holding their memory
        leftovers = clean_leftovers()  # what the next start (or stop) runs
        assert {s.pid for s in stubs} <= set(leftovers.killed_stubs)
        assert {s.region for s in stubs} <= set(leftovers.removed_regions)
        assert not any(alive(s.pid) for s in stubs)
        assert not any((SHM_DIR / s.region).exists() for s in stubs)


@pytest.mark.slow
def test_stop_kills_the_stubs_of_a_crashed_server(tmp_path, triton_installed):
    server = TritonServer(models=["fluxshard"], log_file=tmp_path / "server.log").start()
    stubs = [s for s in python_stubs() if s.parent_pid == server.process.pid]
    server.kill(whole_group=False)
    server.stop()
    assert stubs and not any(alive(s.pid) or (SHM_DIR / s.region).exists() for s in stubs)


@pytest.mark.slow
def test_serve_stops_its_whole_group_on_sigterm_without_waiting_for_open_streams(
        tmp_path, triton_installed):
    ports = [str(free_port()) for _ in range(3)]
    status_file, log = tmp_path / "status.json", tmp_path / "server.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "fluxshard.cli", "serve", "--http-port", ports[0], "--grpc-port",
         ports[1], "--metrics-port", ports[2], "--status-file", str(status_file), "--log-file",
         str(log), "--exit-timeout", "2", "--probe-interval", "1"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # until serve says ready (or dies); pytest's timeout (pyproject) is the hang guard
        while (status := read_status(status_file)) is None or not status["ready"]:
            assert serve.poll() is None, serve.stdout.read()
            time.sleep(0.5)
        server_pid = status["server_pid"]
        stubs = [s for s in python_stubs() if s.parent_pid == server_pid]
        driver = StreamDriver(f"127.0.0.1:{ports[1]}", 1402, seed=2)
        driver.send_next()  # a stream left open: Triton counts it as an in-flight inference
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=120)
        driver.client.close()
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, output
    assert "SIGTERM: stopping tritonserver" in output
    assert stubs and not alive(server_pid) and not any(alive(s.pid) for s in stubs)
    assert not any((SHM_DIR / s.region).exists() for s in stubs)
    assert read_status(status_file)["state"] == "stopped"
    # Triton's drain counted down from our exit timeout, not its default 30 s
    countdown = [int(line.split('"Timeout ')[1].split(":")[0])
                 for line in log.read_text().splitlines() if '"Timeout ' in line]
    assert countdown and max(countdown) <= 2


def test_serve_refuses_half_a_tls_setup(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not used")
    done = subprocess.run([sys.executable, "-m", "fluxshard.cli", "serve", "--tls-cert",
                           str(cert)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--tls-key" in done.stderr


def make_certificates(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key (PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.slow
def test_grpc_over_tls_answers_tls_clients_only(tmp_path, triton_installed):
    import tritonclient.grpc as grpcclient

    from fluxshard.serving.tritonserver import TlsFiles, _probe_ssl

    cert, key = make_certificates(tmp_path)
    tls = TlsFiles(cert, key)
    with TritonServer(models=["fluxshard"], log_file=tmp_path / "server.log", tls=tls) as server:
        ModelProbe(server.grpc_url, ssl_options=_probe_ssl(tls))()  # a TLS client is served
        with grpcclient.InferenceServerClient(server.grpc_url) as plain:
            with pytest.raises(Exception):
                plain.is_server_live(client_timeout=5)
    with pytest.raises(FileNotFoundError, match="TLS key"):
        TlsFiles(cert, tmp_path / "missing.key")
