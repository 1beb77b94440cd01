"""Sequence load test of the `fluxshard` Triton model with perf_analyzer.

Builds real request payloads (every frame sent to the cloud as the SDK sends it: a key frame,
then residual frames with the accumulated field and the residual blocks at ``--tau``,
fluxshard.tau) from a synthetic H.264 clip, or from a corpus clip (``--clip bikes``: real camera
footage, fluxshard.footage), writes them as perf_analyzer input data (one stream per sequence),
starts tritonserver, and sweeps the number of concurrent sequences. Prints one table and writes
its rows to out/perf/load_test.json. perf_analyzer runs as docs/deploy.md writes it
(:func:`perf_analyzer_commands`); ``--models yolo11_dense fluxshard`` adds the stateless dense
model fed the same clip's frames.

    bash scripts/install_perf_tools.sh            # once: perf_analyzer + its libraries
    python perf/load_test.py --concurrency 1 2 4
    python perf/load_test.py --clip bikes --width 640 --height 384 --frames 32 \\
        --sequence-length 16 --models yolo11_dense fluxshard --concurrency 1 2

``--write-input-data DIR`` only writes the input data and prints the raw perf_analyzer commands
(docs/deploy.md): ``DIR/fluxshard.json`` (the payload sequences) and ``DIR/yolo11_dense.json``
(the same clip's frames, RGB, for the stateless dense model).

Skips (exit 0, with a message) when perf_analyzer is not installed.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fluxshard.tau import tau_argument  # noqa: E402 (the repository first on the path)

PERF_TOOLS = REPO / ".cache" / "perf_tools"
PERF_ANALYZER = PERF_TOOLS / "tritonclient" / "bin" / "perf_analyzer"
CUDART_DIR = PERF_TOOLS / "cuda" / "nvidia" / "cuda_runtime" / "lib"


def find_perf_analyzer() -> tuple[str, dict] | None:
    env = dict(os.environ)
    if PERF_ANALYZER.is_file():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(CUDART_DIR),
                                                               env.get("LD_LIBRARY_PATH")]))
        binary = str(PERF_ANALYZER)
    else:
        binary = shutil.which("perf_analyzer")
        if binary is None:
            return None
    probe = subprocess.run([binary, "--version"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"perf_analyzer at {binary} does not run: {probe.stderr.strip()[:300]}",
              file=sys.stderr)
        return None
    return binary, env


def load_clip(frames: int, seq_len: int, width: int, height: int, workdir: Path,
              clip: str | None = None, footage_dir: Path | None = None) -> Path:
    """The H.264 clip the payloads come from: corpus clip ``clip`` re-encoded at the size (a key
    frame every ``seq_len`` frames), or a synthetic scene."""
    if clip:
        from fluxshard.footage import camera_stream

        return camera_stream(clip, footage_dir or workdir, size=(width, height), frames=frames,
                             gop=seq_len)
    from fluxshard.synth import SceneSpec, make_clip

    return make_clip(SceneSpec(width=width, height=height, frames=frames, gop=seq_len, seed=3),
                     workdir, name="load").video


def sequence_payloads(frames: int, seq_len: int, tau: float, block: int, width: int, height: int,
                      workdir: Path, clip: str | None = None, footage_dir: Path | None = None,
                      keep_frames: list | None = None) -> list[list[bytes]]:
    """Payload sequences, exactly as the edge client would send them (see :func:`load_clip`);
    the decoded RGB frames are appended to ``keep_frames`` when given."""
    from perf.capacity_kit import clip_payloads

    video = load_clip(frames, seq_len, width, height, workdir, clip, footage_dir)
    # a synthetic clip is single-reference P-only (its vectors are exact); footage is validated
    # as `fluxshard run` does
    payloads = clip_payloads(video, tau, block, frames=frames, keyframe_every=seq_len,
                             validate=clip is not None).payloads
    if keep_frames is not None:
        from fluxshard.motion.decode import iter_motion

        keep_frames.extend(np.ascontiguousarray(mf.image)
                           for mf in iter_motion(str(video), validate=False, max_frames=frames))
    return [payloads[k:k + seq_len] for k in range(0, len(payloads) - seq_len + 1, seq_len)]


def input_data_json(sequences: list[list[bytes]]) -> dict:
    """perf_analyzer --input-data: one stream per sequence, one step per frame."""
    return {"data": [[{"PAYLOAD": {"b64": base64.b64encode(p).decode(), "shape": [len(p)]}}
                      for p in seq] for seq in sequences]}


def dense_input_data_json(frames: list[np.ndarray]) -> dict:
    """perf_analyzer --input-data for the stateless ``yolo11_dense``: one request per frame."""
    return {"data": [{"FRAME": {"b64": base64.b64encode(f.tobytes()).decode(),
                                "shape": list(f.shape)}} for f in frames]}


def write_input_data(folder: Path, sequences: list[list[bytes]],
                     frames: list[np.ndarray]) -> dict[str, Path]:
    """``fluxshard.json`` and ``yolo11_dense.json`` in ``folder``: model name -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {"fluxshard": folder / "fluxshard.json", "yolo11_dense": folder / "yolo11_dense.json"}
    written["fluxshard"].write_text(json.dumps(input_data_json(sequences)))
    written["yolo11_dense"].write_text(json.dumps(dense_input_data_json(frames)))
    return written


