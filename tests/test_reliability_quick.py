"""Issue 14's acceptance in CI: ``perf/reliability.py --quick`` replays every attack and fault (and
the fuzz, soak and scale rows) against real servers; no frame may be lost and no case may fail.
The case list is whatever the script runs: cases added to it are checked here too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_triton

REPO_ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"case", "server_survived", "other_streams_unaffected", "frames_lost",
              "worst_stall_s", "rss_before_mb", "rss_after_mb", "passed", "note"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(the finished ``perf/reliability.py --quick`` process, its report folder)."""
    require_triton()
    out = tmp_path_factory.mktemp("reliability")
    run = subprocess.run([sys.executable, "perf/reliability.py", "--quick", "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    return run, out


@pytest.mark.slow
def test_reliability_quick_mode_loses_no_frame_and_fails_no_case(quick_run):
    run, out = quick_run
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    report = json.loads((out / "reliability.json").read_text())
    assert report["quick"] is True and report["frames_lost"] == 0
    rows = report["rows"]
    assert rows and all(ROW_FIELDS <= set(row) for row in rows)
    # a row whose ``passed`` is None did not run (not built, no privileges ...): it is no pass
    ran = [row for row in rows if row["passed"] is not None]
    assert ran, "no case ran"
    failed = [row["case"] for row in ran if row["passed"] is not True]
    assert not failed, f"failed cases: {failed}\n{run.stdout[-4000:]}"
    assert sum(row["frames_lost"] for row in rows) == 0
    assert (out / "reliability-soak.png").stat().st_size > 0  # the soak's memory plot


@pytest.mark.slow
def test_reliability_cases_that_did_not_run_are_reported_as_not_run(quick_run):
    """Rows the script did not run are skipped here with their reasons (pytest -ra lists them),
    never counted as passed; each must say why it did not run."""
    _run, out = quick_run
    rows = json.loads((out / "reliability.json").read_text())["rows"]
    not_run = [row for row in rows if row["passed"] is None]
    assert all(str(row["note"] or "").strip() for row in not_run), not_run
    if not_run:
        pytest.skip("not run: " + "; ".join(f"{row['case']} ({row['note']})" for row in not_run))
