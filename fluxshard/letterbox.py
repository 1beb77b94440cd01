"""The model's input frame from a source frame of any size, the way ultralytics' predict does
it (``LetterBox(auto=True)``): scale so the long side is ``imgsz`` (keeping the aspect ratio, up
or down), then pad the short side with grey to the next multiple of the stride, half on each
side. A 1920x1080 frame at imgsz 640 becomes 640x360 padded to 640x384.

Everything that follows the source works at the input size: the motion field is mapped with the
same transform (:meth:`Letterbox.field`: block positions scaled and offset by the pad, vectors
scaled), so the residual sets, the caches and the uplink see the frames the model sees.
Detections go back to the source frame's pixels with :meth:`Letterbox.rows_to_source`.

``imgsz`` None (``--imgsz native``) is the identity: the frame as it is (the executors pad it
bottom/right to a multiple of 32, :func:`fluxshard.models.ops.preprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_VALUE = 114  # ultralytics' letterbox grey
STRIDE = 32  # the models' largest stride: input sides are multiples of it
MV_BLOCK = 4  # fluxshard.motion.MV_BLOCK: one motion vector per 4x4 pixels


@dataclass(frozen=True)
class Letterbox:
    """How one source size maps to the model's input: ``input = source * gain + (left, top)``."""

    source_hw: tuple[int, int]
    input_hw: tuple[int, int]
    gain: float = 1.0
    left: int = 0
    top: int = 0

    @classmethod
    def fit(cls, height: int, width: int, imgsz: int | None, stride: int = STRIDE
            ) -> "Letterbox":
        """ultralytics' ``LetterBox(imgsz, auto=True, stride=stride)`` geometry for a frame of
        ``height`` x ``width`` (``imgsz`` None: the identity)."""
        if height < 1 or width < 1:
            raise ValueError(f"letterbox: frame size must be positive, got {width}x{height}")
        if imgsz is None:
            return cls((height, width), (height, width))
        gain = min(imgsz / height, imgsz / width)
        new_w, new_h = int(round(width * gain)), int(round(height * gain))
        dw, dh = (imgsz - new_w) % stride / 2, (imgsz - new_h) % stride / 2
        top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
        left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
        return cls((height, width), (new_h + top + bottom, new_w + left + right), gain, left,
                   top)

    @property
    def identity(self) -> bool:
        return self.source_hw == self.input_hw and self.gain == 1.0

    @property
    def scaled_hw(self) -> tuple[int, int]:
        """The source's size once scaled, before the pad."""
        h, w = self.source_hw
        return int(round(h * self.gain)), int(round(w * self.gain))

    def image(self, frame: np.ndarray) -> np.ndarray:
        """The model's input frame (uint8 RGB) from a source frame (resized bilinearly like
        ultralytics, with OpenCV; grey 114 pad)."""
        if frame.shape[:2] != self.source_hw:
            raise ValueError(f"letterbox: frame is {frame.shape[1]}x{frame.shape[0]}, expected "
                             f"{self.source_hw[1]}x{self.source_hw[0]}")
        if self.identity:
            return frame
        import cv2

        h, w = self.scaled_hw
        scaled = frame if (h, w) == self.source_hw else cv2.resize(
            frame, (w, h), interpolation=cv2.INTER_LINEAR)
        out = np.full((*self.input_hw, 3), PAD_VALUE, np.uint8)
        out[self.top:self.top + h, self.left:self.left + w] = scaled
        return out

    def field(self, field: np.ndarray | None) -> np.ndarray | None:
        """A source motion field ``(ceil(H/4), ceil(W/4), 2)`` at the input size: each input
        block takes the vector of the source block under its centre, scaled by the gain; blocks
        in the pad get zero (the pad stays where it is)."""
        if field is None or self.identity:
            return field
        field = np.asarray(field, np.float32)
        gh, gw = -(-self.input_hw[0] // MV_BLOCK), -(-self.input_hw[1] // MV_BLOCK)
        rows, row_in = self._source_blocks(gh, self.top, self.source_hw[0], field.shape[0])
        cols, col_in = self._source_blocks(gw, self.left, self.source_hw[1], field.shape[1])
        out = field[np.ix_(rows, cols)] * np.float32(self.gain)
        out[~(row_in[:, None] & col_in[None, :])] = 0.0
        return out

    def _source_blocks(self, n: int, offset: int, source_side: int, grid_side: int):
        """(source block index, inside the source) of ``n`` input blocks along one axis."""
        centre = (np.arange(n) * MV_BLOCK + MV_BLOCK / 2 - offset) / self.gain
        inside = (centre >= 0) & (centre < source_side)
        return np.clip((centre // MV_BLOCK).astype(np.int64), 0, grid_side - 1), inside

    def rows_to_source(self, rows: np.ndarray) -> np.ndarray:
        """(N, 6+) detection rows (x1, y1, x2, y2, ...) in input pixels -> source pixels,
        clipped to the source frame (ultralytics' ``scale_boxes``)."""
        rows = np.array(rows, np.float32, copy=True)
        if self.identity or not len(rows):
            return rows
        h, w = self.source_hw
        rows[:, [0, 2]] = np.clip((rows[:, [0, 2]] - self.left) / self.gain, 0, w)
        rows[:, [1, 3]] = np.clip((rows[:, [1, 3]] - self.top) / self.gain, 0, h)
        return rows

    def masks_to_source(self, masks: np.ndarray) -> np.ndarray:
        """(N, h, w) bool masks in input pixels (h, w at most the input's) -> (N, H, W) in
        source pixels (pad cut off, resized nearest)."""
        masks = np.asarray(masks, bool)
        if self.identity:
            return masks[:, :self.source_hw[0], :self.source_hw[1]]
        h, w = self.source_hw
        rows = np.clip(((np.arange(h) + 0.5) * self.gain + self.top).astype(np.int64), 0,
                       masks.shape[1] - 1)
        cols = np.clip(((np.arange(w) + 0.5) * self.gain + self.left).astype(np.int64), 0,
                       masks.shape[2] - 1)
        return masks[:, rows][:, :, cols]

    def blocks_to_source(self, mask: np.ndarray, block: int) -> np.ndarray:
        """A per-block mask on the input's grid -> (H, W) bool per source pixel (for drawing)."""
        full = np.repeat(np.repeat(np.asarray(mask, bool), block, 0), block, 1)
        return self.masks_to_source(full[None])[0]


__all__ = ["Letterbox", "STRIDE"]
