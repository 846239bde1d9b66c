"""Typed events of the supervisor thread: one frozen dataclass each, and their union (docs/design.md §3).

Producers (gRPC handlers, the ticker, failover workers) only enqueue (`runtime.EventQueue`);
the supervisor thread is the single consumer. An event that carries a `reply` future gets
the value `Supervisor.handle` returns, once the state changes it made are durable.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from supervisor_service.core.planned_events import (
    CancelDrain,
    GetDrain,
    ListTablePolicies,
    SetTablePolicy,
    StartDrain,
)
from supervisor_service.core.types import (
    DetectingRegion,
    MigrationResult,
    MigrationState,
    MigrationTask,
    Peer,
    RegionArray,
    SelectJob,
)

if TYPE_CHECKING:
    from supervisor_service.core.changes import MaintenanceSet, StoredState
    from supervisor_service.core.snapshot import DumpSnapshot


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Heartbeat:
    datanode_id: int
    region_ids: RegionArray  # sorted, unique uint64
    ts_millis: int
    received_monotonic: float = 0.0  # Clock.monotonic() at receipt (0: unknown); receipt-to-applied latency
    known_only: bool = False  # refresh only the regions already watched, create none (more than one heartbeat may add)


@dataclass(frozen=True, slots=True)
class Register:
    regions: tuple[DetectingRegion, ...]
    reply: Future[int] | None = None


@dataclass(frozen=True, slots=True)
class Deregister:
    regions: tuple[DetectingRegion, ...]
    reply: Future[int] | None = None


@dataclass(frozen=True, slots=True)
class Reset:
    regions: tuple[DetectingRegion, ...]
    reply: Future[int] | None = None


@dataclass(frozen=True, slots=True)
class Clear:
    reply: Future[int] | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    due_monotonic: float = 0.0
    lag_ms: float = 0.0  # how late the tick is processed (set by the runtime)
    queue_fill: float = 0.0  # fraction of the event queue in use when it is processed
    heartbeats_refused: int = 0  # heartbeats that found no room in the queue since the last tick (set by the runtime)


@dataclass(frozen=True, slots=True)
class Dump:
    reply: Future[DumpSnapshot]
    datanode_ids: frozenset[int] | None = None


@dataclass(frozen=True, slots=True)
class SetMaintenance:
    """Global maintenance, or per datanode when `datanode_ids` is set; `ttl_ms` > 0 makes it expire."""

    enabled: bool
    reply: Future[MaintenanceSet] | None = None
    datanode_ids: tuple[int, ...] = ()
    ttl_ms: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseHold:
    """An operator lets a held mass failure fail over."""

    reply: Future[bool] | None = None


@dataclass(frozen=True, slots=True)
class Inspect:
    """An operator's read-only question (core/insight.py: ListFailoversQuery, ExplainQuery, WhatIfQuery):
    answered from the core's state, which it does not change."""

    query: object
    reply: Future[object] | None = None


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
    | Inspect
    | SelectionDone
    | SubmissionDone
    | StatusPolled
    | BecomeLeader
    | LoseLeadership
    | Stop
    | StartDrain
    | GetDrain
    | CancelDrain
    | SetTablePolicy
    | ListTablePolicies
)

