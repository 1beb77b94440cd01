"""What every `fluxshard` verb shares: help that shows each option's default, descriptions taken
whole from the owning module's docstring, argument types that refuse bad input while the command
line is parsed (before torch is imported or a server starts), and output folders that a failed run
leaves as it found them.

Exit codes (``fluxshard.cli.main``): 2 for a usage error (argparse, or :class:`UsageError` raised by
a verb), 1 for a runtime failure (one line on stderr, no traceback), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import shutil
from pathlib import Path


class UsageError(Exception):
    """A verb found its arguments inconsistent after parsing: reported like an argparse error."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written (paragraphs, lists) and appends ``(default: X)`` to every
    option that has a default its help does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = show_default(action)
        if shown is not None and "default" not in text.lower():
            # argparse %-formats help strings: a literal % in a default must be escaped
            text += f" (default: {shown.replace('%', '%%')})"
        return text


def show_default(action: argparse.Action) -> str | None:
    """The default as a user would type it, or None when there is nothing to show (flags, no
    default, help/version actions)."""
    default = action.default
    if (default is None or default is argparse.SUPPRESS or isinstance(default, bool)
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
        return None
    if not action.option_strings and action.nargs not in ("?", "*"):
        return None  # a required positional never falls back to its default
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default)
    return str(default)


def describe(doc: str | None, paragraphs: int | None = None) -> str:
    """A verb's description: the first ``paragraphs`` paragraphs of its module docstring (None:
    all of it), whole sentences, with reST literals shown as `x`."""
    text = inspect.cleandoc(doc or "")
    if paragraphs is not None:
        text = "\n\n".join(text.split("\n\n")[:paragraphs])
    return text.replace("``", "`").strip()


def set_formatter(parser: argparse.ArgumentParser) -> None:
    """Use :class:`HelpFormatter` on ``parser`` and every sub-parser under it (argparse does not
    pass the formatter on to sub-parsers)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                set_formatter(sub)


# ---------------------------------------------------------------------------- argument types

def _number(kind, low, inclusive: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or (value < low if inclusive else value <= low):  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_int = _number(int, 0, False, "an integer > 0")
nonnegative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a number > 0")
nonnegative_float = _number(float, 0.0, True, "a number >= 0")


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def int_range(low: int, high: int):
    """An integer in [low, high]."""
    def parse(text: str) -> int:
        value = _number(int, low, True, f"an integer in [{low}, {high}]")(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {value}")
        return value

    parse.__name__ = f"an integer in [{low}, {high}]"
    return parse


def multiple_of(n: int):
    """A positive integer that is a multiple of ``n`` (frame sides the model's strides divide)."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value % n:
            raise argparse.ArgumentTypeError(f"expected a multiple of {n}, got {value}")
        return value

    parse.__name__ = f"a multiple of {n}"
    return parse


def imgsz(text: str) -> int | None:
    """``--imgsz``: a multiple of 32, or "native" (None: the frame as it is)."""
    from fluxshard.predict import imgsz_value

    try:
        return imgsz_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


imgsz.__name__ = "a multiple of 32 or 'native'"


def even_int(text: str) -> int:
    """A positive even integer (yuv420p frames need even sides)."""
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"expected an even integer (yuv420p), got {value}")
    return value


def host_port(text: str) -> str:
    """``HOST:PORT`` of a gRPC endpoint (no scheme)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in text or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:8001), got {text!r}")
    return text


def existing_file(text: str) -> Path:
    """A readable, non-empty regular file."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"{text} is empty")
    return path


def existing_folder(text: str) -> Path:
    """A folder that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder" if not path.exists()
                                         else f"{text} is a file, not a folder")
    return path


def video_source(text: str) -> str:
    """A video file PyAV opens with a video stream whose first frame decodes, or a URL (RTSP,
    HTTP, ...), which is only checked when the run opens it: a live source may take seconds."""
    if "://" in text:
        return text
    existing_file(text)
    import av  # here, not at the top: `fluxshard --help` should not pay for it

    try:
        with av.open(text) as container:
            if not container.streams.video:
                raise argparse.ArgumentTypeError(f"{text} has no video stream")
            # one frame: a header that opens can still hide an undecodable stream
            next(container.decode(video=0), None)
    except argparse.ArgumentTypeError:
        raise
    except Exception as e:  # noqa: BLE001 - FFmpeg raises many kinds; all mean "not a video"
        reason = getattr(e, "strerror", None) or str(e)
        raise argparse.ArgumentTypeError(f"{text} is not a video FFmpeg can read ({reason})")
    return text


def output_folder(text: str) -> Path:
    """A folder to write into: it may exist (as a folder) or not yet. Not created here: a run
    creates it once its inputs are known to be good."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


# ------------------------------------------------------------------------------------ outputs

@contextlib.contextmanager
def clean_up_on_failure(folder: str | Path, keep=lambda: False):
    """Undo what a failing run wrote into ``folder``: on an exception, remove the entries that were
    not there before (and the folder with any parents it created, if it did not exist), unless
    ``keep()`` says the run already wrote results worth keeping (e.g. frames before a Ctrl-C)."""
    folder = Path(folder)
    top = folder
    while not top.parent.exists() and top.parent != top:
        top = top.parent  # the first ancestor a run's mkdir(parents=True) would create
    existed = folder.exists()
    before = set(folder.iterdir()) if existed else set()
    try:
        yield folder
    except BaseException:
        if not keep():
            if not existed:
                shutil.rmtree(top if top.exists() else folder, ignore_errors=True)
            elif folder.is_dir():
                for entry in set(folder.iterdir()) - before:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
        raise


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fluxshard")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
