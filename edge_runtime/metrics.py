"""What `fluxshard run` measures while it runs, in memory that does not grow with the stream.

:class:`EdgeMetrics`: Prometheus metrics of one run (``prometheus_client``, in a registry of its
own, so several runs or streams in one process never share series), served on
``--metrics-port``. :class:`RollingSummary`: what ``summary.json`` reports, from running totals
and the latencies of the last :data:`SUMMARY_WINDOW` frames (every frame of a clip shorter than
that), never a row per frame.
"""

from __future__ import annotations

import threading

import numpy as np

# per-frame latency, seconds: from a fast edge frame to a cloud frame on a slow link
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SUMMARY_WINDOW = 100_000  # frames whose latencies give summary.json's percentiles
DEFAULT_METRICS_ADDRESS = "127.0.0.1"  # --metrics-address: who may scrape


def frame_executor(result, edge_executor: str) -> str:
    """What ran the frame: the cloud says in its stats; the edge runs ``edge_executor``."""
    if result.endpoint == "cloud":
        return str(result.stats.get("executor", "unknown"))
    return edge_executor


def frame_resyncs(result) -> tuple[int, int]:
    """(key frames the cloud asked for, reconnect tries) on the way to this frame's answer."""
    reasons = result.stats.get("resyncs") or ()
    unavailable = sum(1 for r in reasons if str(r).startswith("unavailable"))
    return len(reasons) - unavailable, unavailable


class EdgeMetrics:
    """The metrics of one `fluxshard run`, in their own ``CollectorRegistry``. A frame is
    counted whole: a scrape through :meth:`serve` never sees half of one."""

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self.lock = threading.Lock()
        where = ("endpoint", "executor")
        self.frames = Counter("fluxshard_frames", "Frames processed, by endpoint and executor",
                              where, registry=self.registry)
        self.key_frames = Counter("fluxshard_key_frames",
                                  "Key frames (dense pass, caches rebuilt), by endpoint",
                                  ("endpoint",), registry=self.registry)
        self.latency = Histogram("fluxshard_frame_latency_seconds",
                                 "Per-frame latency (motion, dispatch, inference, uplink and "
                                 "round trip), seconds", where, buckets=LATENCY_BUCKETS_S,
                                 registry=self.registry)
        self.cache_hit = Histogram("fluxshard_cache_hit_ratio",
                                   "Share of feature positions reused, per frame", ("endpoint",),
                                   buckets=RATIO_BUCKETS, registry=self.registry)
        self.crop_area = Histogram("fluxshard_crop_area_ratio",
                                   "Tile executor on the edge: share of the input its crops "
                                   "covered, per frame (halo included; key frames 1)",
                                   buckets=RATIO_BUCKETS, registry=self.registry)
        self.uplink_bytes = Counter("fluxshard_uplink_bytes", "Payload bytes sent to the cloud",
                                    registry=self.registry)
        self.link_estimate = Gauge("fluxshard_uplink_estimate_bits_per_second",
                                   "The dispatcher's estimate of the uplink's bandwidth",
                                   registry=self.registry)
        self.resyncs = Counter("fluxshard_cloud_resyncs",
                               "Key frames the cloud asked for (its cache could not follow)",
                               registry=self.registry)
        self.reconnects = Counter("fluxshard_cloud_reconnects",
                                  "Tries to reach a cloud that did not answer",
                                  registry=self.registry)
        self.cloud_up = Gauge("fluxshard_cloud_up", "1 while the cloud serves frames, 0 while it "
                              "is lost (frames run on the edge); absent without a cloud",
                              ("cloud",), registry=self.registry)
        self.cloud_losses = Counter("fluxshard_cloud_losses",
                                    "Times the cloud was lost (then frames run on the edge)",
                                    registry=self.registry)
        self.edge_fallback = Counter("fluxshard_edge_fallback_frames",
                                     "Frames run on the edge because the cloud could not serve "
                                     "them", registry=self.registry)
        self._cloud_was_up: bool | None = None

    def observe(self, result, edge_executor: str) -> None:
        """Count one frame's FrameResult (``edge_executor``: what the edge runs)."""
        with self.lock:
            self._observe(result, frame_executor(result, edge_executor))

    def _observe(self, result, executor: str) -> None:
        self.frames.labels(result.endpoint, executor).inc()
        if result.key:
            self.key_frames.labels(result.endpoint).inc()
        self.latency.labels(result.endpoint, executor).observe(result.latency_ms / 1e3)
        self.cache_hit.labels(result.endpoint).observe(result.cache_hit_rate)
        if result.endpoint == "edge" and "crop_area_fraction" in result.stats:
            self.crop_area.observe(float(result.stats["crop_area_fraction"]))
        self.uplink_bytes.inc(result.uplink_bytes)
        self.link_estimate.set(result.bandwidth_mbps * 1e6)
        resyncs, reconnects = frame_resyncs(result)
        self.resyncs.inc(resyncs)
        self.reconnects.inc(reconnects)

    def cloud_state(self, cloud: str, up: bool) -> None:
        """The ``cloud`` (its URL) answers (``up``) or was lost."""
        with self.lock:
            if not up and self._cloud_was_up is not False:
                self.cloud_losses.inc()
            self._cloud_was_up = up
            self.cloud_up.labels(cloud).set(1 if up else 0)

    def serve(self, port: int, address: str = DEFAULT_METRICS_ADDRESS) -> "MetricsServer":
        """Serve the registry on ``http://address:port/metrics`` until the server is closed."""
        return MetricsServer(_Consistent(self.registry, self.lock), port, address)


