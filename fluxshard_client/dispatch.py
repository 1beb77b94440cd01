"""Per-frame edge/cloud dispatch (v1 section IV-D; docs/DESIGN.md, "Per frame, on the edge",
step 4).

For each frame the edge knows, per endpoint, the residual set that endpoint would have to
recompute (its active block fraction) and, for the cloud, the uplink bytes. Latencies come from
profiled tables (``fluxshard profile latency``): latency against active residual-block fraction,
interpolated piecewise-linearly. The uplink is a fixed latency ``D_hat`` (round trip, queues)
plus bytes over a bandwidth ``B_hat``, both fitted to the measured transfers (round trip less
the server's own time) of recent cloud frames of different sizes (:class:`BandwidthEstimator`),
and each endpoint's load factor ``L`` an EWMA of measured / profiled latency (device load: other
work on the edge, a busy server, throttling). Then::

    T_edge  = L_edge  * T_edge_table[f_edge]
    T_cloud = L_cloud * T_cloud_table[f_cloud] + D_hat + bytes(S0_cloud) / B_hat
    edge if T_edge < T_cloud - margin, else cloud (within the margin the cloud saves edge energy)

The edge table is the one of the executor the edge runs (``Dispatcher.edge_executor``): the exact
executor's is indexed by the active residual-block fraction; the tile executor's by the share of
the input its crops cover (halo included), which the dispatcher predicts from the residual blocks
(:func:`tile_crop_share`) and learns against the share the executor reports; the dense
executor's is one latency whatever changed.

B_hat, D_hat and L learn only from the endpoint that ran, so in auto mode an endpoint left out
for ``probe_interval`` frames runs once (a probe): a stale estimate cannot lock it out for good.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import asdict, dataclass, field as dataclass_field
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np

POLICIES = ("auto", "edge", "cloud", "alternate")
ENDPOINTS = ("edge", "cloud")
# what the edge may run (fluxshard.sessions.EXECUTORS; "sparse": older name of "exact")
EDGE_EXECUTORS = ("exact", "tiles", "dense")
EXECUTOR_ALIASES = {"sparse": "exact"}
# the tile executor's defaults (fluxshard.tiles.TileExecutor) the crop-share prediction assumes
TILE_HALO_PX, TILE_DENSE_ABOVE = 16, 0.6
PROFILE_VERSION = 1
# where `fluxshard profile latency` writes, and `fluxshard run` reads when present (relative to
# the command's working folder; the SDK itself reads no file it is not told of)
DEFAULT_PROFILE_PATH = Path("out/profile/latency.json")
# an application points the SDK at its latency profile with this, or passes profile=
PROFILE_ENV = "FLUXSHARD_LATENCY_PROFILE"


@dataclass
class LatencyTable:
    """Latency (ms) against the active residual-block fraction in [0, 1]; piecewise linear
    between the profiled points, constant beyond the ends."""

    fractions: list[float]
    ms: list[float]

    def __post_init__(self):
        f, t = np.asarray(self.fractions, float), np.asarray(self.ms, float)
        if f.ndim != 1 or f.size < 1 or f.shape != t.shape:
            raise ValueError(f"latency table needs matching non-empty fractions and ms, got "
                             f"{len(self.fractions)} and {len(self.ms)} values")
        if not (np.all(np.isfinite(f)) and np.all(np.isfinite(t))) or (t < 0).any():
            raise ValueError("latency table values must be finite and ms >= 0")
        if (f < 0).any() or (f > 1).any() or (np.diff(f) <= 0).any():
            raise ValueError(f"latency table fractions must rise strictly within [0, 1]: {f}")
        self.fractions, self.ms = f.tolist(), t.tolist()

    def __call__(self, fraction: float) -> float:
        return float(np.interp(min(max(float(fraction), 0.0), 1.0), self.fractions, self.ms))


def edge_executor_name(name: str) -> str:
    """The edge executor ``name`` means (older alias resolved); a clear error otherwise."""
    canonical = EXECUTOR_ALIASES.get(name, name)
    if canonical not in EDGE_EXECUTORS:
        raise ValueError(f"edge executor must be one of {EDGE_EXECUTORS}, got {name!r}")
    return canonical


def tile_crop_share(mask: np.ndarray, block: int, halo_px: int = TILE_HALO_PX,
                    dense_above: float = TILE_DENSE_ABOVE) -> float:
    """Predicted crop area share of the tile executor for residual blocks ``mask``: the blocks
    grown by the halo; above ``dense_above`` the executor runs the frame dense (share 1). Its
    area budget is left out: crops snapped to its size buckets can exceed it, and the load
    factor learns against the share the executor reports."""
    mask = np.ascontiguousarray(mask, bool)
    if mask.size == 0 or not mask.any():
        return 0.0
    r = -(-int(halo_px) // int(block))
    # every frame pays this on the edge, also when the cloud is not a candidate: one OpenCV
    # dilation (zero outside the frame), not a loop of NumPy shifts
    grown = cv2.dilate(mask.view(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
    share = np.count_nonzero(grown) / grown.size
    return 1.0 if share > dense_above else float(share)


@dataclass
class LatencyProfile:
    """Edge and cloud latency tables, measured at ``width`` x ``height``. Other frame sizes scale
    the latencies by their pixel count (compute is about proportional to it).

    ``edge`` is the exact executor's table (active residual-block fraction); ``edge_executors``
    holds the other edge executors' tables by name: "tiles" against the crop area share, "dense"
    flat. An executor without a profiled table uses the built-in one (older profiles have none)."""

    edge: LatencyTable
    cloud: LatencyTable
    width: int = 640
    height: int = 384
    source: str = "default"  # "default" (built in) or "profiled" (and where/when, in meta)
    meta: dict = dataclass_field(default_factory=dict)
    edge_executors: dict = dataclass_field(default_factory=dict)  # name -> LatencyTable

    def scale(self, width: int, height: int) -> float:
        return (width * height) / float(self.width * self.height)

    def has_edge_table(self, executor: str) -> bool:
        executor = edge_executor_name(executor)
        return executor == "exact" or executor in self.edge_executors

    def edge_ms(self, executor: str, share: float, width: int, height: int) -> float:
        """The edge latency of ``executor`` at ``share`` (its table's x), scaled to the frame
        size; the built-in table when this profile has none for it."""
        executor = edge_executor_name(executor)
        if executor == "exact":
            return self.scale(width, height) * self.edge(share)
        if executor in self.edge_executors:
            return self.scale(width, height) * self.edge_executors[executor](share)
        builtin = LatencyProfile.default()
        return builtin.scale(width, height) * builtin.edge_executors[executor](share)

    def to_json(self) -> dict:
        data = asdict(self)
        data["version"] = PROFILE_VERSION
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != PROFILE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {PROFILE_VERSION}")
            executors = {edge_executor_name(name): LatencyTable(**table)
                         for name, table in dict(data.get("edge_executors") or {}).items()}
            return cls(edge=LatencyTable(**data["edge"]), cloud=LatencyTable(**data["cloud"]),
                       width=int(data["width"]), height=int(data["height"]),
                       source=str(data.get("source", "profiled")), meta=dict(data.get("meta", {})),
                       edge_executors=executors)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a latency profile (fluxshard profile latency "
                             f"writes one): {exc}") from None

    @classmethod
    def default(cls) -> "LatencyProfile":
        """Built-in tables for 640x384 YOLO11n: the edge is this class of machine (2 CPU cores,
        dense ~45 ms, DEVELOPERS.md; sparse pays fixed overhead at low fractions), the cloud a
        server several times faster. The tile executor: its warp and decode at no crops, about
        the dense engine's time at full area; dense: the best dense engine (onnxruntime here).
        Profile the real machines for anything that matters."""
        return cls(edge=LatencyTable([0.0, 0.1, 0.25, 0.5, 1.0], [6.0, 14.0, 24.0, 36.0, 50.0]),
                   cloud=LatencyTable([0.0, 0.1, 0.25, 0.5, 1.0], [2.0, 3.5, 5.5, 8.0, 12.0]),
                   source="default",
                   edge_executors={
                       "tiles": LatencyTable([0.0, 0.1, 0.25, 0.45, 1.0],
                                             [5.0, 12.0, 22.0, 34.0, 45.0]),
                       "dense": LatencyTable([0.0, 1.0], [45.0, 45.0])})

    @classmethod
    def load_or_default(cls, path: str | Path | None = None) -> "LatencyProfile":
        """``path`` (must exist), else the file ``$FLUXSHARD_LATENCY_PROFILE`` names (must exist),
        else the built-in tables. Nothing is looked up relative to the working folder: what a
        library loads must not depend on where its process was started."""
        if path is None:
            path = os.environ.get(PROFILE_ENV) or None
        return cls.default() if path is None else cls.load(path)


def theil_sen(x: np.ndarray, y: np.ndarray, z: float) -> tuple[float, float, float]:
    """Theil-Sen slope of ``y`` on ``x`` (the median of the slopes of all pairs of points with
    different x) and its confidence interval (Sen 1968, eq. 2.6; ``z`` the normal quantile of
    the two-sided level), as (slope, low, high); pairs tied in x are left out, ties in x and y
    corrected for in the variance. ``scipy.stats.theilslopes`` computes the same
    (``tests/test_dispatch.py`` checks it), at a cost per call that counts on the frame path."""
    dx = x[:, None] - x[None, :]
    pairs = dx > 0
    slopes = np.sort((y[:, None] - y[None, :])[pairs] / dx[pairs])
    if slopes.size == 0:
        return math.nan, math.nan, math.nan
    n = x.size
    variance = float(n * (n - 1) * (2 * n + 5))
    for values in (x, y):
        ties = np.unique(values, return_counts=True)[1].astype(float)
        variance -= float((ties * (ties - 1) * (2 * ties + 5)).sum())  # counts of 1 add 0
    variance /= 18
    spread = z * math.sqrt(max(variance, 0.0))
    low = max(int(round((slopes.size - spread) / 2)) - 1, 0)
    high = min(int(round((slopes.size + spread) / 2)), slopes.size - 1)
    return float(np.median(slopes)), float(slopes[low]), float(slopes[high])


class BandwidthEstimator:
    """The uplink as a fixed latency plus bytes over a bandwidth: a call carrying ``n`` bytes
    spends ``base_s + n / bytes_per_s`` on the link (its measured transfer: round trip less the
    server's own time). Reading the whole time as bandwidth would take a long round trip for a
    slow link, which small frames (H.264 P-frames of a few hundred bytes) make all their time.

    The two parts are fitted over the last ``window`` transfers, whose sizes differ (key frames
    and P-frames, busy and still scenes): the Theil-Sen line of time on bytes, robust to a
    minority of stalled calls (a retransmission, a descheduled thread). Its slope's
    ``confidence`` interval says which bandwidths the transfers allow; the estimate is the
    nominal ``initial_bytes_per_s`` when they allow it, else the allowed bandwidth nearest to it.
    So a link whose bytes' share is lost in the timing noise (a fast link with a long round
    trip) keeps its nominal rate, a link the frames' sizes show to be slower gets the fastest
    rate the transfers allow (a chance tilt of the noise moves it little), and one shown faster
    the slowest. It is never below the fastest single transfer's bytes / time (a fixed part
    cannot be negative). ``base_s`` is the median of the transfers' times less their bytes'
    share. Transfers shorter than ``min_transfer_s`` say nothing about the link and are
    ignored; until 8 transfers are in, the nominal rate stands."""

    def __init__(self, initial_bytes_per_s: float = 20e6 / 8, window: int = 32,
                 confidence: float = 0.95, min_transfer_s: float = 2e-4):
        if not initial_bytes_per_s > 0 or window < 3 or not 0.5 <= confidence < 1:
            raise ValueError("initial bandwidth must be > 0, window >= 3 and confidence in "
                             "[0.5, 1)")
        self.nominal_bytes_per_s = float(initial_bytes_per_s)
        self.bytes_per_s = self.nominal_bytes_per_s
        self.base_s = 0.0  # the link's fixed part: round trip, queues, what the server leaves out
        self.resolved = False  # whether the transfers ruled out the nominal rate
        self.min_transfer_s = min_transfer_s
        # fewer transfers test nothing: the interval's normal approximation needs about this
        # many (with 3, any three rising points would rule a rate in)
        self.min_fit = min(8, window)
        self._z = float(NormalDist().inv_cdf(0.5 + confidence / 2))
        self._window: deque[tuple[float, float]] = deque(maxlen=window)
        self.samples = 0

    def observe(self, nbytes: int, transfer_s: float) -> float:
        """One measured transfer of ``nbytes``; returns the new bandwidth estimate."""
        if nbytes <= 0 or not math.isfinite(transfer_s) or transfer_s < self.min_transfer_s:
            return self.bytes_per_s
        self._window.append((float(nbytes), float(transfer_s)))
        self.samples += 1
        n, t = np.array(self._window).T
        rate = self.nominal_bytes_per_s
        if n.size >= self.min_fit and np.unique(n).size >= 3:
            _, low, high = theil_sen(n, t, self._z)
            # the rates the fit allows: [1 / high, 1 / low], open above unless low > 0 (an
            # interval wholly below zero allows no rate: bytes that took less time)
            slowest = 1.0 / high if high > 0 else 0.0
            fastest = 1.0 / low if low > 0 else math.inf
            rate = min(max(rate, slowest), fastest)
        self.resolved = rate != self.nominal_bytes_per_s
        self.bytes_per_s = max(rate, float((n / t).max()))
        self.base_s = max(float(np.median(t - n / self.bytes_per_s)), 0.0)
        return self.bytes_per_s

    def transfer_s(self, nbytes: int) -> float:
        """The predicted time of a transfer of ``nbytes``: the fixed part plus its bytes'."""
        return self.base_s + nbytes / self.bytes_per_s

    @property
    def mbps(self) -> float:
        return self.bytes_per_s * 8 / 1e6


