"""The argument groups several verbs share, each defined once (polygraphy's ``args`` idea): the
model and its weights, tau, the cloud (URL, TLS, auth header), the edge executor, threads, the
frame size and the progress bar.

A group adds its options to a verb's parser with the verb's own help text where the verbs word it
differently (``fluxshard VERB --help`` is what users read, so it says what the option means for
that verb); types, defaults and metavars come from here. Nothing heavy is imported: bad input is
refused while the command line is parsed, before torch loads or a server starts.
"""

from __future__ import annotations

import argparse

from fluxshard import cli_common
from fluxshard.tau import tau_argument

EDGE_EXECUTORS = ("exact", "tiles", "dense")  # fluxshard.sessions.EXECUTORS

# ----------------------------------------------------------------------------- model and weights

# what every verb's --weights reads (fluxshard.models.weights.load_model)
WEIGHTS_SOURCES = ("an ultralytics YOLO11 .pt as it is (yolo11n.pt ... yolo11x-seg.pt, a trained "
                   "best.pt; read without ultralytics, never running code from the file), our "
                   "checkpoint or a state dict")
WEIGHTS_HELP = (f"the detector: {WEIGHTS_SOURCES}; class names and count come from it, and a "
                "local tritonserver serves it too (default: embedded demo detector)")


# every verb's --weights takes named pretrained weights (fluxshard.models.families.named_weights)
# and a family's own files as well
NAMED_WEIGHTS_HELP = (". Also a name: yolov3-tiny (pretrained Darknet YOLOv3-tiny, 80 COCO "
                      "classes, fetched on first use; `fluxshard weights list`), or a Darknet "
                      ".cfg with its .weights beside it")


def add_weights(p: argparse.ArgumentParser, help: str = WEIGHTS_HELP) -> None:
    """``--weights``: the detector (None: the embedded demo one, fluxshard.models.weights), a
    checkpoint or a named one such as ``yolov3-tiny``."""
    p.add_argument("--weights", default=None, help=help + NAMED_WEIGHTS_HELP)


# ------------------------------------------------------------------------------ predict options

def add_predict(p: argparse.ArgumentParser, served: bool = False) -> None:
    """ultralytics' predict options (fluxshard.predict): ``--imgsz --conf --iou --classes
    --max-det``. ``served``: `fluxshard serve`'s, which default to the model config's
    parameters (the same values) and set only those given."""
    from fluxshard.predict import DEFAULT_CONF, DEFAULT_IMGSZ, DEFAULT_IOU, DEFAULT_MAX_DET

    def default(value, parameter):
        return None if served else value, (f" (default: the config's `{parameter}` parameter, "
                                           f"{value})" if served else "")

    value, said = default(DEFAULT_IMGSZ, "imgsz")
    # served: kept as the parameter's text, so "native" differs from not given
    kind = _imgsz_parameter if served else cli_common.imgsz
    what = ("a frame whose long side is over it (a client that did not letterbox) is "
            "letterboxed down to it; smaller frames run as they are" if served else
            "each frame (and its motion field) is letterboxed to this long side")
    p.add_argument("--imgsz", type=kind, default=value, metavar="N|native",
                   help=f"inference size: {what}, keeping the aspect ratio and padding the short "
                        "side to a multiple of 32, as ultralytics does; boxes come back in the "
                        "frame's pixels. native: the frame as it is, padded to a multiple of 32"
                        + said)
    value, said = default(DEFAULT_CONF, "conf")
    p.add_argument("--conf", type=cli_common.fraction, default=value,
                   help="confidence threshold" + said)
    value, said = default(DEFAULT_IOU, "iou")
    p.add_argument("--iou", type=cli_common.fraction, default=value,
                   help="NMS IoU threshold" + said)
    p.add_argument("--classes", type=cli_common.nonnegative_int, nargs="+", default=None,
                   metavar="ID", help="keep only these class ids (default: all)")
    value, said = default(DEFAULT_MAX_DET, "max_det")
    p.add_argument("--max-det", type=cli_common.positive_int, default=value,
                   help="most detections per frame" + said)


def _imgsz_parameter(text: str) -> str:
    from fluxshard.predict import NATIVE

    value = cli_common.imgsz(text)
    return NATIVE if value is None else str(value)


_imgsz_parameter.__name__ = cli_common.imgsz.__name__


def predict_options(args: argparse.Namespace):
    """The :class:`fluxshard.predict.PredictOptions` of a verb's parsed ``add_predict``
    options."""
    from fluxshard.predict import PredictOptions

    return PredictOptions(imgsz=args.imgsz, conf=args.conf, iou=args.iou,
                          classes=tuple(args.classes) if args.classes else None,
                          max_det=args.max_det)


def served_predict_parameters(args: argparse.Namespace) -> dict[str, str]:
    """The served model's parameters for the ``add_predict(served=True)`` options given."""
    given = {"imgsz": args.imgsz, "conf": args.conf, "iou": args.iou, "max_det": args.max_det}
    parameters = {k: str(v) for k, v in given.items() if v is not None}
    if args.classes:
        parameters["classes"] = ",".join(map(str, args.classes))
    return parameters


