"""The predict options, with ultralytics' names and defaults: ``imgsz`` (640; None: the frame's
native size), ``conf`` (0.25), ``iou`` (0.7), ``classes`` (None: all) and ``max_det`` (300).

One :class:`PredictOptions` travels from the command line (``--imgsz`` ...), the SDK stream's
keywords or the served model's parameters (``config.pbtxt``: strings, :meth:`from_parameters`)
to the sessions that run NMS, so every endpoint filters alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.letterbox import STRIDE, Letterbox

DEFAULT_IMGSZ = 640
DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.7
DEFAULT_MAX_DET = 300
NATIVE = "native"  # --imgsz native: no letterbox


@dataclass(frozen=True)
class PredictOptions:
    imgsz: int | None = DEFAULT_IMGSZ
    conf: float = DEFAULT_CONF
    iou: float = DEFAULT_IOU
    classes: tuple[int, ...] | None = None
    max_det: int = DEFAULT_MAX_DET

    def __post_init__(self):
        if isinstance(self.imgsz, str):
            object.__setattr__(self, "imgsz", imgsz_value(self.imgsz))
        elif self.imgsz is not None:
            object.__setattr__(self, "imgsz", check_imgsz(self.imgsz))
        for name in ("conf", "iou"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
            object.__setattr__(self, name, value)
        if int(self.max_det) < 1:
            raise ValueError(f"max_det must be >= 1, got {self.max_det}")
        object.__setattr__(self, "max_det", int(self.max_det))
        if self.classes is not None:
            classes = tuple(int(c) for c in np.atleast_1d(self.classes))
            if not classes or min(classes) < 0:
                raise ValueError(f"classes must be class ids >= 0, got {list(self.classes)}")
            object.__setattr__(self, "classes", classes)

    def letterbox(self, height: int, width: int) -> Letterbox:
        return Letterbox.fit(height, width, self.imgsz)

    def nms(self) -> dict:
        """The keywords of :func:`fluxshard.models.ops.postprocess`."""
        return {"conf_thres": self.conf, "iou_thres": self.iou, "max_det": self.max_det,
                "classes": list(self.classes) if self.classes is not None else None}

    def keep(self, rows: np.ndarray) -> np.ndarray:
        """Indices of the detection rows (N, 6+) another endpoint returned that these options'
        conf, classes and max_det keep (rows come highest score first; all of them for rows
        NMS'd with the same options). IoU cannot be narrowed after NMS: an endpoint's own
        ``iou`` stands."""
        rows = np.asarray(rows)
        kept = rows[:, 4] >= self.conf
        if self.classes is not None:
            kept &= np.isin(rows[:, 5].astype(np.int64), self.classes)
        return np.flatnonzero(kept)[:self.max_det]

    def narrow(self, rows: np.ndarray) -> np.ndarray:
        """The rows :meth:`keep` keeps."""
        return np.asarray(rows)[self.keep(rows)]

    @classmethod
    def from_parameters(cls, params: dict) -> "PredictOptions":
        """From a served model's string parameters (``conf_threshold``: the older name of
        ``conf``; ``classes``: ids separated by commas or spaces, empty for all)."""
        classes = (params.get("classes") or "").replace(",", " ").split()
        conf = params.get("conf") or params.get("conf_threshold") or DEFAULT_CONF
        return cls(imgsz=imgsz_value(params.get("imgsz") or str(DEFAULT_IMGSZ)),
                   conf=float(conf), iou=float(params.get("iou") or DEFAULT_IOU),
                   classes=tuple(int(c) for c in classes) or None,
                   max_det=int(params.get("max_det") or DEFAULT_MAX_DET))

    def parameters(self) -> dict[str, str]:
        """The served model's parameters for these options (:meth:`from_parameters` reads
        them back)."""
        return {"imgsz": NATIVE if self.imgsz is None else str(self.imgsz),
                "conf": str(self.conf), "iou": str(self.iou), "max_det": str(self.max_det),
                "classes": ",".join(map(str, self.classes or ()))}

    def describe(self) -> dict:
        """For summaries: the options as a user wrote them."""
        return {"imgsz": NATIVE if self.imgsz is None else self.imgsz, "conf": self.conf,
                "iou": self.iou, "classes": list(self.classes) if self.classes else None,
                "max_det": self.max_det}


def check_imgsz(imgsz: int) -> int:
    """``imgsz`` as an int; a clear error unless it is a positive multiple of the stride."""
    value = int(imgsz)
    if value != imgsz or value < STRIDE or value % STRIDE:
        raise ValueError(f"imgsz must be a multiple of {STRIDE} (the models' largest stride), "
                         f"got {imgsz}: e.g. {max(STRIDE, -(-int(imgsz) // STRIDE) * STRIDE)}")
    return value


def imgsz_value(text: str) -> int | None:
    """``--imgsz`` / the ``imgsz`` parameter: an int, or "native" (None)."""
    text = str(text).strip().lower()
    if text == NATIVE:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"imgsz must be an integer or {NATIVE!r}, got {text!r}") from None
    return check_imgsz(value)


__all__ = ["PredictOptions", "DEFAULT_IMGSZ", "DEFAULT_CONF", "DEFAULT_IOU", "DEFAULT_MAX_DET",
           "NATIVE", "check_imgsz", "imgsz_value"]