class LoadEstimator:
    """EWMA of measured / profiled latency of one endpoint: how much slower (> 1) or faster (< 1)
    it runs now than its latency table says. A sample counts at most ``step`` times above or
    below the current factor, so one stalled call (a page fault storm, a GC pause) moves the
    factor a bounded step while a lasting change still gets there in a few frames (a table 10x
    off: within 10% after 9 frames)."""

    def __init__(self, alpha: float = 0.3, step: float = 4.0):
        if not 0 < alpha <= 1 or not step > 1:
            raise ValueError("alpha must lie in (0, 1] and step > 1")
        self.alpha = alpha
        self.step = step
        self.factor = 1.0
        self.samples = 0

    def observe(self, profiled_ms: float, measured_ms: float) -> float:
        """One measured call against what the table predicted for it; returns the new factor."""
        if not (profiled_ms > 0 and math.isfinite(measured_ms) and measured_ms > 0):
            return self.factor
        ratio = min(max(measured_ms / profiled_ms, self.factor / self.step),
                    self.factor * self.step)
        self.factor = self.alpha * ratio + (1 - self.alpha) * self.factor
        self.samples += 1
        return self.factor


@dataclass
class Decision:
    endpoint: str  # "edge" or "cloud"
    edge_ms: float  # estimated edge latency
    cloud_ms: float  # estimated cloud latency, transfer included
    transfer_ms: float  # the link's part of cloud_ms: its fixed latency and the bytes' time
    reason: str  # "auto", "probe" or the forcing policy
    edge_load: float = 1.0  # the load factors the estimates include
    cloud_load: float = 1.0


