"""tau: FluxShard's one truncation threshold (v1 section IV-C), one unit everywhere.

tau is a change on the model-input scale: pixels divided by 255, so 0 <= tau <= 1. It is compared
in two places, and :class:`TauPolicy` gives both thresholds from the same value:

* the dispatch layer (an identity layer, ||w||_1 = 1) compares uint8 pixels: a block is residual
  when its max abs difference exceeds ``tau * 255`` grey levels (:meth:`TauPolicy.dispatch_threshold`);
* inside the network a recomputed activation whose change is at most ``tau / ||w||_1`` keeps its
  cached value (:meth:`TauPolicy.layer_threshold`; the executor applies it per conv).

tau travels with every cloud frame as whole grey levels (one byte of the wire header), so it is
always a multiple of 1/255 (:func:`quantize_tau`): the edge, the cloud and the profile truncate with
bit-identical thresholds. Per frame the policy picks tau from the endpoint's motion statistic: a
fixed value, or the truncation table that ``fluxshard profile accuracy`` measured.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

GREY_LEVELS = 255  # uint8 pixels per unit of the model-input scale
DEFAULT_TAU_LEVELS = 40  # integer-pel alignment of sub-pixel motion leaves 10-30 levels on texture
DEFAULT_TAU = DEFAULT_TAU_LEVELS / GREY_LEVELS
METRICS = ("map50_95", "map50")  # the accuracy a tau must keep; the first is the default


def quantize_tau(tau: float) -> float:
    """``tau`` rounded to whole grey levels (the wire's unit); refuses values off the scale."""
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:  # also refuses NaN
        hint = (f" (it looks like grey levels: {tau:g} levels is tau {tau / GREY_LEVELS:.4f})"
                if 1.0 < tau <= GREY_LEVELS else "")
        raise ValueError(f"tau must be on the [0, 1] model-input scale, got {tau:g}{hint}")
    return tau_levels(tau) / GREY_LEVELS


def tau_levels(tau: float) -> int:
    """tau in whole grey levels (0..255), as the wire carries it."""
    return int(round(float(tau) * GREY_LEVELS))


def tau_argument(text: str) -> float:
    """argparse ``type=`` for every ``--tau``: a number on the [0, 1] input scale."""
    try:
        return quantize_tau(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def level_for(levels: list[dict], motion: float) -> dict | None:
    """The motion level a frame with motion statistic ``motion`` uses: the first of ``levels``
    (sorted by ``motion_max``) with motion <= motion_max, the last beyond; None without levels.
    Shared by every per-motion-level table (truncation, tiles)."""
    for level in levels:
        if motion <= level["motion_max"]:
            return level
    return levels[-1] if levels else None


@dataclass
class TruncationTable:
    """motion level -> tau. ``levels`` are sorted by ``motion_max``: a frame with motion
    statistic m uses the first level with m <= motion_max (the last level beyond)."""

    alpha: float
    metric: str = METRICS[0]  # the accuracy alpha applies to (a key of the sweep's points)
    levels: list[dict] = field(default_factory=list)  # {"name", "motion_max", "tau", ...}
    sweep: list[dict] = field(default_factory=list)  # every measured (level, tau) point
    executor: dict = field(default_factory=dict)  # the executor options the taus hold for

    def tau_for(self, motion: float) -> float:
        level = level_for(self.levels, motion)
        return 0.0 if level is None else quantize_tau(level["tau"])

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "TruncationTable":
        try:
            data = json.loads(Path(path).read_text())
            table = cls(alpha=float(data["alpha"]), metric=str(data.get("metric", "map50")),
                        levels=list(data["levels"]),
                        sweep=list(data.get("sweep", [])), executor=dict(data.get("executor", {})))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a truncation table: {exc}") from exc
        if any(not {"motion_max", "tau"} <= set(lv) for lv in table.levels):
            raise ValueError(f"{path}: every level needs motion_max and tau")
        for level in table.levels:
            quantize_tau(level["tau"])  # a table on another scale is refused here, not per frame
        table.levels.sort(key=lambda lv: lv["motion_max"])
        return table


@dataclass(frozen=True)
class TauPolicy:
    """Where tau comes from: a fixed value, or a truncation table read per frame by the motion
    statistic of the endpoint's accumulated field (``fluxshard.motion.motion_statistic``)."""

    fixed: float = DEFAULT_TAU
    table: TruncationTable | None = None
    source: str = ""  # what the user gave (a number or the table's path), for reports

    def __post_init__(self):
        object.__setattr__(self, "fixed", quantize_tau(self.fixed))

    @classmethod
    def from_options(cls, tau: float | None = None,
                     table: str | Path | TruncationTable | None = None) -> "TauPolicy":
        """A policy from the ``--tau`` / ``--tau-table`` options (the table wins)."""
        if table is not None:
            source = "table" if isinstance(table, TruncationTable) else str(table)
            if not isinstance(table, TruncationTable):
                table = TruncationTable.load(table)
            return cls(table=table, source=source)
        fixed = DEFAULT_TAU if tau is None else tau
        return cls(fixed=fixed, source=f"{quantize_tau(fixed):.4f}")

    @classmethod
    def of(cls, tau) -> "TauPolicy":
        """A policy from a number, a table or a policy (library callers' ``tau=`` argument)."""
        if isinstance(tau, TauPolicy):
            return tau
        if isinstance(tau, TruncationTable):
            return cls.from_options(table=tau)
        return cls.from_options(tau=tau)

    def tau_for(self, motion: float) -> float:
        """tau for a frame whose endpoint's accumulated field has motion statistic ``motion``."""
        return self.table.tau_for(motion) if self.table is not None else self.fixed

    @property
    def executor_options(self) -> dict:
        """The executor options the table's taus were measured with (none for a fixed tau)."""
        return dict(self.table.executor) if self.table is not None else {}

    @staticmethod
    def dispatch_threshold(tau: float) -> float:
        """The dispatch layer's residual-block threshold in uint8 grey levels."""
        return float(tau) * GREY_LEVELS

    @staticmethod
    def layer_threshold(tau: float, weight_l1: float) -> float:
        """The in-network threshold of a layer whose weights have L1 norm ``weight_l1``."""
        return float(tau) / float(weight_l1)


__all__ = ["GREY_LEVELS", "DEFAULT_TAU", "DEFAULT_TAU_LEVELS", "METRICS", "TauPolicy",
           "TruncationTable", "level_for", "quantize_tau", "tau_argument", "tau_levels"]
