"""What `fluxshard run` writes: detections.jsonl, annotated.mp4, report.png, summary.json (its
numbers: edge_runtime.metrics.RollingSummary)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ENDPOINT_COLORS = {"edge": (255, 170, 0), "cloud": (0, 160, 255)}
RESIDUAL_TINT = np.array([255, 40, 40], np.float32)  # blocks sent / recomputed
REUSED_TINT = np.array([40, 220, 90], np.float32)  # blocks taken from the aligned cache
# instance mask fill, by class (cycled); the hues farthest from the reuse tints (red, green) first
MASK_COLORS = np.array([[0, 194, 255], [255, 178, 29], [203, 56, 255], [0, 212, 187],
                        [255, 112, 31], [132, 56, 255], [255, 149, 200], [100, 115, 255],
                        [207, 210, 49], [52, 69, 147], [255, 157, 151], [82, 0, 133],
                        [0, 24, 236], [26, 147, 52], [72, 249, 10], [255, 56, 56]], np.float32)
MASK_ALPHA = 0.5


def class_name(k: int, names) -> str:
    return names[k] if 0 <= k < len(names) else f"class{k}"


def detection_record(result, names, track_ids=None) -> dict:
    """One detections.jsonl line (``track_ids``: one per box, -1 untracked, written as null)."""
    classes = [int(c) for c in result.classes]
    tracks = ({} if track_ids is None else
              {"track_ids": [int(t) if t >= 0 else None for t in track_ids]})
    return {"index": result.index, "endpoint": result.endpoint, "key": result.key,
            "boxes": np.round(result.boxes.astype(float), 2).tolist(),
            "scores": np.round(result.scores.astype(float), 4).tolist(),
            "classes": classes, "names": [class_name(c, names) for c in classes], **tracks,
            "latency_ms": round(result.latency_ms, 3), "uplink_bytes": result.uplink_bytes,
            "cache_hit_rate": round(result.cache_hit_rate, 4),
            "residual_fraction": round(result.residual_fraction, 4),
            "tau": result.stats.get("tau"),  # the tau dispatch and the executor used
            "dispatch": _dispatch_record(result.decision),
            **_segments_record(getattr(result, "masks", None))}


def _segments_record(masks) -> dict:
    """A segment model's masks as ``segments``: one COCO RLE per detection; nothing for a
    detect model."""
    return {} if masks is None else {"segments": mask_rles(masks)}


def mask_rles(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool masks -> N COCO run-length encodings ``{"size": [H, W], "counts": str}``
    (what COCO's results files hold; pycocotools' and faster-coco-eval's ``mask.decode`` read
    them)."""
    from faster_coco_eval.core import mask as coco_mask

    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {masks.shape}")
    if not len(masks):
        return []
    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
            for r in rles]


def masks_from_rles(rles: list[dict]) -> np.ndarray:
    """:func:`mask_rles`' records (a detections.jsonl line's ``segments``) -> (N, H, W) bool."""
    from faster_coco_eval.core import mask as coco_mask

    if not rles:
        return np.zeros((0, 0, 0), bool)
    coded = [{"size": list(r["size"]), "counts": r["counts"].encode("ascii")} for r in rles]
    return coco_mask.decode(coded).transpose(2, 0, 1).astype(bool)


def _dispatch_record(d) -> dict:
    """Why the frame ran where it did: the estimates and the load factors they include."""
    return {"reason": d.reason, "edge_ms": round(d.edge_ms, 2), "cloud_ms": round(d.cloud_ms, 2),
            "transfer_ms": round(d.transfer_ms, 2), "edge_load": round(d.edge_load, 3),
            "cloud_load": round(d.cloud_load, 3)}


def jpeg_bytes(frame: np.ndarray, quality: int = 90) -> int:
    """Size of the frame as a per-frame JPEG (Pillow), the uplink baseline."""
    from fluxshard.wire import jpeg_encode

    return len(jpeg_encode(frame, quality))