def perf_analyzer_commands(url: str, files: dict[str, Path], seq_len: int,
                           concurrency: int = 1, requests_per_window: int = 20,
                           root_certificates: Path | None = None) -> dict[str, list[str]]:
    """The raw perf_analyzer command lines for both models (docs/deploy.md explains each flag);
    ``root_certificates``: gRPC over TLS, trusting that CA."""
    common = ["-u", url, "-i", "grpc", "--concurrency-range", f"{concurrency}:{concurrency}",
              "--measurement-mode", "count_windows",
              "--measurement-request-count", str(requests_per_window)]
    if root_certificates is not None:
        # a bare flag: perf_analyzer 2.44 refuses a value, whatever its help says
        common += ["--ssl-grpc-use-ssl",
                   f"--ssl-grpc-root-certifications-file={root_certificates}"]
    return {
        "yolo11_dense": ["perf_analyzer", "-m", "yolo11_dense", "--input-data",
                         str(files["yolo11_dense"]), *common],
        "fluxshard": ["perf_analyzer", "-m", "fluxshard", "--input-data", str(files["fluxshard"]),
                      # each stream is one sequence: exactly its length, or perf_analyzer
                      # would wrap to its key frame mid-sequence or end it early
                      "--sequence-length", str(seq_len), "--sequence-length-variation", "0",
                      "--sequence-id-range", "1:100000", *common],
    }


