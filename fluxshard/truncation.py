"""The truncation policy (v1 section IV-C): one global tau per motion level, chosen offline as the
largest tau whose end-task accuracy stays >= alpha x dense accuracy (v1 Eq. 8).

tau lives on the model-input scale ([0, 1] pixels). The dispatch layer is an identity layer
(||w||_1 = 1), so its residual-block threshold in uint8 pixels is ``tau * 255``; inside the
network the executor keeps a recomputed position's cached value when it moved by no more than
``tau / ||w||_1`` (fluxshard.sparse.spec).

`fluxshard profile accuracy` sweeps tau on held-out synthetic clips at several motion levels and
writes the table (JSON) plus a plot of accuracy and cache hit rate against tau.

Accuracy is mAP@0.5:0.95 against ground truth by default (``metric``): mAP@0.5 barely moves while
truncation shifts boxes by a few pixels (low motion, tau 0.6: mAP@0.5 0.998 of dense, mAP@0.5:0.95
0.89), so it would admit a visibly worse detector. The default sweep reaches past the first tau
that fails, so the chosen tau is the largest feasible one rather than the top of the sweep.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

# the table and the tau unit live in fluxshard.tau; re-exported for the profile's users
from fluxshard.synth import MOTION_LEVELS
from fluxshard.tau import METRICS, TruncationTable, quantize_tau

DEFAULT_TAUS = (0.0, 0.02, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6)
METRIC_NAMES = {"map50_95": "mAP@0.5:0.95", "map50": "mAP@0.5"}


def edge_path_outputs(executor, video, tau: float):
    """The path the profile measures, frame by frame, as ``fluxshard run`` runs it on the edge:
    decoded frames -> residual blocks at ``tau`` -> the assembled input -> ``executor``
    truncating with the same tau. Yields (MotionFrame, assembled image, model input, model
    output, FrameReport, key)."""
    from fluxshard.endpoint import EndpointPath
    from fluxshard.models import preprocess
    from fluxshard.motion import iter_motion
    from fluxshard.sparse import StreamState

    path, stream = EndpointPath(tau), StreamState()
    for mf in iter_motion(video):
        step = path.step_decoded(mf)
        x = preprocess(step.image, device=executor.device)
        out, report = executor.run(stream, x, step.field, key=step.key, tau=step.tau)
        yield mf, step.image, x, out, report, step.key


def bound_levels(levels: list[dict]) -> list[dict]:
    """Sort ``levels`` by their measured ``motion`` and set each one's ``motion_max`` halfway to
    the next (the last: unbounded), in place; ``fluxshard.tau.level_for`` reads them back.
    Shared by every per-motion-level profile (truncation, tiles)."""
    levels.sort(key=lambda lv: lv["motion"])
    for a, b in zip(levels, levels[1:]):
        a["motion_max"] = (a["motion"] + b["motion"]) / 2
    if levels:
        levels[-1]["motion_max"] = float("inf")
    return levels


def choose_tau(points: list[dict], dense_map: float, alpha: float, metric: str = "map50"
               ) -> float:
    """Largest tau whose ``metric`` >= alpha x the dense model's (tau 0 always qualifies: exact)."""
    ok = [p["tau"] for p in points if p[metric] >= alpha * dense_map or p["tau"] == 0.0]
    return max(ok) if ok else 0.0


