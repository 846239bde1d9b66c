"""What the core shows outside: the Dump snapshot, and the status published after every event (docs/design.md §10)."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor_service.core.guards import Guards
from supervisor_service.core.holds import Holds
from supervisor_service.core.inflight import InFlight
from supervisor_service.core.leadership import LeaderState
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.registry import Registry
from supervisor_service.core.status import CoreStatus
from supervisor_service.core.table import NodeSnapshot
from supervisor_service.core.types import DetectingRegion


@dataclass(frozen=True, slots=True)
class DumpSnapshot:
    """What Dump returns: a consistent copy, turned into rows off the supervisor thread."""

    nodes: list[NodeSnapshot]
    failover_counts: dict[DetectingRegion, int]
    migrating: frozenset[int]
    is_leader: bool
    maintenance: bool
    maintenance_datanodes: dict[int, int]
    holds: tuple[str, ...]
    threshold: float
    taken_at_ms: int


class Snapshots:
    """Copies of the core's state for other threads: nothing they get is ever changed afterwards."""

    def __init__(self, registry: Registry, inflight: InFlight, leadership: LeaderState, maintenance: Maintenance,
                 holds: Holds, guards: Guards | None) -> None:
        self._registry = registry
        self._inflight = inflight
        self._leadership = leadership
        self._maintenance = maintenance
        self._holds = holds
        self._guards = guards

    def dump(self, datanode_ids: frozenset[int] | None, now: int) -> DumpSnapshot:
        wanted = None if datanode_ids is None else set(datanode_ids)
        counts = {k: v for k, v in self._registry.failover_counts.items() if wanted is None or k[0] in wanted}
        table = self._registry.table
        return DumpSnapshot(
            nodes=table.snapshot(wanted),
            failover_counts=counts,
            migrating=frozenset(self._inflight.regions),
            is_leader=self._leadership.leads,
            maintenance=self._maintenance.enabled,
            maintenance_datanodes=dict(self._maintenance.datanodes),
            holds=self._holds.current,
            threshold=table.opts.threshold,
            taken_at_ms=now,
        )

    def status(self) -> CoreStatus:
        m, guards = self._maintenance, self._guards
        return CoreStatus(
            is_leader=self._leadership.leads,
            term=self._leadership.term,
            maintenance=m.enabled,
            maintenance_until_ms=m.until_ms,
            datanode_maintenance=tuple(sorted(m.datanodes.items())),
            holds=self._holds.current,
            failed_datanode_fraction=guards.mass_failure_fraction if guards is not None else 0.0,
            guards_enabled=guards is not None,
        )
