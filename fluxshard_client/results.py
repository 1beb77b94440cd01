"""What a stream returns per frame (:class:`FrameResult`) and what an endpoint returned for it
(:class:`EndpointRun`), with the adapter to supervision's ``Detections`` and track ids from its
ByteTrack (:class:`DetectionTracker`)."""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field

import numpy as np

from fluxshard.letterbox import Letterbox

from .dispatch import Decision
from .transport import DetectionRows


@dataclass
class EndpointRun:
    """What one endpoint returned for one frame."""

    detections: np.ndarray  # (N, 6) float32 x1, y1, x2, y2, score, class
    stats: dict
    input_image: np.ndarray  # the input it ran on: its new input cache
    key: bool  # ran as a key frame (a remote resync can turn a residual frame into one)
    uplink_bytes: int = 0
    transfer_s: float | None = None  # measured uplink transfer time (remote endpoints)
    masks: np.ndarray | None = None  # (N, H, W) bool, row i of detections[i]; None: detect model
    # what the endpoint's executor recomputed, when it says: (its block, the blocks its crops
    # recomputed on its padded input; fluxshard_client.stream.recomputed_blocks); None: what
    # its residual set marked
    recomputed: tuple | None = None


def class_name(k: int, names: dict[int, str] | None) -> str:
    """The model's name of class ``k`` (``class{k}`` when it has none)."""
    return (names or {}).get(int(k), f"class{int(k)}")


@dataclass
class FrameResult(DetectionRows):
    """The result of one frame, with what it cost and where it ran.

    Like an ultralytics ``Results``: ``names`` (the model's class names, {index: name}; None when
    the stream was not told them and its edge runs remotely), ``orig_shape`` (height, width of
    the frame as given), ``boxes`` in that frame's pixels, ``masks`` ((N, H, W) bool in the
    frame's pixels for a segmentation model, else None) and ``timestamp`` (seconds: the
    container's presentation time, or what the caller passed with a bare frame)."""

    index: int
    endpoint: str  # "edge" or "cloud"
    key: bool
    detections: np.ndarray  # (N, 6) float32 x1, y1, x2, y2, score, class
    latency_ms: float  # motion estimate + residual sets + dispatch + inference (+ uplink, RTT)
    endpoint_ms: float  # the endpoint call alone
    uplink_bytes: int  # payload bytes sent (0 when the edge ran it in-process)
    cache_hit_rate: float  # share of feature positions reused by the endpoint that ran
    computed_fraction: float
    residual_fraction: float  # active residual-block fraction of the endpoint that ran
    residual_mask: np.ndarray  # (ceil(H/b), ceil(W/b)) bool: blocks sent / recomputed
    field: np.ndarray | None  # accumulated field (quarter-pel) the endpoint applied; None: key
    decision: Decision
    bandwidth_mbps: float  # the uplink estimate after this frame
    stats: dict = dataclass_field(default_factory=dict)
    orig_shape: tuple[int, int] = (0, 0)
    names: dict[int, str] | None = None
    timestamp: float | None = None
    masks: np.ndarray | None = None
    motion: str = "given"  # the frame's field: "given" (the caller's / codec's), "estimated", "key"
    # source frame -> model input (``imgsz``): detections, masks and orig_shape are the source
    # frame's; residual_mask and field are on the input's grid (``letterbox.blocks_to_source``)
    letterbox: Letterbox | None = None

    @property
    def class_names(self) -> list[str]:
        """Each detection's class name."""
        return [class_name(k, self.names) for k in self.classes]

    def to_supervision(self, tracker_id: np.ndarray | None = None):
        """These detections as supervision's ``Detections`` (``xyxy``, ``confidence``,
        ``class_id``, ``mask``, ``data["class_name"]``; ``tracker_id`` when given)."""
        import supervision as sv

        rows = len(self.detections)
        return sv.Detections(
            xyxy=self.boxes.astype(np.float32).reshape(rows, 4),
            confidence=self.scores.astype(np.float32), class_id=self.classes,
            mask=None if self.masks is None else np.asarray(self.masks, bool),
            tracker_id=None if tracker_id is None else np.asarray(tracker_id, np.int64),
            data={"class_name": np.array(self.class_names, dtype=str).reshape(rows)})




class DetectionTracker:
    """Track ids for a stream's results: supervision's ByteTrack over each frame's detections.

    ``track_ids(result)`` gives one id per row of ``result.detections`` (-1: not tracked, e.g. a
    low-score box that starts no track). ``frame_rate``: the stream's, which scales how many
    frames a lost track is kept."""

    def __init__(self, frame_rate: float = 30.0):
        import supervision as sv

        self.tracker = sv.ByteTrack(frame_rate=max(1, int(round(frame_rate))))

    def track_ids(self, result: FrameResult) -> np.ndarray:
        detections = result.to_supervision()
        rows = len(detections)
        detections.data["row"] = np.arange(rows)  # the tracker returns a subset, reordered
        tracked = self.tracker.update_with_detections(detections)
        ids = np.full(rows, -1, np.int64)
        if len(tracked):
            ids[tracked.data["row"]] = tracked.tracker_id
        return ids


__all__ = ["EndpointRun", "FrameResult", "DetectionTracker", "class_name"]
