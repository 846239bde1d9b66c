"""The age of each datanode's newest heartbeat, as a bounded summary published at each tick: a
histogram over datanodes and the few oldest by datanode id, never a series per region."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    AGE_BUCKETS_S,
    OLDEST_HEARTBEATS_REPORTED,
    BecomeLeader,
    Deregister,
    FailoverPolicy,
    Heartbeat,
    LoseLeadership,
    PhiAccrualOptions,
    StoredState,
    Supervisor,
    Tick,
    as_region_array,
)

HIST = "supervisor_datanode_heartbeat_age_seconds"
OLDEST = "supervisor_datanode_heartbeat_age_oldest_seconds"


def _supervisor(registry: CollectorRegistry) -> Supervisor:
    sup = Supervisor(PhiAccrualOptions(), Metrics(registry), FailoverPolicy(warmup_grace_ms=0), is_leader=False)
    sup.handle(BecomeLeader(1, StoredState()), 0)
    return sup


def _oldest(registry: CollectorRegistry) -> dict[str, float]:
    return {s.labels["datanode_id"]: s.value for m in registry.collect() for s in m.samples if s.name == OLDEST}


def test_ages_are_a_histogram_over_datanodes_and_the_oldest_few_by_id():
    registry = CollectorRegistry()
    sup = _supervisor(registry)
    # Datanode d heartbeats last at 100_000 - 1000 * d: ages 1 s .. 20 s at the tick; 1,000 regions each.
    for d in range(1, 21):
        sup.handle(Heartbeat(d, as_region_array(range(d * 10_000, d * 10_000 + 1000)), 100_000 - 1000 * d), 0)
    sup.handle(Heartbeat(2**64 - 1, as_region_array([1]), 100_000), 0)  # the largest id, age 0
    sup.handle(Tick(), 100_000)
    assert registry.get_sample_value(f"{HIST}_count") == 21  # datanodes, not 20,001 regions
    assert registry.get_sample_value(f"{HIST}_sum") == sum(range(1, 21))
    assert registry.get_sample_value(f"{HIST}_bucket", {"le": "1.0"}) == 2  # ages 0 and 1
    assert registry.get_sample_value(f"{HIST}_bucket", {"le": "10.0"}) == 11
    assert registry.get_sample_value(f"{HIST}_bucket", {"le": "+Inf"}) == 21
    oldest = _oldest(registry)
    assert len(oldest) == OLDEST_HEARTBEATS_REPORTED
    assert oldest == {str(d): float(d) for d in range(20, 20 - OLDEST_HEARTBEATS_REPORTED, -1)}
    # Every series of the whole registry: bounded by datanodes' count only through OLDEST.
    names = [s for m in registry.collect() for s in m.samples if s.name.startswith(HIST)]
    assert len(names) == len(AGE_BUCKETS_S) + 2  # the buckets (+Inf among them), count and sum


def test_a_deregistered_datanode_leaves_the_summary_and_a_heartbeat_from_the_future_is_age_zero():
    registry = CollectorRegistry()
    sup = _supervisor(registry)
    sup.handle(Heartbeat(1, as_region_array([10]), 1_000), 0)
    sup.handle(Heartbeat(2, as_region_array([20]), 500_000), 0)  # a client clock ahead of ours
    sup.handle(Tick(), 61_000)
    assert _oldest(registry) == {"1": 60.0, "2": 0.0}
    sup.handle(Deregister(((1, 10),)), 61_000)
    sup.handle(Tick(), 62_000)
    assert _oldest(registry) == {"2": 0.0}
    assert registry.get_sample_value(f"{HIST}_count") == 1


def test_an_empty_table_publishes_an_empty_summary():
    registry = CollectorRegistry()
    sup = _supervisor(registry)
    sup.handle(Tick(), 5_000)
    assert registry.get_sample_value(f"{HIST}_count") == 0
    assert _oldest(registry) == {}


def test_a_replica_that_stops_leading_reports_no_ages():
    """Its ticks stop with its leadership: ages as of its last tick would look like silent datanodes."""
    registry = CollectorRegistry()
    sup = _supervisor(registry)
    sup.handle(Heartbeat(1, as_region_array([10]), 1_000), 0)
    sup.handle(Tick(), 31_000)
    assert _oldest(registry) == {"1": 30.0}
    sup.handle(LoseLeadership(), 31_000)
    assert _oldest(registry) == {}
    assert registry.get_sample_value(f"{HIST}_count") == 0
