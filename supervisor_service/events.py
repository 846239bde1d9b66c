"""Typed events of the supervisor thread, the domain types they carry, and the bounded queue.

Producers (gRPC handlers, the ticker, failover workers) only enqueue; the
supervisor thread is the single consumer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from supervisor_service.store import StoredState

DetectingRegion = tuple[int, int]
"""(datanode_id, region_id)."""


def region_label(region_id: int) -> str:
    """`table_id/region_number`: how an operator reads a region id (table id in the high 32 bits)."""
    return f"{region_id >> 32}/{region_id & 0xFFFFFFFF}"


@dataclass(frozen=True, slots=True)
class Peer:
    id: int
    addr: str = ""


class MigrationState(Enum):
    UNSPECIFIED = 0
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    NOT_FOUND = 4


@dataclass(frozen=True, slots=True)
class MigrationTask:
    """One SubmitRegionMigration: regions of one datanode going to one target."""

    task_id: int
    datanode_id: int
    from_peer: Peer
    to_peer: Peer
    region_ids: tuple[int, ...]
    timeout_ms: int
    leader_term: int
    request_id: str = ""
    """The idempotency key of the decision: the same for every retry of it, by any leader."""


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """The answer to a SubmitRegionMigration, by category (DESIGN.md section 4)."""

    migrated: tuple[int, ...] = ()
    migrating: tuple[int, ...] = ()
    region_not_found: tuple[int, ...] = ()
    table_not_found: tuple[int, ...] = ()
    leader_changed: tuple[int, ...] = ()
    peer_conflict: tuple[int, ...] = ()
    submitted: tuple[int, ...] = ()
    procedure_id: str = ""


# Categories after which the detector and its failover count are dropped, and those after which both are kept.
DONE_CATEGORIES = ("migrated", "region_not_found", "table_not_found", "leader_changed")
KEPT_CATEGORIES = ("migrating", "peer_conflict", "submitted")


@dataclass(frozen=True, slots=True)
class SelectJob:
    """Ask PeerLookup for the failed datanode and Selector for `len(region_ids)` targets."""

    job_id: int
    datanode_id: int
    region_ids: tuple[int, ...]
    exclude_targets: tuple[int, ...] = ()  # besides the datanode itself (flap damping)


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Heartbeat:
    datanode_id: int
    region_ids: np.ndarray  # sorted, unique uint64
    ts_millis: int
    received_monotonic: float = 0.0  # Clock.monotonic() at receipt (0: unknown); receipt-to-applied latency


@dataclass(frozen=True, slots=True)
class Register:
    regions: tuple[DetectingRegion, ...]
    reply: Future | None = None


@dataclass(frozen=True, slots=True)
class Deregister:
    regions: tuple[DetectingRegion, ...]
    reply: Future | None = None


@dataclass(frozen=True, slots=True)
class Reset:
    regions: tuple[DetectingRegion, ...]
    reply: Future | None = None


@dataclass(frozen=True, slots=True)
class Clear:
    reply: Future | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    due_monotonic: float = 0.0
    lag_ms: float = 0.0  # how late the tick is processed (set by the runtime)
    queue_fill: float = 0.0  # fraction of the event queue in use when it is processed


@dataclass(frozen=True, slots=True)
class Dump:
    reply: Future
    datanode_ids: frozenset[int] | None = None


@dataclass(frozen=True, slots=True)
class SetMaintenance:
    """Global maintenance, or per datanode when `datanode_ids` is set; `ttl_ms` > 0 makes it expire."""

    enabled: bool
    reply: Future | None = None
    datanode_ids: tuple[int, ...] = ()
    ttl_ms: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseHold:
    """An operator lets a held mass failure fail over."""

    reply: Future | None = None


@dataclass(frozen=True, slots=True)
class SelectionDone:
    job: SelectJob
    from_peer: Peer | None = None
    peers: tuple[Peer, ...] = ()
    error: str | None = None
    error_stage: str = ""


# What a failed SubmitRegionMigration tells about the migration (SubmissionDone.error_kind).
SUBMIT_AMBIGUOUS = "ambiguous"  # the call may have been carried out (timeout, connection lost, server error)
SUBMIT_REFUSED = "refused"  # the service answered that it did not do it (invalid argument, ...)
SUBMIT_NOT_SENT = "not_sent"  # it never left (no lease, state not durable, a newer term was seen)


@dataclass(frozen=True, slots=True)
class SubmissionDone:
    task: MigrationTask
    result: MigrationResult | None = None
    error: str | None = None
    error_kind: str = SUBMIT_AMBIGUOUS  # when `error` is set; unclassified errors are ambiguous


@dataclass(frozen=True, slots=True)
class StatusPolled:
    procedure_id: str
    state: MigrationState | None = None
    message: str = ""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BecomeLeader:
    """This replica leads from now, under `term`: recover from the stored state."""

    term: int
    state: StoredState


@dataclass(frozen=True, slots=True)
class LoseLeadership:
    """This replica no longer leads: stop failing over and forget the table."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Sentinel: the consumer processes what is ahead of it, then exits."""


