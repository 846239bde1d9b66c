"""CoreStatus: the immutable snapshot of the supervisor's state that other threads read
(docs/design.md §10); published after every event, replaced, never mutated."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CoreStatus:
    is_leader: bool = False               # the core has finished recovery and leads
    term: int = 0
    maintenance: bool = False
    maintenance_until_ms: int = 0
    datanode_maintenance: tuple[tuple[int, int], ...] = ()   # (datanode, until_ms or 0), sorted
    holds: tuple[str, ...] = ()           # active holds whatever guards_enabled says
                                          # (maintenance, warmup, local_pause, overload, mass_failure)
    failed_datanode_fraction: float = 0.0
    guards_enabled: bool = True
