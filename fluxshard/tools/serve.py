"""`fluxshard serve`: tritonserver on the FluxShard model repository, supervised (probes,
restarts) until a signal stops it (fluxshard.serving.tritonserver, .supervisor)."""

from __future__ import annotations

import argparse
import signal
import sys

from fluxshard import cli_common
from fluxshard.serving.tritonserver import (DEFAULT_MODEL_REPOSITORY, TlsFiles, TritonNotInstalled,
                                            TritonServer, TritonStartError, _probe_ssl)
from fluxshard.tools import args as shared


def register(subparsers) -> None:
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
    shared.add_weights(p, help=f"detector the models serve: {shared.WEIGHTS_SOURCES} "
                               "(default: embedded demo detector)")
    shared.add_predict(p, served=True)
    shared.add_executor(p, default=None,
                        help="the fluxshard model's compute: exact (sparse executor), tiles "
                             "(v2 tile executor) or dense (default: the "
                             "config's `executor` parameter, exact)")
    p.add_argument("--log-file", default=None, help="server log (default: a temporary file)")
    p.add_argument("--timeout", type=cli_common.positive_float, default=300.0,
                   help="seconds to wait for readiness")
    p.add_argument("--status-file", default=None,
                   help="JSON file the supervisor rewrites on every change: state (ready, "
                        "unhealthy, restarting, failed, stopped), ready, server pid, restarts")
    p.add_argument("--probe-interval", type=cli_common.positive_float, default=5.0,
                   help="seconds between the supervisor's probe inferences")
    p.add_argument("--failures-before-restart", type=cli_common.positive_int, default=2,
                   help="failed probes in a row after which the server is restarted")
    p.add_argument("--no-supervise", action="store_true",
                   help="no probes and no restarts: exit when tritonserver exits")
    p.add_argument("--exit-timeout", type=cli_common.int_range(0, 3600), default=5,
                   help="seconds a graceful stop waits for in-flight frames (Triton counts every "
                        "open stream as one)")
    shared.add_server_security(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import threading

    from fluxshard.serving.supervisor import ModelProbe, Supervisor

    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_root and not args.tls_cert):
        print("fluxshard serve: --tls-cert and --tls-key go together (and --tls-root needs them)",
              file=sys.stderr)
        return 2
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_root) if args.tls_cert else None
    if args.weights:
        from fluxshard.models import YOLO11, load_model
        from fluxshard.models.families import family_of

        # a file that is no detector fails here, in one line, not in the server's log
        model = load_model(args.weights)
        if args.executor in (None, "exact", "sparse") and not isinstance(model, YOLO11):
            print(f"fluxshard serve: {args.weights} is a "
                  f"{family_of(model).tag(model.scale, model.task)} model; the exact executor "
                  "(the default) supports YOLO11 only: pass --executor dense or tiles",
                  file=sys.stderr)
            return 2
        print(f"weights {args.weights}: {family_of(model).tag(model.scale, model.task)}, "
              f"{model.nc} classes "
              f"({', '.join(model.names[k] for k in range(min(model.nc, 8)))}"
              f"{', ...' if model.nc > 8 else ''})")
    server = TritonServer(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                          args.log_file, host=args.host, model_config_name=args.model_config_name,
                          weights=args.weights,
                          parameters={**({"executor": args.executor} if args.executor else {}),
                                      **shared.served_predict_parameters(args)} or None,
                          exit_timeout_s=args.exit_timeout, tls=tls,
                          auth_header=args.auth_header)
    # systemd and `docker stop` send SIGTERM, a terminal SIGINT or SIGHUP: all stop the server
    stop = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        server.start(args.timeout)
    except (TritonNotInstalled, TritonStartError, FileNotFoundError, ValueError) as e:
        print(f"fluxshard serve: {e}", file=sys.stderr)
        server.stop()
        return 1
    print(f"tritonserver ready (pid {server.process.pid})\n  gRPC    {server.grpc_url}"
          f"{' (TLS)' if tls else ''}{' (auth header)' if args.auth_header else ''}"
          f"\n  HTTP    http://{server.http_url}\n"
          f"  metrics {server.metrics_url}\n  log     {server.log_file}\nCtrl-C to stop.",
          flush=True)
    code = 0
    try:
        if args.no_supervise:
            while server.is_running() and not stop.wait(0.5):
                pass
            if not stop.is_set():
                print(f"tritonserver exited with code {server.process.returncode}\n"
                      f"{server.log_tail()}", file=sys.stderr)
                code = 1
        else:
            probe = ModelProbe(server.grpc_url, ssl_options=_probe_ssl(tls),
                               headers=server.client_headers())
            supervisor = Supervisor(server, probe, args.probe_interval,
                                    args.failures_before_restart, args.status_file,
                                    start_timeout_s=args.timeout)
            supervisor.run(stop)
            supervisor.mark_stopped(f"signal {received[0]}" if received else "stopped")
    finally:
        if received:
            print(f"{received[0]}: stopping tritonserver ...", flush=True)
        returned = server.stop()
    return code or (0 if returned in (0, None) or received else 1)
