"""Ultralytics ``.pt`` files as they are (``--weights yolo11n.pt``), read without ultralytics and
without running code from the pickle (fluxshard/models/ultralytics_checkpoint.py).

ultralytics cannot be installed here, so each checkpoint is made the way ultralytics writes one:
our YOLO11 (whose modules, attribute names and state-dict keys mirror ultralytics') with every
module's class swapped for a throwaway class registered under the ultralytics module path
(``ultralytics.nn.tasks.DetectionModel``, ``ultralytics.nn.modules.block.C3k2`` ...), only while
``torch.save`` pickles it, in the dict layout of ultralytics' ``strip_optimizer`` (fp16 model,
``train_args``, ``train_metrics`` with numpy scalars ...). The loader then sees nothing of those
classes: ``sys.modules`` no longer has them when it reads the file."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from fluxshard import synth
from fluxshard.cli import main
from fluxshard.models import CheckpointError, build_yolo11, fuse, is_fused, load_model

# our module class -> the ultralytics module that defines the class of that name
ULTRALYTICS_MODULE_OF = {
    **dict.fromkeys(("Conv", "DWConv", "Concat"), "ultralytics.nn.modules.conv"),
    **dict.fromkeys(("Bottleneck", "C2f", "C3", "C3k", "C3k2", "SPPF", "Attention", "PSABlock",
                     "C2PSA", "DFL", "Proto"), "ultralytics.nn.modules.block"),
    **dict.fromkeys(("Detect", "Segment"), "ultralytics.nn.modules.head"),
}
TASK_MODEL_CLASS = {"detect": "DetectionModel", "segment": "SegmentationModel"}
NAMES = {0: "forklift", 1: "pallet", 2: "worker"}
H, W = 64, 96


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    spec = synth.SceneSpec(width=160, height=128, frames=3, gop=3, camera="static")
    return synth.make_clip(spec, tmp_path_factory.mktemp("clip"), name="clip",
                           progress=False).video


@contextlib.contextmanager
def ultralytics_classes(renamed: dict[str, str] | None = None):
    """Throwaway classes under ultralytics' module paths in ``sys.modules`` while the block
    runs (so pickle names them as ultralytics does); gone afterwards. ``renamed`` maps one of
    our class names to another ultralytics class name (a head ultralytics has and we do not)."""
    renamed = renamed or {}
    modules: dict[str, types.ModuleType] = {}
    classes: dict[str, type] = {}

    def module(path: str) -> types.ModuleType:
        if path not in modules:
            modules[path] = types.ModuleType(path)
        return modules[path]

    for parent in ("ultralytics", "ultralytics.nn", "ultralytics.nn.modules"):
        module(parent)
    wanted = {**ULTRALYTICS_MODULE_OF,
              **{cls: "ultralytics.nn.tasks" for cls in TASK_MODEL_CLASS.values()}}
    for ours, path in wanted.items():
        name = renamed.get(ours, ours)
        cls = type(name, (nn.Module,), {"__module__": path, "__qualname__": name})
        setattr(module(path), name, cls)
        classes[ours] = cls
    namespace = type("IterableSimpleNamespace", (types.SimpleNamespace,),
                     {"__module__": "ultralytics.utils"})
    module("ultralytics.utils").IterableSimpleNamespace = namespace
    classes["IterableSimpleNamespace"] = namespace
    saved = {path: sys.modules.get(path) for path in modules}
    sys.modules.update(modules)
    try:
        yield classes
    finally:
        for path, previous in saved.items():
            if previous is None:
                sys.modules.pop(path, None)
            else:
                sys.modules[path] = previous


def as_ultralytics_tree(model: nn.Module, classes: dict[str, type]) -> nn.Module:
    """A copy of ``model`` as ultralytics pickles it: fp16, no gradients, every module of ours
    an instance of the ultralytics class of that name (torch's own layers stay torch's)."""
    tree = copy.deepcopy(model).half().requires_grad_(False)
    for m in tree.modules():
        ours = type(m).__name__
        if ours == "YOLO11":
            m.__class__ = classes[TASK_MODEL_CLASS[model.task]]
        elif ours in classes:
            m.__class__ = classes[ours]
    return tree


def save_ultralytics_checkpoint(path, model=None, ema=None, classes=None, **extra):
    """``torch.save`` of the dict ultralytics' strip_optimizer writes (``model``) or a training
    checkpoint (``ema`` beside ``model``)."""
    ckpt = {
        "date": datetime.datetime(2024, 9, 30).isoformat(),
        "version": "8.3.0",
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1 if ema is None else 41,
        "best_fitness": None if ema is None else np.float64(0.61),
        "model": None if model is None else as_ultralytics_tree(model, classes),
        "ema": None if ema is None else as_ultralytics_tree(ema, classes),
        "updates": None if ema is None else 8200,
        "optimizer": None,
        "scaler": None,
        "train_args": {"task": "detect", "imgsz": 640, "lr0": 0.01, "data": "coco.yaml"},
        "train_metrics": {"metrics/mAP50-95(B)": np.float64(0.39), "fitness": np.float64(0.41)},
        "train_results": {"epoch": [1, 2], "metrics/mAP50(B)": [0.1, 0.2]},
        **extra,
    }
    for tree in (ckpt["model"], ckpt["ema"]):
        if tree is not None:  # what a training checkpoint's model carries beside its layers
            tree.args = classes["IterableSimpleNamespace"](task=model.task, imgsz=640)
    torch.save(ckpt, path)
    return path


def random_model(scale: str, task: str, seed: int) -> nn.Module:
    """A YOLO11 with random weights and BatchNorm statistics (none left at their init)."""
    torch.manual_seed(seed)
    model = build_yolo11(scale, task, len(NAMES), names=NAMES).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return model


def rounded_like_the_file(model: nn.Module) -> nn.Module:
    """``model`` with its floating tensors through fp16, as the checkpoint stores them."""
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                         for k, v in model.state_dict().items()})
    return ref.eval()


def assert_same_model(loaded: nn.Module, expected: nn.Module) -> None:
    assert (loaded.scale, loaded.task, loaded.nc, loaded.names) == \
        (expected.scale, expected.task, expected.nc, expected.names)
    theirs, ours = loaded.state_dict(), expected.state_dict()
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)


@pytest.mark.parametrize("scale, task", [("n", "detect"), ("s", "detect"), ("n", "segment"),
                                         ("s", "segment")])
def test_an_ultralytics_checkpoint_loads_as_the_model_of_its_tensors(tmp_path, scale, task):
    model = random_model(scale, task, seed=1)
    with ultralytics_classes() as classes:
        path = save_ultralytics_checkpoint(tmp_path / f"yolo11{scale}-{task}.pt", model,
                                           classes=classes)
    assert "ultralytics" not in sys.modules  # nothing of ultralytics is importable now
    assert_same_model(load_model(path), rounded_like_the_file(model))


def test_a_training_checkpoint_loads_its_ema_weights(tmp_path):
    trained, averaged = random_model("n", "detect", seed=1), random_model("n", "detect", seed=2)
    with ultralytics_classes() as classes:
        path = save_ultralytics_checkpoint(tmp_path / "last.pt", trained, ema=averaged,
                                           classes=classes)
    assert_same_model(load_model(path), rounded_like_the_file(averaged))


def test_a_fused_ultralytics_model_loads_fused(tmp_path):
    """ultralytics' fuse() folds BN and sets ``conv.forward = conv.forward_fuse``, a bound
    method the pickle stores as ``getattr(conv, 'forward_fuse')``: read, never looked up."""
    model = random_model("n", "detect", seed=1)
    expected = rounded_like_the_file(fuse(copy.deepcopy(model)))  # fused, then stored in fp16
    fused = fuse(copy.deepcopy(model))
    for m in fused.modules():
        if hasattr(m, "forward_fuse"):
            m.forward = m.forward_fuse
    with ultralytics_classes() as classes:
        tree = as_ultralytics_tree(fused, classes)
        tree.args = {"task": "detect"}
        torch.save({"model": tree, "ema": None, "epoch": -1}, tmp_path / "fused.pt")
    loaded = load_model(tmp_path / "fused.pt")
    assert is_fused(loaded)
    assert_same_model(loaded, expected)


class RunsACommand:
    """Unpickling this calls ``os.system`` (what a hostile .pt does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_naming_os_system_is_refused_in_one_line_and_runs_nothing(tmp_path, clip,
                                                                                capsys):
    marker = tmp_path / "it_ran"
    with ultralytics_classes() as classes:
        path = save_ultralytics_checkpoint(tmp_path / "yolo11n.pt", random_model("n", "detect", 1),
                                           classes=classes, hook=RunsACommand(marker))
    system = f"{os.system.__module__}.system"  # posix.system here
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    message = str(refused.value)
    assert "\n" not in message and f"names {system}," in message and "refused" in message
    code = main(["run", "--imgsz", "native",
                 str(clip), "--weights", str(path), "--dispatch", "edge",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and system in err
    assert not marker.exists()


def test_any_global_off_the_allow_list_is_refused(tmp_path):
    """Not a list of known-bad names: ``builtins.eval`` in an otherwise plain checkpoint of
    state dicts is refused as well, because the allow-list does not name it."""
    class Evaluates:
        def __reduce__(self):
            return eval, ("1 + 1",)

    torch.save({"model": {"x": torch.zeros(1)}, "train_args": {"x": Evaluates()}},
               tmp_path / "eval.pt")
    with pytest.raises(CheckpointError, match=r"names builtins\.eval, "):
        load_model(tmp_path / "eval.pt")


def test_a_head_fluxshard_does_not_run_is_named(tmp_path):
    with ultralytics_classes(renamed={"Detect": "Pose"}) as classes:
        path = save_ultralytics_checkpoint(tmp_path / "yolo11n-pose.pt",
                                           random_model("n", "detect", 1), classes=classes)
    with pytest.raises(CheckpointError, match="whose head is Pose"):
        load_model(path)


def test_run_takes_an_ultralytics_checkpoint_through_the_cli(tmp_path, clip, capsys):
    model = random_model("n", "detect", seed=1)
    with torch.no_grad():  # class "pallet" scores high everywhere: every frame has detections
        for branch in model.head.cv3:
            branch[-1].bias[1] = 8.0
    with ultralytics_classes() as classes:
        weights = save_ultralytics_checkpoint(tmp_path / "yolo11n.pt", model, classes=classes)
    out = tmp_path / "run"
    code = main(["run", "--imgsz", "native",
                 str(clip), "--weights", str(weights), "--dispatch", "edge", "--frames", "3",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["classes"] == list(NAMES.values())
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all("pallet" in r["names"] for r in records)