def profile_accuracy(weights=None, *, taus=DEFAULT_TAUS, alpha: float = 0.99, frames: int = 30,
                     clips_per_level: int = 1, width: int = 640, height: int = 384,
                     strict_rfap: bool = False, grid_snap: bool = False, out_dir: str | Path = "out/profile",
                     threads: int = 2, progress: bool = True, bypass: bool = True,
                     adaptive: bool = False, metric: str = METRICS[0]) -> TruncationTable:
    """Sweep ``taus`` per motion level (see the module doc). ``bypass``: frames with nothing to
    reuse run on the best dense runner (SparseExecutor's bypass); ``adaptive``: reusable frames
    too while the bypass measures faster (SparseExecutor's adaptive policy)."""
    import torch
    from tqdm import tqdm

    from fluxshard import synth
    from fluxshard.accuracy import evaluate_detections
    from fluxshard.models import load_model, postprocess, preprocess
    from fluxshard.motion import iter_motion, motion_statistic
    from fluxshard.sparse import SparseExecutor

    from fluxshard.models.dense import best_dense_runner
    from fluxshard.models.ops import padded_size

    taus = sorted({quantize_tau(t) for t in taus})  # the wire's unit: whole grey levels
    model = load_model(weights, fused=True)
    out_dir = Path(out_dir)
    # the model sees the frames padded to multiples of 32 (preprocess); so does the baseline
    model_w, model_h = padded_size(width, height, who="fluxshard profile accuracy")
    with tempfile.TemporaryDirectory() as tmp:  # the baseline every speedup is against
        best, medians = best_dense_runner(model, (model_h, model_w), threads=threads,
                                          kinds=("fused_channels_last", "onnxruntime"),
                                          workdir=tmp)
    dense_ms = medians[best.name]
    sweep, levels = [], []
    bar = tqdm(total=len(MOTION_LEVELS) * clips_per_level * (len(taus) + 1), disable=not progress,
               desc="profile accuracy")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for level in MOTION_LEVELS:
            clips, motions = [], []
            for c in range(clips_per_level):
                spec = synth.heldout_spec(level, c, width=width, height=height, frames=frames)
                paths = synth.make_clip(spec, tmp, name=f"{level}{c}")
                gt = synth.load_ground_truth(paths.ground_truth)
                clips.append((paths.video, [dict(boxes=b, classes=k) for b, k in
                                            zip(gt.boxes, gt.classes)]))
            # Dense reference on the decoded frames.
            dense_preds, truths = [], []
            for video, gt in clips:
                for mf in iter_motion(video):
                    if not mf.is_key:
                        motions.append(motion_statistic(mf.field))
                    x = preprocess(mf.image)
                    dense_preds.append(postprocess(model(x), x.shape[-2:], mf.image.shape[:2],
                                                   conf_thres=0.001)[0])
                    truths.append(gt[mf.index])
            dense = evaluate_detections(dense_preds, truths)
            bar.update(clips_per_level)
            points = []
            for tau in taus:
                executor = SparseExecutor(model, strict_rfap=strict_rfap, tau=tau,
                                          grid_snap=grid_snap, bypass=best if bypass else None,
                                          adaptive=adaptive)
                preds, hits, seconds, bypassed, dense_seconds = [], [], [], [], []
                for video, _gt in clips:
                    for _mf, image, x, out, report, key in edge_path_outputs(executor, video,
                                                                               tau):
                        preds.append(postprocess(out, x.shape[-2:], image.shape[:2],
                                                 conf_thres=0.001)[0])
                        if not key:
                            hits.append(report.cache_hit_rate)
                            seconds.append(report.seconds)
                            bypassed.append(report.bypassed)
                            # the baseline on the same frame, right after: machine drift hits both
                            t0 = time.perf_counter()
                            best.run(x)
                            dense_seconds.append(time.perf_counter() - t0)
                    bar.update(1)
                acc = evaluate_detections(preds, truths)
                sparse_ms = 1e3 * float(np.median(seconds))
                frame_dense_ms = 1e3 * float(np.median(dense_seconds))
                point = dict(level=level, tau=float(tau), map50=acc["map50"],
                             map50_95=acc["map50_95"], dense_map50=dense["map50"],
                             dense_map50_95=dense["map50_95"],
                             cache_hit=float(np.mean(hits)), sparse_ms=sparse_ms,
                             dense_ms=frame_dense_ms, speedup=frame_dense_ms / sparse_ms,
                             bypassed=float(np.mean(bypassed)))
                points.append(point)
            sweep += points
            tau = choose_tau(points, dense[metric], alpha, metric)
            chosen = next(p for p in points if p["tau"] == tau)
            levels.append(dict(name=level, motion=float(np.mean(motions)), tau=tau,
                               dense_map50=dense["map50"], map50=chosen["map50"],
                               dense_map50_95=dense["map50_95"], map50_95=chosen["map50_95"],
                               cache_hit=chosen["cache_hit"], speedup=chosen["speedup"]))
    bar.close()
    bound_levels(levels)
    table = TruncationTable(alpha=alpha, metric=metric, levels=levels, sweep=sweep,
                            executor=dict(strict_rfap=strict_rfap, grid_snap=grid_snap,
                                          bypass=bypass, adaptive=adaptive, threads=threads,
                                          size=[width, height],
                                          best_dense=best.name, dense_ms=dense_ms))
    table.save(out_dir / "truncation_table.json")
    plot_sweep(table, out_dir / "truncation_profile.png")
    return table


def plot_sweep(table: TruncationTable, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_hit, ax_speed) = plt.subplots(1, 3, figsize=(17, 4.5))
    for level in table.levels:
        pts = [p for p in table.sweep if p["level"] == level["name"]]
        taus = [p["tau"] for p in pts]
        line, = ax_acc.plot(taus, [p[table.metric] for p in pts], "o-",
                            label=f"{level['name']} (motion {level['motion']:.1f} px)")
        ax_acc.axhline(table.alpha * level["dense_" + table.metric], color=line.get_color(),
                       ls=":", lw=1)
        ax_acc.axvline(level["tau"], color=line.get_color(), ls="--", lw=1)
        ax_hit.plot(taus, [p["cache_hit"] for p in pts], "o-", color=line.get_color(),
                    label=level["name"])
        ax_speed.plot(taus, [p.get("speedup", float("nan")) for p in pts], "o-",
                      color=line.get_color(), label=level["name"])
    ax_acc.set(xlabel="tau", ylabel=f"{METRIC_NAMES[table.metric]} vs ground truth",
               title=f"accuracy (dotted: alpha={table.alpha} x dense; dashed: chosen tau)")
    ax_hit.set(xlabel="tau", ylabel="cache hit rate", title="feature reuse")
    baseline = table.executor.get("best_dense", "best dense")
    ax_speed.axhline(1.0, color="grey", ls="--", lw=1)
    ax_speed.set(xlabel="tau", ylabel=f"speedup vs {baseline}",
                 title=f"whole-model speedup ({table.executor.get('threads', '?')} threads)")
    ax_speed.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    ax_hit.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
