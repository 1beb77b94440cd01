"""The served tile executor on the TensorRT maps engine against onnxruntime (scripts/gpu_check.sh,
section 5): camera streams' wire payloads, made where PyAV and the footage are, are sent to a real
tritonserver serving ``fluxshard`` with ``executor=tiles`` on ``tiles_engine`` (the GPU config),
every stream's frame k at once so the sequence batcher can batch them, and each answer is
compared with the same frames on onnxruntime in process.

    python3 scripts/check_served_tiles_trt.py payloads --out .cache/served_trt/payloads.npz
    python3 scripts/check_served_tiles_trt.py check --payloads .cache/served_trt/payloads.npz \\
        --kind tensorrt --engine maps.engine --config-name gpu

``--kind torch`` (CPU config, no ``--config-name``) runs the same check on a machine without a GPU.
Exit status: 0 every answer matched, 1 a mismatch or a refusal.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIPS = ("bikes", "carphone_pristine", "bigbuckbunny")


def write_payloads(out: Path, streams: int, frames: int, size: tuple[int, int]) -> None:
    import tempfile

    from fluxshard import footage
    from perf.capacity_kit import clip_payloads

    arrays = {}
    with tempfile.TemporaryDirectory(prefix="fluxshard-served-trt-") as tmp:
        for s, name in enumerate(CLIPS[:streams]):
            clip = clip_payloads(footage.camera_stream(name, tmp, size=size, frames=frames))
            for k, payload in enumerate(clip.payloads):
                arrays[f"s{s}_f{k}"] = np.frombuffer(payload, np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"wrote {out}: {streams} streams x {frames} frames")


def read_payloads(path: Path) -> list[list[bytes]]:
    data = np.load(path)
    streams = sorted({int(k.split("_")[0][1:]) for k in data.files})
    return [[data[f"s{s}_f{k}"].tobytes()
             for k in range(sum(1 for n in data.files if n.startswith(f"s{s}_")))]
            for s in streams]


def reference_answers(payloads: list[list[bytes]], kind: str = "onnxruntime"):
    """Every frame's answer on ``kind`` in process, the streams computed together."""
    from fluxshard.predict import PredictOptions
    from fluxshard.serving.session import SessionManager, StreamFrame
    from fluxshard.sessions import yolo_session_factory

    manager = SessionManager(yolo_session_factory(
        "tiles", predict=PredictOptions.from_parameters({}), tile_engine=kind))
    rounds = []
    for k in range(len(payloads[0])):
        rounds.append(manager.handle_many([StreamFrame(s + 1, k == 0, False, p[k])
                                           for s, p in enumerate(payloads)]))
    return rounds


def served_answers(payloads, kind: str, engine: Path | None, config_name: str | None,
                   log_file: Path):
    from fluxshard.serving.tritonserver import TritonServer
    from fluxshard.wire import response_from_tensors
    from fluxshard_client import FluxShardClient

    params = {"executor": "tiles", "tiles_engine": kind}
    if engine is not None:
        params["tiles_engine_path"] = str(engine.resolve())
    rounds = []
    with TritonServer(parameters=params, models=["fluxshard"], model_config_name=config_name,
                      log_file=log_file) as server:
        clients = [FluxShardClient(server.grpc_url) for _ in payloads]

        def send(s: int, k: int):
            out = clients[s].infer(payloads[s][k], 100 + s, start=k == 0, end=False)
            return response_from_tensors(out["DETECTIONS"], out["STATS"], out["DIGEST"])

        with ThreadPoolExecutor(len(payloads)) as pool:
            for k in range(len(payloads[0])):
                rounds.append(list(pool.map(lambda s: send(s, k), range(len(payloads)))))
        for c in clients:
            c.close()
    return rounds


def compare(reference, served, kind: str, atol: float, reference_kind: str) -> int:
    failures, batched = 0, 0
    for k, (expected_round, got_round) in enumerate(zip(reference, served)):
        for s, (a, b) in enumerate(zip(expected_round, got_round)):
            where = f"frame {k} of stream {s}"
            if isinstance(a, Exception):
                print(f"{where}: the {reference_kind} reference failed: {a}")
                failures += 1
                continue
            batched = max(batched, int(b.stats.get("batched_streams", 1)))
            problems = []
            if a.digest != b.digest:
                problems.append("input digest differs")
            if b.stats.get("executor") != "tiles":
                problems.append(f"executor {b.stats.get('executor')}")
            if a.detections.shape != b.detections.shape:
                problems.append(f"{len(b.detections)} detections, {reference_kind} "
                                f"{len(a.detections)}")
            elif len(a.detections):
                diff = float(np.abs(a.detections - b.detections).max())
                if diff > atol:
                    problems.append(f"max difference {diff:.4f} > {atol}")
            print(f"{where}: {len(b.detections)} detections, crops {b.stats.get('crops')}, "
                  f"batched {b.stats.get('batched_streams', 1)}: "
                  f"{'; '.join(problems) or 'matches ' + reference_kind}")
            failures += bool(problems)
    print(f"served {kind}: {failures} mismatching frames; largest batch of streams: {batched}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("payloads", help="write the streams' wire payloads (needs PyAV)")
    pp.add_argument("--out", type=Path, default=Path(".cache/served_trt/payloads.npz"))
    pp.add_argument("--streams", type=int, default=3)
    pp.add_argument("--frames", type=int, default=4)
    pp.add_argument("--size", default="640x384", help="WxH (the engine's padded frame)")
    cp = sub.add_parser("check", help="serve them on --kind and compare with onnxruntime")
    cp.add_argument("--payloads", type=Path, default=Path(".cache/served_trt/payloads.npz"))
    cp.add_argument("--kind", default="tensorrt", choices=("tensorrt", "torch", "onnxruntime"))
    cp.add_argument("--reference", default="onnxruntime", choices=("onnxruntime", "torch"),
                    help="the in-process engine answers are compared with")
    cp.add_argument("--engine", type=Path, default=None, help="the TensorRT engine file")
    cp.add_argument("--config-name", default=None, help="e.g. gpu: configs/gpu.pbtxt")
    cp.add_argument("--atol", type=float, default=0.5,
                    help="largest box (px) or score difference accepted (TF32 kernels)")
    cp.add_argument("--log", type=Path, default=Path("/tmp/fluxshard_served_trt.log"))
    args = ap.parse_args(argv)
    if args.command == "payloads":
        w, h = (int(v) for v in args.size.lower().split("x"))
        write_payloads(args.out, args.streams, args.frames, (w, h))
        return 0
    payloads = read_payloads(args.payloads)
    reference = reference_answers(payloads, args.reference)
    try:
        served = served_answers(payloads, args.kind, args.engine, args.config_name, args.log)
    except Exception as e:  # refused at load (the one-line reason is in the log), or no server
        print(f"the served model did not answer: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 1 if compare(reference, served, args.kind, args.atol, args.reference) else 0


if __name__ == "__main__":
    sys.exit(main())
