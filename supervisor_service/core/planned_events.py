"""Events of the planned operations (docs/design.md §17): drains and table policies. Each carries a
reply future that gets what `Supervisor.handle` returns, once the change is durable."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StartDrain:
    """Drain these datanodes: the reply is the DrainView, or a DrainRefused (not raised: a value)."""

    datanode_ids: tuple[int, ...]
    reason: str = ""
    reply: Future[Any] | None = None


@dataclass(frozen=True, slots=True)
class GetDrain:
    """The DrainView of a drain ('' : the newest), or None."""

    drain_id: str = ""
    reply: Future[Any] | None = None


@dataclass(frozen=True, slots=True)
class CancelDrain:
    drain_id: str = ""
    reason: str = ""
    reply: Future[Any] | None = None


@dataclass(frozen=True, slots=True)
class SetTablePolicy:
    table_ids: tuple[int, ...]
    failover_enabled: bool | None = None  # None: each table keeps its own
    priority: int | None = None
    reason: str = ""
    reply: Future[Any] | None = None


@dataclass(frozen=True, slots=True)
class ListTablePolicies:
    table_ids: tuple[int, ...] = ()  # empty: every table with a policy
    reply: Future[Any] | None = None


PlannedEvent = StartDrain | GetDrain | CancelDrain | SetTablePolicy | ListTablePolicies
