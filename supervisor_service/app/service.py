"""Lifecycle of the whole service: start, leadership transitions, health, shutdown (docs/design.md §9, §10).

`Service` has its parts built from `Settings` (`app/wiring.py`), starts
them, runs the leadership transitions one at a time, and shuts them down in
a fixed order, once, within a time budget: health NOT_SERVING -> stop
accepting RPCs (grace period) -> stop the ticker -> drain and stop the
supervisor thread -> close remote channels -> stop the metrics server.
Signal handlers live in `cli.main`, not here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from supervisor_service.app.settings import Settings
from supervisor_service.app.tls import server_certificates
from supervisor_service.app.wiring import Hooks, bind_grpc, build_edge, build_parts, serve_metrics
from supervisor_service.cluster import SingleLeadership
from supervisor_service.core import BecomeLeader, Clock, LoseLeadership, StoredState, TermSet, log_event
from supervisor_service.edge import RegionSupervisorServicer, set_health
from supervisor_service.remotes import Remotes
from supervisor_service.store import KV, StoreError, StoreGone, redact

log = logging.getLogger("supervisor_service.app")

EXIT_SUPERVISOR_DIED = 70  # EX_SOFTWARE
EXIT_STORE_GONE = 74  # EX_IOERR: the state store was deleted or replaced while the service ran
EXIT_STORE_UNCOMMITTED = 75  # EX_TEMPFAIL: shutdown could not commit pending state (the store kept failing)


@dataclass
class Addresses:
    grpc: str
    metrics: str


class Service:
    """One replica: its parts (`app/wiring.py`), started, led and stopped in order."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
        remotes: Remotes | None = None,
        kv: KV | None = None,
    ) -> None:
        self.settings = settings
        hooks = Hooks(
            on_elected=self._on_elected,
            on_lost=self._on_lost,
            next_single_term=self._next_single_term,
            step_down=self._step_down,
            on_store_health=self._on_store_health,
            on_store_gone=self._on_store_gone,
            on_supervisor_death=self._on_supervisor_death,
        )
        self.parts = p = build_parts(settings, hooks, clock=clock, registry=registry, remotes=remotes, kv=kv)
        self.clock, self.registry, self.metrics = p.clock, p.registry, p.metrics
        self.queue, self.directory, self.remotes = p.queue, p.directory, p.remotes
        self.kv, self.leadership, self.store = p.kv, p.leadership, p.store
        self.supervisor, self.runtime, self.ticker = p.supervisor, p.runtime, p.ticker
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
        self._lost: Future | None = None  # the last LoseLeadership hand-over queued there
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
        self.servicer, self.server, self.health = build_edge(s, self.parts)
        certificates = server_certificates(s, on_reload=lambda o: self.parts.metrics.tls_reloads.labels(outcome=o).inc())
        self.addresses.grpc = bind_grpc(self.server, s.grpc_addr, certificates)
        advertise = s.advertise_addr or self.addresses.grpc
        self._metrics_server, self.addresses.metrics = serve_metrics(s, self.parts)
        self.store.start()
        self.runtime.start()
        await self.server.start()
        self.leadership.advertise_addr = advertise  # the bound port, when grpc_addr asked for port 0
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
            store=redact(s.store),
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
        try:
            self._lost = self._transitions.submit(self._lose_leadership)
        except RuntimeError:  # the transitions were shut down (the service is stopping): hand it over here
            self._lose_leadership()

    def _become_leader(self, term: int) -> None:
        if self.settings.initialization_delay_ms:
            time.sleep(self.settings.initialization_delay_ms / 1000)
        state = self._load_state()
        if not self.leadership.is_leader() or self.leadership.term != term:
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
        await loop.run_in_executor(None, self.leadership.resign)
        self._transitions.shutdown(wait=False, cancel_futures=True)
        if self._lost is not None and self._lost.cancelled():
            # Queued behind a transition still under way, and cancelled with it: the supervisor must
            # still hear that this replica no longer leads before it drains.
            self._lose_leadership()
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
