"""The one place that opens the state store's backend and the leadership that goes with it (docs/design.md §6)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from supervisor_service.cluster.etcd import EtcdElection
from supervisor_service.cluster.leadership import Leadership, SingleLeadership
from supervisor_service.cluster.postgres import PostgresElection
from supervisor_service.security.tls import ClientTLS
from supervisor_service.store import KV, EtcdKV, PostgresKV, open_kv


def open_cluster(
    store: str,
    *,
    data_dir: Path,
    prefix: str,
    advertise_addr: str,
    lease_ttl_ms: int,
    next_term: Callable[[], int],
    on_elected: Callable[[int], None],
    on_lost: Callable[[], None],
    allow_new_store: bool = False,
    kv: KV | None = None,
    etcd_tls: ClientTLS | None = None,
) -> tuple[KV, Leadership]:
    """The backend `store` names (or `kv`, when given) and who leads over it.

    On etcd and on PostgreSQL the replicas sharing `prefix` elect a leader
    (a lease of `lease_ttl_ms`); on any other store this replica is the only one and leads
    from `start`, under the term `next_term()` persists and returns. Nothing
    runs until the leadership's `start`; `advertise_addr` may be set again
    before it (once the port is bound).
    """
    kv = kv if kv is not None else open_kv(store, data_dir, allow_new_store=allow_new_store, etcd_tls=etcd_tls)
    if isinstance(kv, EtcdKV):
        return kv, EtcdElection(kv, prefix, advertise_addr, lease_ttl_ms, on_elected=on_elected, on_lost=on_lost)
    if isinstance(kv, PostgresKV):
        return kv, PostgresElection(kv, prefix, advertise_addr, lease_ttl_ms, on_elected=on_elected,
                                    on_lost=on_lost)
    return kv, SingleLeadership(advertise_addr, next_term=next_term, on_elected=on_elected, on_lost=on_lost)
