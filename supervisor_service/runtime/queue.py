"""The bounded event queue of the supervisor thread: many producers, one consumer (docs/design.md §3.3)."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from supervisor_service.core import Clock, Event, Heartbeat, SystemClock


class QueueFull(Exception):
    """The bounded event queue stayed full for the whole wait."""


class QueueClosed(Exception):
    """The supervisor thread is gone or shutting down; nothing more is accepted."""


HEARTBEAT_OVERHEAD_BYTES = 256
"""What a queued heartbeat costs besides its region ids (event, entry, array header), for the byte bound."""


class Queued:
    """One queued event. The gRPC edge keeps its stream's last queued heartbeat, so that a newer
    heartbeat of the same stream can supersede it while it still waits (`EventQueue.offer_heartbeat`)."""

    __slots__ = ("event", "external", "at", "cost", "barrier", "waiting")

    def __init__(self, event: Event, external: bool, at: float, cost: int, barrier: int) -> None:
        self.event = event
        self.external = external
        self.at = at
        self.cost = cost  # bytes, heartbeats only (0 for other events)
        self.barrier = barrier  # other events queued before it (see EventQueue.offer_heartbeat)
        self.waiting = True  # False once the consumer has taken it


class HeartbeatRefusals:
    """Heartbeats that found no room in the queue: counted by the edge (`note`), read by the consumer,
    which hands the increase since the last Tick to the next one. The overload guard holds
    convictions after any: what the table does not see, it must not convict on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def note(self, why: str | None) -> bool:
        """Count a refusal (`why`: `EventQueue.refusal`'s), unless the datanode's own share refused it
        (that datanode has heartbeats queued: its liveness is on its way) or there was room after all."""
        if why is None or why == "datanode_share":
            return False
        with self._lock:
            self.count += 1
        return True


