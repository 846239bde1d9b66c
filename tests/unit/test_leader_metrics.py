"""The leader's term and every change of leadership, as the core sees them (after its recovery)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    BecomeLeader,
    FailoverPolicy,
    LoseLeadership,
    PhiAccrualOptions,
    StoredState,
    Supervisor,
    as_region_array,
)


def _changes(registry, change: str) -> float:
    return registry.get_sample_value("supervisor_leadership_changes_total", {"change": change}) or 0.0


def test_term_and_changes_follow_elections_and_losses():
    registry = CollectorRegistry()
    sup = Supervisor(PhiAccrualOptions(), Metrics(registry), FailoverPolicy(), is_leader=False, leader_term=0)
    assert registry.get_sample_value("supervisor_leader_term") == 0
    assert _changes(registry, "elected") == 0 and _changes(registry, "lost") == 0
    sup.handle(BecomeLeader(7, StoredState(registry={1: as_region_array([10])})), 1000)
    assert registry.get_sample_value("supervisor_leader_term") == 7
    assert registry.get_sample_value("supervisor_is_leader") == 1
    assert _changes(registry, "elected") == 1
    sup.handle(BecomeLeader(7, StoredState(registry={1: as_region_array([10])})), 2000)  # the same term again
    assert _changes(registry, "elected") == 1
    sup.handle(LoseLeadership(), 3000)
    sup.handle(LoseLeadership(), 3500)  # a second loss is no change
    assert _changes(registry, "lost") == 1
    assert registry.get_sample_value("supervisor_is_leader") == 0
    assert registry.get_sample_value("supervisor_leader_term") == 7  # the last term led, for the record
    sup.handle(BecomeLeader(2**63 + 5, StoredState()), 4000)  # a large etcd revision or sequence value
    assert registry.get_sample_value("supervisor_leader_term") == float(2**63 + 5)
    assert _changes(registry, "elected") == 2
