"""The process from outside: a port that is already served, out-of-range flags and settings,
`| head`, SIGTERM with open heartbeat streams. Each is a real `supervisor-service` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from tests._servers import ServiceProcess, free_port

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env.update(GRPC_VERBOSITY="NONE", SUPERVISOR_LOG_FORMAT="json", **extra)
    return env


def _cli(*argv: str, env: dict[str, str] | None = None, cwd=None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_service.cli", *argv], env=env or _env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The stderr lines that are not JSON log records: exactly one, the CLI's error."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("supervisor-service: error:"), proc.stderr
    return lines[0]


# ---------------------------------------------------------------- the gRPC port is not shared


@pytest.mark.realtime
def test_a_second_instance_on_the_same_grpc_port_is_refused(tmp_path):
    first = ServiceProcess({"SUPERVISOR_DATA_DIR": str(tmp_path / "first"), "GRPC_VERBOSITY": "NONE"},
                           str(tmp_path / "first.log"))
    try:
        first.wait_serving()
        second = subprocess.Popen(
            [sys.executable, "-m", "supervisor_service.cli", "serve", "--grpc-addr", first.addr, "--metrics-addr", ""],
            env=_env(SUPERVISOR_DATA_DIR=str(tmp_path / "second")), cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            _, stderr = second.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate()
            pytest.fail(f"a second supervisor started on {first.addr}, the port of the first")
        proc = subprocess.CompletedProcess(second.args, second.returncode, "", stderr)
        line = _one_error_line(proc)
        assert proc.returncode == 69, proc.stderr
        assert "grpc_addr" in line and first.addr in line
        # The first is still the one answering.
        with SupervisorClient(first.addr, timeout=5) as client:
            assert client.maintenance_status().is_leader
    finally:
        first.stop()
