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

from supervisor_service._log import log_event
from supervisor_service.clock import Clock, SystemClock
from supervisor_service.etcd import EtcdElection, EtcdKV
from supervisor_service.events import BecomeLeader, EventQueue, LoseLeadership
from supervisor_service.guards import Guards
from supervisor_service.leadership import Leadership, SingleLeadership
from supervisor_service.metrics import Metrics
from supervisor_service.metrics_http import MetricsHTTPServer
from supervisor_service.remotes import PeerDirectory, Remotes, build_remotes
from supervisor_service.runtime import SupervisorRuntime, Ticker
from supervisor_service.server import RegionSupervisorServicer, build_server, set_health
from supervisor_service.settings import Settings
from supervisor_service.store import KV, JournalAppend, StateStore, StoredState, StoreError, TermSet, open_kv
from supervisor_service.supervisor import Supervisor

log = logging.getLogger("supervisor_service.app")

EXIT_SUPERVISOR_DIED = 70  # EX_SOFTWARE


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
        self.queue = EventQueue(s.event_queue_size)
        self.metrics.bind_queue(lambda: len(self.queue), self.queue.oldest_age)
        self.directory = PeerDirectory(self.clock)
        self.kv = kv if kv is not None else open_kv(s.store, s.data_dir)
        self.store = StateStore(
            self.kv,
            s.store_prefix,
            flush_interval_s=s.store_flush_interval_ms / 1000,
            journal_capacity=s.journal_capacity,
            on_fenced=lambda: self._step_down("a store write was fenced: another replica leads"),
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
            self.remotes.journal.set_persist(lambda entry, term: self.store.submit([JournalAppend(entry, term)]))
        self.leadership: Leadership | None = None  # built in start, once the address is known
        self.supervisor = Supervisor(
            s.detector_options(),
            self.metrics,
            s.failover_policy(),
            is_leader=False,
            leader_term=0,
            guards=Guards(gs) if (gs := s.guard_settings()) is not None else None,
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
        self.leader_since: float | None = None

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
            supervisor=self.supervisor,
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
        self.leadership.start()
        await set_health(self.health, True)
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
            s.advertise_addr or s.grpc_addr,
            next_term=self._next_single_term,
            on_elected=self._on_elected,
            on_lost=self._on_lost,
        )

    def _next_single_term(self) -> int:
        """Bump the stored term before anything is submitted under it."""
        term = self._load_state().term + 1
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
        self._transitions.submit(self._become_leader, term)

    def _on_lost(self) -> None:
        # Stop ticking at once, on the caller's thread; the rest follows in order.
        self.ticker.stop()
        self.leader_since = None
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
        self.leader_since = self.clock.monotonic()
        if self._start_ticker:
            self.ticker.start(clear=False)  # BecomeLeader already cleared and rebuilt the table

    def _lose_leadership(self) -> None:
        self.ticker.stop()
        if not self.queue.closed:
            self.queue.put_control(LoseLeadership())

    def _step_down(self, reason: str = "") -> None:
        if self.leadership is not None:
            self.leadership.step_down(reason or "fenced")

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
        health NOT_SERVING, stop accepting RPCs, step down (ticker stops, lease revoked),
        drain the supervisor thread, commit pending state, close remotes, stop metrics."""
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
            await set_health(self.health, False)
            if self.servicer is not None:
                self.servicer.close_streams()  # heartbeat streams never end by themselves
            await self.server.stop(grace=budget / 2)
        self.ticker.stop()
        if self.leadership is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.leadership.resign)
        self._transitions.shutdown(wait=False, cancel_futures=True)
        drained = self.runtime.stop(timeout=remaining())
        committed = self.store.stop(timeout=remaining())
        self.store.close()
        self.remotes.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        log_event(log, logging.INFO, "service_stopped", drained=drained, committed=committed,
                  exit_code=self.exit_code)


_EMBEDDED_MEANING = {
    "peer_lookup": "datanode addresses come from their heartbeats (peer_addr)",
    "selector": "targets are chosen round-robin among datanodes heard from recently",
    "region_migration": "DRY RUN: failover decisions are journaled, nothing is migrated",
}
