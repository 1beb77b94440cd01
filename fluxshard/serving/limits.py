"""What one client may cost the ``fluxshard`` model (issue 14): frame size, sessions, memory.

* :class:`FrameLimits` refuses a frame larger than the server accepts from its header alone,
  before any decompression, decoding or compute (``max_frame_side``, ``max_frame_pixels``; the
  default fits cameras up to 1920x1088 in either orientation). The frame size bounds what one
  frame costs the instance that serialises it.
* :func:`derived_max_streams`: the session cap from the memory the server gives each instance,
  ``max_streams = floor(memory_budget_mb / session_memory_mb)``, where ``session_memory_mb`` is
  what one session of the largest accepted frame holds with the configured executor
  (``perf/reliability_limits.py`` measures it; model_repository/README.md records it).
* :func:`release_memory` hands freed heap back to the system after a session ends (glibc keeps
  freed arenas otherwise, and the resident size would only ever grow).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
from dataclasses import dataclass

from fluxshard.wire import PayloadError

DEFAULT_MAX_FRAME_SIDE = 1920
DEFAULT_MAX_FRAME_PIXELS = 1920 * 1088


class FrameTooLarge(PayloadError):
    """A frame over the server's size limit; the message names the limit and the parameter."""


@dataclass(frozen=True)
class FrameLimits:
    max_side: int = DEFAULT_MAX_FRAME_SIDE
    max_pixels: int = DEFAULT_MAX_FRAME_PIXELS

    def __post_init__(self):
        if self.max_side < 1 or self.max_pixels < 1:
            raise ValueError(f"frame limits must be positive, got side {self.max_side}, "
                             f"pixels {self.max_pixels}")

    def check(self, height: int, width: int) -> None:
        """Raise :class:`FrameTooLarge` unless a ``height`` x ``width`` frame is within limits."""
        if max(height, width) > self.max_side or height * width > self.max_pixels:
            raise FrameTooLarge(
                f"frame {width}x{height} is larger than this server accepts (at most "
                f"{self.max_side} px a side and {self.max_pixels} pixels: the model's "
                "max_frame_side / max_frame_pixels parameters); send a smaller frame")

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "FrameLimits":
        return cls(int(params.get("max_frame_side") or DEFAULT_MAX_FRAME_SIDE),
                   int(params.get("max_frame_pixels") or DEFAULT_MAX_FRAME_PIXELS))


def derived_max_streams(memory_budget_mb: float, session_memory_mb: float) -> int:
    """Sessions that fit ``memory_budget_mb`` when each holds ``session_memory_mb`` (at least 1)."""
    if not memory_budget_mb > 0 or not session_memory_mb > 0:
        raise ValueError(f"memory_budget_mb and session_memory_mb must be > 0, got "
                         f"{memory_budget_mb} and {session_memory_mb}")
    return max(1, math.floor(memory_budget_mb / session_memory_mb))


def max_streams_from_parameters(params: dict[str, str]) -> int:
    """``max_streams`` when set to a number, else derived from ``memory_budget_mb`` and
    ``session_memory_mb`` (:func:`derived_max_streams`)."""
    explicit = (params.get("max_streams") or "auto").strip()
    if explicit != "auto":
        value = int(explicit)
        if value < 1:
            raise ValueError(f"max_streams must be >= 1 or 'auto', got {explicit!r}")
        return value
    try:
        budget, per_session = params["memory_budget_mb"], params["session_memory_mb"]
    except KeyError as e:
        raise ValueError(f"max_streams 'auto' needs the {e.args[0]} parameter") from None
    return derived_max_streams(float(budget), float(per_session))


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_memory(collect: bool = False) -> bool:
    """Return free heap pages to the system (glibc ``malloc_trim``); whether a trim ran.
    ``collect`` first runs the cycle collector: sessions are freed by reference counting, and a
    full collection in a process holding a torch model costs far more than the trim."""
    if collect:
        gc.collect()
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of one process, MB (``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


__all__ = ["FrameLimits", "FrameTooLarge", "DEFAULT_MAX_FRAME_SIDE", "DEFAULT_MAX_FRAME_PIXELS",
           "derived_max_streams", "max_streams_from_parameters", "release_memory", "rss_mb"]
