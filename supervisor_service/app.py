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
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server

from supervisor_service._log import log_event
from supervisor_service.clock import Clock, SystemClock
from supervisor_service.events import EventQueue
from supervisor_service.metrics import Metrics
from supervisor_service.remotes import PeerDirectory, Remotes, build_remotes
from supervisor_service.runtime import SupervisorRuntime, Ticker
from supervisor_service.server import Leadership, RegionSupervisorServicer, build_server, set_health
from supervisor_service.settings import Settings
from supervisor_service.supervisor import FailoverPolicy, Supervisor

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
    ) -> None:
        self.settings = s = settings
        self.clock = clock or SystemClock()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.queue = EventQueue(s.event_queue_size)
        self.metrics.bind_queue(lambda: len(self.queue), self.queue.oldest_age)
        self.directory = PeerDirectory(self.clock)
        self.remotes = remotes or build_remotes(
            clock=self.clock,
            directory=self.directory,
            selector_endpoint=s.selector_endpoint,
            peer_lookup_endpoint=s.peer_lookup_endpoint,
            region_migration_endpoint=s.region_migration_endpoint,
            timeout_s=s.remote_timeout_ms / 1000,
            alive_window_ms=s.selector_alive_window_ms or int(s.acceptable_heartbeat_pause_ms),
            journal_capacity=s.journal_capacity,
        )
        self.leadership = Leadership(advertise_addr=s.advertised)
        self.supervisor = Supervisor(
            s.detector_options(),
            self.metrics,
            FailoverPolicy(
                base_timeout_ms=s.migration_base_timeout_ms,
                status_poll_interval_ms=s.migration_status_poll_interval_ms,
            ),
            leader_term=self.leadership.term,
        )
        self.runtime = SupervisorRuntime(
            self.supervisor,
            self.queue,
            self.clock,
            self.metrics,
            self.remotes,
            workers=s.failover_workers,
            on_death=self._on_supervisor_death,
        )
        self.ticker = Ticker(self.queue, self.runtime, self.clock, self.metrics, s.tick_interval_ms / 1000)
        self.servicer = RegionSupervisorServicer(
            settings=s,
            queue=self.queue,
            supervisor=self.supervisor,
            clock=self.clock,
            metrics=self.metrics,
            directory=self.directory,
            journal=self.remotes.journal,
            leadership=self.leadership,
        )
        # The grpc.aio server and health servicer belong to the event loop that runs
        # them, so they are built in `start`.
        self.server = None
        self.health = None
        self.addresses = Addresses(grpc="", metrics="")
        self.exit_code = 0
        self._metrics_server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._stopped = False

    # ------------------------------------------------------------ start

    async def start(self, *, start_ticker: bool = True) -> Addresses:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.server, self.health = build_server(self.servicer, s)
        host, _, _ = s.grpc_addr.rpartition(":")
        port = self.server.add_insecure_port(s.grpc_addr)
        if port == 0:
            raise OSError(f"cannot listen on {s.grpc_addr} (setting grpc_addr): address in use or invalid")
        self.addresses.grpc = f"{host}:{port}"
        if s.metrics_addr:
            mhost, _, mport = s.metrics_addr.rpartition(":")
            self._metrics_server, _ = start_http_server(int(mport), addr=mhost.strip("[]"), registry=self.registry)
            self.addresses.metrics = f"{mhost}:{self._metrics_server.server_port}"
        self.runtime.start()
        await self.server.start()
        if start_ticker:
            self.ticker.start()
        await set_health(self.health, True)
        log_event(
            log,
            logging.INFO,
            "service_started",
            grpc=self.addresses.grpc,
            metrics=self.addresses.metrics or "off",
            tick_interval_ms=s.tick_interval_ms,
            heartbeat_clock=s.heartbeat_clock,
            **self.remotes.describe(),
        )
        for name, kind in self.remotes.describe().items():
            if kind == "embedded":
                log_event(log, logging.WARNING, "embedded_service_in_use", service=name,
                          meaning=_EMBEDDED_MEANING[name])
        return self.addresses

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
        """Idempotent; the steps run in this order and within shutdown_timeout_ms overall."""
        if self._stopped:
            return
        self._stopped = True
        budget = self.settings.shutdown_timeout_ms / 1000
        started = self.clock.monotonic()
        if self.server is not None:
            await set_health(self.health, False)
            await self.server.stop(grace=budget / 2)
        self.ticker.stop()
        remaining = max(0.1, budget - (self.clock.monotonic() - started))
        drained = self.runtime.stop(timeout=remaining)
        self.remotes.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log_event(log, logging.INFO, "service_stopped", drained=drained, exit_code=self.exit_code)


_EMBEDDED_MEANING = {
    "peer_lookup": "datanode addresses come from their heartbeats (peer_addr)",
    "selector": "targets are chosen round-robin among datanodes heard from recently",
    "region_migration": "DRY RUN: failover decisions are journaled, nothing is migrated",
}
