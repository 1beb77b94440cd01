"""Track ids: supervision's ByteTrack over a stream's results (fluxshard_client.DetectionTracker)
and `fluxshard run --track`, which writes them to detections.jsonl and the video's labels."""

from __future__ import annotations

import json

import numpy as np

from fluxshard_client import DetectionTracker, FrameResult


def _result(index: int, rows: list[tuple]) -> FrameResult:
    detections = np.array(rows, np.float32).reshape(-1, 6)
    return FrameResult(index=index, endpoint="edge", key=index == 0, detections=detections,
                       latency_ms=0.0, endpoint_ms=0.0, uplink_bytes=0, cache_hit_rate=0.0,
                       computed_fraction=1.0, residual_fraction=1.0,
                       residual_mask=np.ones((1, 1), bool), field=None, decision=None,
                       bandwidth_mbps=0.0, orig_shape=(240, 320), names={0: "car", 1: "person"})


def test_an_object_moving_across_frames_keeps_its_id_beside_a_still_one():
    """A car drives 6 px a frame across 30 frames past a standing person; a second person
    appears at frame 10. Each keeps one id, the three differ, whatever order the rows come in.
    ByteTrack confirms a track that starts after the first frame at its second sighting: the
    late one has no id in its first frame."""
    tracker = DetectionTracker(frame_rate=25)
    ids = {"car": [], "person": [], "late": []}
    for t in range(30):
        rows = [(10 + 6 * t, 50, 50 + 6 * t, 80, 0.9, 0), (250, 100, 280, 180, 0.85, 1)]
        if t >= 10:
            rows.append((100, 150, 130, 230, 0.8, 1))
        if t % 2:
            rows.reverse()  # the tracker's answer is mapped back to each row, not by position
        result = _result(t, rows)
        track = tracker.track_ids(result)
        assert track.shape == (len(rows),)
        for row, track_id in zip(rows, track):
            name = "car" if row[5] == 0 else ("person" if row[0] == 250 else "late")
            ids[name].append(int(track_id))
    assert ids["late"][0] == -1
    ids["late"] = ids["late"][1:]
    for name, seen in ids.items():
        assert len(set(seen)) == 1 and seen[0] >= 0, (name, seen)
    assert len({seen[0] for seen in ids.values()}) == 3


def test_frames_without_detections_give_no_ids():
    tracker = DetectionTracker()
    assert tracker.track_ids(_result(0, [])).shape == (0,)
    box = [(0, 0, 20, 20, 0.9, 0)]
    assert tracker.track_ids(_result(1, box)).tolist() == [-1]  # the tracker's frame 2: unconfirmed
    assert tracker.track_ids(_result(2, box)).tolist() == [1]
    assert tracker.track_ids(_result(3, [])).shape == (0,)


def _iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_run_track_writes_ids_that_follow_the_synthetic_objects(tmp_path, capsys):
    """`fluxshard run --demo --track` on the synthetic scene (objects moving before a still
    camera): every box has an id (or null), and a box that overlaps one of the same class in the
    frame before (IoU >= 0.5: the same object moved a little) carries its id."""
    from fluxshard.cli import main

    out = tmp_path / "run"
    assert main(["run", "--demo", "--dispatch", "edge", "--track", "--frames", "16", "--size",
                 "320", "192", "--imgsz", "native", "--no-progress", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert len(records) == 16
    assert json.loads((out / "summary.json").read_text())["track"] is True
    assert (out / "annotated.mp4").stat().st_size > 0
    same = linked = 0
    for before, now in zip(records, records[1:]):
        assert len(now["track_ids"]) == len(now["boxes"])
        for box, cls, track in zip(now["boxes"], now["classes"], now["track_ids"]):
            overlaps = [(_iou(box, b), t) for b, c, t in
                        zip(before["boxes"], before["classes"], before["track_ids"])
                        if c == cls and t is not None]
            best = max(overlaps, default=(0.0, None))
            if best[0] >= 0.5 and track is not None:
                linked += 1
                same += track == best[1]
    assert linked >= 20, linked
    assert same / linked >= 0.95, (same, linked)
