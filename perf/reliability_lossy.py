"""Lossy-uplink rows of perf/reliability.py (issue 22): H.264 uplinks through 1% and 5% packet
loss lose no frame, and what the recovery costs in uplink bytes.

One camera stream (``FluxShardStream``: an in-process edge, dispatch forced to the cloud, the
derived default deadline, the H.264 uplink for key and residual frames) runs against a real
tritonserver in a network namespace behind a shaped link (``fluxshard.serving.netshape``: tbf
at 56 Mbit/s, 20 ms round trip). The link's proxy loses edge -> cloud TCP segments by a seeded
Gilbert-Elliott chain (mean burst 2 segments). The uplink is gRPC over TCP, so what a lost packet
does is modelled at the layer it acts on (``netshape`` module doc):

* ``retransmit``: TCP's own answer, the segment and all behind it arrive one retransmission
  timeout (200 ms, doubling on a repeated loss) late: a late cloud answer, or, past the frame's
  deadline, an edge answer and an IDR when the cloud is used again;
* ``reset``: every loss aborts the connection: the call in flight fails, the edge answers the
  frame, the cloud comes back (readiness probe, gRPC reconnect) with an IDR.

Each setting is compared with a loss-free run of the same frames through the same link: uplink
bytes per cloud-answered frame (every attempt counted, failed ones too, as the proxy carried
them) and the IDRs' own bytes. The uplink's quality is pinned at its crf for these runs
(``fluxshard.uplink_h264.LinkRate``'s range collapsed): the quality controller re-codes at
another crf, each change an IDR, on its own estimate of the link, which loss and retransmission
delays move, so unpinned its IDRs would be counted with the resyncs'. A frame is lost when it raises or is answered for another index;
a cloud answer is digest-checked by the transport. A row passes when no frame is lost, the
cloud answered again after its last failed call and its first answer after every failed call
was an IDR.

    python3 perf/reliability.py [--quick]          # with the other rows
    python3 perf/reliability_lossy.py [--quick]    # these rows alone
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fluxshard import wire  # noqa: E402
from fluxshard.digest_scene import Scene  # noqa: E402
from fluxshard.serving.netshape import (LossSpec, ShapedLink, ShapingUnavailable,  # noqa: E402
                                        check_privileges)
from perf.reliability_kit import group_rss_mb  # noqa: E402

FRAME_SIZE = (192, 320)  # H, W
LINK_MBIT, LINK_RTT_MS = 56.0, 20.0
MEAN_BURST = 2.0  # segments lost in a row, on average
SETTINGS = ((0.01, "retransmit"), (0.05, "retransmit"), (0.01, "reset"), (0.05, "reset"))
CASE = "lossy H.264 uplink"
CAMERA_FPS = 30.0
SETTLE_S = 20.0  # how long a run waits, past its frames, for the cloud to answer again


def lossy_run(link: ShapedLink, loss: LossSpec | None, frames: int, stream_id: int,
              scene_seed: int = 2201, until_resynced: bool = False,
              pin_quality: bool = True, settle_s: float = SETTLE_S) -> dict:
    """``frames`` frames of one camera through ``link`` with the proxy losing by ``loss``
    (``until_resynced``: at most ``frames``, ending once the cloud answered an IDR resync;
    ``pin_quality``: the uplink keeps its crf, see the module doc); -> counts, bytes and the
    per-frame outcomes.

    A run whose last cloud call failed goes on past ``frames``, at the camera's rate, until the
    cloud answers again (at most ``settle_s``): whether it is back after a fixed number of
    frames depends on how fast this machine runs the edge's frames against the readiness
    probe's pauses, and a row must show that it comes back."""
    from fluxshard_client import FluxShardClient, FluxShardStream, LocalEndpoint

    link.set_loss(loss)
    scene = Scene(scene_seed, *FRAME_SIZE)
    client = FluxShardClient(link.grpc_url)
    stream = FluxShardStream(LocalEndpoint(threads=1),
                             client.open_stream(stream_id, key_codec=wire.Codec.H264,
                                                residual_codec=wire.Codec.H264),
                             dispatch="cloud", imgsz=None)
    uplink = stream.cloud.stream.core.uplink
    if pin_quality and uplink.link_rate is not None:
        # the quality controller's range collapsed to the stream's crf: every IDR is then a
        # resync, and the bytes compare with the loss-free run's at the same quality
        uplink.link_rate.max_crf = uplink.link_rate.base_crf
    zero = np.zeros(wire.field_shape(*FRAME_SIZE), np.float32)
    # per frame: "lost", "failed" (the cloud call failed: the edge answered), "edge" (the cloud
    # left out, waiting for its readiness probe), "cloud", "resync" (the cloud's first answer
    # after a failure: must be an IDR), "idr" (an IDR for another reason: a quality change)
    kinds, lost, errors, stall, cloud_ms, idr_bytes = [], 0, [], 0.0, [], {"resync": 0, "idr": 0}
    awaiting_resync, settle_frames, settle_end = False, 0, None
    try:
        for t in itertools.count():
            if until_resynced and "resync" in kinds:
                break
            if t >= frames:
                if until_resynced or not awaiting_resync:
                    break
                settle_end = settle_end or time.monotonic() + settle_s
                if time.monotonic() > settle_end:
                    break
                time.sleep(1.0 / CAMERA_FPS)  # a camera's frames, not a busy loop
                settle_frames += 1
            t0 = time.perf_counter()
            try:
                result = stream.process(scene.frame(t), None if t == 0 else zero, t == 0, t)
            except Exception as e:  # noqa: BLE001 - a frame that raises is a lost frame
                lost += 1
                errors.append(f"frame {t}: {e}")
                kinds.append("lost")
                continue
            stall = max(stall, time.perf_counter() - t0)
            if result.index != t:
                lost += 1
                errors.append(f"frame {t}: answered as frame {result.index}")
            if result.endpoint == "edge":
                failed = result.decision.reason.startswith("cloud failed")
                awaiting_resync |= failed
                kinds.append("failed" if failed else "edge")
                continue
            cloud_ms.append(result.endpoint_ms)
            if awaiting_resync:
                kinds.append("resync" if result.key else "not resynced")
                awaiting_resync = False
            elif result.key and t > 0:  # the transport re-sent it as an IDR, or a new quality
                kinds.append("resync" if result.stats.get("resyncs") else "idr")
            else:
                kinds.append("cloud")
            if kinds[-1] in idr_bytes:
                idr_bytes[kinds[-1]] += result.uplink_bytes
    finally:
        stream.close()
        client.close()
    stats = link.proxy_stats()
    cloud_frames = sum(kinds.count(k) for k in ("cloud", "resync", "idr", "not resynced"))
    return {"frames": len(kinds), "frames_lost": lost, "errors": errors,
            "settle_frames": settle_frames, "cloud_back": not awaiting_resync,
            "cloud_frames": cloud_frames, "cloud_failed": kinds.count("failed"),
            "edge_frames": kinds.count("failed") + kinds.count("edge"),
            "resync_idrs": kinds.count("resync"), "resync_idr_bytes": idr_bytes["resync"],
            "not_resynced": kinds.count("not resynced"),
            "quality_idrs": kinds.count("idr"), "quality_idr_bytes": idr_bytes["idr"],
            "quality_changes": uplink.link_rate.changes if uplink.link_rate else 0,
            "cloud_p95_ms": round(float(np.percentile(cloud_ms, 95)), 1) if cloud_ms else None,
            "worst_stall_s": round(stall, 3), "proxy": stats.as_dict(),
            "uplink_bytes_per_cloud_frame": stats.bytes_up / max(cloud_frames, 1)}


