"""Whether this replica leads, and under which term: the one home of the leader check (docs/design.md §6)."""

from __future__ import annotations

from supervisor_service.core.ports import CoreMetrics


class LeaderState:
    """Set by the recovery (BecomeLeader, LoseLeadership); read by every concern that acts only as leader."""

    def __init__(self, metrics: CoreMetrics, leads: bool, term: int) -> None:
        self._metrics = metrics
        self.leads = False
        self.set(leads, term)

    def set(self, leads: bool, term: int) -> None:
        if leads != self.leads:  # what a leadership-flapping alert counts (a gauge misses short terms)
            self._metrics.leadership_changes.labels(change="elected" if leads else "lost").inc()
        self.leads, self.term = leads, term
        self._metrics.leader.set(int(leads))
        self._metrics.leader_term.set(term)
