"""Shared fixtures; the harness itself lives in `tests/support`.

`service(**settings)` starts a real `supervisor_service.app.service.Service`
(grpc.aio) on 127.0.0.1 with a free port, on its own asyncio loop in a
daemon thread, waits until it is ready (SERVING and leading, see
`tests.support.readiness`), and stops it at teardown. It returns the
`Service`: the bound address is `service.addresses.grpc`, metrics are read
with `service.registry.get_sample_value(...)`. Defaults: no metrics
endpoint, an in-memory store (tests never share ./data), a short shutdown
budget; any setting can be overridden (`tests.support.service`).
"""

from __future__ import annotations

import logging

import pytest

from tests.support.backends import BACKENDS, EtcdBackend, PostgresBackend
from tests.support.servers import EtcdServer, PostgresServer
from tests.support.service import ServiceFactory

# Fixtures defined in support modules, for every test: `cert_files`, `other_ca_files`.
pytest_plugins = ("tests.support.certs",)


@pytest.fixture
def service():
    """Factory: `service(tick_interval_ms=100, ..., remotes=..., kv=..., clock=...)` -> a started, leading `Service`;
    `wait_leader=False`: ready once SERVING (a leader may still be loading its state)."""
    factory = ServiceFactory()
    yield factory
    factory.close()


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


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the whole test session (initdb takes seconds); each test takes its own database."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres(postgres_server):
    """A `PostgresBackend`: a new, empty database on the session's PostgreSQL."""
    return PostgresBackend(postgres_server)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """Each store that several replicas can share (tests.support.backends), one run of the test per store."""
    if request.param == "etcd":
        return EtcdBackend(request.getfixturevalue("etcd"))
    return PostgresBackend(request.getfixturevalue("postgres_server"))
