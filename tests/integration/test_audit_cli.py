"""`supervisor-service audit` and `--reason` as an operator runs them: a real CLI process against the
service, the entry it reads back, and its flags' bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from supervisor_service.cli.audit import since_millis
from tests.support.roles import IDENTITIES, write_security_files


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env.update(GRPC_VERBOSITY="NONE")
    return subprocess.run([sys.executable, "-m", "supervisor_service.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=30)


def test_maintenance_with_a_reason_is_in_the_audit_trail(service, tmp_path):
    svc = service(**write_security_files(tmp_path))
    addr = ["--addr", svc.addresses.grpc]
    alice, bob = IDENTITIES["ops-alice"][0], IDENTITIES["reader-bob"][0]
    on = _cli("maintenance", "on", "--datanode", "4", "--ttl", "60", "--reason", "upgrade of rack 3",
              "--token", alice, *addr)
    assert on.returncode == 0, on.stderr
    refused = _cli("maintenance", "off", "--reason", "me too", "--token", bob, *addr)
    assert refused.returncode == 69 and "PERMISSION_DENIED" in refused.stderr and "'reader-bob'" in refused.stderr
    shown = _cli("audit", "--json", "--identity", "ops-alice", "--since", "1h", "--token", bob, *addr)
    assert shown.returncode == 0, shown.stderr
    (entry,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert (entry["identity"], entry["rpc"], entry["code"], entry["reason"]) == (
        "ops-alice", "SetMaintenanceMode", "OK", "upgrade of rack 3")
    assert "datanodes 4" in entry["summary"] and "ttl_millis=60000" in entry["summary"]
    text = _cli("audit", "--token", bob, *addr)
    assert text.returncode == 0 and "reason: upgrade of rack 3" in text.stdout
    assert _cli("audit", "--identity", "nobody", "--token", bob, *addr).stdout.strip() == "no audit entries match"
    denied = _cli("audit", "--token", IDENTITIES["datanode-1"][0], *addr)
    assert denied.returncode == 69 and "PERMISSION_DENIED" in denied.stderr


@pytest.mark.parametrize("argv", [
    ["audit", "--since", "yesterday"], ["audit", "--since", "-5"], ["audit", "--since", "9" * 30],
    ["audit", "--limit", "0"], ["audit", "--limit", "10001"],
    ["maintenance", "on", "--reason", "x" * 1025], ["maintenance", "on", "--reason", "two\nlines"],
    ["hold", "release", "--reason", "nul\x01".replace("\x01", "\n")],
])
def test_bad_audit_and_reason_flags_are_usage_errors(argv):
    proc = _cli(*argv, "--addr", "127.0.0.1:1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_since_takes_epoch_millis_or_a_duration_ago():
    now = 1_800_000_000_000
    assert since_millis("1700000000000", now) == 1_700_000_000_000
    assert since_millis("90s", now) == now - 90_000
    assert since_millis("2h", now) == now - 7_200_000
    assert since_millis("999999999999d", now) == 0
