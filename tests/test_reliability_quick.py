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


@pytest.mark.slow
def test_reliability_quick_mode_loses_no_frame_and_fails_no_case(tmp_path):
    require_triton()
    run = subprocess.run([sys.executable, "perf/reliability.py", "--quick", "--out", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    report = json.loads((tmp_path / "reliability.json").read_text())
    assert report["quick"] is True and report["frames_lost"] == 0
    rows = report["rows"]
    assert rows and all(ROW_FIELDS <= set(row) for row in rows)
    failed = [row["case"] for row in rows if row["passed"] not in (True, None)]
    assert not failed, f"failed cases: {failed}\n{run.stdout[-4000:]}"
    assert sum(row["frames_lost"] for row in rows) == 0
    assert (tmp_path / "reliability-soak.png").stat().st_size > 0  # the soak's memory plot
