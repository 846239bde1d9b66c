"""`--curve` and `--profile` of the benchmark at a tiny size: they run end to end and print their tables.

No timing is asserted (`make bench` is where numbers are measured).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from supervisor_service.bench.curve import CURVE_COLUMNS, CurveRow, Point, run_point
from supervisor_service.bench.profile import py_spy

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]


def test_the_curve_prints_a_best_and_a_worst_row_per_size_each_from_its_own_process(tmp_path):
    out = tmp_path / "curve.json"
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor_service.bench", "--curve", "--curve-sizes", "40,200",
         "--curve-regions", "20", "--budget", "30", "--json", str(out)],
        capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| case"))
    assert all(title in header for _, title in CURVE_COLUMNS)
    rows = [line for line in lines if line.startswith("| ") and line is not header and "---" not in line]
    assert len(rows) == 4, proc.stdout
    summaries = json.loads(out.read_text())["curve"]
    assert [(s["detectors"], s["point"]["worst"]) for s in summaries] == [(40, False), (40, True), (200, False),
                                                                          (200, True)]
    assert all(s["complete"] and not s["error"] and s["apply_samples"] > 0 and s["ticks"] > 0 for s in summaries)
    assert any(line.startswith("- worst case, 40 -> 200 detectors") for line in lines), proc.stdout


def test_a_point_that_does_not_answer_in_time_is_an_error_row_and_its_child_is_ended():
    summary = run_point(Point(1, 10, worst=True), timeout_s=0.01)
    assert summary["error"] == "no answer within 0.01 s"
    assert CurveRow(summary).cells()["note"] == "no answer within 0.01 s"


@pytest.mark.skipif(py_spy() is None, reason="py-spy is not installed")
def test_the_profile_records_the_service_under_the_flood_and_prints_the_top_entries():
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor_service.bench", "--profile", "--datanodes", "4", "--regions", "10",
         "--period", "0.5", "--seconds", "2"],
        capture_output=True, text=True, timeout=110,
    )
    if proc.returncode == 1 and "could not record" in proc.stderr:
        pytest.skip(f"py-spy cannot attach here: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by thread:" in proc.stdout and "top 20 by self samples" in proc.stdout, proc.stdout
    assert "ingest: 10 regions/message" in proc.stdout