class Dispatcher:
    """Chooses the endpoint per frame. ``policy``: auto (the rule above), edge, cloud, or
    alternate (edge and cloud in turn: for tests and demonstrations). ``margin_ms`` is eps.

    ``probe_interval``: the link and load estimates learn only from the endpoint that ran, so a
    stale estimate (or the initial guess) would keep the other out for good. In auto mode each
    endpoint runs at least once every ``probe_interval`` frames (None: never probe).

    ``edge_executor``: what the edge runs ("exact", "tiles", "dense"), which picks its latency
    table and what the edge's share means (:meth:`edge_share`)."""

    def __init__(self, profile: LatencyProfile | None = None, policy: str = "auto",
                 margin_ms: float = 2.0, bandwidth: BandwidthEstimator | None = None,
                 probe_interval: int | None = 30, edge_executor: str = "exact"):
        if policy not in POLICIES:
            raise ValueError(f"dispatch policy must be one of {POLICIES}, got {policy!r}")
        if margin_ms < 0:
            raise ValueError("margin_ms must be >= 0")
        if probe_interval is not None and probe_interval < 1:
            raise ValueError("probe_interval must be >= 1 (or None)")
        self.profile = profile or LatencyProfile.default()
        self.policy = policy
        self.margin_ms = margin_ms
        self.bandwidth = bandwidth or BandwidthEstimator()
        self.probe_interval = probe_interval
        self.edge_executor = edge_executor_name(edge_executor)
        self.load = {name: LoadEstimator() for name in ENDPOINTS}
        self.frames_since = {name: 0 for name in ENDPOINTS}  # frames since each endpoint ran
        self._turn = 0

    def candidates(self, cloud_available: bool = True) -> tuple[str, ...]:
        """The endpoints this policy may pick (the others need no dispatch state)."""
        if not cloud_available or self.policy == "edge":
            return ("edge",)
        return ("cloud",) if self.policy == "cloud" else ENDPOINTS

    def estimate(self, edge_fraction: float, cloud_fraction: float, cloud_bytes: int,
                 width: int, height: int) -> tuple[float, float, float]:
        """(T_edge, T_cloud including transfer, transfer) in ms, load factors included."""
        transfer_ms = 1e3 * self.bandwidth.transfer_s(cloud_bytes)
        edge_ms = self.load["edge"].factor * self.profiled_ms("edge", edge_fraction, width, height)
        cloud_ms = self.load["cloud"].factor * self.profiled_ms("cloud", cloud_fraction, width,
                                                               height)
        return edge_ms, cloud_ms + transfer_ms, transfer_ms

    def profiled_ms(self, endpoint: str, fraction: float, width: int, height: int) -> float:
        """The endpoint's latency table at ``fraction`` (the edge's: its executor's table at its
        share), scaled to the frame size (no load)."""
        if endpoint == "edge":
            return self.profile.edge_ms(self.edge_executor, fraction, width, height)
        return self.profile.scale(width, height) * self.profile.cloud(fraction)

    def edge_share(self, residual_mask: np.ndarray | None, block: int) -> float:
        """The x of the edge's table for a frame whose edge residual blocks are
        ``residual_mask`` (None: a key frame): the active fraction (exact), the predicted crop
        area share (tiles), 1 (dense, and key frames)."""
        if residual_mask is None or self.edge_executor == "dense":
            return 1.0
        if self.edge_executor == "tiles":
            return tile_crop_share(residual_mask, block)
        return float(np.asarray(residual_mask).mean()) if np.size(residual_mask) else 0.0

    def observed_edge_share(self, stats: dict, residual_mask: np.ndarray | None,
                            block: int) -> float:
        """The x of the edge's table for a frame the edge ran: what the executor reports (the
        tile executor's crop area share) when it does, else :meth:`edge_share`."""
        if self.edge_executor == "tiles" and "crop_area_fraction" in stats:
            return float(stats["crop_area_fraction"])
        return self.edge_share(residual_mask, block)

    def decide(self, edge_fraction: float, cloud_fraction: float, cloud_bytes: int,
               width: int, height: int, cloud_available: bool = True) -> Decision:
        edge_ms, cloud_ms, transfer_ms = self.estimate(edge_fraction, cloud_fraction, cloud_bytes,
                                                       width, height)
        if not cloud_available or self.policy == "edge":
            choice = "edge"
        elif self.policy == "cloud":
            choice = "cloud"
        elif self.policy == "alternate":
            choice = ENDPOINTS[self._turn % 2]
            self._turn += 1
        else:
            choice = "edge" if edge_ms < cloud_ms - self.margin_ms else "cloud"
        reason = self.policy if cloud_available else "no cloud"
        other = "cloud" if choice == "edge" else "edge"
        if (self.policy == "auto" and cloud_available and self.probe_interval is not None
                and self.frames_since[other] + 1 >= self.probe_interval):
            choice, reason = other, "probe"
        for name in ENDPOINTS:
            self.frames_since[name] = 0 if name == choice else self.frames_since[name] + 1
        return Decision(choice, edge_ms, cloud_ms, transfer_ms, reason,
                        self.load["edge"].factor, self.load["cloud"].factor)

    def observe_uplink(self, nbytes: int, transfer_s: float) -> None:
        self.bandwidth.observe(nbytes, transfer_s)

    def observe_latency(self, endpoint: str, fraction: float, width: int, height: int,
                        measured_ms: float) -> float:
        """A measured compute latency of ``endpoint`` (the edge's in-process call, the cloud's
        server time) at active fraction ``fraction``; returns its new load factor."""
        return self.load[endpoint].observe(self.profiled_ms(endpoint, fraction, width, height),
                                           measured_ms)
