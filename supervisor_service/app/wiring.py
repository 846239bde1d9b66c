"""Building the service's parts from `Settings` (nothing here starts a thread or binds a port; docs/design.md §9).

`build_parts` makes every component and connects them; the `Service`
(`app/service.py`) starts them, runs the leadership transitions and shuts
them down. The gRPC server and the metrics endpoint belong to the event loop
that serves them, so `build_edge` and `serve_metrics` are called from
`Service.start`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.metrics_http import MetricsHTTPServer
from supervisor_service.app.settings import Settings
from supervisor_service.app.tls import etcd_tls, metrics_ssl_context, remote_tls
from supervisor_service.cluster import Leadership, open_cluster
from supervisor_service.core import Clock, Guards, JournalAppend, Supervisor, SystemClock
from supervisor_service.edge import RegionSupervisorServicer, build_server
from supervisor_service.remotes import PeerDirectory, Remotes, build_remotes
from supervisor_service.runtime import EventQueue, SupervisorRuntime, Ticker
from supervisor_service.security.tls import ServerCertificates
from supervisor_service.store import KV, StateStore, StoreGone


@dataclass(frozen=True, slots=True)
class Hooks:
    """What the parts report to the service that runs them (each called on the reporting part's thread)."""

    on_elected: Callable[[int], None]
    on_lost: Callable[[], None]
    next_single_term: Callable[[], int]  # a single replica's new term, persisted
    step_down: Callable[[str], None]  # a write or a submission was fenced: another replica leads
    on_store_health: Callable[[bool, str], None]
    on_store_gone: Callable[[StoreGone], None]
    on_supervisor_death: Callable[[BaseException], None]


@dataclass(frozen=True, slots=True)
class Parts:
    """Every component of one service, connected, none started."""

    clock: Clock
    registry: CollectorRegistry
    metrics: Metrics
    queue: EventQueue
    directory: PeerDirectory
    kv: KV
    leadership: Leadership
    store: StateStore
    remotes: Remotes
    supervisor: Supervisor
    runtime: SupervisorRuntime
    ticker: Ticker


def build_parts(
    s: Settings,
    hooks: Hooks,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    remotes: Remotes | None = None,
    kv: KV | None = None,
) -> Parts:
    """The parts the settings ask for; `clock`, `registry`, `remotes` and `kv` replace the defaults (tests)."""
    clock = clock or SystemClock()
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    queue = EventQueue(
        s.event_queue_size,
        max_heartbeat_bytes=s.max_queued_heartbeat_bytes,
        datanode_fraction=s.max_queue_fraction_per_datanode,
        clock=clock,
    )
    metrics.bind_queue(lambda: len(queue), queue.oldest_age)
    metrics.queue_capacity.set(s.event_queue_size)
    metrics.queue_heartbeat_bytes.set_function(lambda: queue.heartbeat_bytes)
    # A lower node_epoch is a new life once the newest has been silent as long as a detector tolerates.
    directory = PeerDirectory(clock, new_life_after_ms=s.acceptable_heartbeat_pause_ms)
    kv, leadership = open_cluster(
        s.store,
        data_dir=s.data_dir,
        allow_new_store=s.allow_new_store,
        prefix=s.store_prefix,
        advertise_addr=s.advertised,  # set again once the port is bound
        lease_ttl_ms=s.leader_lease_ttl_ms,
        next_term=hooks.next_single_term,
        on_elected=hooks.on_elected,
        on_lost=hooks.on_lost,
        kv=kv,
        etcd_tls=etcd_tls(s),
    )
    store = StateStore(
        kv,
        s.store_prefix,
        flush_interval_s=s.store_flush_interval_ms / 1000,
        journal_capacity=s.journal_capacity,
        audit_capacity=s.audit_capacity,
        on_fenced=lambda: hooks.step_down("a store write was fenced: another replica leads"),
        holds_term=leadership.holds,
        on_health=hooks.on_store_health,
        on_gone=hooks.on_store_gone,
        metrics=metrics,
    )
    remotes = remotes or build_remotes(
        clock=clock,
        directory=directory,
        selector_endpoint=s.selector_endpoint,
        peer_lookup_endpoint=s.peer_lookup_endpoint,
        region_migration_endpoint=s.region_migration_endpoint,
        timeout_s=s.remote_timeout_ms / 1000,
        alive_window_ms=s.selector_alive_window,
        journal_capacity=s.journal_capacity,
        tls=remote_tls(s),
    )
    if remotes.journal is not None:
        remotes.journal.set_persist(lambda entry, term: store.submit([JournalAppend(entry, term)], term=term))
    supervisor = Supervisor(
        s.detector_options(),
        metrics,
        s.failover_policy(),
        is_leader=False,
        leader_term=0,
        guards=Guards(gs) if (gs := s.guard_settings()) is not None else None,
        clock_base=clock.base(),
    )
    runtime = SupervisorRuntime(
        supervisor,
        queue,
        clock,
        metrics,
        remotes,
        workers=s.failover_workers,
        on_death=hooks.on_supervisor_death,
        store=store,
        is_leader=leadership.is_leader,
        on_fenced=hooks.step_down,
        leader_term=lambda: leadership.term,
    )
    ticker = Ticker(queue, runtime, clock, metrics, s.tick_interval_ms / 1000)
    return Parts(clock, registry, metrics, queue, directory, kv, leadership, store, remotes, supervisor, runtime,
                 ticker)


def build_edge(s: Settings, parts: Parts):
    """(servicer, grpc.aio server, health servicer), on the running event loop; no port bound yet."""
    servicer = RegionSupervisorServicer(
        settings=s,
        queue=parts.queue,
        status=lambda: parts.supervisor.status,
        clock=parts.clock,
        metrics=parts.metrics,
        directory=parts.directory,
        journal=parts.remotes.journal,
        leadership=parts.leadership,
        store=parts.store,
    )
    server, health = build_server(servicer, s, parts.metrics.grpc_server)
    return servicer, server, health


def bind_grpc(server, grpc_addr: str, certificates: ServerCertificates | None = None) -> str:
    """Bind `grpc_addr` (port 0: any free one), TLS only when `certificates` are given; the address
    bound, or OSError naming the setting."""
    host, _, _ = grpc_addr.rpartition(":")
    try:
        port = (server.add_insecure_port(grpc_addr) if certificates is None
                else server.add_secure_port(grpc_addr, certificates.credentials()))
    except RuntimeError:  # grpc.aio raises where the sync server returned 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {grpc_addr} (setting grpc_addr): address in use or not assignable")
    return f"{host}:{port}"


def serve_metrics(s: Settings, parts: Parts) -> tuple[MetricsHTTPServer | None, str]:
    """The /metrics endpoint `metrics_addr` asks for, started, and its address; (None, '') when off."""
    if not s.metrics_addr:
        return None, ""
    mhost, _, mport = s.metrics_addr.rpartition(":")
    metrics = parts.metrics
    try:
        server = MetricsHTTPServer(
            parts.registry, mhost.strip("[]"), int(mport),
            max_connections=s.metrics_max_connections,
            timeout_s=s.metrics_timeout_ms / 1000,
            on_drop=lambda reason: metrics.metrics_http_errors.labels(reason=reason).inc(),
            on_open=metrics.metrics_http_connections.set,
            ssl_context=metrics_ssl_context(s),
        ).start()
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on {s.metrics_addr} (setting metrics_addr): {exc.strerror or exc}"
        ) from None
    return server, f"{mhost}:{server.server_port}"
