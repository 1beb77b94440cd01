"""The adaptive dense bypass: a policy object around a :class:`SparseExecutor`.

A frame whose non-reusable share (stride-8 positions failing RFAP Cond. 2, else changed input
pixels) exceeds ``above`` has nothing worth reusing: the fastest dense engine (``runner``) runs
it instead and the stream's layer caches are dropped (the next reusable frame is a key frame).
``adaptive``: reusable frames are bypassed too while the stream's measured sparse latency (EWMA)
exceeds the bypass's, re-measuring the sparse path every ``probe_interval`` bypassed frames, so
the endpoint is never much slower than its fastest dense engine.

The policy keeps no per-frame state: what it measures per stream lives in the stream's
:class:`BypassStats` (``StreamState.bypass_stats``), so one policy serves every stream.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .ops import channels_last
from .state import PROBE_FRAMES, BypassStats, FrameReport, StreamState

__all__ = ["PROBE_FRAMES", "AdaptiveBypass", "BypassStats", "SteppedExecutor"]


class SteppedExecutor(Protocol):
    """The executor's frame steps the bypass drives (``SparseExecutor``)."""

    model: torch.nn.Module

    def begin(self, state: StreamState, frame: torch.Tensor, field, *, key: bool, tau): ...

    def unaligned(self, ctx) -> float: ...

    def compare_input(self, ctx): ...

    def walk(self, ctx, x): ...

    def end(self, ctx) -> FrameReport: ...


class AdaptiveBypass:
    """``executor`` with the dense bypass ``runner`` (fluxshard.models.dense.DenseRunner, e.g.
    onnxruntime, or a callable frame -> eval output); see the module doc. ``run`` and ``model``
    are the executor's, so it stands wherever the executor does."""

    def __init__(self, executor: SteppedExecutor, runner, *, above: float = 0.5,
                 adaptive: bool = False, probe_interval: int = 30):
        self.executor = executor
        self.runner = runner
        self.above = above
        self.adaptive = adaptive
        self.probe_interval = probe_interval

    @property
    def model(self):
        return self.executor.model

    @torch.no_grad()
    def run(self, state: StreamState, frame: torch.Tensor, field: np.ndarray | None = None, *,
            key: bool = False, tau: float | None = None):
        """As :meth:`SparseExecutor.run`; the report says whether the frame was bypassed."""
        ex = self.executor
        stats = state.bypass_stats
        with ex.begin(state, frame, field, key=key, tau=tau) as ctx:
            report, x, bypass = ctx.report, None, False
            if not report.key:
                # Cheap tests first: an unaligned frame skips the input compare (which costs
                # most when everything moves) and reports the unaligned share instead.
                unaligned = ex.unaligned(ctx)
                bypass = unaligned > self.above or (self.adaptive and self._bypass_is_faster(stats))
                if bypass:
                    report.input_changed = unaligned
                    state.caches["input"] = channels_last(frame)
                else:
                    x = ex.compare_input(ctx)
                    bypass = report.input_changed > self.above
            if bypass:
                out = self._run_dense(frame)
                report.bypassed = True
                state.drop_layer_caches()
            else:
                out = ex.walk(ctx, ex.compare_input(ctx) if x is None else x)
        ex.end(ctx)
        self._record_latency(stats, report)
        return out, report

    def _bypass_is_faster(self, stats: BypassStats) -> bool:
        """Bypass reusable frames too while this stream's measured sparse latency exceeds the
        bypass's; every ``probe_interval`` bypassed frames, measure the sparse path again (a key
        frame, then ``PROBE_FRAMES`` sparse frames)."""
        if stats.sparse_probe_left > 0 or stats.sparse_ms is None:
            return False
        if stats.bypass_ms is None:
            return True  # measure the bypass once
        if stats.bypassed_since_probe >= self.probe_interval:
            stats.bypassed_since_probe = 0
            stats.sparse_probe_left = PROBE_FRAMES
            return False
        return stats.sparse_ms > stats.bypass_ms

    @staticmethod
    def _record_latency(stats: BypassStats, report: FrameReport) -> None:
        ms = report.seconds * 1e3
        if report.bypassed:
            stats.bypass_ms = _ewma(stats.bypass_ms, ms)
            stats.bypassed_since_probe += 1
        elif not report.key:
            stats.sparse_ms = _ewma(stats.sparse_ms, ms)
            stats.sparse_probe_left = max(0, stats.sparse_probe_left - 1)

    def _run_dense(self, frame: torch.Tensor):
        """The runner's output in the model's eval format (torch tensors)."""
        out = self.runner.run(frame) if hasattr(self.runner, "run") else self.runner(frame)
        if isinstance(out, (list, tuple)):  # onnxruntime: [output0] or [output0, prototypes]
            out = [torch.as_tensor(o, device=frame.device) for o in out]
            return out[0] if len(out) == 1 else tuple(out)
        return out


def _ewma(old: float | None, new: float, alpha: float = 0.3) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new
