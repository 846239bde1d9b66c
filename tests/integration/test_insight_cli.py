"""`history`, `explain`, `whatif` and `demo` as real processes: against a real service where a datanode died
and was failed over by the embedded dry run, their text and --json output, the picture, their usage errors,
and the demo's failover with its evidence well within 90 s on the defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from tests.support.fakes import wait_for
from tests.support.servers import ServiceProcess, free_port

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(180)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env.update(GRPC_VERBOSITY="NONE")
    return env


def cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_service.cli", *argv], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def failed_over(tmp_path_factory):
    """A service where datanode 3 died and was failed over (embedded dry run); yields its address."""
    tmp = tmp_path_factory.mktemp("insight-cli")
    env = {"SUPERVISOR_STORE": "sqlite", "SUPERVISOR_DATA_DIR": str(tmp / "data"), "SUPERVISOR_TICK_INTERVAL_MS": "100",
           "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "1000", "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "200",
           "SUPERVISOR_MAX_FAILED_DATANODE_FRACTION": "1"}
    proc = ServiceProcess(env, str(tmp / "service.log"))
    beaters = {}
    try:
        proc.wait_serving(leader=True)
        beaters = {d: DatanodeHeartbeater(proc.addr, d, lambda d=d: [(1024 << 32) | (d * 100 + i) for i in range(2)],
                                          interval_s=0.1, peer_addr=f"127.0.0.1:{21_000 + d}").start()
                   for d in (1, 2, 3)}
        with SupervisorClient(proc.addr, timeout=5) as client:
            wait_for(lambda: len(client.dump()[1]) == 6, 15, message="datanodes never registered")
            time.sleep(1.0)
            beaters.pop(3).stop()
            wait_for(lambda: [r for r in client.failovers() if r.finished_at_millis], 30, message="no failover")
        yield proc.addr, tmp
    finally:
        for b in beaters.values():
            b.stop()
        proc.stop()


def test_history_text_json_and_plot(failed_over):
    addr, tmp = failed_over
    text = cli("history", "--addr", addr)
    assert text.returncode == 0, text.stderr
    assert "datanode 3 -> " in text.stdout and "SUCCEEDED after" in text.stdout
    assert "check  mass_failure: 1 of 3 datanodes silent" in text.stdout and "phi " in text.stdout
    lines = cli("history", "--json", "--datanode", "3", "--addr", addr).stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(r["from_peer"]["id"] == 3 and r["final_state"] == "SUCCEEDED" for r in records)
    assert all(e["phi"] >= r["threshold"] for r in records for e in r["evidence"])
    assert cli("history", "--json", "--datanode", "1", "--addr", addr).stdout == ""
    png = tmp / "failover.png"
    plot = cli("history", "--plot", str(png), "--addr", addr)
    assert plot.returncode == 0, plot.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000


def test_explain_and_whatif_text_and_json(failed_over):
    addr, _ = failed_over
    ex = cli("explain", "2", "--addr", addr)
    assert ex.returncode == 0 and ex.stdout.startswith("datanode 2: 2 regions, 0 failing, 0 in flight; healthy"), ex
    one = json.loads(cli("explain", "2", str((1024 << 32) | 200), "--json", "--addr", addr).stdout)
    assert one["verdict"].startswith("healthy: phi ") and len(one["detectors"]) == 1
    assert one["predicted_failure_millis"] > one["detectors"][0]["last_heartbeat_millis"]
    gone = cli("explain", "3", "--addr", addr)  # its regions were failed over: no detector left
    assert gone.returncode == 69 and "NOT_FOUND: no detector for datanode 3" in gone.stderr
    w = json.loads(cli("whatif", "1", "2", "--json", "--addr", addr).stdout)
    assert [p["datanode_id"] for p in w["plans"]] == [1, 2] and w["all_submitted_by_millis"] > 0
    assert "would be convicted" in cli("whatif", "1", "--addr", addr).stdout


@pytest.mark.parametrize("argv", [["whatif"], ["whatif", "x"], ["explain"], ["explain", "-1"],
                                  ["history", "--limit", "0"], ["history", "--limit", "1001"],
                                  ["history", "--since", "-3"], ["explain", "1", "--at", "-1"]])
def test_usage_errors_are_one_line_exit_2(argv):
    proc = cli(*argv, "--addr", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("supervisor-service: error:") or "usage:" in proc.stderr


def test_the_demo_shows_a_failover_with_its_evidence_well_within_90_s():
    started = time.monotonic()
    proc = cli("demo", timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAILOVER of datanode 5" in out and "check  mass_failure: 1 of 5 datanodes silent" in out
    assert "phi " in out and "the migration ended: MIGRATION_STATE_SUCCEEDED" in out
    assert "waiting: phi rises slowly until the acceptable heartbeat pause has passed" in out
    assert "supervisor-service explain 5 --addr" in out
    assert took < 60, took


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_the_demo_ends_cleanly_on_a_signal(sig, tmp_path):
    import glob
    import signal as signals
    import tempfile

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "supervisor-demo-*")))
    proc = subprocess.Popen([sys.executable, "-m", "supervisor_service.cli", "demo"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(4)
        proc.send_signal(getattr(signals, sig))
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted: stopping the datanodes and the service" in out and "done:" in out
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "supervisor-demo-*"))) <= before
