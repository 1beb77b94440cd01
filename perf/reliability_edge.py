"""Edge rows of perf/reliability.py (issue 14): a dead or hung cloud never stalls the camera, and
a cloud served over TLS with an auth header refuses clients without them.

"hung / dead cloud": one camera stream (``FluxShardStream``, dispatch forced to the cloud, the
derived default deadline) runs against a real tritonserver that is frozen (SIGSTOP: connections
accepted, nothing answered), thawed, killed (kill -9) and restarted on its ports. Every frame
must be answered (by the edge while the cloud is out), no frame may take longer than its cloud
deadline plus the slowest edge frame of the run, and the cloud must be used again (from a key
frame) after each recovery. "secured cloud": mutual TLS and an auth header; the client with both
streams frames, one without the header and one without a client certificate are refused.

    python3 perf/reliability.py [--quick]        # with the other rows
    python3 perf/reliability_edge.py [--quick]   # these rows alone
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fluxshard import wire  # noqa: E402
from fluxshard.digest_scene import Scene  # noqa: E402
from perf.reliability_kit import group_rss_mb  # noqa: E402
from fluxshard.serving.tritonserver import TlsFiles, TritonServer  # noqa: E402

FRAME_SIZE = (192, 320)  # H, W
FRAME_INTERVAL_S = 0.05  # a camera's pace between frames
AUTH = ("fluxshard-auth", "reliability-token")
# a given-up cloud call may end this much after its deadline: gRPC's timer and the cancel,
# on a shared 2-core box
DEADLINE_TOLERANCE_MS = 150.0


class _Camera:
    """Frames of one scene through a FluxShardStream; every result's wall time recorded."""

    def __init__(self, url: str, **client_kwargs):
        from fluxshard_client import FluxShardClient, FluxShardStream, LocalEndpoint

        self.client = FluxShardClient(url, **client_kwargs)
        self.stream = FluxShardStream(LocalEndpoint(threads=1), self.client.open_stream(5101),
                                      dispatch="cloud", imgsz=None)
        self.scene = Scene(5101, *FRAME_SIZE)
        self.t = 0
        self.results = []  # (phase, FrameResult, wall ms)
        self.lost = 0

    def frame(self, phase: str):
        frame = self.scene.frame(self.t)
        field = None if self.t == 0 else np.zeros(wire.field_shape(*FRAME_SIZE), np.float32)
        t0 = time.perf_counter()
        try:
            result = self.stream.process(frame, field, self.t == 0, self.t)
        except Exception as e:  # noqa: BLE001 - a frame that raises is a lost frame
            self.lost += 1
            print(f"frame {self.t} lost: {e}", file=sys.stderr)
            result = None
        self.results.append((phase, result, (time.perf_counter() - t0) * 1e3))
        self.t += 1
        time.sleep(FRAME_INTERVAL_S)
        return result

    def until_cloud(self, phase: str, at_least: int, limit_s: float = 300.0) -> int:
        """Frames until the cloud answered one again (after ``at_least`` frames); how many."""
        started, n = time.monotonic(), 0
        while True:
            result = self.frame(phase)
            n += 1
            if n >= at_least and result is not None and result.endpoint == "cloud":
                return n
            if time.monotonic() - started > limit_s:
                raise TimeoutError(f"{phase}: the cloud did not come back in {limit_s:.0f} s")

    def close(self):
        self.stream.close()
        self.client.close()


def _signal_group(server: TritonServer, sig: int) -> None:
    import os

    os.killpg(os.getpgid(server.process.pid), sig)


