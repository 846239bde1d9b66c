"""State changes the core hands to the store, and the state a leader loads back (docs/design.md §6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from supervisor_service.core.records import FailoverRecord
from supervisor_service.core.types import DetectingRegion, Peer, RegionArray


@dataclass(frozen=True, slots=True)
class ClockMark:
    """Where a stored duration was last measured: the writer's boot, its CLOCK_MONOTONIC (ms) and its
    `now_ms()` then. A reader on the same boot measures the time since exactly (monotonic); any other
    reader (a restart after a reboot, another replica) cannot, and never trusts a wall-clock difference."""

    boot_id: str
    monotonic_ms: int
    wall_ms: int


# States of a submission (InFlightRecord.state).
INTENT = "intent"  # decided and durable; the call may be under way (nobody knows yet)
AMBIGUOUS = "ambiguous"  # a call failed in a way that leaves it unknown whether it was carried out
SUBMITTED = "submitted"  # accepted under `procedure_id` (polled)
MIGRATING = "migrating"  # reported already migrating (no procedure of ours): ends at its timeout


@dataclass(frozen=True, slots=True)
class InFlightRecord:
    """One SubmitRegionMigration decision: regions of one datanode going to one target, under one
    `request_id` that every retry of it carries, whoever the leader. Stored under one key whatever
    the number of regions, so each failover step is one write of a handful of keys."""

    request_id: str
    datanode_id: int
    from_peer: Peer
    to_peer: Peer
    region_ids: tuple[int, ...]
    timeout_ms: int
    state: str
    procedure_id: str = ""
    attempts: int = 0  # calls that failed ambiguously so far
    mark: ClockMark | None = None  # submitted / migrating: when it was accepted (its timeout runs from there)
    trigger_reason: str = "FAILOVER"  # or MANUAL (a drain): what every retry of it says


@dataclass(frozen=True, slots=True)
class LegacyInFlight:
    """A record of the first format, one per region (`inflight/<region>`, an absolute deadline); read
    only so that a leader can replace it with an InFlightRecord."""

    region_id: int
    datanode_id: int
    procedure_id: str
    deadline_ms: int


@dataclass(slots=True)
class StoredState:
    registry: dict[int, RegionArray] = field(default_factory=dict)
    maintenance: bool = False
    maintenance_until_ms: int = 0  # on the writer's clock; see maintenance_mark
    datanode_maintenance: dict[int, int] = field(default_factory=dict)
    maintenance_mark: ClockMark | None = None  # when the expiries above were written (None: first format)
    failover_counts: dict[DetectingRegion, int] = field(default_factory=dict)
    inflight: dict[str, InFlightRecord] = field(default_factory=dict)  # by submission id
    legacy_inflight: dict[str, LegacyInFlight] = field(default_factory=dict)  # by key id
    journal: list[JournalEntry] = field(default_factory=list)
    journal_term: int = 0
    failovers: list[FailoverRecord] = field(default_factory=list)  # the failover history (any order)
    failovers_unreadable: list[str] = field(default_factory=list)  # ids of stored records that did not decode
    term: int = 0
    table_policies: tuple[Any, ...] = ()  # core.policy.TablePolicy
    drains: dict[str, Any] = field(default_factory=dict)  # drain id -> core.drains.DrainRecord

    @property
    def region_count(self) -> int:
        return sum(r.size for r in self.registry.values())


@dataclass(frozen=True, slots=True)
class RegistryAdd:
    datanode_id: int
    region_ids: RegionArray


@dataclass(frozen=True, slots=True)
class RegistryRemove:
    datanode_id: int
    region_ids: RegionArray


@dataclass(frozen=True, slots=True)
class CountsSet:
    counts: tuple[tuple[DetectingRegion, int], ...]


@dataclass(frozen=True, slots=True)
class CountsDrop:
    keys: tuple[DetectingRegion, ...]


@dataclass(frozen=True, slots=True)
class InFlightSet:
    submission_id: str
    record: InFlightRecord


@dataclass(frozen=True, slots=True)
class InFlightDrop:
    submission_id: str


@dataclass(frozen=True, slots=True)
class MaintenanceSet:
    """The whole maintenance state: the global switch and the per-datanode ones, with expiries (0: none)
    on the writer's clock, and the mark they were measured at (what a reader trusts: the time left)."""

    enabled: bool
    until_ms: int = 0
    datanodes: tuple[tuple[int, int], ...] = ()
    mark: ClockMark | None = None


@dataclass(frozen=True, slots=True)
class JournalAppend:
    entry: JournalEntry
    term: int


@dataclass(frozen=True, slots=True)
class FailoverSet:
    """A failover record, new or updated (core/failovers.py)."""

    record: FailoverRecord


@dataclass(frozen=True, slots=True)
class FailoverDrop:
    failover_id: str


@dataclass(frozen=True, slots=True)
class TermSet:
    term: int


@dataclass(frozen=True, slots=True)
class TablePoliciesSet:
    """The whole per-table policy (core.policy.TablePolicy values): one stored value."""

    policies: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class DrainSet:
    """One drain's record (core.drains.DrainRecord), written whole."""

    drain_id: str
    record: Any


@dataclass(frozen=True, slots=True)
class DrainDrop:
    drain_id: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit trail (docs/design.md §14.4): who called what, from where, and how it ended."""

    at_millis: int
    identity: str
    peer: str
    rpc: str
    summary: str
    code: str
    reason: str
    leader_term: int


@dataclass(frozen=True, slots=True)
class AuditAppend:
    """Append to the audit trail (trimmed to its capacity, the oldest first)."""

    entry: AuditEntry


Change = (
    RegistryAdd | RegistryRemove | CountsSet | CountsDrop | InFlightSet | InFlightDrop | MaintenanceSet
    | JournalAppend | TermSet | TablePoliciesSet | DrainSet | DrainDrop | FailoverSet | FailoverDrop | AuditAppend
)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    at_millis: int
    region_ids: tuple[int, ...]
    from_peer: Peer
    to_peer: Peer
    timeout_ms: int
    trigger_reason: str
    procedure_id: str
    leader_term: int
    request_id: str = ""