def _row(rate: float, effect: str, run: dict, free: dict, before: float, after: float) -> dict:
    proxy = run["proxy"]
    extra = run["uplink_bytes_per_cloud_frame"] / free["uplink_bytes_per_cloud_frame"] - 1.0
    passed = (run["frames_lost"] == 0 and run["not_resynced"] == 0 and run["cloud_frames"] > 0
              and run["cloud_back"])
    resets = f", {proxy['resets']} connection resets" if effect == "reset" else ""
    settle = (f" ({run['settle_frames']} past the {run['frames'] - run['settle_frames']} "
              f"until the cloud answered again)" if run["settle_frames"] else "")
    if not run["cloud_back"]:
        settle = f" (the cloud not back {SETTLE_S:.0f} s after the last frame)"
    note = (f"{proxy['segments_lost']} of {proxy['segments_up']} segments lost{resets}; "
            f"{run['cloud_frames']} cloud / {run['edge_frames']} edge frames"
            f"{settle}; "
            f"{run['cloud_failed']} cloud calls failed, {run['resync_idrs']} IDR resyncs "
            f"({run['resync_idr_bytes'] / 1e3:.1f} kB); {run['quality_idrs']} IDRs for quality "
            f"changes ({run['quality_idr_bytes'] / 1e3:.1f} kB; loss-free: "
            f"{free['quality_idrs']}); uplink per cloud frame {extra * 100:+.0f}% against "
            f"loss-free; cloud p95 {run['cloud_p95_ms']} ms (loss-free {free['cloud_p95_ms']} ms)")
    if run["errors"]:
        note += "; " + run["errors"][0][:80]
    return {"case": f"{CASE}, {rate:.0%} loss ({effect})", "server_survived": True,
            "other_streams_unaffected": None, "frames_lost": run["frames_lost"],
            "worst_stall_s": run["worst_stall_s"], "rss_before_mb": round(before, 1),
            "rss_after_mb": round(after, 1), "resyncs": run["resync_idrs"], "passed": passed,
            "note": note, "loss_rate": rate, "loss_effect": effect, "mean_burst": MEAN_BURST,
            "frames": run["frames"], "settle_frames": run["settle_frames"],
            "cloud_back": run["cloud_back"], "segments_up": proxy["segments_up"],
            "segments_lost": proxy["segments_lost"], "connection_resets": proxy["resets"],
            "cloud_frames": run["cloud_frames"], "edge_frames": run["edge_frames"],
            "cloud_failed": run["cloud_failed"], "resync_idrs": run["resync_idrs"],
            "resync_idr_kb": round(run["resync_idr_bytes"] / 1e3, 1),
            "quality_idrs": run["quality_idrs"], "quality_idrs_loss_free": free["quality_idrs"],
            "uplink_kb": round(proxy["bytes_up"] / 1e3, 1),
            "uplink_kb_loss_free": round(free["proxy"]["bytes_up"] / 1e3, 1),
            "extra_uplink_per_cloud_frame_pct": round(extra * 100, 1),
            "cloud_p95_ms": run["cloud_p95_ms"], "cloud_p95_ms_loss_free": free["cloud_p95_ms"]}


def cases(args, log_dir: Path) -> list[dict]:
    frames = 24 if args.quick else 200
    try:
        check_privileges()
    except ShapingUnavailable as e:
        return [{"case": f"{CASE}, {rate:.0%} loss ({effect})", "server_survived": None,
                 "other_streams_unaffected": None, "frames_lost": 0, "worst_stall_s": None,
                 "rss_before_mb": None, "rss_after_mb": None, "passed": None,
                 "note": f"not run: {e}"} for rate, effect in SETTINGS]
    rows = []
    with ShapedLink(rate_mbit=LINK_MBIT, rtt_ms=LINK_RTT_MS) as link:
        server = link.start_server(models=["fluxshard"], log_file=log_dir / "lossy.log")
        free = lossy_run(link, None, frames, 2200)
        for k, (rate, effect) in enumerate(SETTINGS):
            before = group_rss_mb(server.process.pid)
            run = lossy_run(link, LossSpec(rate, MEAN_BURST, seed=k, effect=effect), frames,
                            2201 + k)
            rows.append(_row(rate, effect, run, free, before, group_rss_mb(server.process.pid)))
    return rows


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    import reliability

    return reliability.main(argv, modules=("reliability_lossy",))


if __name__ == "__main__":
    sys.exit(main())
