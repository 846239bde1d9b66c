"""The supervisor thread: takes events off the queue, runs `Supervisor.handle`, answers, hands effects on.

- `Consumer` is one turn of that thread, with no thread of its own: `step`
  takes the next event (or run of heartbeats), hands it to the supervisor
  at the clock's now, then sends the state changes to the store and, once
  they are durable, resolves the reply and hands the effects on
  (docs/design.md §3.2, §6.4). The `evaluate` simulation steps it directly.
- `SupervisorRuntime` runs the consumer on one named thread and the effects
  on an `EffectRunner`'s workers, whose results come back as events.

If the consumer dies (a bug), `on_death` is called once: the service then
reports NOT_SERVING and exits non-zero. It never keeps answering while the
thread that owns the table is gone (docs/design.md §10).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    Clock,
    Effect,
    Event,
    Heartbeat,
    Stop,
    Supervisor,
    Tick,
)
from supervisor_service.remotes import Remotes
from supervisor_service.runtime.effects import EffectRunner, not_durable
from supervisor_service.runtime.queue import EventQueue, QueueClosed
from supervisor_service.store import StateStore

log = logging.getLogger("supervisor_service.runtime")

# Heartbeats applied per turn of the supervisor thread at most: a run of them costs one lock
# acquisition; the bound keeps the producers' room coming back while a long backlog is applied.
_HEARTBEAT_BATCH = 256


class Consumer:
    """The work of the supervisor thread, one turn at a time (single-threaded: call from one thread).

    Effects whose state is durable go to `hand_on`; result events the consumer makes itself (an
    effect whose state could not be committed) are put back on the queue.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        queue: EventQueue,
        clock: Clock,
        metrics: Metrics,
        hand_on: Callable[[Effect], None],
        *,
        store: StateStore | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.queue = queue
        self.clock = clock
        self.metrics = metrics
        self.store = store
        self._hand_on = hand_on
        self.tick_pending = threading.Event()  # set by the ticker with each Tick it queues, cleared here
        self._event_counters: dict[str, object] = {}
        self._refused_seen = queue.refusals.count  # the queue's refusal count as the last Tick saw it

    def step(self, timeout: float) -> bool:
        """Take and handle the next event, waiting up to `timeout` seconds for one.

        False when the consumer is done: it took Stop, or the queue is closed and empty.
        """
        events = self.queue.get_batch(timeout=timeout, limit=_HEARTBEAT_BATCH)
        if not events:
            return not self.queue.closed
        if len(events) > 1:
            self._apply_heartbeats(events)
            return True
        event = events[0]
        if isinstance(event, Stop):
            return False
        self._dispatch(event)
        return True

    def run(self) -> None:
        """Step until Stop (or until the queue is closed and empty)."""
        while self.step(timeout=0.5):
            pass

    def report(self, event: Event) -> None:
        """Put a result event back on the queue (thread-safe); dropped once the queue is closed."""
        if not self.queue.closed:
            self.queue.put_control(event)

    def _dispatch(self, event) -> None:
        name = type(event).__name__
        reply: Future | None = getattr(event, "reply", None)
        if isinstance(event, Tick):
            self.tick_pending.clear()
            lateness = max(0.0, self.clock.monotonic() - event.due_monotonic) if event.due_monotonic else 0.0
            self.metrics.tick_lateness.observe(lateness)
            # The supervisor's own lag feeds the local-pause and overload guards, and so do the
            # heartbeats the edge could not queue since the last tick (it only counts them).
            count = self.queue.refusals.count
            refused, self._refused_seen = count - self._refused_seen, count
            event = dataclasses.replace(
                event,
                lag_ms=max(lateness, self.queue.oldest_age()) * 1000,
                queue_fill=self.queue.external_depth / self.queue.capacity,
                heartbeats_refused=refused,
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
                self._hand_on(effect)

    def _after_commit(
        self, reply: Future | None, value: object, effects: list[Effect]
    ) -> Callable[[BaseException | None], None] | None:
        """The writer's callback (on its thread): it only completes the reply and hands effects on."""
        if reply is None and not effects:
            return None

        def done(exc: BaseException | None) -> None:
            if reply is not None and not reply.done():
                if exc is None:
                    reply.set_result(value)
                else:
                    reply.set_exception(exc)
            for effect in effects:
                result = None if exc is None else not_durable(effect, exc)
                if result is None:
                    self._hand_on(effect)
                else:
                    self.report(result)

        return done


class SupervisorRuntime:
    """The supervisor thread (`region-supervisor`) running a `Consumer`, and the failover workers."""

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
        leader_term: Callable[[], int] | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.queue = queue
        self.clock = clock
        self.metrics = metrics
        self.remotes = remotes
        self.store = store
        self._on_death = on_death
        self.effects = EffectRunner(
            # The term a submission must still be of when it leaves: the election's, which moves on the
            # moment another term is won (the core's status follows only once BecomeLeader is handled).
            remotes, metrics, self._report, leader_term=leader_term or (lambda: supervisor.status.term),
            is_leader=is_leader, on_fenced=on_fenced, workers=workers,
        )
        self.consumer = Consumer(supervisor, queue, clock, metrics, self.effects.start, store=store)
        self._thread = threading.Thread(target=self._run, name="region-supervisor", daemon=True)
        self.death: BaseException | None = None

    @property
    def tick_pending(self) -> threading.Event:
        """Set while a Tick is queued (the ticker skips a tick due meanwhile)."""
        return self.consumer.tick_pending

    def _report(self, event: Event) -> None:
        self.consumer.report(event)

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
        self.effects.shutdown()
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.consumer.run()
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
