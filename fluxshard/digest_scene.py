"""A synthetic camera whose every answered frame can be checked exactly: a still, textured
background with a square bouncing across it (any number of frames, a zero motion field, a few
residual blocks per frame), and the residual blocks at tau 0. Tests of the server and
``perf/reliability*.py`` compare each answer's cache digest with the true frame's.
"""

from __future__ import annotations

import numpy as np

from fluxshard import wire
from fluxshard.motion.field import align_image

H, W, BLOCK = 64, 96, 16


class Scene:
    """A still camera over a textured background with a square bouncing across it: any number
    of frames, a zero motion field, a few residual blocks per frame."""

    def __init__(self, seed: int, height: int = H, width: int = W):
        rng = np.random.default_rng(seed)
        self.height, self.width = height, width
        coarse = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
        self.background = np.kron(coarse, np.ones((4, 4, 1), np.uint8))[:height, :width]
        self.color = rng.integers(0, 256, 3, dtype=np.uint8)

    def frame(self, t: int) -> np.ndarray:
        span = self.width - 16
        phase = (3 * t) % (2 * span)
        x = phase if phase < span else 2 * span - phase
        f = self.background.copy()
        f[20:36, x:x + 16] = self.color
        return f


def residual_mask(cache: np.ndarray, frame: np.ndarray, field_: np.ndarray,
                  block: int = BLOCK) -> np.ndarray:
    """tau = 0: a block is residual when any pixel differs from the aligned cache."""
    h, w = frame.shape[:2]
    aligned, valid = align_image(cache, field_)
    diff = (aligned != frame).any(axis=2) | ~valid
    hr, wr = wire.residual_grid(h, w, block)
    padded = np.zeros((hr * block, wr * block), bool)
    padded[:h, :w] = diff
    return padded.reshape(hr, block, wr, block).any(axis=(1, 3))