class _Consistent:
    """A registry read under the lock its writer holds per frame (prometheus_client's exporter
    collects from anything with ``collect``)."""

    def __init__(self, registry, lock: threading.Lock):
        self.registry, self.lock = registry, lock

    def collect(self):
        with self.lock:
            return list(self.registry.collect())

    def restricted_registry(self, names):
        return _Consistent(self.registry.restricted_registry(names), self.lock)


class MetricsServer:
    """prometheus_client's HTTP exporter of one registry, on a thread, closed by :meth:`close`."""

    def __init__(self, registry, port: int, address: str = DEFAULT_METRICS_ADDRESS):
        from prometheus_client import start_http_server

        try:
            self._httpd, self._thread = start_http_server(port, address, registry=registry)
        except OSError as e:
            raise ValueError(f"--metrics-port {port}: cannot listen on {address}:{port} "
                             f"({e.strerror or e})") from None
        self.port = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class _Window:
    """The last ``size`` values in a ring buffer (grown up to ``size`` as values come)."""

    def __init__(self, size: int):
        self.size = size
        self.values = np.empty(min(size, 1024))
        self.count = 0

    def add(self, value: float) -> None:
        if self.count < self.size and self.count == len(self.values):
            grown = np.empty(min(self.size, 2 * len(self.values)))
            grown[:self.count] = self.values
            self.values = grown
        self.values[self.count % self.size] = value
        self.count += 1

    def recent(self) -> np.ndarray:
        return self.values[:min(self.count, self.size)]


class _Totals:
    """Running totals of one endpoint's frames (or all of them)."""

    def __init__(self, window: int):
        self.frames = self.key_frames = 0
        self.latency_sum = 0.0
        self.latencies = _Window(window)

    def add(self, latency_ms: float, key: bool) -> None:
        self.frames += 1
        self.key_frames += int(key)
        self.latency_sum += latency_ms
        self.latencies.add(latency_ms)

    def latency_stat(self) -> dict | None:
        if not self.frames:
            return None
        recent = self.latencies.recent()
        return {"mean": round(self.latency_sum / self.frames, 3),
                "p50": round(float(np.median(recent)), 3),
                "p90": round(float(np.percentile(recent, 90)), 3)}


class RollingSummary:
    """summary.json's numbers, kept as the frames go by: counts and means over every frame,
    latency percentiles over the last ``window`` frames. Feed it :meth:`add` per frame."""

    def __init__(self, window: int = SUMMARY_WINDOW):
        self.window = window
        self.all = _Totals(window)
        self.endpoints = {name: _Totals(window) for name in ("edge", "cloud")}
        self.uplink_bytes = 0
        self.jpeg_bytes: int | None = None  # None: no per-frame JPEG baseline was made
        self.cache_hit_sum = self.residual_sum = 0.0
        self.crop_sum, self.crop_frames = 0.0, 0

    @property
    def frames(self) -> int:
        return self.all.frames

    def add(self, record: dict, jpeg_bytes: int | None = None) -> None:
        """One detections.jsonl record (``outputs.detection_record``); ``jpeg_bytes``: the
        frame as a per-frame JPEG, when that baseline is made."""
        self.all.add(record["latency_ms"], record["key"])
        self.endpoints[record["endpoint"]].add(record["latency_ms"], record["key"])
        self.uplink_bytes += record["uplink_bytes"]
        if jpeg_bytes is not None:
            self.jpeg_bytes = (self.jpeg_bytes or 0) + jpeg_bytes
        self.cache_hit_sum += record["cache_hit_rate"]
        self.residual_sum += record["residual_fraction"]
        if "crop_area_fraction" in record:
            self.crop_sum += record["crop_area_fraction"]
            self.crop_frames += 1

    def summary(self, extra: dict) -> dict:
        n = self.frames
        jpeg = self.jpeg_bytes
        return {"frames": n, "latency_ms": self.all.latency_stat(),
                "latency_percentiles_over_frames": min(n, self.window),
                "endpoints": {name: {"frames": t.frames, "latency_ms": t.latency_stat(),
                                     "key_frames": t.key_frames}
                              for name, t in self.endpoints.items()},
                "uplink_bytes_total": self.uplink_bytes, "jpeg_q90_bytes_total": jpeg,
                "uplink_vs_jpeg": round(self.uplink_bytes / jpeg, 4) if jpeg else None,
                "cache_hit_rate_mean": round(self.cache_hit_sum / n, 4) if n else None,
                "residual_fraction_mean": round(self.residual_sum / n, 4) if n else None,
                # tiles: the share of the input its crops covered (halo included), edge frames
                "crop_area_fraction_mean": round(self.crop_sum / self.crop_frames, 4)
                if self.crop_frames else None,
                **extra}