class EventQueue:
    """A bounded FIFO with one consumer.

    `put` (external producers: heartbeats, admin calls) respects the bound. `put_control` is for
    events whose number is bounded by construction (one pending tick, one result per remote call
    already in flight, Stop): dropping those would lose state, and blocking on them could deadlock
    the workers against a full queue, so they are always admitted.

    Heartbeats are bounded twice more, so that one datanode cannot take the
    queue from the others: by the bytes of their region ids (`max_heartbeat_bytes`
    in all), and per datanode by `datanode_fraction` of both the capacity and
    those bytes (a datanode's first queued heartbeat is always admitted, however
    large, when the queue has room). And `offer_heartbeat` folds a stream's
    heartbeat into its previous one when that one still waits with the same
    regions: it takes no room at all.

    Time is read only through `clock` (the system clock by default): the stamp of each queued
    event (`oldest_age`) and the deadline of `put`. A wait for room is a real wait on a
    Condition, at most the time left on that clock; with a clock that does not move, it ends
    only when room is made or the queue is closed.
    """

    def __init__(
        self,
        capacity: int,
        *,
        max_heartbeat_bytes: int | None = None,
        datanode_fraction: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"event queue capacity must be >= 1, got {capacity}")
        if not 0 < datanode_fraction <= 1:
            raise ValueError(f"datanode_fraction must be in (0, 1], got {datanode_fraction}")
        self.capacity = capacity
        self._monotonic = (clock or SystemClock()).monotonic  # bound once: the stamp of every queued event
        self.max_heartbeat_bytes = max_heartbeat_bytes
        self._datanode_events = max(1, int(capacity * datanode_fraction))
        self._datanode_bytes = None if max_heartbeat_bytes is None else max_heartbeat_bytes * datanode_fraction
        self._items: deque[Queued] = deque()
        self._external = 0
        self._heartbeat_bytes = 0
        self._by_datanode: dict[int, list[int]] = {}  # datanode -> [queued heartbeats, their bytes]
        self._barrier = 0  # events other than heartbeats queued so far: no heartbeat is folded across one
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        # Notifying a Condition costs microseconds of Python even with nobody waiting: producers
        # notify only when the consumer is (or is about to be) waiting.
        self._getters = 0
        self._closed = False
        self.refusals = HeartbeatRefusals()  # counted by the edge, read by the consumer at each Tick

    def __len__(self) -> int:
        return len(self._items)

    @property
    def external_depth(self) -> int:
        """Events counted against the capacity."""
        return self._external

    @property
    def heartbeat_bytes(self) -> int:
        """Bytes of the queued heartbeats, as counted against `max_heartbeat_bytes`."""
        return self._heartbeat_bytes

    def oldest_age(self) -> float:
        """Seconds the oldest queued event has waited (0 when the queue is empty)."""
        try:
            return max(0.0, self._monotonic() - self._items[0].at)
        except IndexError:
            return 0.0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, event: Event) -> bool:
        """Enqueue without waiting; False if the queue is full."""
        with self._lock:
            if self._closed:
                raise QueueClosed("the supervisor is shutting down")
            if self._refusal(event) is not None:
                return False
            self._push(event, external=True)
            return True

    def offer_heartbeat(self, event: Heartbeat, previous: Queued | None, *, wake: bool = True) -> Queued | None:
        """Enqueue a heartbeat without waiting; None if there is no room for it.

        With `wake=False` a waiting consumer is not woken for it: the producer promises a `wake()`
        soon, for all the heartbeats it queued meanwhile (a wake per message costs the consumer
        thread a GIL hand-off per message).

        When `previous` (the last heartbeat its stream queued) still waits, for the same datanode
        and regions, with no other event than heartbeats queued after it, it is superseded instead:
        it becomes one heartbeat at the newer of the two timestamps (a detector ignores an older one
        after a newer; the two intervals become one), keeping the earlier receipt time (its apply
        latency counts the whole wait), and `previous` is returned. Otherwise the returned entry is
        the new one. (Heartbeats of other datanodes commute with it; a Deregister, a Tick or a Dump
        queued between the two must see the first one applied and the second not yet.)"""
        with self._lock:
            if self._closed:
                raise QueueClosed("the supervisor is shutting down")
            if previous is not None and previous.waiting and previous.barrier == self._barrier:
                old = previous.event
                if (
                    old.datanode_id == event.datanode_id
                    and old.known_only == event.known_only
                    and (old.region_ids is event.region_ids or _same_array(old.region_ids, event.region_ids))
                ):
                    if event.ts_millis > old.ts_millis:
                        previous.event = Heartbeat(
                            old.datanode_id, old.region_ids, event.ts_millis, old.received_monotonic, old.known_only
                        )
                    return previous
            # _refusal and _push, inline: this is the path of every heartbeat.
            if self._external >= self.capacity:
                return None
            cost = event.region_ids.nbytes + HEARTBEAT_OVERHEAD_BYTES
            total, limit = self._heartbeat_bytes, self.max_heartbeat_bytes
            if limit is not None and total and total + cost > limit:
                return None
            queued = self._by_datanode.get(event.datanode_id)
            if queued is None:
                self._by_datanode[event.datanode_id] = [1, cost]
            elif queued[0] >= self._datanode_events or (
                self._datanode_bytes is not None and queued[1] + cost > self._datanode_bytes
            ):
                return None
            else:
                queued[0] += 1
                queued[1] += cost
            self._heartbeat_bytes = total + cost
            entry = Queued(event, True, self._monotonic(), cost, self._barrier)
            self._items.append(entry)
            self._external += 1
            if self._getters and wake:
                self._not_empty.notify()
            return entry

    @property
    def consumer_waiting(self) -> bool:
        """The consumer waits for an event (unlocked: one that waits later finds the queued events itself)."""
        return self._getters > 0

    def wake(self) -> None:
        """Wake a waiting consumer when something is queued: after `offer_heartbeat(wake=False)`.
        (Without a wake the consumer still finds them at the end of its wait's timeout.)"""
        if self._getters and self._items:  # read unlocked: a consumer that waits after this finds the items itself
            with self._lock:
                if self._getters and self._items:
                    self._not_empty.notify()

    def refusal(self, event: Event) -> str | None:
        """Why `event` would not be admitted now (`queue_full`, `queue_bytes`, `datanode_share`), or None."""
        with self._lock:
            return self._refusal(event)

    def _refusal(self, event: Event) -> str | None:
        if self._external >= self.capacity:
            return "queue_full"
        if event.__class__ is not Heartbeat:
            return None
        cost = event.region_ids.nbytes + HEARTBEAT_OVERHEAD_BYTES
        limit = self.max_heartbeat_bytes
        if limit is not None and self._heartbeat_bytes and self._heartbeat_bytes + cost > limit:
            return "queue_bytes"
        queued = self._by_datanode.get(event.datanode_id)
        if queued is not None and (
            queued[0] >= self._datanode_events
            or (self._datanode_bytes is not None and queued[1] + cost > self._datanode_bytes)
        ):
            return "datanode_share"
        return None

    def put(self, event: Event, timeout: float) -> None:
        """Enqueue, waiting up to `timeout` seconds for room; raises QueueFull or QueueClosed.

        The timeout runs on the queue's clock and, since the wait itself is a real one, on the
        system's monotonic clock too: whichever ends first (a clock that never moves cannot make
        a producer wait for ever)."""
        deadline = self._monotonic() + timeout
        real_deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    raise QueueClosed("the supervisor is shutting down")
                if self._refusal(event) is None:
                    self._push(event, external=True)
                    return
                remaining = min(deadline - self._monotonic(), real_deadline - time.monotonic())
                if remaining <= 0:
                    raise QueueFull(f"event queue full ({self.capacity} events)")
                self._not_full.wait(remaining)

    def put_control(self, event: Event) -> None:
        with self._lock:
            self._push(event, external=False)

    def _push(self, event: Event, external: bool) -> Queued:
        cost = 0
        if event.__class__ is not Heartbeat:
            self._barrier += 1
        elif external:
            cost = event.region_ids.nbytes + HEARTBEAT_OVERHEAD_BYTES
            self._heartbeat_bytes += cost
            queued = self._by_datanode.get(event.datanode_id)
            if queued is None:
                self._by_datanode[event.datanode_id] = [1, cost]
            else:
                queued[0] += 1
                queued[1] += cost
        entry = Queued(event, external, self._monotonic(), cost, self._barrier)
        self._items.append(entry)
        if external:
            self._external += 1
        if self._getters:
            self._not_empty.notify()
        return entry

    def _taken(self, entry: Queued) -> None:
        """Under the lock: the heartbeat `entry` left the queue; give back the room it held."""
        self._heartbeat_bytes -= entry.cost
        datanode_id = entry.event.datanode_id
        queued = self._by_datanode[datanode_id]
        if queued[0] == 1:
            del self._by_datanode[datanode_id]
        else:
            queued[0] -= 1
            queued[1] -= entry.cost

    def drain(self) -> list[Event]:
        """Remove and return everything queued."""
        with self._lock:
            items = [entry.event for entry in self._items]
            for entry in self._items:
                entry.waiting = False
            self._items.clear()
            self._external = 0
            self._heartbeat_bytes = 0
            self._by_datanode.clear()
            self._not_full.notify_all()
            return items

    def get(self, timeout: float) -> Event | None:
        """The next event, or None after `timeout` seconds (or when closed and empty)."""
        batch = self.get_batch(timeout, limit=1)
        return batch[0] if batch else None

    def get_batch(self, timeout: float, limit: int) -> list[Event]:
        """The next event, and when it is a Heartbeat the Heartbeats right behind it (at most
        `limit` events in all); [] after `timeout` seconds (or when closed and empty).

        A run of Heartbeats carries no reply and none of them reads the queue, so the consumer
        can apply them back to back, for one lock acquisition. Every other event comes alone: a
        Tick reads the depth and age of what is queued behind it, which must still be queued.
        """
        with self._lock:
            if not self._wait_for_items(timeout):
                return []
            items, taken = self._items, self._taken
            entry = items.popleft()
            if entry.cost:
                taken(entry)
            entry.waiting = False
            event = entry.event
            batch = [event]
            released = int(entry.external)
            if event.__class__ is Heartbeat:
                while items and len(batch) < limit and items[0].event.__class__ is Heartbeat:
                    entry = items.popleft()
                    if entry.cost:
                        taken(entry)
                    entry.waiting = False
                    batch.append(entry.event)
                    released += entry.external
            if released:
                self._external -= released
                self._not_full.notify(released)
            return batch

    def _wait_for_items(self, timeout: float) -> bool:
        """Under the lock: wait up to `timeout` for an item; False if there is none."""
        if self._items:
            return True
        if self._closed:
            return False
        self._getters += 1
        try:
            self._not_empty.wait(timeout)
        finally:
            self._getters -= 1
        return bool(self._items)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()
