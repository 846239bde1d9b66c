"""The benchmark's machinery at a tiny scale: it runs end to end and prints the whole table.

No timing is asserted here (numbers on a shared machine mean nothing in a
test); `make bench` is where the targets are measured.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from supervisor_service.bench.rows import COLUMNS, Row, render
from supervisor_service.bench.runner import percentile, predicted_crossing_ms
from supervisor_service.core import PhiAccrualFailureDetector, PhiAccrualOptions
from supervisor_service.proto import pb

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(180)]


def test_bench_runs_at_tiny_scale_and_prints_every_column(tmp_path):
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        # Fast detection, so the failover scenario takes seconds: a short pause, short ticks,
        # and no guards (with a 1 s pause, the mass-failure window would hold everything).
        "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "1000",
        "SUPERVISOR_TICK_INTERVAL_MS": "200",
        "SUPERVISOR_GUARDS_ENABLED": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor_service.bench", "--datanodes", "5", "--regions", "10",
         "--small-datanodes", "5", "--period", "0.5", "--seconds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=170, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| scenario"))
    for _, title in COLUMNS:
        assert title in header, title
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| scenario")]
    scenarios = [line.split("|")[1].strip() for line in table]
    for prefix in ("steady", "dump", "failover", "gRPC ceiling", "naive baseline", "detector table"):
        assert any(s.startswith(prefix) for s in scenarios), (prefix, scenarios)
    assert sum(s.startswith("ingest") for s in scenarios) == 2, scenarios
    assert all(line.count("|") == len(COLUMNS) + 1 for line in table)
    assert any("target" in line for line in lines)

    report = json.loads(out.read_text())
    rows = {r["scenario"].split(":")[0]: r for r in report["rows"]}
    assert rows["steady"]["detectors"] == 50
    assert rows["steady"]["msgs_s"] > 0 and rows["steady"]["apply_p99"] is not None
    assert rows["failover"]["extra"]["failover_delay_ms"] is not None, rows["failover"]["result"]
    assert rows["dump"]["extra"]["dump"]["rows"] == 50
    ingest = [r for r in report["rows"] if r["scenario"].startswith("ingest")]
    assert all(r["msgs_s"] > 0 and r["errors"] == 0 for r in ingest)
    tls = [r for r in report["rows"] if r["scenario"].startswith("TLS")]
    assert [r["extra"]["tls"] for r in tls] == [False, True, False, True], [r["scenario"] for r in tls]
    assert all(len(r["extra"]["rounds"]) == 3 for r in tls)
    assert all(r["msgs_s"] > 0 and r["errors"] == 0 for r in tls), [(r["scenario"], r["errors"]) for r in tls]
    assert all("vs plaintext" in r["result"] for r in tls if r["extra"]["tls"])


def test_predicted_crossing_matches_the_reference_detector():
    """The bench's crossing, from Dumped fields, is the first ms at which the reference says failed."""
    opts = PhiAccrualOptions()
    fd = PhiAccrualFailureDetector(opts)
    times = [0, 3000, 6100, 8900, 12000, 15050]
    for t in times:
        fd.heartbeat(t)
    # What the table reports (DetectorState): the observed mean and population std, from exact sums.
    n, total, total_sq = len(fd.intervals), sum(fd.intervals), sum(x * x for x in fd.intervals)
    mean, std = total / n, math.sqrt((n * total_sq - total * total) / (n * n))
    row = pb.DetectorState(last_heartbeat_millis=times[-1], sample_count=n, mean_interval_millis=mean,
                           std_deviation_millis=std)
    crossing = predicted_crossing_ms(row, opts)
    assert not fd.is_available(crossing)
    assert fd.is_available(crossing - 1)


def test_render_and_percentile():
    text = render([Row("a", detectors=1, msgs_s=2.0), Row("b")])
    assert text.splitlines()[0].startswith("| scenario")
    assert len(text.splitlines()) == 4
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99


def test_soak_runs_for_a_minute_and_checks_what_it_provoked():
    """One crash (failed over exactly once), one 3 s pause and one 7 s SIGSTOP of the service
    (neither failed over), against the real `serve` process with its default settings."""
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor_service.bench.soak", "--minutes", "1", "--datanodes", "12",
         "--regions", "3", "--churn", "10", "--stall-every", "15"],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| crashes (failed over / missed / more than once) | 1 (1 / 0 / 0) |" in proc.stdout
    assert "| datanodes paused 3 s, and false failovers | 1, 0 |" in proc.stdout
    assert "| service SIGSTOPped 7 s | 1 times |" in proc.stdout
    assert "| service alive at the end | yes |" in proc.stdout
