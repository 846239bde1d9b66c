"""The stores several replicas can share, behind one interface, so that one HA suite runs on each.

A `Backend` is a running etcd or PostgreSQL that a test may use alone:

- `store(endpoint=None)`: the `SUPERVISOR_STORE` setting, through `endpoint` (host:port, e.g. a
  `PausableProxy`) instead of the server's own address when given;
- `endpoint`: the server's host:port (what a proxy forwards to);
- `read_prefix(prefix)`: what is stored there, read with a fresh client;
- `pause()` / `resume()`: SIGSTOP / SIGCONT the server (its connections stay open, nothing answers).

etcd is a server per test (it starts in a fraction of a second); PostgreSQL is one server per test
session (initdb takes a few seconds) and a new database per test.
"""

from __future__ import annotations

import signal

from supervisor_service.store import EtcdKV, PostgresKV, parse_endpoints
from tests.support.servers import EtcdServer, PostgresServer

BACKENDS = ("etcd", "postgresql")


class EtcdBackend:
    name = "etcd"

    def __init__(self, server: EtcdServer) -> None:
        self.server = server
        self.endpoint = server.endpoint

    def store(self, endpoint: str | None = None) -> str:
        return f"etcd://{endpoint or self.endpoint}"

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        kv = EtcdKV(parse_endpoints(self.store()))
        try:
            return kv.read_prefix(prefix)
        finally:
            kv.close()

    def pause(self) -> None:
        self.server.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.server.proc.send_signal(signal.SIGCONT)


class PostgresBackend:
    name = "postgresql"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.endpoint = f"127.0.0.1:{server.port}"
        self._url = server.create_database()
        self._dbname = self._url.rsplit("/", 1)[1]

    def store(self, endpoint: str | None = None) -> str:
        return f"postgresql://postgres@{endpoint or self.endpoint}/{self._dbname}"

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        kv = PostgresKV(self.store())
        try:
            return kv.read_prefix(prefix)
        finally:
            kv.close()

    def pause(self) -> None:
        self.server.pause()

    def resume(self) -> None:
        self.server.resume()
