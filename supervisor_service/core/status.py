"""The status the core publishes after every event: what other threads may read (docs/design.md §10).

The supervisor thread replaces `Supervisor.status` with a new `CoreStatus`, never mutates it:
reading the reference is atomic, so the edge reads a consistent view without a lock, and a
caller whose event was answered reads a status that includes it (it is published before the
event's reply is resolved).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CoreStatus:
    is_leader: bool = False
    """The core has finished recovery and leads."""
    term: int = 0
    maintenance: bool = False
    """Global maintenance: no failover at all."""
    maintenance_until_ms: int = 0
    """When global maintenance expires (0: never)."""
    datanode_maintenance: tuple[tuple[int, int], ...] = ()
    """(datanode, expiry or 0) of the datanodes in maintenance, sorted."""
    holds: tuple[str, ...] = ()
    """What held failover at the last tick, whatever `guards_enabled` says: the holds of all failover
    (maintenance, warmup, local_pause, overload, mass_failure), then those that held regions one by
    one (resubmit_backoff, resubmit_limit)."""
    failed_datanode_fraction: float = 0.0
    """Fraction of the datanodes silent at the last tick (the mass-failure guard's measure)."""
    guards_enabled: bool = True
