"""Motion and residual statistics of clips (`fluxshard motion`, fluxshard.tools.motion): each clip
decoded through the motion layer with one endpoint's dispatch state (reset on key frames and every
``reset_every`` frames, as if that endpoint ran inference then); a per-clip table, per-frame JSON
and a plot of motion statistic, residual fraction and motion path."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fluxshard.motion.decode import MOTION_SOURCES, iter_motion
from fluxshard.motion.field import motion_statistic
from fluxshard.motion.state import RESIDUAL_BLOCK, EndpointState
from fluxshard.tau import DEFAULT_TAU, TauPolicy

DEFAULT_RESET_EVERY = 10


@dataclass
class FrameStats:
    index: int
    motion_source: str
    is_key: bool
    frame_motion: float  # mean |d_t|
    accumulated_motion: float  # mean |d_acc| since the last reset
    residual_fraction: float  # share of residual blocks against the cache (0 on resets)
    replaced_fraction: float


def analyse_clip(source: str | Path, *, tau: float = DEFAULT_TAU,
                 reset_every: int = DEFAULT_RESET_EVERY, validate: bool = True,
                 max_frames: int | None = None, block: int = RESIDUAL_BLOCK,
                 progress: bool = True) -> tuple[list[FrameStats], float]:
    """Per-frame statistics of one clip and the frames per second of the whole pipeline
    (decode + motion + residual set)."""
    from tqdm import tqdm

    if reset_every < 1:
        raise ValueError(f"reset_every must be >= 1, got {reset_every}")
    state = EndpointState(block)
    stats: list[FrameStats] = []
    start = time.perf_counter()
    frames = iter_motion(source, validate=validate, max_frames=max_frames)
    for mf in tqdm(frames, desc=f"motion {Path(str(source)).name}", unit="frame",
                   disable=not progress, dynamic_ncols=True):
        residual, accumulated = 0.0, 0.0
        if mf.is_key or state.cache is None:
            state.reset(mf.image)  # dense pass on a key frame
        else:
            state.accumulate(mf.field)
            residual = state.residual(mf.image, TauPolicy.dispatch_threshold(tau)).fraction
            accumulated = state.motion_statistic()
            if state.frames_since_reset >= reset_every:
                state.reset(mf.image)  # the endpoint ran inference on this frame
        stats.append(FrameStats(mf.index, mf.motion_source, mf.is_key, motion_statistic(mf.field),
                                accumulated, residual, mf.replaced_fraction))
    elapsed = time.perf_counter() - start
    return stats, (len(stats) / elapsed if elapsed > 0 else float("nan"))


def summarize(name: str, stats: list[FrameStats], fps: float) -> dict:
    moving = [s for s in stats if not s.is_key]
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)
    paths = {k: sum(s.motion_source == k for s in stats) for k in MOTION_SOURCES}
    return {"clip": name, "frames": len(stats), "fps": fps,
            "mean_frame_motion_px": mean([s.frame_motion for s in moving]),
            "mean_residual_fraction": mean([s.residual_fraction for s in moving]),
            "mean_replaced_fraction": mean([s.replaced_fraction for s in moving]),
            **{f"frames_{k}": v for k, v in paths.items()}}


def print_table(rows: list[dict]) -> None:
    header = ("clip", "frames", "fps", "motion px", "residual", "replaced", "codec", "validated",
              "block_match", "key")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(" | ".join([r["clip"], str(r["frames"]), f"{r['fps']:.0f}",
                          f"{r['mean_frame_motion_px']:.2f}", f"{r['mean_residual_fraction']:.3f}",
                          f"{r['mean_replaced_fraction']:.3f}", str(r["frames_codec"]),
                          str(r["frames_validated"]), str(r["frames_block_matching"]),
                          str(r["frames_none"])]))


def plot_clip(name: str, stats: list[FrameStats], path: Path, tau: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.index for s in stats]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    axes[0].plot(t, [s.frame_motion for s in stats], label="per-frame mean |d_t|")
    axes[0].plot(t, [s.accumulated_motion for s in stats], label="accumulated mean |d_acc|")
    axes[0].set_ylabel("motion (px)")
    axes[0].legend(loc="upper right")
    axes[1].plot(t, [s.residual_fraction for s in stats], color="tab:red")
    axes[1].set_ylabel(f"residual fraction\n(tau={tau:.3f})")
    axes[1].set_ylim(0, 1)
    codes = {k: i for i, k in enumerate(MOTION_SOURCES)}
    axes[2].scatter(t, [codes[s.motion_source] for s in stats], s=10)
    axes[2].set_yticks(range(len(MOTION_SOURCES)), MOTION_SOURCES)
    axes[2].set_ylabel("motion path")
    axes[2].set_xlabel("frame")
    fig.suptitle(f"fluxshard motion: {name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(clips: list[str], out: Path, *, tau: float = DEFAULT_TAU,
        reset_every: int = DEFAULT_RESET_EVERY, validate: bool = True,
        max_frames: int | None = None) -> list[dict]:
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for clip in clips:
        stats, fps = analyse_clip(clip, tau=tau, reset_every=reset_every, validate=validate,
                                  max_frames=max_frames)
        name = Path(clip).stem if "://" not in clip else clip
        plot_path = out / f"motion-{Path(name).name}.png"
        plot_clip(name, stats, plot_path, tau)
        (out / f"motion-{Path(name).name}.json").write_text(json.dumps(
            {"summary": summarize(name, stats, fps), "frames": [asdict(s) for s in stats]},
            indent=1))
        row = summarize(name, stats, fps)
        row["plot"] = str(plot_path)
        rows.append(row)
    print_table(rows)
    for r in rows:
        print(f"plot: {r['plot']}")
    return rows
