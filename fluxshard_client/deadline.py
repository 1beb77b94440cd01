"""Frame deadlines and the cloud's health, off the frame path (issue 14 item 6).

The edge answers every frame (Dedelayed: the local path always works). A cloud call gets the
frame's :class:`Deadline`; one that misses it is abandoned and the edge runs the frame, and one
that finds the cloud unreachable gives up at once instead of sleeping between retries. Either
way the cloud is left out of dispatch while a :class:`CloudWatch` asks for its readiness in the
background (a thread, or a task of the running event loop), and the next cloud frame after it
answers is a key frame: an abandoned frame may or may not have reached the cloud.

Default deadline (:func:`default_deadline_ms`): the largest of :data:`DEADLINE_FLOOR_MS`,
:data:`EDGE_FRAMES_PER_DEADLINE` full edge frames (the edge's latency table at this frame size,
times its measured load) and :data:`CLOUD_ESTIMATES_PER_DEADLINE` times what the dispatcher
expects this cloud frame to take (uplink included, the cloud's measured load too). A cloud answer
later than that is worth less than the edge's own: the edge would have answered this frame and
the next few by then. Until the cloud has answered once (at the start, and after it was lost)
its estimate is only the table's and its first call pays connection set-up and a cold model, so
that frame gets at least :data:`COLD_DEADLINE_MS`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

# a healthy cloud's frames are not abandoned for a scheduling hiccup of a loaded box
DEADLINE_FLOOR_MS = 500.0
COLD_DEADLINE_MS = 2000.0
EDGE_FRAMES_PER_DEADLINE = 4.0
CLOUD_ESTIMATES_PER_DEADLINE = 4.0
# pauses between readiness probes of a cloud that stopped answering: first, largest
PROBE_BACKOFF_S = (0.2, 2.0)
PROBE_TIMEOUT_S = 2.0
# a stream's closing END frame: one prompt try (a server that is gone frees it by its idle sweep)
CLOSE_TIMEOUT_S = 5.0


def default_deadline_ms(edge_full_frame_ms: float, cloud_estimate_ms: float,
                        cloud_warm: bool = True) -> float:
    """The deadline of a cloud frame when none is configured (see the module doc)."""
    return max(DEADLINE_FLOOR_MS if cloud_warm else COLD_DEADLINE_MS,
               EDGE_FRAMES_PER_DEADLINE * edge_full_frame_ms,
               CLOUD_ESTIMATES_PER_DEADLINE * cloud_estimate_ms)


def check_deadline_ms(deadline_ms: float | None) -> float | None:
    """``deadline_ms`` as configured: None (derived per frame), a positive number, or infinity
    (no deadline: the transport's :class:`RetryPolicy` alone decides how long a frame waits)."""
    if deadline_ms is None:
        return None
    value = float(deadline_ms)
    if not value > 0:  # NaN included
        raise ValueError(f"deadline_ms must be > 0 (or inf: no deadline), got {deadline_ms}")
    return value


@dataclass
class Deadline:
    """The moment a frame's cloud answer stops being worth waiting for, on ``clock``."""

    at: float
    clock: Callable[[], float] = time.monotonic
    seconds: float | None = None  # how long it was set for

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> "Deadline":
        return cls(clock() + seconds, clock, seconds)

    def remaining(self) -> float:
        return self.at - self.clock()


class CloudWatch:
    """Whether the cloud may be dispatched to. :meth:`lost` takes it out and starts asking
    ``probe`` (True when the cloud is ready; a plain or an async callable) with growing pauses,
    in a background thread or a task of the running loop, until it answers; frames never wait
    on it."""

    def __init__(self, probe: Callable, backoff_s: tuple[float, float] = PROBE_BACKOFF_S):
        self.probe = probe
        self.backoff_s = backoff_s
        self.reason = ""  # why the cloud was taken out (while it is)
        self.probes = 0  # readiness probes asked since it was
        self._up = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = None  # the thread or task probing now

    @property
    def up(self) -> bool:
        return self._up

    def lost(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            if not self._up or self._stop.is_set():
                return  # already watching (or closed)
            self._up, self.probes = False, 0
            if asyncio.iscoroutinefunction(self.probe):
                self._worker = asyncio.get_running_loop().create_task(self._watch_async())
            else:
                self._worker = threading.Thread(target=self._watch, name="fluxshard-cloud-watch",
                                                daemon=True)
                self._worker.start()

    def _pauses(self):
        first, largest = self.backoff_s
        pause = first
        while True:
            yield pause
            pause = min(largest, pause * 2)

    def _answered(self, ready) -> bool:
        self.probes += 1
        if ready:
            self._up = True
        return bool(ready)

    def _watch(self) -> None:
        for pause in self._pauses():
            if self._stop.wait(pause):
                return
            try:
                ready = self.probe()
            except Exception:  # noqa: BLE001 - any failure means not ready yet
                ready = False
            if self._answered(ready):
                return

    async def _watch_async(self) -> None:
        for pause in self._pauses():
            await asyncio.sleep(pause)
            if self._stop.is_set():
                return
            try:
                ready = await self.probe()
            except Exception:  # noqa: BLE001 - any failure means not ready yet
                ready = False
            if self._answered(ready):
                return

    def close(self) -> None:
        self._stop.set()
        worker = self._worker
        if isinstance(worker, threading.Thread):
            worker.join()
        elif worker is not None and not worker.done():
            worker.cancel()


def no_deadline(deadline_ms: float | None) -> bool:
    return deadline_ms is not None and math.isinf(deadline_ms)
