"""The measures every benchmark reports, defined once (docs/DESIGN.md, "Measures")."""

from __future__ import annotations


def speedup(dense_seconds: float, fluxshard_seconds: float) -> float:
    """Dense latency / FluxShard latency, same machine, same run."""
    return dense_seconds / fluxshard_seconds if fluxshard_seconds > 0 else float("inf")


def executor_efficiency(dense_seconds: float, active_fraction: float, sparse_seconds: float) -> float:
    """(dense time x active fraction) / sparse time: 1.0 means sparse work costs exactly its share
    of the dense op, lower means gather/scatter/halo overhead."""
    return dense_seconds * active_fraction / sparse_seconds if sparse_seconds > 0 else float("inf")


def cache_hit_rate(reused_positions: int, total_positions: int) -> float:
    """Share of feature positions reused (not recomputed), over all cached layers (v2)."""
    return reused_positions / total_positions if total_positions else 0.0
