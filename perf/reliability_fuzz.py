"""Fuzz row of perf/reliability.py (issue 14): hostile requests against a real tritonserver with
the ``fluxshard`` model while two healthy streams run.

The requests are the ones ``tests/test_fuzz.py`` fuzzes the decoders with in process (hypothesis,
derandomized: the same requests every run): random bytes, valid payloads of every codec with
flipped, cut or added bytes, any header field set to anything, bodies rewritten with a matching
checksum, a zlib bomb and a JPEG that trips Pillow's size guard; each with a stranger's own
stream id and secret, START and END. Every one must get a clear refusal or a well-formed answer,
never an ``internal error`` (an exception the model did not expect) or a dead stub; the healthy
streams' answers must stay exact. (A stranger who guesses a live stream's id is the stream-secret
cases' subject: the SDK's default ids are unguessable.)

    python3 perf/reliability.py [--quick]          # with the other cases
    python3 perf/reliability_fuzz.py [--quick]     # this row alone
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the fuzz strategies live with the fuzz tests

from perf.reliability_kit import StreamDriver, group_rss_mb  # noqa: E402
from fluxshard.serving.tritonserver import TritonServer  # noqa: E402

QUICK_REQUESTS, DEFAULT_REQUESTS = 150, 2000
# answers that mean the model did not expect what it got, or its process died
CRASH_MARKERS = ("internal error", "not healthy", "Stub process")


def classify(error: Exception) -> str:
    text = str(error)
    if any(marker in text for marker in CRASH_MARKERS):
        return "crash"
    return "refused"


def hostile_run(server: TritonServer, requests: int) -> tuple[Counter, list[str]]:
    """Send ``requests`` hostile requests; -> (outcome counts, the unexpected answers)."""
    from hypothesis import HealthCheck, Phase, example, given, settings
    from test_fuzz import _bomb, _jpeg_claiming, hostile_requests
    from tritonclient.utils import InferenceServerException

    from fluxshard import wire
    from fluxshard_client import FluxShardClient

    outcomes: Counter = Counter()
    crashes: list[str] = []
    with FluxShardClient(server.grpc_url) as attacker:
        @settings(derandomize=True, database=None, deadline=None, max_examples=requests,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(request=hostile_requests())
        @example(request=(1, True, False, _bomb(), "a"))
        @example(request=(1, True, True, _jpeg_claiming(65535, 65535), "a"))
        def attack(request):
            corrid, start, end, payload, secret = request
            corrid = min(corrid, 2**63 - 1)  # the gRPC client's sequence ids are int64
            try:
                outputs = attacker.infer(payload, corrid, start, end, secret=secret)
            except InferenceServerException as e:
                outcome = classify(e)
                if outcome == "crash":
                    crashes.append(str(e))
            else:
                wire.response_from_tensors(outputs["DETECTIONS"], outputs["STATS"],
                                           outputs["DIGEST"])
                outcome = "answered"
            outcomes[outcome] += 1

        attack()
    return outcomes, crashes


def cases(args, log_dir: Path) -> list[dict]:
    quick = bool(getattr(args, "quick", False))
    requests = QUICK_REQUESTS if quick else DEFAULT_REQUESTS
    healthy_ids = [7301, 7302]  # outside the strangers' ids (tests/test_fuzz.py)
    server = TritonServer(models=["fluxshard"], log_file=log_dir / "tritonserver-fuzz.log").start()
    try:
        drivers = [StreamDriver(server.grpc_url, sid, seed=sid) for sid in healthy_ids]
        before = group_rss_mb(server.process.pid)
        for d in drivers:
            d.start()
        try:
            outcomes, crashes = hostile_run(server, requests)
            for d in drivers:  # a few more frames each after the last hostile request
                mark = d.report.frames_answered + 3
                while d.report.frames_answered < mark and not d.report.frames_lost:
                    d._stop.wait(0.05)
        finally:
            reports = [d.stop() for d in drivers]
        after = group_rss_mb(server.process.pid)
        survived = server.is_running()
    finally:
        server.stop()
    lost = sum(r.frames_lost for r in reports)
    unaffected = all(r.unaffected for r in reports)
    sent = outcomes["answered"] + outcomes["refused"] + outcomes["crash"]
    note = (f"{sent} hostile requests: {outcomes['refused']} refused, {outcomes['answered']} "
            f"answered, {outcomes['crash']} unexpected")
    if crashes:
        note += f" (first: {crashes[0][:120]})"
    return [{"case": "fuzzed and hostile payloads (tests/test_fuzz.py's, over gRPC)",
             "server_survived": survived, "other_streams_unaffected": unaffected,
             "frames_lost": lost,
             "worst_stall_s": round(max(r.worst_stall_s for r in reports), 2),
             "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
             "resyncs": sum(r.resyncs for r in reports),
             "passed": survived and unaffected and outcomes["crash"] == 0, "note": note,
             "hostile_requests": sent}]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    import reliability

    return reliability.main(argv, modules=("reliability_fuzz",))


if __name__ == "__main__":
    sys.exit(main())
