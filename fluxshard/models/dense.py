"""Dense YOLO11 runners and timing: the baselines every speedup is measured against.

Speedups count against the best dense runner on the same machine in the same run
(``best_dense_runner``): eager torch, BN-fused, fused + channels_last, and onnxruntime.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .export import export_onnx, onnxruntime_session
from .families import family_of
from .yolo import YOLO11

RUNNER_KINDS = ("torch", "fused", "fused_channels_last", "onnxruntime")


@dataclass
class DenseRunner:
    """``run(x)`` computes the dense eval output for x (1, 3, H, W) float32 (torch tensor); the
    onnxruntime runner returns numpy arrays."""

    name: str
    run: Callable[[torch.Tensor], Any]
    imgsz: tuple[int, int]


def _torch_runner(name: str, model: YOLO11, imgsz, channels_last: bool) -> DenseRunner:
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def run(x: torch.Tensor):
        with torch.inference_mode():
            return model(x.contiguous(memory_format=fmt))

    return DenseRunner(name, run, imgsz)


def _fused(model):
    """A BN-folded copy of ``model`` (its family's fuse)."""
    return family_of(model).fuse(copy.deepcopy(model))


def dense_runners(model: YOLO11, imgsz: tuple[int, int] = (384, 640),
                  kinds: tuple[str, ...] = RUNNER_KINDS, threads: int = 2,
                  workdir: str | Path | None = None) -> list[DenseRunner]:
    """One runner per kind; each works on its own copy of ``model`` (left untouched)."""
    unknown = set(kinds) - set(RUNNER_KINDS)
    if unknown:
        raise ValueError(f"unknown runner kinds {sorted(unknown)}; choose from {RUNNER_KINDS}")
    base = copy.deepcopy(model).float().cpu().eval()
    runners = []
    if "torch" in kinds:
        runners.append(_torch_runner("torch", base, imgsz, channels_last=False))
    if "fused" in kinds:
        runners.append(_torch_runner("fused", _fused(base), imgsz, False))
    if "fused_channels_last" in kinds:
        cl = _fused(base).to(memory_format=torch.channels_last)
        runners.append(_torch_runner("fused_channels_last", cl, imgsz, True))
    if "onnxruntime" in kinds:
        wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fluxshard-dense-"))
        tag = family_of(base).tag(base.scale, base.task)
        onnx_path = export_onnx(base, wd / f"{tag}-{imgsz[0]}x{imgsz[1]}.onnx", imgsz=imgsz)
        session = onnxruntime_session(onnx_path, threads=threads)
        input_name = session.get_inputs()[0].name

        def run_ort(x: torch.Tensor):
            return session.run(None, {input_name: x.detach().cpu().numpy()})

        runners.append(DenseRunner("onnxruntime", run_ort, imgsz))
    return runners


class ShapeRunners:
    """One dense runner of ``kind`` per input shape, built on first use (an onnxruntime runner
    needs a static-shape export: a few seconds, once per shape). Callable like a runner's
    ``run``; what the sparse executor's ``bypass`` takes when streams differ in size."""

    def __init__(self, model: YOLO11, kind: str = "onnxruntime", threads: int = 2,
                 workdir: str | Path | None = None):
        if kind not in RUNNER_KINDS:
            raise ValueError(f"unknown runner kind {kind!r}; choose from {RUNNER_KINDS}")
        self.model, self.kind, self.threads, self.workdir = model, kind, threads, workdir
        self._runners: dict[tuple[int, int], DenseRunner] = {}
        self._building = threading.Lock()  # streams on threads share one: build each shape once

    def __call__(self, x: torch.Tensor):
        shape = tuple(int(v) for v in x.shape[-2:])
        runner = self._runners.get(shape)
        if runner is None:
            with self._building:
                runner = self._runners.get(shape)
                if runner is None:
                    runner = self._runners[shape] = dense_runners(
                        self.model, shape, kinds=(self.kind,), threads=self.threads,
                        workdir=self.workdir)[0]
        return runner.run(x)


def time_runner(runner: DenseRunner, x: torch.Tensor, warmup: int = 3, runs: int = 20) -> list[float]:
    """Wall times in ms of ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        runner.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.run(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_runners(runners: list[DenseRunner], x: torch.Tensor, warmup: int = 3,
                 runs: int = 20) -> dict[str, float]:
    """Median ms per runner, measured round-robin so machine noise hits every runner alike."""
    for r in runners:
        time_runner(r, x, warmup=warmup, runs=0)
    samples: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(runs):
        for r in runners:
            samples[r.name].extend(time_runner(r, x, warmup=0, runs=1))
    return {name: statistics.median(v) for name, v in samples.items()}


def best_dense_runner(model: YOLO11, imgsz: tuple[int, int] = (384, 640), threads: int = 2,
                      warmup: int = 3, runs: int = 10, kinds: tuple[str, ...] = RUNNER_KINDS,
                      workdir: str | Path | None = None) -> tuple[DenseRunner, dict[str, float]]:
    """The fastest dense runner for ``model`` at ``imgsz`` on this machine, and every runner's
    median ms. ``threads``: the onnxruntime runners'; torch runs on the process's intra-op
    threads, which the entry point sets once (``torch.set_num_threads``), not this function:
    a server picks runners while other streams run."""
    runners = dense_runners(model, imgsz, kinds=kinds, threads=threads, workdir=workdir)
    x = torch.rand(1, 3, *imgsz)
    medians = time_runners(runners, x, warmup=warmup, runs=runs)
    best = min(runners, key=lambda r: medians[r.name])
    return best, medians
