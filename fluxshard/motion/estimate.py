"""Motion fields for bare frames: frames an application decoded itself (OpenCV, GStreamer,
DeepStream, any numpy array) carry no codec vectors, so the field of each frame is estimated
against the previous one.

Two estimators (``FIELD_ESTIMATORS``), both giving the motion layer's backward field
(docs/CONVENTIONS.md, "Motion fields"):

* ``"dis"``: OpenCV's DIS optical flow (``cv2.DISOpticalFlow``), dense per pixel, computed from
  the current frame to the previous one (so pixel x of the current frame came from x + flow(x)),
  then averaged over each 4x4 block.
* ``"block_matching"``: the project's own hierarchical block matching
  (:func:`fluxshard.motion.block_matching.match_blocks`), the fallback ``iter_motion`` uses for
  streams without codec vectors.

``perf/bench_frame_source.py`` measures both against the codec path on the same frames;
``DEFAULT_ESTIMATOR`` is the one that measured better (docs/sdk.md says how).
"""

from __future__ import annotations

import cv2
import numpy as np

from fluxshard.motion.block_matching import DEFAULT_RADIUS, match_blocks
from fluxshard.motion.field import MV_BLOCK, field_shape

FIELD_ESTIMATORS = ("dis", "block_matching")
DEFAULT_ESTIMATOR = "dis"
DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
               "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
DEFAULT_DIS_PRESET = "ultrafast"


def check_frame(frame) -> np.ndarray:
    """An (H, W, 3) uint8 frame, or a one-line ValueError saying what it is instead."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
    return frame


def gray(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 luma."""
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def flow_to_field(flow: np.ndarray) -> np.ndarray:
    """A dense (H, W, 2) float32 backward flow -> the (ceil(H/4), ceil(W/4), 2) block field:
    each block's mean vector (edge blocks of a side not divisible by 4 repeat the last row or
    column, as the field's blocks cover them)."""
    height, width = flow.shape[:2]
    hb, wb = field_shape(height, width)[:2]
    padded = cv2.copyMakeBorder(flow, 0, hb * MV_BLOCK - height, 0, wb * MV_BLOCK - width,
                                cv2.BORDER_REPLICATE)
    # INTER_AREA at an integer factor is the exact block mean
    field = cv2.resize(padded, (wb, hb), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(field, dtype=np.float32)


class FrameMotion:
    """Backward motion of each bare frame against the one before it.

    ``field(frame)`` returns the field of ``frame`` against the previously seen frame, or None
    when there is none to compare with (the first frame, or a frame of another size): a key
    frame. ``observe(frame)`` records a frame whose field came from elsewhere (a codec), so a
    bare frame after it is still compared with it: by reference, converted to luma only if a
    bare frame follows (a stream fed codec fields pays nothing). Bare frames are kept as luma.
    """

    def __init__(self, estimator: str = DEFAULT_ESTIMATOR, *, radius: int = DEFAULT_RADIUS,
                 dis_preset: str = DEFAULT_DIS_PRESET):
        if estimator not in FIELD_ESTIMATORS:
            raise ValueError(f"estimator must be one of {FIELD_ESTIMATORS}, got {estimator!r}")
        if dis_preset not in DIS_PRESETS:
            raise ValueError(f"dis_preset must be one of {tuple(DIS_PRESETS)}, got {dis_preset!r}")
        self.estimator = estimator
        self.radius = radius
        self.dis_preset = dis_preset
        self._dis = None
        self._previous: np.ndarray | None = None  # the last frame seen: luma, or RGB if observed

    def reset(self) -> None:
        self._previous = None

    def observe(self, frame: np.ndarray) -> None:
        self._previous = check_frame(frame)

    def field(self, frame: np.ndarray) -> np.ndarray | None:
        luma = gray(check_frame(frame))
        previous, self._previous = self._previous, luma
        if previous is None or previous.shape[:2] != luma.shape:
            return None
        if previous.ndim == 3:
            previous = gray(previous)
        if self.estimator == "block_matching":
            return match_blocks(luma, previous, radius=self.radius)[0]
        if self._dis is None:  # made on first use: a stream that never estimates holds none
            self._dis = cv2.DISOpticalFlow_create(DIS_PRESETS[self.dis_preset])
        # flow from the current frame to the previous one: current(x) ~ previous(x + flow(x))
        return flow_to_field(self._dis.calc(luma, previous, None))


__all__ = ["FIELD_ESTIMATORS", "DEFAULT_ESTIMATOR", "DIS_PRESETS", "FrameMotion",
           "flow_to_field", "check_frame", "gray"]