def dead_cloud_case(args, log_dir: Path) -> dict:
    frames = 3 if args.quick else 20
    server = TritonServer(models=["fluxshard"], log_file=log_dir / "edge-cloud.log").start()
    restarted = None
    camera = _Camera(server.grpc_url)
    before = group_rss_mb(server.process.pid)
    notes = []
    try:
        for _ in range(frames):
            camera.frame("up")
        _signal_group(server, signal.SIGSTOP)  # hung: connections accepted, nothing answered
        for _ in range(frames):
            camera.frame("hung")
        _signal_group(server, signal.SIGCONT)
        notes.append(f"back {camera.until_cloud('thawed', 1)} frames after SIGCONT")
        server.kill()
        for _ in range(frames):
            camera.frame("dead")
        restarted = TritonServer(http_port=server.http_port, grpc_port=server.grpc_port,
                                 metrics_port=server.metrics_port, models=server.models,
                                 log_file=log_dir / "edge-cloud-restarted.log")
        starter = threading.Thread(target=restarted.start)
        starter.start()
        notes.append(f"back {camera.until_cloud('dead', 1)} frames after the restart began")
        starter.join()
        for _ in range(frames):
            camera.frame("restarted")
        after = group_rss_mb(restarted.process.pid)
        camera.close()
    finally:
        if server.is_running():
            _signal_group(server, signal.SIGCONT)
        server.stop()
        if restarted is not None:
            restarted.stop()
    answered = [(phase, r, ms) for phase, r, ms in camera.results if r is not None]
    out = [(phase, r, ms) for phase, r, ms in answered if phase in ("hung", "dead")]
    edge_ms = max(ms for _, r, ms in answered if r.endpoint == "edge"
                  and r.decision.reason.startswith("cloud down"))
    # the cloud call a frame gave up on never ran past the frame's deadline (the rest of the
    # frame is the edge's compute, on this loaded box as slow as its slowest edge frame)
    attempts = [(r.stats["cloud_attempt_ms"] - r.stats["deadline_ms"], r.index) for _, r, _ in out
                if "cloud_attempt_ms" in r.stats]
    overshoot_ms = max((o for o, _ in attempts), default=0.0)
    over = [i for o, i in attempts if o > DEADLINE_TOLERANCE_MS]
    worst_phase, worst, worst_ms = max(out, key=lambda x: x[2])
    worst_by_phase = {phase: max(ms for p, _, ms in out if p == phase)
                      for phase in ("hung", "dead")}
    back = [r for phase, r, _ in answered if phase in ("thawed", "dead") and r.endpoint == "cloud"]
    passed = (camera.lost == 0 and not over
              and all(r.endpoint == "edge" for phase, r, _ in out if phase == "hung")
              and len(back) == 2 and all(r.key for r in back)
              and all(r.endpoint == "cloud" for phase, r, _ in answered if phase == "restarted"))
    notes.insert(0, f"worst frame {worst_ms:.0f} ms ({worst_phase}; deadline "
                    f"{worst.stats.get('deadline_ms', 'none')} ms, slowest edge frame "
                    f"{edge_ms:.0f} ms; dead: {worst_by_phase['dead']:.0f} ms); cloud calls "
                    f"given up at most {overshoot_ms:.0f} ms past their deadline")
    return {"case": "hung / dead cloud: every frame within deadline + edge",
            "server_survived": "restarted", "other_streams_unaffected": None,
            "frames_lost": camera.lost, "worst_stall_s": round(worst_ms / 1e3, 3),
            "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "passed": passed, "note": "; ".join(notes),
            "worst_frame_ms": round(worst_ms, 1), "slowest_edge_frame_ms": round(edge_ms, 1),
            "deadline_ms": worst.stats.get("deadline_ms"),
            "deadline_overshoot_ms": round(overshoot_ms, 1),
            "worst_frame_ms_hung": round(worst_by_phase["hung"], 1),
            "worst_frame_ms_dead": round(worst_by_phase["dead"], 1)}


def secured_cloud_case(args, log_dir: Path) -> dict:
    from fluxshard.serving.pki import make_pki
    from fluxshard_client import CloudError, FluxShardClient, RetryPolicy, auth_headers
    from fluxshard_client.deadline import Deadline

    frames = 3 if args.quick else 20
    pki = make_pki(log_dir / "pki")
    tls = TlsFiles(pki["server"][0], pki["server"][1], root=pki["ca"][0])
    mutual = dict(ssl=True, root_certificates=pki["ca"][0], private_key=pki["client"][1],
                  certificate_chain=pki["client"][0])
    lost, stall, refusals = 0, 0.0, {}
    with TritonServer(models=["fluxshard"], log_file=log_dir / "edge-secured.log", tls=tls,
                      auth_header=AUTH) as server:
        before = group_rss_mb(server.process.pid)
        scene = Scene(5201, *FRAME_SIZE)
        with FluxShardClient(server.grpc_url, headers=auth_headers(*AUTH), **mutual) as client:
            stream = client.open_stream(5201)
            for t in range(frames):
                t0 = time.perf_counter()
                frame = scene.frame(t)
                result = stream.send(frame, key=True, frame_index=t)
                stall = max(stall, time.perf_counter() - t0)
                lost += result.digest != wire.cache_digest(frame)
            stream.close()
        for who, kwargs in (("no auth header", mutual),
                            ("no client certificate", dict(ssl=True,
                                                           root_certificates=pki["ca"][0],
                                                           headers=auth_headers(*AUTH))),
                            ("plain gRPC", dict(headers=auth_headers(*AUTH)))):
            with FluxShardClient(server.grpc_url, retry=RetryPolicy(reconnect_timeout_s=5),
                                 **kwargs) as client:
                try:
                    client.open_stream(5202).send(scene.frame(0), key=True,
                                                  deadline=Deadline.after(10.0))
                    refusals[who] = None
                except CloudError as e:
                    refusals[who] = str(e)
        after = group_rss_mb(server.process.pid)
    refused = all(refusals.values())
    note = "; ".join(f"{who}: {(why or 'ANSWERED')[:60]}" for who, why in refusals.items())
    return {"case": "TLS + auth header: clients without them refused",
            "server_survived": True, "other_streams_unaffected": lost == 0,
            "frames_lost": int(lost), "worst_stall_s": round(stall, 3),
            "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "passed": refused and lost == 0 and "requires an auth header"
            in (refusals["no auth header"] or ""), "note": note}


def cases(args, log_dir: Path) -> list[dict]:
    return [dead_cloud_case(args, log_dir), secured_cloud_case(args, log_dir)]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    import reliability

    return reliability.main(argv, modules=("reliability_edge",))


if __name__ == "__main__":
    sys.exit(main())