# ------------------------------------------------------------------------------------------ tau

TAU_HELP = ("tau on the [0, 1] input scale, rounded to whole grey levels: picks the residual "
            "blocks and is the executors' truncation threshold, at the edge and in the cloud "
            "(default: 40/255)")


def add_tau(p: argparse.ArgumentParser, default: float | None = None, help: str = TAU_HELP,
            table: bool = False) -> None:
    """``--tau`` (fluxshard.tau's unit), and with ``table`` the ``--tau-table`` that sets it per
    motion level instead."""
    p.add_argument("--tau", type=tau_argument, default=default, help=help)
    if table:
        p.add_argument("--tau-table", type=cli_common.existing_file, default=None,
                       help="truncation table (fluxshard profile accuracy): tau per motion level")


# ---------------------------------------------------------------------------------------- cloud

CLOUD_URL_HELP = ("gRPC host:port of a running `fluxshard serve` (default: start a local "
                  "tritonserver)")


def add_cloud_url(p: argparse.ArgumentParser, help: str = CLOUD_URL_HELP) -> None:
    """``--cloud-url HOST:PORT`` (None: the verb starts a local tritonserver)."""
    p.add_argument("--cloud-url", type=cli_common.host_port, default=None, help=help)


# (option, help) of the PEM files each side of a TLS connection takes
CLIENT_TLS = (
    ("--tls-ca", "--cloud-url over TLS: PEM CA certificate to trust (the server's, or its "
                 "signer's)"),
    ("--tls-cert", "PEM client certificate for mutual TLS (needs --tls-key and --tls-ca)"),
    ("--tls-key", "PEM private key of --tls-cert"))
SERVER_TLS = (
    ("--tls-cert", "PEM server certificate: gRPC over TLS (needs --tls-key)"),
    ("--tls-key", "PEM private key of --tls-cert"),
    ("--tls-root", "PEM CA certificate clients must present a certificate of (mutual TLS)"))


def add_cloud_connection(p: argparse.ArgumentParser) -> None:
    """How a client reaches a ``fluxshard serve --tls-* --auth-header`` cloud: ``--tls-ca``,
    ``--tls-cert``, ``--tls-key``, ``--auth-header`` (FluxShardClient's TLS and headers)."""
    _add_pem_files(p, CLIENT_TLS)
    add_auth_header(p, "the header a `fluxshard serve --auth-header KEY=VALUE` cloud requires")


def add_server_security(p: argparse.ArgumentParser) -> None:
    """What `fluxshard serve` requires of its clients: TLS (``--tls-cert``, ``--tls-key``,
    ``--tls-root`` for mutual TLS) and an ``--auth-header``."""
    _add_pem_files(p, SERVER_TLS)
    add_auth_header(p, "requests other than health checks must carry this header (clients: "
                       "`fluxshard run --auth-header KEY=VALUE`, "
                       "FluxShardClient(headers=auth_headers(KEY, VALUE)))")


def _add_pem_files(p: argparse.ArgumentParser, options) -> None:
    for flag, help in options:
        p.add_argument(flag, type=cli_common.existing_file, default=None, help=help)


def add_auth_header(p: argparse.ArgumentParser, help: str) -> None:
    """``--auth-header KEY=VALUE``: what a client sends, or what a server requires."""
    from fluxshard.serving.tritonserver import auth_header  # stdlib-only at import

    p.add_argument("--auth-header", type=auth_header, default=None, metavar="KEY=VALUE",
                   help=help)


# ------------------------------------------------------------------------------------- executor

def add_executor(p: argparse.ArgumentParser, help: str, default: str | None = "exact",
                 choices: tuple[str, ...] = EDGE_EXECUTORS) -> None:
    """``--executor``: what computes the model (exact: the sparse executor, tiles: the v2 tile
    executor, dense: the fastest dense engine)."""
    p.add_argument("--executor", choices=choices, default=default, help=help)


def add_threads(p: argparse.ArgumentParser, default: int, help: str = "torch threads") -> None:
    """``--threads``: torch's intra-op threads, set once by the verb (the entry point)."""
    p.add_argument("--threads", type=cli_common.positive_int, default=default, help=help)


# ----------------------------------------------------------------------------- frames, progress

def add_size(p: argparse.ArgumentParser, help: str, default=(640, 384),
             type=cli_common.even_int) -> None:
    """``--size W H``: the frame size (even sides by default: yuv420p clips)."""
    p.add_argument("--size", type=type, nargs=2, default=default, metavar=("W", "H"), help=help)


def add_no_progress(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    p.add_argument("--no-progress", action="store_true", help=help)


def uplink_quality(text: str) -> int:
    """--uplink-quality: an x264 crf the uplink accepts."""
    from fluxshard.uplink_h264 import CRF_RANGE

    value = cli_common.positive_int(text)
    if not CRF_RANGE[0] <= value <= CRF_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be a crf in {CRF_RANGE[0]}..{CRF_RANGE[1]}, "
                                         f"got {value}")
    return value