def annotate(frame: np.ndarray, result, names, block: int, track_ids=None) -> np.ndarray:
    """The frame with the per-block reuse heat map (red: residual blocks, sent or recomputed;
    green: reused from the aligned cache), a segment model's masks filled in their class's
    colour, boxes with labels (``#track`` first when ``track_ids`` has one), and the endpoint
    and latency."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = frame.shape[:2]
    letterbox = getattr(result, "letterbox", None)  # the mask is on the model input's grid
    mask = (letterbox.blocks_to_source(result.residual_mask, block) if letterbox is not None
            else np.repeat(np.repeat(result.residual_mask, block, 0), block, 1)[:h, :w])
    tint = np.where(mask[..., None], RESIDUAL_TINT, REUSED_TINT)
    alpha = np.where(mask, 0.35, 0.12)[..., None]
    shaded = frame.astype(np.float32) * (1 - alpha) + tint * alpha
    masks = getattr(result, "masks", None)
    if masks is not None:
        shaded = overlay_masks(shaded, masks, result.classes)
    image = Image.fromarray(shaded.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    size = max(10, h // 32)
    font = ImageFont.load_default(size=size)
    tracks = np.full(len(result.classes), -1) if track_ids is None else track_ids
    for (x1, y1, x2, y2), score, k, track in zip(result.boxes, result.scores, result.classes,
                                                 tracks):
        draw.rectangle([x1, y1, x2, y2], outline=(255, 255, 0), width=2)
        label = (f"#{track} " if track >= 0 else "") + f"{class_name(int(k), names)} {score:.2f}"
        tx, ty = x1, max(0, y1 - size - 2)
        box = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=(255, 255, 0), font=font)
    banner = (f"#{result.index} {result.endpoint.upper()}{' key' if result.key else ''}  "
              f"{result.latency_ms:.0f} ms  {result.uplink_bytes / 1e3:.1f} kB  "
              f"reuse {result.cache_hit_rate:.0%}")
    box = draw.textbbox((4, 4), banner, font=font)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 4), banner, fill=ENDPOINT_COLORS.get(result.endpoint, (255, 255, 255)), font=font)
    return np.asarray(image)


def overlay_masks(image: np.ndarray, masks: np.ndarray, classes) -> np.ndarray:
    """``image`` (H, W, 3) float with each (H, W) bool mask filled in its class's colour at
    ``MASK_ALPHA``; later masks over earlier ones."""
    masks = np.asarray(masks, bool)
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {masks.shape[1:]} do not match the frame {image.shape[:2]}")
    out = np.array(image, np.float32)
    for m, k in zip(masks, classes):
        colour = MASK_COLORS[int(k) % len(MASK_COLORS)]
        out[m] = out[m] * (1 - MASK_ALPHA) + colour * MASK_ALPHA
    return out


class VideoWriter:
    """H.264 (PyAV, yuv420p) writer that takes RGB frames."""

    def __init__(self, path: Path, width: int, height: int, fps: int = 30):
        import av

        if width % 2 or height % 2:
            raise ValueError(f"H.264 needs even sides, got {width}x{height}")
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = {"crf": "23", "preset": "veryfast"}
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()


REPORT_FIELDS = ("index", "endpoint", "latency_ms", "uplink_bytes", "cache_hit_rate",
                 "residual_fraction")


def report_row(record: dict, jpeg_bytes: int) -> dict:
    """What report.png plots of one frame (its detections.jsonl record, its JPEG size)."""
    return {**{k: record[k] for k in REPORT_FIELDS}, "jpeg_bytes": jpeg_bytes}


def plot_report(rows: list[dict], path: Path, title: str) -> None:
    """Latency per frame by endpoint; uplink bytes vs per-frame JPEG q90; cache hit rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.array([r["index"] for r in rows])
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for name, color in ENDPOINT_COLORS.items():
        sel = [i for i, r in enumerate(rows) if r["endpoint"] == name]
        if sel:
            axes[0].scatter(idx[sel], [rows[i]["latency_ms"] for i in sel], s=14,
                            color=np.array(color) / 255, label=f"{name} ({len(sel)} frames)")
    axes[0].set(ylabel="latency (ms)", title=title)
    axes[0].legend(fontsize=8)
    axes[1].plot(idx, [r["uplink_bytes"] / 1e3 for r in rows], ".-", label="FluxShard uplink")
    axes[1].plot(idx, [r["jpeg_bytes"] / 1e3 for r in rows], "--", label="per-frame JPEG q90")
    axes[1].set(ylabel="uplink kB / frame", yscale="symlog")
    axes[1].legend(fontsize=8)
    axes[2].plot(idx, [r["cache_hit_rate"] for r in rows], ".-", label="cache hit rate")
    axes[2].plot(idx, [r["residual_fraction"] for r in rows], ":", label="residual block fraction")
    axes[2].set(xlabel="frame", ylabel="fraction", ylim=(-0.02, 1.02))
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1))
