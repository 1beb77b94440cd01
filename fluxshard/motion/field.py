"""Motion-field operations shared by both endpoints (docs/CONVENTIONS.md, "Motion fields").

A field is float32 ``(ceil(H/4), ceil(W/4), 2)``: one backward vector ``(dx, dy)`` per 4x4 block;
pixel ``(x, y)`` of the current frame came from ``(x + dx, y + dy)`` of the reference.
"""

from __future__ import annotations

import numpy as np

MV_BLOCK = 4


def field_shape(height: int, width: int) -> tuple[int, int, int]:
    return -(-height // MV_BLOCK), -(-width // MV_BLOCK), 2


def zero_field(height: int, width: int) -> np.ndarray:
    return np.zeros(field_shape(height, width), np.float32)


def check_field(field: np.ndarray, height: int, width: int) -> np.ndarray:
    field = np.asarray(field)
    if field.shape != field_shape(height, width):
        raise ValueError(f"motion field shape {field.shape} does not fit a {height}x{width} frame "
                         f"(expected {field_shape(height, width)})")
    if not np.issubdtype(field.dtype, np.floating):
        field = field.astype(np.float32)
    return field


def round_half_away(values: np.ndarray) -> np.ndarray:
    """Integer displacement of a vector: round half away from zero (the conventions' rounding)."""
    return np.trunc(values + np.copysign(0.5, values)).astype(np.int64)


def compose_fields(d_acc: np.ndarray, d_t: np.ndarray) -> np.ndarray:
    """Accumulate by composition: ``d_acc'(x) = d_t(x) + d_acc(x + d_t(x))``, with ``d_acc``
    gathered at the block nearest to the displaced block centre (clamped to the grid: a vector
    that leaves the frame stays out of it and is reported invalid by alignment)."""
    d_acc = np.asarray(d_acc, np.float32)
    d_t = np.asarray(d_t, np.float32)
    if d_acc.shape != d_t.shape or d_t.ndim != 3 or d_t.shape[2] != 2:
        raise ValueError(f"fields must have equal (Hb, Wb, 2) shapes, got {d_acc.shape} and "
                         f"{d_t.shape}")
    hb, wb = d_t.shape[:2]
    # Block (by, bx) centre moves by d_t pixels = d_t / 4 blocks; nearest block of the new centre.
    step = np.floor(d_t * (1 / MV_BLOCK) + 0.5).astype(np.int32)
    sy = np.clip(np.arange(hb, dtype=np.int32)[:, None] + step[..., 1], 0, hb - 1)
    sx = np.clip(np.arange(wb, dtype=np.int32)[None, :] + step[..., 0], 0, wb - 1)
    return d_t + d_acc[sy, sx]


def _block_sources(field: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left source pixel (y, x) of every 4x4 block, clamped to [-4, size]: a block that far
    out is wholly outside either way, so a 4-pixel zero border is all the padding needed."""
    field = check_field(field, height, width)
    hb, wb = field.shape[:2]
    disp = round_half_away(field)
    sy = np.arange(hb)[:, None] * MV_BLOCK + disp[..., 1]
    sx = np.arange(wb)[None, :] * MV_BLOCK + disp[..., 0]
    return np.clip(sy, -MV_BLOCK, height), np.clip(sx, -MV_BLOCK, width)


def zero_bordered(image: np.ndarray) -> np.ndarray:
    """``image`` with the 4-pixel zero border block gathers read from (make it once for an image
    that is warped many times, such as an endpoint's input cache)."""
    b = MV_BLOCK
    return np.ascontiguousarray(np.pad(image, ((b, b), (b, b)) + ((0, 0),) * (image.ndim - 2)))


def _gather_blocks(image: np.ndarray, sy: np.ndarray, sx: np.ndarray,
                   padded: np.ndarray | None = None) -> np.ndarray:
    """Copy the 4x4 windows at block sources (sy, sx) of a 4-pixel zero-bordered ``image`` into
    a block grid laid out as an image ((Hb*4, Wb*4, ...)). Each block row is one contiguous run
    of 4 pixels in the source, so the gather moves whole runs and needs no transpose.
    ``padded``: :func:`zero_bordered` of ``image`` when the caller has it."""
    b = MV_BLOCK
    if padded is None:
        padded = zero_bordered(image)
    rows, cols = padded.shape[:2]
    pixel = padded.strides[1]
    # Overlapping view: element (y, x) is the run of b pixels starting there, as one opaque item.
    runs = np.ndarray(shape=(rows, cols - b + 1), dtype=np.dtype((np.void, b * pixel)),
                      buffer=padded, strides=(padded.strides[0], pixel))
    hb, wb = sy.shape
    lin = np.arange(b)[None, :, None]
    run_rows = (sy[:, None, :] + b + lin).reshape(hb * b, wb)
    run_cols = np.broadcast_to((sx + b)[:, None, :], (hb, b, wb)).reshape(hb * b, wb)
    gathered = runs[run_rows, run_cols]  # (Hb*4, Wb) runs
    return gathered.view(image.dtype).reshape((hb * b, wb * b) + image.shape[2:])


def block_leaves_frame(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """(Hb, Wb) bool: some pixel of the 4x4 block takes its value from outside the frame
    (the last block row/column only counts the pixels the frame has)."""
    return _sources_leave_frame(*_block_sources(field, height, width), height, width)


def _sources_leave_frame(sy: np.ndarray, sx: np.ndarray, height: int, width: int) -> np.ndarray:
    hb, wb = sy.shape
    rows = np.minimum(MV_BLOCK, height - np.arange(hb) * MV_BLOCK)[:, None]
    cols = np.minimum(MV_BLOCK, width - np.arange(wb) * MV_BLOCK)[None, :]
    return (sy < 0) | (sy + rows > height) | (sx < 0) | (sx + cols > width)


def _validity(sy: np.ndarray, sx: np.ndarray, height: int, width: int) -> np.ndarray:
    b = MV_BLOCK
    lin = np.arange(b)
    rows = sy[:, None, :, None] + lin[None, :, None, None]  # (Hb, 4, Wb, 1)
    cols = sx[:, None, :, None] + lin[None, None, None, :]  # (Hb, 1, Wb, 4)
    valid = ((rows >= 0) & (rows < height)) & ((cols >= 0) & (cols < width))
    return valid.reshape(sy.shape[0] * b, sy.shape[1] * b)[:height, :width]


def source_validity(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the pixel's integer-rounded source lies inside the frame."""
    sy, sx = _block_sources(field, height, width)
    return _validity(sy, sx, height, width)


def warp(image: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``align_image`` without the validity mask (out-of-frame pixels are 0 all the same)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    return _warp(image, *_block_sources(field, *image.shape[:2]))


def _warp(image: np.ndarray, sy: np.ndarray, sx: np.ndarray,
          padded: np.ndarray | None = None) -> np.ndarray:
    height, width = image.shape[:2]
    b = MV_BLOCK
    if image.dtype.itemsize == 1:
        aligned = _gather_blocks(image, sy, sx, padded)
    else:  # wider types: view each pixel as bytes
        as_bytes = np.ascontiguousarray(image).view(np.uint8).reshape(height, width, -1)
        aligned = _gather_blocks(as_bytes, sy, sx).view(image.dtype).reshape(
            (sy.shape[0] * b, sy.shape[1] * b) + image.shape[2:])
    return np.ascontiguousarray(aligned[:height, :width])


def align_image(image: np.ndarray, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` (the reference, (H, W) or (H, W, C)) to the current frame with the
    integer-rounded field. Returns ``(aligned, valid)``; invalid positions (source outside the
    image) hold 0."""
    aligned = warp(image, field)
    return aligned, source_validity(field, *aligned.shape[:2])


def field_at_stride(field: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The field on a stride-``s`` feature grid: ``d / s`` per position, and RFAP Cond. 2 per
    position (``coherent``): every input-level vector in the stride window is the same and
    ``d / s`` is integral. Grid shape ``(ceil(Hb*4/s), ceil(Wb*4/s))``; windows cut by the frame
    edge only look at their in-grid vectors. Strides must divide 4 or be multiples of 4."""
    field = np.asarray(field, np.float32)
    if field.ndim != 3 or field.shape[2] != 2:
        raise ValueError(f"field must be (Hb, Wb, 2), got {field.shape}")
    if stride < 1 or (MV_BLOCK % stride and stride % MV_BLOCK):
        raise ValueError(f"stride must divide {MV_BLOCK} or be a multiple of it, got {stride}")
    hb, wb = field.shape[:2]
    if stride <= MV_BLOCK:
        rep = MV_BLOCK // stride
        window = np.repeat(np.repeat(field, rep, 0), rep, 1)
        uniform = np.ones(window.shape[:2], bool)
    else:
        k = stride // MV_BLOCK
        ph, pw = -hb % k, -wb % k
        padded = np.pad(field, ((0, ph), (0, pw), (0, 0)), mode="edge")  # edge: no new vectors
        blocks = padded.reshape((hb + ph) // k, k, (wb + pw) // k, k, 2)
        window = blocks[:, 0, :, 0]
        uniform = (blocks == window[:, None, :, None]).all(axis=(1, 3, 4))
    field_s = (window / stride).astype(np.float32)
    integral = (np.floor(field_s) == field_s).all(axis=-1)
    return field_s, uniform & integral


def motion_statistic(field: np.ndarray) -> float:
    """Mean vector length (L2, pixels) over the frame: the motion level for the tau table."""
    field = np.asarray(field, np.float32)
    if field.size == 0:
        return 0.0
    return float(np.sqrt((field ** 2).sum(-1)).mean())
