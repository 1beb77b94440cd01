"""Several streams' frames computed together: one engine call per engine and input size.

A frame's compute can be written as *steps* (a generator): it plans the frame, yields the engine
inputs it needs as a list of (B, 3, h, w) batches, is sent the engine's output for each, and
returns its result (``TileExecutor.steps``; the sessions' ``infer_steps`` in
``fluxshard.sessions``). Run alone, each batch is one engine call (``executor.run_steps``).
:func:`run_together` drives the steps of several streams at once: every batch yielded in a
round, from every stream, is grouped by (engine, input shape) and each group is one engine call,
its output split back along the batch. A tile frame's crops of all streams then go through the
engine in one call per crop size, and the dense frames of several streams (key frames,
refreshes, the dense executor) in one call per frame size. What each stream keeps (its cache,
carried maps, reference) stays in its own steps: only the engine calls are shared.

Results equal the streams' runs alone up to the engine's rounding for another batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import numpy as np
import torch

Steps = Generator[list, list, Any]  # yields engine batches, is sent their outputs, returns
Engine = Callable[[torch.Tensor], Any]


@dataclass
class Outcome:
    """What one stream's steps came to: ``value`` (what they returned), or ``error`` (what
    they, or an engine call with their batches, raised)."""

    value: Any = None
    error: BaseException | None = None


def split_output(out, sizes: Sequence[int]) -> list:
    """An engine's output for a concatenated batch -> one output per part of ``sizes`` rows
    (tensors and arrays split along dim 0; lists and tuples of them element-wise)."""
    if isinstance(out, torch.Tensor):
        return list(torch.split(out, list(sizes)))
    if isinstance(out, np.ndarray):
        return np.split(out, np.cumsum(sizes)[:-1])
    if isinstance(out, (list, tuple)):
        parts = [split_output(o, sizes) for o in out]
        return [type(out)(p[k] for p in parts) for k in range(len(sizes))]
    raise TypeError(f"cannot split an engine output of type {type(out).__name__} by batch")


def run_together(jobs: Sequence[tuple[Steps, Engine]]) -> list[Outcome]:
    """Drive every (steps, engine) job to its end, round by round: in each round every live
    job's batches are grouped by (engine, shape, dtype), each group is one engine call on the
    batches concatenated (in job order), and each job is sent its own part of the outputs.
    A job that raises (or whose engine call raises) ends with that error; the others go on.
    Call it under ``torch.inference_mode()`` (the tile executor writes its cached maps in
    place)."""
    outcomes = [Outcome() for _ in jobs]
    pending: dict[int, list] = {}  # job -> the batches it waits on
    for i, (steps, _engine) in enumerate(jobs):
        _advance(i, steps, None, outcomes, pending, first=True)
    while pending:
        groups: dict[tuple, list[tuple[int, int]]] = {}  # key -> (job, batch index)
        engines: dict[tuple, Engine] = {}
        for i, batches in pending.items():
            for b, batch in enumerate(batches):
                key = (id(jobs[i][1]), tuple(batch.shape[1:]), batch.dtype)
                groups.setdefault(key, []).append((i, b))
                engines[key] = jobs[i][1]
        answers = {i: [None] * len(batches) for i, batches in pending.items()}
        failed: dict[int, BaseException] = {}
        for key, members in groups.items():
            members = [(i, b) for i, b in members if i not in failed]
            if not members:
                continue
            inputs = [pending[i][b] for i, b in members]
            try:
                out = engines[key](inputs[0] if len(inputs) == 1 else torch.cat(inputs))
                parts = [out] if len(inputs) == 1 else split_output(out, [len(x) for x in inputs])
            except Exception as e:  # every job in this call fails; the rest go on
                failed.update({i: e for i, _ in members})
                continue
            for (i, b), part in zip(members, parts):
                answers[i][b] = part
        for i in list(pending):
            del pending[i]
            steps = jobs[i][0]
            if i in failed:
                outcomes[i].error = failed[i]
                steps.close()
                continue
            _advance(i, steps, answers[i], outcomes, pending)
    return outcomes


def _advance(i: int, steps: Steps, sent, outcomes: list[Outcome], pending: dict,
             first: bool = False) -> None:
    """Resume job ``i`` (start it, or send it its outputs) until it yields batches (kept in
    ``pending``) or ends (its outcome)."""
    try:
        batches = next(steps) if first else steps.send(sent)
        while not batches:  # nothing to compute this round
            batches = steps.send([])
        pending[i] = batches
    except StopIteration as done:
        outcomes[i].value = done.value
    except Exception as e:
        outcomes[i].error = e


__all__ = ["Outcome", "Steps", "run_together", "split_output"]
