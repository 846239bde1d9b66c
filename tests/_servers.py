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
