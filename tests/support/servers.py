"""Real servers the tests start on 127.0.0.1: the service in a child process, etcd, PostgreSQL.

A missing binary skips the test, except under CI=true, where it fails: CI
must never pass by skipping what it was meant to check.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.readiness import free_port, wait_ready

__all__ = ["EtcdServer", "PostgresServer", "ServiceProcess", "free_port", "require_binary", "stop_process"]


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

    def __init__(self, env: dict[str, str], log_path: str, grpc_port: int | None = None, client_tls=None) -> None:
        """`client_tls`: the `ClientTLS` that reaches a TLS port (readiness)."""
        self.client_tls = client_tls
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
            wait_ready(self.addr, timeout, leader=leader, token=self.token, gone=self._gone, tls=self.client_tls)
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
    """A single-member etcd on loopback ports, data in a temporary directory.

    `tls`: files by name as `tests.support.certs.cert_files` makes them (`server`, `server-key`, `ca`,
    and a client pair `metasrv`): clients must then speak TLS and present a certificate of that CA
    (etcd's --client-cert-auth)."""

    def __init__(self, data_dir: str, tls: dict | None = None) -> None:
        binary = require_binary("etcd", "etcd-server")
        self.client_port, peer_port = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.tls = tls
        scheme = "https" if tls else "http"
        secure = ["--cert-file", str(tls["server"]), "--key-file", str(tls["server-key"]),
                  "--trusted-ca-file", str(tls["ca"]), "--client-cert-auth"] if tls else []
        self._log = open(os.path.join(data_dir, "etcd.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "--data-dir", os.path.join(data_dir, "etcd"), "--name", "test",
             "--listen-client-urls", f"{scheme}://{self.endpoint}",
             "--advertise-client-urls", f"{scheme}://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"test=http://127.0.0.1:{peer_port}", *secure],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls["ca"]))
            context.load_cert_chain(str(self.tls["metasrv"]), str(self.tls["metasrv-key"]))
        url = f"{'https' if self.tls else 'http'}://{self.endpoint}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"etcd exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                    if b"true" in resp.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("etcd did not become healthy")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def _postgres_bindir() -> str:
    """Debian installs the server's binaries off PATH (/usr/lib/postgresql/<major>/bin): the newest there,
    else wherever PATH has initdb (another distribution's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    return os.path.dirname(require_binary("initdb", "postgresql"))


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb, then postgres) on a free loopback port, data in a fresh
    temporary directory; run as the `postgres` user when the tests run as root (PostgreSQL refuses root).

    `url(dbname)` is a store setting for one database; `create_database()` makes a new one, so that the
    tests sharing a server never share state. `pause()`/`resume()` SIGSTOP/SIGCONT the postmaster and
    every backend: the database stops answering while its connections stay open.
    """

    def __init__(self) -> None:
        bindir = _postgres_bindir()
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
        self.base = tempfile.mkdtemp(prefix="supervisor-pg-")
        self.data_dir = os.path.join(self.base, "data")
        if self.user is not None:
            shutil.chown(self.base, self.user, self.user)
        self._databases = 0
        self._log = open(os.path.join(self.base, "postgres.log"), "ab")  # noqa: SIM115 - closed in stop
        as_user = {"user": self.user, "group": self.user} if self.user is not None else {}
        init = subprocess.run(
            [os.path.join(bindir, "initdb"), "-D", self.data_dir, "-U", "postgres", "--auth=trust",
             "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.base, **as_user,
        )
        if init.returncode != 0:
            raise AssertionError(f"initdb failed ({init.returncode}): {init.stdout.decode(errors='replace')[-2000:]}")
        # Its own session: a signal to the test's process group (a ^C) does not reach it.
        self.proc = subprocess.Popen(
            [os.path.join(bindir, "postgres"), "-D", self.data_dir, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.base}",
             "-c", "fsync=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.base, start_new_session=True, **as_user,
        )
        self._wait_ready()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new, empty database; its store URL."""
        import psycopg

        self._databases += 1
        name = f"supervisor_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited with {self.proc.returncode}; see {self.base}/postgres.log")
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise AssertionError(f"postgres did not accept connections within {timeout} s")

    def _children(self) -> list[int]:
        """The postmaster's child processes (each backend is a session leader of its own: no killpg)."""
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == self.proc.pid:
                children.append(int(entry))
        return children

    def _signal_all(self, sig: int, postmaster_first: bool) -> None:
        if postmaster_first:
            self.proc.send_signal(sig)  # stopped first, it forks no backend the loop below would miss
        for pid in self._children():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not postmaster_first:
            self.proc.send_signal(sig)

    def pause(self) -> None:
        self._signal_all(signal.SIGSTOP, postmaster_first=True)

    def resume(self) -> None:
        if self.proc.poll() is None:
            self._signal_all(signal.SIGCONT, postmaster_first=False)

    def stop(self) -> None:
        self.resume()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: no checkpoint, the data is thrown away
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self._signal_all(signal.SIGKILL, postmaster_first=True)
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.base, ignore_errors=True)
