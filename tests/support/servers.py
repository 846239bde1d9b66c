"""Real servers the tests start on 127.0.0.1 (Prometheus, etcd).

A missing binary skips the test, except under CI=true, where it fails: CI
must never pass by skipping what it was meant to check.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """`supervisor-service serve` in a child process, configured through SUPERVISOR_* variables."""

    def __init__(self, env: dict[str, str], log_path: str, grpc_port: int | None = None) -> None:
        import sys

        self.port = grpc_port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        full_env = dict(os.environ)
        full_env.update({"SUPERVISOR_GRPC_ADDR": self.addr, "SUPERVISOR_METRICS_ADDR": "", "SUPERVISOR_LOG_FORMAT": "json"})
        full_env.update(env)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor_service.cli", "serve"],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_serving(self, timeout: float = 30.0) -> None:
        import time

        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"service exited with {self.proc.returncode}; log: {self.log_tail()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"service at {self.addr} not SERVING within {timeout} s; log: {self.log_tail()}")

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
        import time
        import urllib.request

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