Event = (
    Heartbeat
    | Register
    | Deregister
    | Reset
    | Clear
    | Tick
    | Dump
    | SetMaintenance
    | ReleaseHold
    | SelectionDone
    | SubmissionDone
    | StatusPolled
    | BecomeLeader
    | LoseLeadership
    | Stop
)


# ---------------------------------------------------------------- queue


class QueueFull(Exception):
    """The bounded event queue stayed full for the whole wait."""


class QueueClosed(Exception):
    """The supervisor thread is gone or shutting down; nothing more is accepted."""


_monotonic = time.monotonic  # bound once: the stamp of every queued event


class EventQueue:
    """A bounded FIFO with one consumer.

    `put` (external producers: heartbeats, admin calls) respects the bound.
    `put_control` is for events whose number is bounded by construction
    (one pending tick, one result per remote call already in flight, Stop):
    dropping those would lose state, and blocking on them could deadlock the
    workers against a full queue, so they are always admitted.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"event queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[tuple[Event, bool, float]] = deque()  # (event, external, enqueued at)
        self._external = 0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        # Notifying a Condition costs microseconds of Python even with nobody waiting: producers
        # notify only when the consumer is (or is about to be) waiting.
        self._getters = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def external_depth(self) -> int:
        """Events counted against the capacity."""
        return self._external

    def oldest_age(self) -> float:
        try:
            return max(0.0, time.monotonic() - self._items[0][2])
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
            if self._external >= self.capacity:
                return False
            self._push(event, external=True)
            return True

    def put(self, event: Event, timeout: float) -> None:
        """Enqueue, waiting up to `timeout` seconds for room; raises QueueFull or QueueClosed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    raise QueueClosed("the supervisor is shutting down")
                if self._external < self.capacity:
                    self._push(event, external=True)
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueFull(f"event queue full ({self.capacity} events)")
                self._not_full.wait(remaining)

    def put_control(self, event: Event) -> None:
        with self._lock:
            self._push(event, external=False)

    def _push(self, event: Event, external: bool) -> None:
        self._items.append((event, external, _monotonic()))
        if external:
            self._external += 1
        if self._getters:
            self._not_empty.notify()

    def drain(self) -> list[Event]:
        """Remove and return everything queued."""
        with self._lock:
            items = [item[0] for item in self._items]
            self._items.clear()
            self._external = 0
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
            items = self._items
            event, external, _ = items.popleft()
            batch = [event]
            released = int(external)
            if event.__class__ is Heartbeat:
                while items and len(batch) < limit and items[0][0].__class__ is Heartbeat:
                    event, external, _ = items.popleft()
                    batch.append(event)
                    released += external
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
