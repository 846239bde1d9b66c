"""`supervisor-service drain` and `policy` as an operator runs them: a separate process against a real
server with fake remotes (cli/planned.py): the drain runs to its end with --wait, status as JSON,
policies set and listed, and usage errors exit 2 with one line before any call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from supervisor_service.client import SupervisorClient
from tests.support.drained import MovingCluster, rid
from tests.support.fakes import FakeSelector, peer
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]

FAST = dict(tick_interval_ms=100, acceptable_heartbeat_pause_ms=1000, first_heartbeat_estimate_ms=200,
            warmup_grace_ms=0, max_failed_datanode_fraction=1.0, migration_status_poll_interval_ms=200,
            target_holddown_ms=0)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env.update(GRPC_VERBOSITY="NONE")
    return subprocess.run([sys.executable, "-m", "supervisor_service.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=60)


def test_drain_and_policy_commands_against_a_real_server(service):
    sel = FakeSelector([peer(d, f"127.0.0.1:{22_000 + d}") for d in (1, 2, 3)])
    cluster = MovingCluster({1: [rid(1, i) for i in range(50)], 2: [rid(9, 1)], 3: [rid(9, 2)]})
    try:
        svc = service(**FAST, selector_endpoint=sel.endpoint, region_migration_endpoint=cluster.migration.endpoint)
        cluster.start(svc.addresses.grpc)
        addr = svc.addresses.grpc
        with SupervisorClient(addr, timeout=5) as client:
            wait_for(lambda: len(client.dump()[1]) >= 52, 20)
        out = _cli("policy", "set", "1", "--failover", "off", "--priority", "-5", "--reason", "pinned", "--addr", addr)
        assert out.returncode == 0 and out.stdout.strip() == "table 1: failover off, priority -5", out
        only = _cli("policy", "set", "1", "--priority", "-5", "--addr", addr)
        assert only.stdout.strip() == "table 1: failover off, priority -5", only  # --failover left as it was
        listed = _cli("policy", "list", "--json", "--addr", addr)
        assert [json.loads(line) for line in listed.stdout.splitlines()] == [
            {"table_id": 1, "failover_enabled": False, "priority": -5}]
        started = _cli("drain", "start", "1", "--reason", "decommission", "--wait", "--addr", addr)
        assert started.returncode == 0, started
        drain_id, summary = started.stdout.splitlines()[:2]
        assert drain_id.startswith("drain-") and ": done, datanodes 1: 50/50 moved" in summary
        status = json.loads(_cli("drain", "status", "--json", "--addr", addr).stdout)
        assert status["drain_id"] == drain_id and status["regions_moved"] == 50 and status["reason"] == "decommission"
        cancel = _cli("drain", "cancel", drain_id, "--addr", addr)
        assert cancel.returncode == 0 and ": done," in cancel.stdout  # an ended drain stays as it ended
        missing = _cli("drain", "status", "nope", "--addr", addr)
        assert missing.returncode == 69 and "NOT_FOUND: no drain 'nope'" in missing.stderr
    finally:
        cluster.close()
        sel.stop()


@pytest.mark.parametrize("argv, words", [
    (("drain", "start"), "name the datanodes"),
    (("drain", "start", "-1"), "expected a datanode id in 0..18446744073709551615, got -1"),
    (("drain", "start", "x"), "expected a datanode id, got 'x'"),
    (("drain", "cancel"), "name the drain"),
    (("drain", "status", "a", "b"), "one drain id at most"),
    (("policy", "set", "1"), "--failover on|off"),
    (("policy", "set", "4294967296", "--failover", "on"), "expected a table id in 0..4294967295"),
    (("policy", "set", "1", "--failover", "on", "--priority", "2147483648"), "expected a priority in"),
    (("drain", "start", "1", "--reason", "x" * 1025), "at most 1024"),
])
def test_usage_errors_exit_2_before_any_call(argv, words):
    out = _cli(*argv, "--addr", "127.0.0.1:1")
    assert out.returncode == 2, out
    assert words in out.stderr, out.stderr
