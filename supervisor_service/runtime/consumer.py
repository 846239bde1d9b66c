"""The threads around the pure supervisor: the consumer, the failover workers, the ticker.

- `SupervisorRuntime` runs one named thread that takes events off the queue,
  hands them to `Supervisor.handle`, answers replies and passes effects to a
  small pool of failover workers. Workers make the remote calls (each with a
  deadline) and put the results back as events.
- `Ticker` enqueues a Clear once, then a Tick every interval; a tick that is
  due while the previous one is still queued is skipped, not piled up.

If the consumer dies (a bug), `on_death` is called once: the service then
reports NOT_SERVING and exits non-zero. It never keeps answering while the
thread that owns the table is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    SUBMIT_AMBIGUOUS,
    SUBMIT_NOT_SENT,
    SUBMIT_REFUSED,
    Clock,
    Effect,
    Heartbeat,
    PollMigration,
    SelectionDone,
    SelectPeers,
    StatusPolled,
    Stop,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    Tick,
    log_event,
)
from supervisor_service.remotes import RemoteError, Remotes, StaleLeaderTerm
from supervisor_service.runtime.queue import EventQueue, QueueClosed
from supervisor_service.store import StateStore

log = logging.getLogger("supervisor_service.runtime")

# Heartbeats applied per turn of the supervisor thread at most: a run of them costs one lock
# acquisition; the bound keeps the producers' room coming back while a long backlog is applied.
_HEARTBEAT_BATCH = 256

# Status codes after which a SubmitRegionMigration may still have been carried out: the deadline
# passed or the connection broke with the request possibly received, or the server failed midway.
# Any other code is the service's answer that it did not do it.
# RESOURCE_EXHAUSTED is among them (the client reports it itself for an answer larger than its
# receive limit, after the server acted), and so is ALREADY_EXISTS (an idempotent service's word
# for a request_id it has seen).
AMBIGUOUS_CODES = frozenset({
    "DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "INTERNAL", "CANCELLED", "DATA_LOSS",
    "RESOURCE_EXHAUSTED", "ALREADY_EXISTS",
})


def submit_error_kind(exc: RemoteError) -> str:
    """What a failed SubmitRegionMigration says about the migration (events.SUBMIT_*)."""
    if isinstance(exc, StaleLeaderTerm):
        return SUBMIT_NOT_SENT  # refused for our term; the successor owns the decision
    return SUBMIT_AMBIGUOUS if exc.code in AMBIGUOUS_CODES else SUBMIT_REFUSED


class SupervisorRuntime:
    def __init__(
        self,
        supervisor: Supervisor,
        queue: EventQueue,
        clock: Clock,
        metrics: Metrics,
        remotes: Remotes,
        *,
        workers: int = 4,
        on_death: Callable[[BaseException], None] | None = None,
        store: StateStore | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        on_fenced: Callable[[str], None] | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.queue = queue
        self.clock = clock
        self.metrics = metrics
        self.remotes = remotes
        self._on_death = on_death
        self.store = store
        self._is_leader = is_leader
        self._on_fenced = on_fenced
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="failover-worker")
        self._thread = threading.Thread(target=self._run, name="region-supervisor", daemon=True)
        self.tick_pending = threading.Event()
        self._event_counters: dict[str, object] = {}
        self.death: BaseException | None = None
        self._stopped = threading.Event()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.metrics.thread_alive.set(1)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float) -> bool:
        """Process what is queued, then stop; True if the thread ended within `timeout` seconds."""
        if self._thread.is_alive():
            self.queue.put_control(Stop())
            self._thread.join(timeout)
        self.queue.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        return not self._thread.is_alive()

    # ------------------------------------------------------------ consumer

    def _run(self) -> None:
        try:
            while True:
                events = self.queue.get_batch(timeout=0.5, limit=_HEARTBEAT_BATCH)
                if not events:
                    if self.queue.closed:
                        return
                    continue
                if len(events) > 1:
                    self._apply_heartbeats(events)
                    continue
                event = events[0]
                if isinstance(event, Stop):
                    return
                self._dispatch(event)
        except BaseException as exc:  # the table's owner is gone: make it loud
            self.death = exc
            log.critical("supervisor_thread_died", exc_info=exc, extra={"fields": {"error": repr(exc)}})
            self.queue.close()
            # Nobody will answer what is still queued: fail those calls now rather than let them hang.
            for pending in self.queue.drain():
                reply = getattr(pending, "reply", None)
                if reply is not None and not reply.done():
                    reply.set_exception(QueueClosed("the supervisor thread died"))
            if self._on_death is not None:
                self._on_death(exc)
        finally:
            self.metrics.thread_alive.set(0)
            self._stopped.set()

    def _dispatch(self, event) -> None:
        name = type(event).__name__
        reply: Future | None = getattr(event, "reply", None)
        if isinstance(event, Tick):
            self.tick_pending.clear()
            lateness = max(0.0, self.clock.monotonic() - event.due_monotonic) if event.due_monotonic else 0.0
            self.metrics.tick_lateness.observe(lateness)
            # The supervisor's own lag feeds the local-pause and overload guards.
            event = dataclasses.replace(
                event,
                lag_ms=max(lateness, self.queue.oldest_age()) * 1000,
                queue_fill=self.queue.external_depth / self.queue.capacity,
            )
            started = time.perf_counter()
        try:
            value = self.supervisor.handle(event, self.clock.now_ms())
        except BaseException as exc:
            if reply is not None and not reply.done():
                reply.set_exception(exc)
            raise
        if isinstance(event, Tick):
            self.metrics.tick_duration.observe(time.perf_counter() - started)
        elif isinstance(event, Heartbeat) and event.received_monotonic:
            self.metrics.heartbeat_apply_latency.observe(self.clock.monotonic() - event.received_monotonic)
        self._count_events(name)
        self._release(reply, value)

    def _count_events(self, name: str, n: int = 1) -> None:
        counter = self._event_counters.get(name)
        if counter is None:  # `labels()` is slow for a per-event call: keep the children
            counter = self._event_counters[name] = self.metrics.events.labels(type=name)
        counter.inc(n)

    def _release(self, reply: Future | None, value: object) -> None:
        """After events were handled: their state changes go to the store, then the reply and effects."""
        changes = self.supervisor.drain_changes()
        effects = self.supervisor.drain_outbox()
        if changes and self.store is not None:
            # Nothing leaves before the state that justifies it is durable: replies are
            # acknowledged, and migrations submitted, from the writer's callback.
            self.store.submit(changes, self._after_commit(reply, value, effects), term=self.supervisor.leader_term)
        else:
            if reply is not None and not reply.done():
                reply.set_result(value)
            for effect in effects:
                self._execute(effect)

    def _apply_heartbeats(self, events: list[Heartbeat]) -> None:
        """A run of Heartbeats, as `_dispatch` would apply them one by one: each at the clock's
        now, its apply latency observed as soon as it is applied; their changes (regions they
        created) leave for the store together, in order. A heartbeat has no reply and no effect."""
        handle, now_ms, monotonic = self.supervisor.handle, self.clock.now_ms, self.clock.monotonic
        latency = self.metrics.heartbeat_apply_latency
        for event in events:
            handle(event, now_ms())
            if event.received_monotonic:
                latency.observe(monotonic() - event.received_monotonic)
        self._count_events("Heartbeat", len(events))
        self._release(None, None)

    def _after_commit(
        self, reply: Future | None, value: object, effects: list[Effect]
    ) -> Callable[[BaseException | None], None] | None:
        if reply is None and not effects:
            return None

        def done(exc: BaseException | None) -> None:
            if reply is not None and not reply.done():
                if exc is None:
                    reply.set_result(value)
                else:
                    reply.set_exception(exc)
            for effect in effects:
                if exc is None:
                    self._execute(effect)
                elif isinstance(effect, SubmitMigration):
                    # Not durable (fenced, or the store gave up): the submission must not leave.
                    self._report(SubmissionDone(effect.task, error=f"state not durable: {exc}",
                                                error_kind=SUBMIT_NOT_SENT))
                elif isinstance(effect, SelectPeers):
                    self._report(SelectionDone(effect.job, error=f"state not durable: {exc}", error_stage="store"))
                else:
                    self._execute(effect)

        return done

    # ------------------------------------------------------------ workers

    def _execute(self, effect: Effect) -> None:
        match effect:
            case SelectPeers():
                work = self._select
            case SubmitMigration():
                work = self._submit
            case PollMigration():
                work = self._poll
        try:
            self._pool.submit(work, effect)
        except RuntimeError:
            # Shutting down: the workers are gone. Nothing leaves; what was committed (an intent)
            # is resent by the next leadership.
            log_event(log, logging.WARNING, "effect_dropped_at_shutdown", effect=type(effect).__name__)

    def _timed(self, service: str, method: str, call):
        started = time.perf_counter()
        try:
            return call()
        except RemoteError as exc:
            self.metrics.remote_errors.labels(service=service, method=method, code=exc.code).inc()
            raise
        except Exception as exc:  # an embedded service's bug counts as an error, not a dead worker
            self.metrics.remote_errors.labels(service=service, method=method, code="INTERNAL").inc()
            raise RemoteError(service, method, "INTERNAL", repr(exc)) from exc
        finally:
            self.metrics.remote_latency.labels(service=service, method=method).observe(
                time.perf_counter() - started
            )

    def _report(self, event) -> None:
        if not self.queue.closed:
            self.queue.put_control(event)

    def _select(self, effect: SelectPeers) -> None:
        job = effect.job
        try:
            from_peer = self._timed(
                "PeerLookup", "GetDatanode", lambda: self.remotes.peer_lookup.get_datanode(job.datanode_id)
            )
        except RemoteError as exc:
            self._report(SelectionDone(job, error=str(exc), error_stage="peer_lookup"))
            return
        try:
            peers = self._timed(
                "Selector",
                "Select",
                lambda: self.remotes.selector.select(
                    len(job.region_ids), {job.datanode_id, *job.exclude_targets}, job.datanode_id, job.region_ids
                ),
            )
        except RemoteError as exc:
            self._report(SelectionDone(job, error=str(exc), error_stage="select"))
            return
        self._report(SelectionDone(job, from_peer=from_peer, peers=tuple(peers)))

    def _submit(self, effect: SubmitMigration) -> None:
        task = effect.task
        if not self._is_leader() or task.leader_term != self.supervisor.leader_term:
            # Leadership (of the decision's term) ended after the decision: nothing leaves without
            # its lease. A later leadership resends the committed intent under its own term.
            self._report(SubmissionDone(task, error=f"the leadership of term {task.leader_term} ended; "
                                        "submission not sent", error_kind=SUBMIT_NOT_SENT))
            return
        try:
            result = self._timed(
                "RegionMigration", "SubmitRegionMigration", lambda: self.remotes.region_migration.submit(task)
            )
        except StaleLeaderTerm as exc:
            self._report(SubmissionDone(task, error=str(exc), error_kind=submit_error_kind(exc)))
            # Only a refusal of the term this replica leads under now says another leader exists.
            if self._on_fenced is not None and task.leader_term == self.supervisor.leader_term:
                self._on_fenced(str(exc))
            return
        except RemoteError as exc:
            self._report(SubmissionDone(task, error=str(exc), error_kind=submit_error_kind(exc)))
            return
        self._report(SubmissionDone(task, result=result))

    def _poll(self, effect: PollMigration) -> None:
        pid = effect.procedure_id
        try:
            state, message = self._timed(
                "RegionMigration", "GetMigrationStatus", lambda: self.remotes.region_migration.status(pid)
            )
        except RemoteError as exc:
            self._report(StatusPolled(pid, error=str(exc)))
            return
        self._report(StatusPolled(pid, state=state, message=message))


