"""Shared fixtures.

`service(**settings)` starts a real `supervisor_service.app.Service` (grpc.aio)
on 127.0.0.1 with a free port, on its own asyncio loop in a daemon thread,
and stops it at teardown. It returns the `Service`: the bound address is
`service.addresses.grpc`, metrics are read with
`service.registry.get_sample_value(...)`. Defaults: no metrics endpoint, an
in-memory store (tests never share ./data), a short shutdown budget; any
setting can be overridden.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from supervisor_service.app.service import Service
from supervisor_service.app.settings import load_settings
from tests.support.servers import EtcdServer

SERVICE_DEFAULTS = dict(
    grpc_addr="127.0.0.1:0",
    metrics_addr="",
    store="memory",
    shutdown_timeout_ms=2000,
)


class _ServiceThread:
    """`asyncio.run(start() + wait())` in a daemon thread."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.error: BaseException | None = None
        self.exit_code: int | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._main, name="test-service-loop", daemon=True)

    def _main(self) -> None:
        async def main() -> int:
            try:
                await self.service.start()
            except BaseException as exc:
                self.error = exc
                raise
            finally:
                self._started.set()
            return await self.service.wait()

        try:
            self.exit_code = asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - surfaced by start()/stop()
            self.error = self.error or exc

    def start(self, timeout: float) -> None:
        self.thread.start()
        if not self._started.wait(timeout):
            raise AssertionError(f"service did not start within {timeout} s")
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float) -> None:
        if not self.thread.is_alive():
            return  # never started, or start() failed
        self.service.request_stop()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"service did not stop within {timeout} s")


@pytest.fixture
def service():
    """Factory: `service(tick_interval_ms=100, ..., remotes=..., kv=..., clock=...)` -> a started, leading `Service`."""
    running: list[_ServiceThread] = []

    def start(
        *, wait_leader: bool = True, start_timeout: float = 15.0, remotes=None, kv=None, clock=None, **settings
    ) -> Service:
        svc = Service(
            load_settings(**{**SERVICE_DEFAULTS, **settings}),
            registry=CollectorRegistry(), remotes=remotes, kv=kv, clock=clock,
        )
        runner = _ServiceThread(svc)
        running.append(runner)
        runner.start(start_timeout)
        if wait_leader:
            # The single replica loads its state on a transition thread after start() returns.
            deadline = time.monotonic() + start_timeout
            while not svc.supervisor.is_leader:
                if time.monotonic() > deadline:
                    raise AssertionError("the service did not become leader")
                time.sleep(0.005)
        return svc

    yield start
    errors = []
    for runner in reversed(running):
        try:
            runner.stop(15.0)
        except AssertionError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def logged(caplog):
    """logged(name) -> the fields of every log line named `name` (log_event's message is the event name)."""
    caplog.set_level(logging.DEBUG, logger="supervisor_service")

    def lines(name: str) -> list[dict]:
        return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]

    return lines


@pytest.fixture
def etcd(tmp_path):
    """A real etcd on 127.0.0.1 free ports, stopped at teardown."""
    server = EtcdServer(str(tmp_path))
    yield server
    server.stop()
