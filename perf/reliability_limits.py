"""Hostile-client rows of perf/reliability.py (issue 14 items 1, 3, 5): an oversized frame, a
stranger with a guessed stream id, ENDs with bad payloads, a full instance, the memory one
session holds and gives back after END, and idle eviction (a stream silent past the timeout). One server with the shipped ``fluxshard`` config; a
healthy stream runs alongside every attack and every answer is checked against the true frame's
digest (perf/reliability_kit.py: StreamDriver). ``cases(args, log_dir)``; ``args.quick``
sends fewer ENDs and measures a 640x384 session instead of a 1920x1088 one.

    python3 perf/reliability.py [--quick]          # with the other cases
    python3 perf/reliability_limits.py [--quick]   # these rows alone
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fluxshard import wire  # noqa: E402
from fluxshard.serving.limits import max_streams_from_parameters  # noqa: E402
from fluxshard.digest_scene import Scene, residual_mask  # noqa: E402
from perf.reliability_kit import StreamDriver, case_row, group_rss_mb  # noqa: E402
from fluxshard.serving.tritonserver import TritonServer  # noqa: E402

UNKNOWN = "unknown stream"


def _row(*args, **kwargs) -> dict:
    """These attacks' rows: a stream is unaffected when it lost nothing (a resync forced by
    Triton freeing a slot is counted in the row's resyncs)."""
    return case_row(*args, unaffected=lambda r: r.frames_lost == 0, **kwargs)


def _refusal(call) -> str:
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as e:
        return e.message() or f"<empty {e.status()}>"
    return "ACCEPTED"


def _key(t=0, seed=1, size=None):
    scene = Scene(seed, *size) if size else Scene(seed)
    return wire.encode_key_frame(scene.frame(t), t)


def _residual(t, seed=1, size=None):
    scene = Scene(seed, *size) if size else Scene(seed)
    prev, frame = scene.frame(t - 1), scene.frame(t)
    zero = np.zeros(wire.field_shape(*frame.shape[:2]), np.float32)
    return wire.encode_residual_frame(frame, zero, residual_mask(prev, frame, zero), t)


def _healthy(url, stream_id, frames):
    """A stream sending frames on its own thread, once it has ``frames`` answers."""
    driver = StreamDriver(url, stream_id, seed=stream_id).start()
    _more(driver, frames)
    return driver


def _more(driver, frames, timeout_s=300.0):
    mark, deadline = driver.report.frames_answered + frames, time.monotonic() + timeout_s
    while driver.report.frames_answered < mark and time.monotonic() < deadline:
        time.sleep(0.05)


def oversized_frame(server, client, args) -> dict:
    pid = server.process.pid
    healthy = _healthy(server.grpc_url, 9101, args.frames)
    before = group_rss_mb(pid)
    huge = wire.encode_key_frame(np.zeros((2304, 4096, 3), np.uint8), 0)
    t0 = time.monotonic()
    refusal = _refusal(lambda: client.infer(huge, 9102, True, False, secret="a"))
    refused_s = time.monotonic() - t0
    _more(healthy, args.frames)
    report = healthy.stop()
    after = group_rss_mb(pid)
    refused = "larger than this server accepts" in refusal
    return _row("4096x2304 key frame (over max_frame_pixels)", server.is_running(), [report],
                before, after, refused and report.frames_lost == 0,
                f"refused in {refused_s * 1e3:.0f} ms, {len(huge) // 1024} kB payload: "
                f"{refusal[:60]}")


def stranger(server, client, args) -> dict:
    pid = server.process.pid
    owner = _healthy(server.grpc_url, 9201, args.frames)  # an explicit, guessable id
    before = group_rss_mb(pid)
    seed, t = 9201, args.frames
    tries = ((False, False, _residual(t, seed)), (False, False, _key(t, seed)),
             (True, False, _key(t, seed)), (False, True, _residual(t, seed)),
             (False, True, b"\0" * 8))
    answers = [_refusal(lambda s=s, e=e, p=p: client.infer(p, 9201, s, e, secret="guess"))
               for s, e, p in tries]
    _more(owner, args.frames)
    report = owner.stop()
    after = group_rss_mb(pid)
    same = all(UNKNOWN in a for a in answers[:4]) and len(set(answers[:4])) == 1
    return _row("stranger with a guessed stream id: read, re-open, reset, end", server.is_running(),
                [report], before, after, same and report.frames_lost == 0,
                f"{len(answers)} tries refused, one answer for all: {answers[0][:50]}; owner "
                f"resynced {report.resyncs}x (Triton freed its slot on the stranger's END)",
                touched=())


