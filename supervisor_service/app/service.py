"""Wiring and lifecycle of the whole service.

`Service` builds every component from `Settings`, starts them, and shuts
them down in a fixed order, once, within a time budget:
health NOT_SERVING -> stop accepting RPCs (grace period) -> stop the ticker
-> drain and stop the supervisor thread -> close remote channels -> stop the
metrics server. Signal handlers live in `cli.main`, not here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.metrics_http import MetricsHTTPServer
from supervisor_service.app.settings import Settings
from supervisor_service.cluster import EtcdElection, Leadership, SingleLeadership
from supervisor_service.core import (
    BecomeLeader,
    Clock,
    CoreStatus,
    Guards,
    JournalAppend,
    LoseLeadership,
    StoredState,
    Supervisor,
    SystemClock,
    TermSet,
    log_event,
)
from supervisor_service.edge import RegionSupervisorServicer, build_server, set_health
from supervisor_service.remotes import PeerDirectory, Remotes, build_remotes
from supervisor_service.runtime import EventQueue, SupervisorRuntime, Ticker
from supervisor_service.store import KV, EtcdKV, StateStore, StoreError, StoreGone, open_kv

log = logging.getLogger("supervisor_service.app")

EXIT_SUPERVISOR_DIED = 70  # EX_SOFTWARE
EXIT_STORE_GONE = 74  # EX_IOERR: the state store was deleted or replaced while the service ran
EXIT_STORE_UNCOMMITTED = 75  # EX_TEMPFAIL: shutdown could not commit pending state (the store kept failing)


def _status_of(supervisor: Supervisor) -> CoreStatus:
    """Temporary adapter until the core publishes CoreStatus: built from the attributes the edge
    used to read. With the guards off it knows only the maintenance hold (the warm-up state is
    the supervisor thread's alone)."""
    guards = supervisor.guards
    if guards is not None:
        holds, fraction = guards.active_holds, guards.mass_failure_fraction
    else:
        holds, fraction = ("maintenance",) if supervisor.maintenance else (), 0.0
    return CoreStatus(
        is_leader=supervisor.is_leader,
        term=supervisor.leader_term,
        maintenance=supervisor.maintenance,
        maintenance_until_ms=supervisor.maintenance_until_ms,
        datanode_maintenance=tuple(sorted(supervisor.datanode_maintenance.items())),
        holds=holds,
        failed_datanode_fraction=fraction,
        guards_enabled=guards is not None,
    )


@dataclass
class Addresses:
    grpc: str
    metrics: str


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
        remotes: Remotes | None = None,
        kv: KV | None = None,
    ) -> None:
        self.settings = s = settings
        self.clock = clock or SystemClock()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.queue = EventQueue(
            s.event_queue_size,
            max_heartbeat_bytes=s.max_queued_heartbeat_bytes,
            datanode_fraction=s.max_queue_fraction_per_datanode,
        )
        self.metrics.bind_queue(lambda: len(self.queue), self.queue.oldest_age)
        self.metrics.queue_heartbeat_bytes.set_function(lambda: self.queue.heartbeat_bytes)
        # A lower node_epoch is a new life once the newest has been silent as long as a detector tolerates.
        self.directory = PeerDirectory(self.clock, new_life_after_ms=s.acceptable_heartbeat_pause_ms)
        self.kv = kv if kv is not None else open_kv(s.store, s.data_dir, allow_new_store=s.allow_new_store)
        self.store = StateStore(
            self.kv,
            s.store_prefix,
            flush_interval_s=s.store_flush_interval_ms / 1000,
            journal_capacity=s.journal_capacity,
            on_fenced=lambda: self._step_down("a store write was fenced: another replica leads"),
            holds_term=lambda term: self.leadership is not None and self.leadership.holds(term),
            on_health=self._on_store_health,
            on_gone=self._on_store_gone,
            metrics=self.metrics,
        )
        self.remotes = remotes or build_remotes(
            clock=self.clock,
            directory=self.directory,
            selector_endpoint=s.selector_endpoint,
            peer_lookup_endpoint=s.peer_lookup_endpoint,
            region_migration_endpoint=s.region_migration_endpoint,
            timeout_s=s.remote_timeout_ms / 1000,
            alive_window_ms=s.selector_alive_window,
            journal_capacity=s.journal_capacity,
        )
        if self.remotes.journal is not None:
            self.remotes.journal.set_persist(
                lambda entry, term: self.store.submit([JournalAppend(entry, term)], term=term)
            )
        self.leadership: Leadership | None = None  # built in start, once the address is known
        self.supervisor = Supervisor(
            s.detector_options(),
            self.metrics,
            s.failover_policy(),
            is_leader=False,
            leader_term=0,
            guards=Guards(gs) if (gs := s.guard_settings()) is not None else None,
            clock_base=self.clock.base(),
        )
        self.runtime = SupervisorRuntime(
            self.supervisor,
            self.queue,
            self.clock,
            self.metrics,
            self.remotes,
            workers=s.failover_workers,
            on_death=self._on_supervisor_death,
            store=self.store,
            is_leader=lambda: self.leadership is not None and self.leadership.is_leader(),
            on_fenced=self._step_down,
        )
        self.ticker = Ticker(self.queue, self.runtime, self.clock, self.metrics, s.tick_interval_ms / 1000)
        self.servicer: RegionSupervisorServicer | None = None
        # The grpc.aio server and health servicer belong to the event loop that runs
        # them, so they are built in `start`.
        self.server = None
        self.health = None
        self.addresses = Addresses(grpc="", metrics="")
        self.exit_code = 0
        self._metrics_server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._stopped: asyncio.Future | None = None
        self._start_ticker = True
        # Leadership transitions run here, one at a time, off the election's and the gRPC loop's threads.
        self._transitions = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leadership")
        # Health: SERVING from start until stop, except while something in `_unhealthy` says otherwise.
        self._unhealthy: dict[str, str] = {}
        self._serving = False
        self._started = False
        self._health_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------ start

    async def start(self, *, start_ticker: bool = True) -> Addresses:
        s = self.settings
        self._start_ticker = start_ticker
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        host, _, _ = s.grpc_addr.rpartition(":")
        self.leadership = self._build_leadership()
        self.servicer = RegionSupervisorServicer(
            settings=s,
            queue=self.queue,
            status=lambda: _status_of(self.supervisor),  # TODO: self.supervisor.status once the core publishes it
            clock=self.clock,
            metrics=self.metrics,
            directory=self.directory,
            journal=self.remotes.journal,
            leadership=self.leadership,
            store=self.store,
        )
        self.server, self.health = build_server(self.servicer, s)
        try:
            port = self.server.add_insecure_port(s.grpc_addr)
        except RuntimeError:  # grpc.aio raises where the sync server returned 0
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {s.grpc_addr} (setting grpc_addr): address in use or not assignable")
        self.addresses.grpc = f"{host}:{port}"
        self._advertise = s.advertise_addr or self.addresses.grpc
        if s.metrics_addr:
            mhost, _, mport = s.metrics_addr.rpartition(":")
            try:
                self._metrics_server = MetricsHTTPServer(
                    self.registry, mhost.strip("[]"), int(mport),
                    max_connections=s.metrics_max_connections,
                    timeout_s=s.metrics_timeout_ms / 1000,
                    on_drop=lambda reason: self.metrics.metrics_http_errors.labels(reason=reason).inc(),
                    on_open=self.metrics.metrics_http_connections.set,
                ).start()
            except OSError as exc:
                raise OSError(
                    f"cannot serve metrics on {s.metrics_addr} (setting metrics_addr): {exc.strerror or exc}"
                ) from None
            self.addresses.metrics = f"{mhost}:{self._metrics_server.server_port}"
        self.store.start()
        self.runtime.start()
        await self.server.start()
        self.leadership.advertise_addr = self._advertise  # the bound port, when grpc_addr asked for port 0
        # Off the event loop: a single replica reads its store and commits its new term here, and
        # the loop must go on answering (and hear a SIGTERM) meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, self.leadership.start)
        self._started = True
        await self._apply_health()
        log_event(
            log,
            logging.INFO,
            "service_started",
            grpc=self.addresses.grpc,
            metrics=self.addresses.metrics or "off",
            store=s.store,
            data_dir=str(s.data_dir) if s.store == "sqlite" else "",
            tick_interval_ms=s.tick_interval_ms,
            heartbeat_clock=s.heartbeat_clock,
            **self.remotes.describe(),
        )
        for name, kind in self.remotes.describe().items():
            if kind == "embedded":
                log_event(log, logging.WARNING, "embedded_service_in_use", service=name,
                          meaning=_EMBEDDED_MEANING[name])
        return self.addresses

    def _build_leadership(self) -> Leadership:
        s = self.settings
        if isinstance(self.kv, EtcdKV):
            return EtcdElection(
                self.kv, s.store_prefix, s.advertise_addr, s.leader_lease_ttl_ms,
                on_elected=self._on_elected, on_lost=self._on_lost,
            )
        return SingleLeadership(
            s.advertised,
            next_term=self._next_single_term,
            on_elected=self._on_elected,
            on_lost=self._on_lost,
        )

    def _next_single_term(self) -> int:
        """Bump the stored term before anything is submitted under it. It never goes back: it is
        above the store's own and above the highest the data directory remembers (a store that
        was deleted and begun again, or restored from a backup, still gets a higher term)."""
        # At start a store that cannot be read is a failure to start (exit 69), not a wait for ever.
        term = max(self.store.load().term, self.kv.term_floor()) + 1
        self.kv.note_term(term)
        self.store.submit([TermSet(term)])
        self.store.flush()
        return term

    def _load_state(self) -> StoredState:
        delay = 0.1
        while True:
            try:
                return self.store.load()
            except StoreError as exc:
                if self._stopped is not None:
                    raise
                log_event(log, logging.ERROR, "state_load_failed", error=str(exc), retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------ leadership

    def _on_elected(self, term: int) -> None:
        self.store.leadership_changed()
        self._transitions.submit(self._become_leader, term)

    def _on_lost(self) -> None:
        # Stop ticking at once, on the caller's thread; the rest follows in order.
        self.ticker.stop()
        # Writes of the term that ended are answered now, not when etcd answers (or never).
        self.store.leadership_changed()
        self._transitions.submit(self._lose_leadership)

    def _become_leader(self, term: int) -> None:
        if self.settings.initialization_delay_ms:
            time.sleep(self.settings.initialization_delay_ms / 1000)
        state = self._load_state()
        if self.leadership is None or not self.leadership.is_leader() or self.leadership.term != term:
            return  # lost it while loading
        if self.remotes.journal is not None:
            self.remotes.journal.restore(state.journal, state.journal_term)
        self.queue.put_control(BecomeLeader(term, state))
        if self._start_ticker:
            self.ticker.start(clear=False)  # BecomeLeader already cleared and rebuilt the table

    def _lose_leadership(self) -> None:
        self.ticker.stop()
        if not self.queue.closed:
            self.queue.put_control(LoseLeadership())

    def _step_down(self, reason: str = "") -> None:
        if self.leadership is not None:
            self.leadership.step_down(reason or "fenced")
            if isinstance(self.leadership, SingleLeadership):
                # The only replica will not lead again in this life: it must not look healthy.
                self._set_unhealthy("leadership", reason or "fenced")

    # ------------------------------------------------------------ health

    def _on_store_health(self, healthy: bool, error: str) -> None:
        """From the store's writer: NOT_SERVING while the store cannot commit, SERVING once it does."""
        self._set_unhealthy("store", "" if healthy else error)

    def _on_store_gone(self, exc: StoreGone) -> None:
        """The store's file was deleted or replaced: nothing more can be made durable; exit non-zero."""
        self._set_unhealthy("store", str(exc))
        if self.exit_code == 0:
            self.exit_code = EXIT_STORE_GONE
        self.ticker.stop()
        self.request_stop()

    def _set_unhealthy(self, key: str, reason: str) -> None:
        """Any thread: record (or clear, with '') a reason for NOT_SERVING and update the health service."""
        if reason:
            self._unhealthy[key] = reason
        else:
            self._unhealthy.pop(key, None)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: loop.create_task(self._apply_health()))
            except RuntimeError:  # the loop closed meanwhile
                pass

    async def _apply_health(self) -> None:
        """Set the health service to what the state says now; one change at a time."""
        if self._health_lock is None:
            self._health_lock = asyncio.Lock()
        async with self._health_lock:
            serving = self._started and self._stopped is None and not self._unhealthy
            if self.health is None or serving == self._serving:
                return
            self._serving = serving
            await set_health(self.health, serving)
            if not serving and self._unhealthy:
                log_event(log, logging.ERROR, "not_serving", **{k: v for k, v in self._unhealthy.items()})

    def _on_supervisor_death(self, exc: BaseException) -> None:
        """Called on the dying supervisor thread: get the event loop to shut down with an error."""
        self.exit_code = EXIT_SUPERVISOR_DIED
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)

    def request_stop(self) -> None:
        """Thread-safe and signal-safe: ask `wait` to return."""
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)

    async def wait(self) -> int:
        assert self._done is not None
        await self._done.wait()
        await self.stop()
        return self.exit_code

    # ------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Idempotent; the steps run in this order and within shutdown_timeout_ms overall:
        health NOT_SERVING, stop accepting RPCs, stop the ticker, commit what was handled under
        the current term, step down (lease revoked), drain the supervisor thread, commit pending
        state (exit EXIT_STORE_UNCOMMITTED if it cannot be), close remotes, stop metrics."""
        if self._stopped is not None:
            await asyncio.shield(self._stopped)  # a second caller waits for the first to finish
            return
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            await self._stop_steps()
        finally:
            self._stopped.set_result(None)

    async def _stop_steps(self) -> None:
        budget = self.settings.shutdown_timeout_ms / 1000
        started = self.clock.monotonic()

        def remaining() -> float:
            return max(0.1, budget - (self.clock.monotonic() - started))

        if self.server is not None:
            await self._apply_health()  # NOT_SERVING: _stopped is set
            if self.servicer is not None:
                self.servicer.close_streams()  # heartbeat streams never end by themselves
            await self.server.stop(grace=budget / 2)
        self.ticker.stop()
        loop = asyncio.get_running_loop()
        # Commit what was handled while this replica's term still holds (etcd: before the lease goes).
        await loop.run_in_executor(None, self._flush_quietly, min(remaining(), 2.0))
        if self.leadership is not None:
            await loop.run_in_executor(None, self.leadership.resign)
        self._transitions.shutdown(wait=False, cancel_futures=True)
        drained = self.runtime.stop(timeout=remaining())
        committed = self.store.stop(timeout=remaining())
        if not committed and self.exit_code == 0:
            self.exit_code = EXIT_STORE_UNCOMMITTED
            log_event(log, logging.ERROR, "store_uncommitted_at_shutdown", error=self.store.unavailable() or "unknown")
        self.store.close()
        self.remotes.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        log_event(log, logging.INFO, "service_stopped", drained=drained, committed=committed,
                  exit_code=self.exit_code)

    def _flush_quietly(self, timeout: float) -> None:
        try:
            self.store.flush(timeout)
        except StoreError:
            pass  # not committed now: store.stop tries again and reports it


_EMBEDDED_MEANING = {
    "peer_lookup": "datanode addresses come from their heartbeats (peer_addr)",
    "selector": "targets are chosen round-robin among datanodes heard from recently",
    "region_migration": "DRY RUN: failover decisions are journaled, nothing is migrated",
}
