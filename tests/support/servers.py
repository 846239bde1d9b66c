"""Real servers the tests start on 127.0.0.1: the service in a child process, etcd.

A missing binary skips the test, except under CI=true, where it fails: CI
must never pass by skipping what it was meant to check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.readiness import free_port, wait_ready

__all__ = ["EtcdServer", "ServiceProcess", "free_port", "require_binary", "stop_process"]


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found: install the Debian package {package} (`make test` does it as root)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class ServiceProcess:
    """`supervisor-service serve` in a child process, configured through SUPERVISOR_* variables.

    It serves metrics on a free port unless `env` says otherwise
    (SUPERVISOR_METRICS_ADDR=""), so that a test can count the ticks it
    handled (`handled`, `tests.support.waiting.wait_ticks`).
    """

    def __init__(self, env: dict[str, str], log_path: str, grpc_port: int | None = None) -> None:
        self.port = grpc_port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        full_env = dict(os.environ)
        full_env.update({"SUPERVISOR_GRPC_ADDR": self.addr, "SUPERVISOR_METRICS_ADDR": f"127.0.0.1:{free_port()}",
                         "SUPERVISOR_LOG_FORMAT": "json"})
        full_env.update(env)
        self.metrics_addr = full_env["SUPERVISOR_METRICS_ADDR"]
        self.token = full_env.get("SUPERVISOR_AUTH_TOKEN", "")
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor_service.cli", "serve"],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_serving(self, timeout: float = 30.0, *, leader: bool = False) -> None:
        """Ready: SERVING over grpc.health.v1 (and leading with its state loaded, if `leader`)."""
        try:
            wait_ready(self.addr, timeout, leader=leader, token=self.token, gone=self._gone)
        except AssertionError as exc:
            if self.proc.poll() is not None:
                raise
            raise AssertionError(f"{exc}; log: {self.log_tail()}") from None

    def _gone(self) -> str:
        if self.proc.poll() is None:
            return ""
        return f"exited with {self.proc.returncode}; log: {self.log_tail()}"

    def handled(self, event_type: str = "Tick") -> int:
        """supervisor_events_total{type=event_type}, read from the metrics endpoint (not its cached render)."""
        if not self.metrics_addr:
            raise AssertionError("this service has no metrics endpoint (SUPERVISOR_METRICS_ADDR is empty)")
        url = f"http://{self.metrics_addr}/metrics?name[]=supervisor_events_total"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "supervisor_events_total" and sample.labels.get("type") == event_type:
                    return int(sample.value)
        return 0

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")

    def kill(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class EtcdServer:
    """A single-member etcd on loopback ports, data in a temporary directory."""

    def __init__(self, data_dir: str) -> None:
        binary = require_binary("etcd", "etcd-server")
        self.client_port, peer_port = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self._log = open(os.path.join(data_dir, "etcd.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "--data-dir", os.path.join(data_dir, "etcd"), "--name", "test",
             "--listen-client-urls", f"http://{self.endpoint}", "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"test=http://127.0.0.1:{peer_port}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"etcd exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as resp:
                    if b"true" in resp.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("etcd did not become healthy")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()
