"""The fluxshard model's own metrics, on Triton's metrics port (``/metrics``, beside Triton's
``nv_*`` ones), through the python backend's custom metrics API (``pb_utils.MetricFamily``).

Per stream (label ``stream``: the Triton correlation id): frames, key frames, executor seconds,
the tile executor's crop area of the last frame, resyncs. Per server: frames and executor time
by executor (a histogram), requests refused by reason, streams held. A stream's series exist
while the model holds the stream and are removed when it ends, times out or is closed, so the
number of series stays bounded by ``max_streams``, however many streams come and go.

:class:`SessionObserver` is what :class:`fluxshard.serving.session.SessionManager` tells about
its streams (it is no-op there); :class:`ServedModelMetrics` is the observer the Triton model
installs. Metrics never fail a frame: an error from the metrics API is logged once and the
metrics stop being updated.
"""

from __future__ import annotations

import sys

EXECUTOR_SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
                            1.0, 2.5)
# why a request got no detections (the model's error answers)
REFUSALS = ("resync", "bad_payload", "server_full", "internal")


class SessionObserver:
    """What a SessionManager reports about its streams; every hook does nothing here."""

    def frame(self, corrid: int, stats: dict) -> None:
        """A frame of stream ``corrid`` was served (``stats``: the response's STATS)."""

    def resync(self, corrid: int) -> None:
        """A stream the manager holds was asked for a key frame (its input cache cannot follow)."""

    def closed(self, corrid: int) -> None:
        """Stream ``corrid`` was freed (END, idle timeout, restart or shutdown)."""

    def refused(self, reason: str) -> None:
        """A request was refused (``reason`` one of :data:`REFUSALS`)."""


# the per-stream series: key -> (name, description, kind)
PER_STREAM = {
    "frames": ("fluxshard_stream_frames_total", "Frames served, per stream", "COUNTER"),
    "key_frames": ("fluxshard_stream_key_frames_total",
                   "Key frames served (dense pass, caches rebuilt), per stream", "COUNTER"),
    "executor_seconds": ("fluxshard_stream_executor_seconds_total",
                         "Executor time spent on the stream's frames, seconds", "COUNTER"),
    "crop_area": ("fluxshard_stream_crop_area_ratio",
                  "Tile executor: share of the input its crops covered on the stream's last "
                  "frame (halo included; key frames 1)", "GAUGE"),
    "resyncs": ("fluxshard_stream_resyncs_total",
                "Key frames asked of the stream (its input cache could not follow)", "COUNTER"),
}


class ServedModelMetrics(SessionObserver):
    """The observer on Triton's metrics port. ``pb_utils``: the python backend's
    ``triton_python_backend_utils`` module; ``labels``: added to every series (model, version).

    The python backend removes a series only with its whole family (a family keeps every
    metric made from it), so a stream's end rebuilds the per-stream families with the streams
    still held, from the values kept here: a live stream's series go on at the same values."""

    def __init__(self, pb_utils, labels: dict[str, str] | None = None):
        self._family = pb_utils.MetricFamily
        self._labels = dict(labels or {})
        self._broken = False
        executor_hist = self._make("fluxshard_executor_seconds",
                                   "Executor time per frame, seconds, by executor", "HISTOGRAM")
        refused = self._make("fluxshard_requests_refused_total",
                             "Requests answered with an error, by reason", "COUNTER")
        streams = self._make("fluxshard_streams", "Streams the model instance holds", "GAUGE")
        self._server_families = (executor_hist, refused, streams)  # live as long as the model
        self._streams = streams.Metric(labels=self._labels)
        self._refused = {reason: refused.Metric(labels={**self._labels, "reason": reason})
                         for reason in REFUSALS}
        self._by_executor: dict[str, object] = {}
        self._values: dict[int, dict[str, float]] = {}  # per stream: what its series hold
        self._series: dict[int, dict[str, object]] = {}
        self._stream_families: dict[str, object] = {}
        self._rebuild()

    def _make(self, name: str, description: str, kind: str):
        return self._family(name=name, description=description,
                            kind=getattr(self._family, kind))

    def _rebuild(self) -> None:
        """The per-stream families anew, holding the series of the streams in ``_values``."""
        self._series = {}  # the metrics before their families (the backend's order)
        self._stream_families = {}  # deleting a family removes its series from the endpoint
        self._stream_families = {key: self._make(*spec) for key, spec in PER_STREAM.items()}
        for corrid, values in self._values.items():
            series = self._new_series(corrid)
            for key, value in values.items():
                if value:
                    _add(series[key], value, PER_STREAM[key][2])
        self._streams.set(len(self._values))

    def _new_series(self, corrid: int) -> dict[str, object]:
        labels = {**self._labels, "stream": str(corrid)}
        series = {key: family.Metric(labels=labels)
                  for key, family in self._stream_families.items()}
        self._series[corrid] = series
        return series

    def _update(self, corrid: int, key: str, value: float) -> None:
        """Add ``value`` to stream ``corrid``'s counter ``key``, or set its gauge to it."""
        if corrid not in self._values:
            self._values[corrid] = dict.fromkeys(PER_STREAM, 0.0)
            self._new_series(corrid)
            self._streams.set(len(self._values))
        kind = PER_STREAM[key][2]
        values = self._values[corrid]
        values[key] = values[key] + value if kind == "COUNTER" else value
        _add(self._series[corrid][key], value, kind)

    def _guarded(self, update) -> None:
        if self._broken:
            return
        try:
            update()
        except Exception as e:  # noqa: BLE001 - a metrics failure must not fail the frame
            self._broken = True
            print(f"fluxshard model: metrics disabled after an error: {type(e).__name__}: {e}",
                  file=sys.stderr)

    def frame(self, corrid: int, stats: dict) -> None:
        def update():
            seconds = float(stats.get("compute_ms", 0.0)) / 1e3
            self._update(corrid, "frames", 1)
            self._update(corrid, "key_frames", 1 if stats.get("key") else 0)
            self._update(corrid, "executor_seconds", seconds)
            if "crop_area_fraction" in stats:
                self._update(corrid, "crop_area", float(stats["crop_area_fraction"]))
            self._executor_histogram(str(stats.get("executor", "unknown"))).observe(seconds)

        self._guarded(update)

    def _executor_histogram(self, executor: str):
        metric = self._by_executor.get(executor)
        if metric is None:  # a handful of executors: one series set each
            metric = self._server_families[0].Metric(
                labels={**self._labels, "executor": executor},
                buckets=list(EXECUTOR_SECONDS_BUCKETS))
            self._by_executor[executor] = metric
        return metric

    def resync(self, corrid: int) -> None:
        self._guarded(lambda: self._update(corrid, "resyncs", 1))

    def closed(self, corrid: int) -> None:
        def update():
            if self._values.pop(corrid, None) is not None:
                self._rebuild()

        self._guarded(update)

    def refused(self, reason: str) -> None:
        self._guarded(lambda: self._refused[reason].increment(1))


def _add(metric, value: float, kind: str) -> None:
    if kind == "COUNTER":
        if value:
            metric.increment(value)
    else:
        metric.set(value)
