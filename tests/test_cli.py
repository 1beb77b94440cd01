"""The `fluxshard` console script as a user meets it: help with defaults and whole descriptions,
--version, bad input refused while the command line is read (exit 2, nothing written, nothing heavy
imported), and a cloud that cannot be reached (exit 1, or the edge with --fallback edge)."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from importlib.metadata import version

import pytest

from fluxshard import cli, cli_common

# a hang guard for the subprocesses, not a timing assertion
TIMEOUT_S = 300


def fluxshard(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxshard.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def verb_parsers():
    """(name, parser) of every verb and sub-verb (`profile latency`, ...)."""
    found = []
    for verb in cli.VERBS:
        parser = cli.build_parser([verb]).verbs[verb]
        found.append((verb, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [(f"{verb} {name}", sub) for name, sub in action.choices.items()]
    return found


VERB_PARSERS = verb_parsers()


@pytest.mark.parametrize("name,parser", VERB_PARSERS, ids=[n for n, _ in VERB_PARSERS])
def test_every_option_has_help_and_shows_its_default(name, parser):
    assert parser.description and parser.description.rstrip().endswith("."), parser.description
    formatter = parser._get_formatter()
    assert isinstance(formatter, cli_common.HelpFormatter)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{name} {action.dest}: no help text"
        if cli_common.show_default(action) is not None:
            assert "default" in formatter._get_help_string(action), f"{name} {action.dest}"


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_help_prints_the_whole_description(verb, tmp_path):
    done = fluxshard(verb, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    parser = cli.build_parser([verb]).verbs[verb]
    last_line = parser.description.strip().splitlines()[-1]
    assert last_line in done.stdout  # printed as written, not cut or re-wrapped
    if any(cli_common.show_default(a) is not None for a in parser._actions):
        assert "(default: " in done.stdout


def test_version(tmp_path):
    done = fluxshard("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"fluxshard {version('fluxshard')}"


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    empty = tmp_path / "empty.mp4"
    empty.touch()
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    return {"text renamed .mp4": ([text], "is not a video"),
            "empty file": ([empty], "is empty"),
            "folder": ([folder], "is a folder"),
            "missing file": ([tmp_path / "missing.mp4"], "no such file"),
            "--frames 0": (["--demo", "--frames", "0"], "--frames"),
            "--uplink-quality 60": (["--demo", "--uplink-quality", "60"], "--uplink-quality")}


BAD = ["text renamed .mp4", "empty file", "folder", "missing file", "--frames 0",
       "--uplink-quality 60"]


@pytest.mark.parametrize("case", BAD)
def test_run_refuses_bad_input_with_exit_2_and_writes_nothing(case, tmp_path):
    args, why = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "run"
    done = fluxshard("run", *args, "--out", out, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and why in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", BAD[:3])
def test_motion_refuses_bad_clips_with_exit_2(case, tmp_path):
    args, why = _bad_inputs(tmp_path)[case]
    done = fluxshard("motion", *args, "--out", tmp_path / "plots", cwd=tmp_path)
    assert done.returncode == 2 and why in done.stderr, done.stderr
    assert not (tmp_path / "plots").exists()


def test_bad_input_is_refused_before_torch_or_a_server_is_imported(tmp_path):
    """What keeps a refusal quick: argument types run before a verb imports its heavy parts."""
    (tmp_path / "notes.mp4").write_text("not a video")
    probe = ("import sys\nfrom fluxshard.cli import main\n"
             "for argv in (['run', 'notes.mp4'], ['run', '--demo', '--frames', '0'],\n"
             "             ['motion', 'notes.mp4'], ['export', '--size', '0', '384'],\n"
             "             ['synth', '--frames', '0']):\n"
             "    assert main(argv) == 2, argv\n"
             "heavy = sorted(m for m in ('torch', 'onnx', 'tritonclient') if m in sys.modules)\n"
             "print('heavy:', heavy)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout, done.stdout


def test_a_runtime_failure_is_one_line_exit_1_and_leaves_no_files(synth_clips, tmp_path):
    clip, _ = synth_clips("pan")
    table = tmp_path / "table.json"
    table.write_text("not json")
    out = tmp_path / "out"
    done = fluxshard("run", "--imgsz", "native",
                     clip.video, "--tau-table", table, "--dispatch", "edge", "--out", out,
                     "--no-progress", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "table.json" in done.stderr, done.stderr
    assert not out.exists()


def test_synth_no_progress(tmp_path):
    done = fluxshard("synth", tmp_path / "clip", "--width", 64, "--height", 48, "--frames", 3,
                     "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar
    assert len(list((tmp_path / "clip").glob("*.mp4"))) == 1


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dispatch_cloud_with_an_unreachable_cloud_exits_1(synth_clips, tmp_path):
    clip, _ = synth_clips("pan")
    out = tmp_path / "out"
    done = fluxshard("run", "--imgsz", "native", clip.video, "--dispatch", "cloud", "--cloud-url",
                     f"127.0.0.1:{_unused_port()}", "--frames", 3, "--out", out, "--no-progress",
                     cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot reach the cloud" in done.stderr and "--fallback edge" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_dispatch_cloud_with_fallback_edge_runs_on_the_edge_and_says_so(synth_clips, tmp_path):
    clip, _ = synth_clips("pan")
    out = tmp_path / "out"
    url = f"127.0.0.1:{_unused_port()}"
    done = fluxshard("run", "--imgsz", "native",
                     clip.video, "--dispatch", "cloud", "--fallback", "edge",
                     "--cloud-url", url, "--frames", 3, "--out", out, "--no-progress",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cloud {url} unreachable" in done.stderr  # on the console as it happens
    assert "3 of 3 frames ran on the edge instead (--fallback edge)" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edge_fallback_frames"] == 3 and summary["fallback"] == "edge"
    assert summary["endpoints"]["cloud"]["frames"] == 0
    assert len(summary["cloud_events"]) == 1


def test_train_demo_help_states_the_training_defaults():
    """train-demo's options default to None (TrainConfig decides); their help states the value."""
    from fluxshard.train.trainer import TrainConfig

    parser = cli.build_parser(["train-demo"]).verbs["train-demo"]
    helps = {a.dest: a.help for a in parser._actions}
    c = TrainConfig()
    for dest, value in (("epochs", c.epochs), ("batch", c.batch), ("train_scenes", c.train_scenes),
                        ("frames_per_scene", c.frames_per_scene), ("val_scenes", c.val_scenes),
                        ("lr", c.lr), ("optimizer", c.optimizer),
                        ("crop", " ".join(map(str, c.crop)))):
        assert f"(default: {value}" in helps[dest], (dest, helps[dest])
