"""Opens the backend a `store` setting names (`sqlite`, `memory`, `etcd://host:port[,host:port]`,
`postgresql://user@host:port/dbname`)."""

from __future__ import annotations

from pathlib import Path

from supervisor_service.security.tls import ClientTLS
from supervisor_service.store.etcd import EtcdKV
from supervisor_service.store.kv import KV, MemoryKV, StoreError
from supervisor_service.store.postgres import PostgresKV, redact
from supervisor_service.store.sqlite import SqliteKV


def parse_endpoints(store: str) -> list[tuple[str, int]]:
    """`etcd://h1:p1,h2:p2` (or `etcds://`) -> [(h1, p1), (h2, p2)]; ValueError naming what is wrong."""
    body = store.removeprefix("etcds://").removeprefix("etcd://").strip("/")
    endpoints = []
    for part in body.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {part!r} is not host:port (store={store!r})")
        endpoints.append((host, int(port)))
    if not endpoints:
        raise ValueError(f"no etcd endpoint in store={store!r}")
    return endpoints


def open_kv(store: str, data_dir: Path, *, allow_new_store: bool = False, etcd_tls: ClientTLS | None = None) -> KV:
    """The backend a `store` setting names: `sqlite`, `memory`, `etcd://host:port[,host:port]` (`etcds://`
    with `etcd_tls`) or `postgresql://user[:password]@host[:port]/dbname` (`postgres://` too)."""
    if store == "sqlite":
        return SqliteKV(data_dir, allow_new_store=allow_new_store)
    if store == "memory":
        return MemoryKV()
    if store.startswith("etcds://"):
        return EtcdKV(parse_endpoints(store), tls=etcd_tls or ClientTLS())
    if store.startswith("etcd://"):
        return EtcdKV(parse_endpoints(store))
    if is_postgres(store):
        return PostgresKV(store)
    raise StoreError(f"unknown store {redact(store)!r}: use sqlite, memory, etcd://host:port[,host:port] "
                     "or postgresql://user@host:port/dbname")


def is_postgres(store: str) -> bool:
    return store.startswith(("postgresql://", "postgres://"))