def run_sweep(binary: str, env: dict, url: str, files: dict[str, Path], models: list[str],
              concurrency: list[int], requests_per_window: int, seq_len: int,
              stability_percentage: float = 25.0) -> list[dict]:
    """perf_analyzer as :func:`perf_analyzer_commands` writes it, per model and concurrency;
    one CSV row each, with ``model`` and ``concurrency`` added."""
    rows = []
    for model in models:
        for c in concurrency:
            command = perf_analyzer_commands(url, files, seq_len, c, requests_per_window)[model]
            csv_path = files[model].with_name(f"pa_{model}_c{c}.csv")
            cmd = [binary, *command[1:], "--max-trials", "6",
                   "--stability-percentage", str(stability_percentage), "-f", str(csv_path)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not csv_path.is_file():
                raise RuntimeError(f"perf_analyzer failed for {model} at concurrency {c}:\n"
                                   f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            row = next(csv.DictReader(io.StringIO(csv_path.read_text())))
            rows.append({"model": model, "concurrency": c, **row})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4],
                    help="concurrent sequences (streams) to sweep")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=192)
    ap.add_argument("--frames", type=int, default=48, help="frames in the synthetic clip")
    ap.add_argument("--sequence-length", type=int, default=16, help="frames per sequence")
    ap.add_argument("--tau", type=tau_argument, default=12 / 255,
                    help="tau on the [0, 1] input scale (fluxshard.tau): residual blocks and the "
                         "server's truncation (default: 12/255)")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--requests-per-window", type=int, default=40)
    ap.add_argument("--url", default=None, help="an already running server (gRPC host:port)")
    ap.add_argument("--clip", default=None,
                    help="a corpus clip (fluxshard.footage, e.g. bikes) instead of the synthetic "
                         "scene, re-encoded at --width x --height")
    ap.add_argument("--footage-dir", type=Path, default=REPO / "out" / "footage",
                    help="cache of the re-encoded corpus clips (default out/footage)")
    ap.add_argument("--models", nargs="+", choices=("fluxshard", "yolo11_dense"),
                    default=["fluxshard"], help="the models to load (default: fluxshard)")
    ap.add_argument("--executor", default=None,
                    help="the fluxshard model's executor parameter (default: its config's)")
    ap.add_argument("--stability-percentage", type=float, default=25.0,
                    help="perf_analyzer's -s (max/min of three windows; raise it on a busy "
                         "machine)")
    ap.add_argument("--json", type=Path, default=REPO / "out" / "perf" / "load_test.json",
                    help="where the rows go (default out/perf/load_test.json)")
    ap.add_argument("--write-input-data", type=Path, default=None, metavar="DIR",
                    help="only write DIR/fluxshard.json and DIR/yolo11_dense.json and print the "
                         "perf_analyzer commands; starts no server")
    args = ap.parse_args(argv)

    if args.write_input_data is not None:
        with tempfile.TemporaryDirectory(prefix="fluxshard-load-") as tmp:
            frames: list[np.ndarray] = []
            seqs = sequence_payloads(args.frames, args.sequence_length, args.tau, args.block,
                                     args.width, args.height, Path(tmp), args.clip,
                                     args.footage_dir, keep_frames=frames)
        files = write_input_data(args.write_input_data, seqs, frames)
        print(f"{len(seqs)} sequences x {args.sequence_length} frames, {len(frames)} frames at "
              f"{args.width}x{args.height}: {', '.join(map(str, files.values()))}")
        for cmd in perf_analyzer_commands(args.url or "127.0.0.1:8001", files,
                                          args.sequence_length).values():
            print(" ".join(cmd))
        return 0

    found = find_perf_analyzer()
    if found is None:
        print("SKIP: perf_analyzer is not installed (run scripts/install_perf_tools.sh)")
        return 0
    binary, env = found
    from fluxshard.serving.tritonserver import TritonServer

    with tempfile.TemporaryDirectory(prefix="fluxshard-load-") as tmp:
        tmp = Path(tmp)
        frames: list[np.ndarray] = []
        seqs = sequence_payloads(args.frames, args.sequence_length, args.tau, args.block,
                                 args.width, args.height, tmp, args.clip, args.footage_dir,
                                 keep_frames=frames)
        files = write_input_data(tmp, seqs, frames)
        key_bytes = [s[0] for s in seqs]
        res_bytes = [p for s in seqs for p in s[1:]]
        print(f"{len(seqs)} sequences x {args.sequence_length} frames at {args.width}x{args.height}"
              f" ({args.clip or 'synthetic'}), tau {args.tau}: key frame "
              f"{np.mean([len(p) for p in key_bytes]) / 1e3:.1f} kB, residual frame "
              f"{np.mean([len(p) for p in res_bytes]) / 1e3:.1f} kB mean "
              f"(raw frame {args.width * args.height * 3 / 1e3:.1f} kB)")
        server = None
        url = args.url
        if url is None:
            parameters = {"executor": args.executor} if args.executor else None
            server = TritonServer(models=args.models, parameters=parameters).start()
            url = server.grpc_url
        try:
            rows = run_sweep(binary, env, url, files, args.models, args.concurrency,
                             args.requests_per_window, args.sequence_length,
                             args.stability_percentage)
        finally:
            if server is not None:
                server.stop()

    header = ["model", "concurrency", "infer/s", "p50 ms", "p90 ms", "p99 ms", "queue ms",
              "compute ms"]
    print("\n" + " | ".join(f"{h:>12}" for h in header))
    print("-+-".join("-" * 12 for _ in header))
    table = []
    for row in rows:
        us = lambda k: float(row.get(k, "nan")) / 1e3  # noqa: E731 - microseconds -> ms
        compute = us("Server Compute Input") + us("Server Compute Infer") + us("Server Compute Output")
        vals = [row["model"], row["concurrency"], float(row["Inferences/Second"]),
                us("p50 latency"), us("p90 latency"), us("p99 latency"), us("Server Queue"),
                compute]
        table.append(dict(zip(header, vals)))
        print(" | ".join(f"{v:>12.1f}" if isinstance(v, float) else f"{v:>12}" for v in vals))
    for model in args.models:
        mine = [r for r in table if r["model"] == model]
        base = mine[0]["infer/s"]
        print(f"{model}: throughput relative to concurrency {mine[0]['concurrency']}: "
              + ", ".join(f"{r['concurrency']}: {r['infer/s'] / base:.2f}x" for r in mine))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"clip": args.clip or "synthetic",
                                     "size": [args.width, args.height],
                                     "executor": args.executor, "rows": table}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
