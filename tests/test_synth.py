"""fluxshard.synth: deterministic scenes, exact motion, real H.264/HEVC clips with ground truth."""

from __future__ import annotations

import av
import numpy as np
import pytest

from fluxshard import synth
from fluxshard.cli import main as cli_main

SMALL = dict(width=160, height=96, frames=12, gop=12)


def test_render_is_deterministic_per_seed():
    a = synth.Scene(synth.SceneSpec(seed=3, **SMALL)).render(5)
    b = synth.Scene(synth.SceneSpec(seed=3, **SMALL)).render(5)
    c = synth.Scene(synth.SceneSpec(seed=4, **SMALL)).render(5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.flow, b.flow)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.object_ids, b.object_ids)
    assert not np.array_equal(a.image, c.image)


def test_frame_fields_are_consistent():
    spec = synth.SceneSpec(width=320, height=192, num_objects=6, camera="pan+zoom", seed=5)
    frame = synth.Scene(spec).render(7)
    n = len(frame.classes)
    assert frame.image.shape == (192, 320, 3) and frame.image.dtype == np.uint8
    assert frame.image.flags.c_contiguous
    assert frame.flow.shape == (192, 320, 2) and frame.flow.dtype == np.float32
    assert frame.boxes.shape == (n, 4) and frame.instance_masks.shape == (n, 192, 320)
    assert n > 0 and set(frame.classes.tolist()) <= set(range(len(synth.CLASS_NAMES)))
    for box, mask in zip(frame.boxes, frame.instance_masks):
        ys, xs = np.nonzero(mask)
        assert (box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).all()
    # Instance masks are the visible parts: disjoint.
    assert frame.instance_masks.sum(0).max() <= 1


def test_objects_occlude_each_other():
    """Some frame shows an object with part of its shape hidden by another."""
    spec = synth.SceneSpec(width=320, height=192, num_objects=8, frames=40, seed=0)
    scene = synth.Scene(spec)
    hidden = 0
    for t in range(spec.frames):
        frame = scene.render(t)
        for oid, mask in zip(frame.object_ids, frame.instance_masks):
            hidden = max(hidden, scene.sprites[oid].mask.sum() - mask.sum())
    assert hidden > 50


def test_flow_warps_previous_frame_onto_current():
    """Integer pan: frame t-1 sampled at x + flow equals frame t wherever the source shows the
    same surface (exact motion, not an estimate)."""
    spec = synth.SceneSpec(width=320, height=192, camera="pan", pan_angle=0, pan_speed=3, seed=1)
    scene = synth.Scene(spec)
    prev, cur = scene.render(4), scene.render(5)
    h, w = cur.labels.shape
    ys, xs = np.mgrid[0:h, 0:w]
    sx = xs + np.rint(cur.flow[..., 0]).astype(int)
    sy = ys + np.rint(cur.flow[..., 1]).astype(int)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    same = np.zeros_like(inside)
    same[inside] = prev.labels[sy[inside], sx[inside]] == cur.labels[inside]
    assert same.mean() > 0.94  # seeds 0-4: worst 0.977, minus 0.03 (rounded down)
    warped = prev.image[sy[same], sx[same]]
    assert np.array_equal(warped, cur.image[same])


def test_class_shapes_are_distinct():
    """Each class has its own silhouette (fill ratio of its box differs)."""
    scene = synth.Scene(synth.SceneSpec(num_objects=24, seed=2))
    fill = {}
    for s in scene.sprites:
        fill.setdefault(s.cls, []).append(s.mask.mean())
    assert len(fill) == len(synth.CLASS_NAMES)
    means = sorted(np.mean(v) for v in fill.values())
    assert min(np.diff(means)) > 0.07  # seeds 0-4: worst 0.109, minus 0.03 (rounded down)


@pytest.mark.parametrize("kwargs, problem", [
    (dict(width=161), "odd"), (dict(height=95), "odd"), (dict(camera="orbit"), "camera"),
    (dict(width=16), "smaller"), (dict(frames=0), "frames"),
])
def test_bad_spec_is_a_clear_error(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        synth.SceneSpec(**kwargs)


def test_make_clip_writes_video_and_ground_truth(tmp_path):
    spec = synth.SceneSpec(width=160, height=96, frames=20, gop=8, seed=1)
    paths = synth.make_clip(spec, tmp_path)
    with av.open(str(paths.video)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.codec_context.name == "h264"
    assert len(frames) == 20 and (frames[0].width, frames[0].height) == (160, 96)
    keys = [i for i, f in enumerate(frames) if f.key_frame]
    assert keys == [0, 8, 16]
    truth = synth.load_ground_truth(paths.ground_truth)
    assert truth.spec == spec and len(truth) == 20
    assert truth.block_flow.shape == (20, 24, 40, 2)
    scene = synth.Scene(spec)
    frame = scene.render(13)
    assert np.array_equal(truth.boxes[13], frame.boxes)
    assert np.array_equal(truth.object_ids[13], frame.object_ids)
    mean, _ = synth.block_motion(frame.flow)
    assert np.allclose(truth.block_flow[13], mean)
    # Background blocks exist and have the camera's motion.
    assert truth.background_blocks[13].mean() > 0.78  # seeds 0-4: worst 0.813, minus 0.03


@pytest.mark.parametrize("kwargs", [{}, {"bframes": 2}, {"codec": "libx265"}])
def test_clips_are_reproducible(tmp_path, kwargs):
    spec = synth.SceneSpec(width=160, height=96, frames=10, seed=6)
    a = synth.make_clip(spec, tmp_path / "a", **kwargs)
    b = synth.make_clip(spec, tmp_path / "b", **kwargs)
    assert a.video.read_bytes() == b.video.read_bytes()


def test_load_ground_truth_rejects_other_files(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(ValueError, match="ground-truth"):
        synth.load_ground_truth(bad)


def test_synth_verb(tmp_path, capsys):
    rc = cli_main(["synth", str(tmp_path), "--width", "96", "--height", "64", "--frames", "4",
                   "--camera", "zoom"])
    assert rc == 0
    assert len(list(tmp_path.glob("*.mp4"))) == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    assert cli_main(["synth", str(tmp_path), "--width", "97"]) == 2
    assert "even" in capsys.readouterr().err
