"""Which engine the served ``tiles`` and ``dense`` executors compute on: the model parameters
``tiles_engine`` (``onnxruntime`` | ``torch`` | ``tensorrt``) and ``tiles_engine_path`` (the
TensorRT engine file, ``scripts/build_tiles_trt.sh``). Everything a first frame would trip over
(an unknown kind, a missing engine file, no ``tensorrt`` module, a CPU instance) is refused
here, when the model loads, in one line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fluxshard.tiles.engine import ENGINE_KINDS

# the executors whose compute the parameter picks; "exact" runs its own sparse executor
EXECUTORS_ON_ENGINE = ("tiles", "dense")


@dataclass(frozen=True)
class ServedEngine:
    """The tile engine kind of a served model and, for ``tensorrt``, its engine file."""

    kind: str = "onnxruntime"
    path: Path | None = None

    @classmethod
    def from_parameters(cls, params: dict, device: str = "cpu", executor: str = "tiles",
                        model_dir: str | Path | None = None) -> "ServedEngine":
        """The engine ``params`` name, checked for ``executor`` on ``device``. A relative
        ``tiles_engine_path`` is taken from ``model_dir`` (the model's folder in the
        repository). Raises ValueError with one line for anything that cannot serve."""
        kind = (params.get("tiles_engine") or "onnxruntime").strip()
        if kind not in ENGINE_KINDS:
            raise ValueError(f"model parameter tiles_engine={kind!r}: choose one of "
                             f"{', '.join(ENGINE_KINDS)}")
        if kind != "tensorrt":
            return cls(kind)
        text = (params.get("tiles_engine_path") or "").strip()
        if not text:
            raise ValueError("tiles_engine=tensorrt needs tiles_engine_path, the engine file "
                             "scripts/build_tiles_trt.sh builds")
        path = Path(text)
        if not path.is_absolute() and model_dir is not None:
            path = Path(model_dir) / path
        engine = cls(kind, path)
        if executor in EXECUTORS_ON_ENGINE:
            engine.check(device)
        return engine

    def check(self, device: str) -> None:
        """Refuse a TensorRT engine that cannot run on ``device`` (one-line ValueError)."""
        if self.kind != "tensorrt":
            return
        if self.path is None or not self.path.is_file():
            raise ValueError(f"tiles_engine=tensorrt: engine file {self.path} not found (build "
                             "it with scripts/build_tiles_trt.sh and set tiles_engine_path)")
        if importlib.util.find_spec("tensorrt") is None:
            raise ValueError("tiles_engine=tensorrt: the `tensorrt` Python module is not "
                             "installed here; install TensorRT or set tiles_engine=onnxruntime")
        if not device.startswith("cuda"):
            raise ValueError(f"tiles_engine=tensorrt runs on a GPU instance (KIND_GPU), this "
                             f"one is on {device}; use configs/gpu.pbtxt or onnxruntime")

    def session_options(self, device: str) -> dict:
        """``fluxshard.sessions.yolo_session_factory``'s engine arguments for an instance on
        ``device``."""
        return {"tile_engine": self.kind, "engine_path": self.path,
                "dense_engine": self.dense_engine(device)}

    def dense_engine(self, device: str) -> str:
        """What the dense executor's frames run on: this engine, except that on a GPU instance
        the CPU engines (onnxruntime; torch maps, which run on the CPU) give way to the torch
        model on the instance's GPU."""
        if self.kind == "tensorrt" or device == "cpu":
            return self.kind
        return "torch"


__all__ = ["ServedEngine", "EXECUTORS_ON_ENGINE"]