def bad_ends(server, client, args, max_streams: int) -> dict:
    pid = server.process.pid
    healthy = _healthy(server.grpc_url, 9301, args.frames)
    before = group_rss_mb(pid)
    n = 64 if args.quick else 255
    refused = 0
    for i in range(n):
        corrid = 9400 + i
        client.infer(_key(0), corrid, True, False, secret="s")
        refused += "bad payload" in _refusal(
            lambda c=corrid: client.infer(b"\0" * 8, c, False, True, secret="s"))
    # every session was freed: a full instance's worth of new streams still opens
    opened = 0
    for i in range(max_streams - 1):
        client.infer(_key(0), 9800 + i, True, False, secret="s")
        opened += 1
    full = _refusal(lambda: client.infer(_key(0), 9899, True, False, secret="s"))
    for i in range(max_streams - 1):
        client.infer(_key(1), 9800 + i, False, True, secret="s")
    client.infer(_key(1), 9899, False, True, secret="s")  # frees the slot its START took
    _more(healthy, args.frames)
    report = healthy.stop()
    after = group_rss_mb(pid)
    ok = refused == n and opened == max_streams - 1 and "server full" in full
    return _row(f"{n} STARTs each ENDed with a bad payload, then a full instance",
                server.is_running(), [report], before, after, ok and report.frames_lost == 0,
                f"{refused}/{n} ENDs refused yet freed; then {opened} + 1 healthy streams "
                f"opened, the next got: {full[:45]}")


def session_memory(server, client, args) -> dict:
    pid = server.process.pid
    size = (384, 640) if args.quick else (1088, 1920)
    def play(corrid: int, end: bool) -> None:  # a key frame and two residual frames
        client.infer(_key(0, 7, size), corrid, True, False, secret="m")
        for t in range(1, 3):
            client.infer(_residual(t, 7, size), corrid, False, end and t == 2, secret="m")

    # engines are shared by every session and kept (their memory for a frame size, and for
    # each crop shape the tile executor ran, which its latency table, learned over the first
    # sessions, decides): throwaway sessions of the very same frames build them first, so what
    # is measured is the one session's own memory
    for corrid in (9499, 9500):
        play(corrid, end=True)
    before = group_rss_mb(pid)
    play(9501, end=False)
    held = group_rss_mb(pid)
    _refusal(lambda: client.infer(b"\0" * 8, 9501, False, True, secret="m"))
    after = group_rss_mb(pid)
    returned = held - after
    return _row(f"one {size[1]}x{size[0]} session: memory held, then END (bad payload)",
                server.is_running(), [], before, after, returned > 0.5 * (held - before),
                f"held {held - before:.0f} MB over the server before it; {returned:.0f} MB "
                "returned after END")


def idle_eviction(args, log_dir: Path, idle_s: float = 2.0) -> dict:
    """A stream silent past the idle timeout (the shipped config's is 30 s; this server's
    ``idle_s``): Triton frees its slot and the model its session, so its next frame is answered
    "resync needed" and re-sent as a key frame; no frame is lost, and a stream sending all along
    is untouched."""
    with TritonServer(models=["fluxshard"], log_file=log_dir / "idle-tritonserver.log",
                      idle_timeout_s=idle_s) as server:
        rss_before = group_rss_mb(server.process.pid)
        healthy = _healthy(server.grpc_url, 9301, args.frames)
        quiet = StreamDriver(server.grpc_url, 9302, seed=9302)
        for _ in range(3):
            quiet.send_next()
        time.sleep(idle_s * 2.5)  # the fault: silence past the timeout
        resyncs_before = quiet.report.resyncs
        for _ in range(3):
            quiet.send_next()
        _more(healthy, args.frames)
        reports = [healthy.stop(), quiet.stop()]
        rss_after = group_rss_mb(server.process.pid)
    resynced = quiet.report.resyncs - resyncs_before
    lost = sum(r.frames_lost for r in reports)
    return {"case": f"idle eviction: a stream silent {idle_s * 2.5:g} s past a {idle_s:g} s "
                    "timeout", "server_survived": True,
            "other_streams_unaffected": reports[0].unaffected, "frames_lost": lost,
            # the silent stream's gap is the fault itself: the stall is the other stream's
            "worst_stall_s": round(reports[0].worst_stall_s, 2),
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
            "resyncs": resynced, "passed": lost == 0 and reports[0].unaffected and resynced == 1,
            "note": f"the silent stream resumed with {resynced} key frame(s); "
                    f"{reports[1].frames_answered}/{reports[1].frames_sent} answered"}


def cases(args, log_dir: Path) -> list[dict]:
    from fluxshard_client import FluxShardClient

    server = TritonServer(models=["fluxshard"], log_file=log_dir / "limits-tritonserver.log")
    server.start()
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((REPO_ROOT / "model_repository" / "fluxshard" / "config.pbtxt")
                               .read_text(), model_config_pb2.ModelConfig())
    max_streams = max_streams_from_parameters({k: v.string_value
                                               for k, v in config.parameters.items()})
    rows = []
    try:
        with FluxShardClient(server.grpc_url) as client:
            rows.append(oversized_frame(server, client, args))
            rows.append(stranger(server, client, args))
            rows.append(bad_ends(server, client, args, max_streams))
            rows.append(session_memory(server, client, args))
    finally:
        server.stop()
    return rows + [idle_eviction(args, log_dir)]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    import reliability

    return reliability.main(argv, modules=("reliability_limits",))


if __name__ == "__main__":
    sys.exit(main())
