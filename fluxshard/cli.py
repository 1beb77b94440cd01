"""FluxShard: motion-aware edge-cloud video inference. `fluxshard VERB --help` says what a verb
does and lists its options with their defaults.

Each verb is one module of fluxshard.tools, which exposes `register(subparsers)` (adds its
sub-parser, sets `func`); the options several verbs share are defined once in
fluxshard.tools.args. Modules are imported only when their verb is used, so `fluxshard synth` does
not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fluxshard import cli_common

# verb -> (module, one-line help). Order is the order `fluxshard --help` lists them.
VERBS: dict[str, tuple[str, str]] = {
    "run": ("fluxshard.tools.run", "run a video (or --demo) through edge/cloud dispatch"),
    "demo": ("fluxshard.tools.demo", "run the main job on the embedded default (= run --demo)"),
    "synth": ("fluxshard.tools.synth", "make a synthetic H.264 clip with ground truth"),
    "motion": ("fluxshard.tools.motion", "motion and residual statistics of a clip (table + plot)"),
    "serve": ("fluxshard.tools.serve", "run the Triton server with the FluxShard models"),
    "train-demo": ("fluxshard.tools.train_demo", "train the embedded demo weights"),
    "profile": ("fluxshard.tools.profile",
                "offline profiles: latency tables, accuracy (tau table)"),
    "export": ("fluxshard.tools.export", "YOLO11 -> FluxShard ONNX graph (onnxruntime, TensorRT)"),
    "footage": ("fluxshard.tools.footage", "fetch, list or re-encode the real-footage corpus"),
    "weights": ("fluxshard.tools.weights", "list or fetch named pretrained weights (yolov3-tiny)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxshard", description=cli_common.describe(__doc__, 1))
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {cli_common.package_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for verb, (module, help_text) in VERBS.items():
        if verb == wanted:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(verb, help=help_text)
    cli_common.set_formatter(parser)
    parser.verbs = sub.choices  # verb -> its parser, for usage errors a verb raises later
    return parser


# Runtime failures the verbs expect (bad files, a server that does not start, a stream that
# breaks): one line, exit 1. FLUXSHARD_TRACEBACK=1 shows where instead.
EXPECTED_ERRORS = (OSError, ValueError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0, 1 (runtime failure), 2 (usage error: argparse's message printed), 130.
    Returned rather than raised, so callers in Python get it the same way for every error."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse: --help, --version, usage errors
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # SystemExit("message"), as Python would print it
        return 1


def _main(argv: list[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    verb_parser = parser.verbs[args.verb]
    try:
        return int(args.func(args) or 0)
    except cli_common.UsageError as e:
        verb_parser.error(str(e))  # exits 2
    except KeyboardInterrupt:
        print(f"{verb_parser.prog}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        if os.environ.get("FLUXSHARD_TRACEBACK"):
            raise
        print(f"{verb_parser.prog}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
