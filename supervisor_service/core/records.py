"""The failover record and its evidence: what the history keeps of one decision (core/failovers.py)."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor_service.core.types import MigrationState, Peer

TRIGGER_FAILOVER, TRIGGER_MANUAL = "failover", "manual"  # a failure convicted it; an operator drained it


@dataclass(frozen=True, slots=True)
class RegionEvidence:
    """One region's detector as the decision saw it (the Dump's columns at `decided_at_millis`)."""

    region_id: int
    phi: float
    last_heartbeat_millis: int
    mean_interval_millis: float
    std_deviation_millis: float
    sample_count: int
    failover_count: int
    result: str = ""


@dataclass(frozen=True, slots=True)
class FailoverRecord:
    """A decision from its making to its end (the proto's FailoverRecord)."""

    failover_id: str  # the decision's request_id
    decided_at_millis: int
    leader_term: int
    datanode_id: int
    from_peer: Peer
    to_peer: Peer
    region_ids: tuple[int, ...]
    timeout_ms: int
    evidence: tuple[RegionEvidence, ...]
    threshold: float
    acceptable_heartbeat_pause_ms: float
    checks: tuple[str, ...]
    trigger_reason: str = TRIGGER_FAILOVER
    procedure_id: str = ""
    result: str = ""  # "" until the submit is answered
    final_state: MigrationState = MigrationState.UNSPECIFIED
    finished_at_millis: int = 0  # 0: not ended
