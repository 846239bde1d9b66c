"""What the core needs from outside, as protocols: the metrics it sets (docs/design.md §9).

The core imports no metrics library. `supervisor_service.app.metrics.Metrics` satisfies
`CoreMetrics` structurally (its prometheus_client gauges and counters have these methods);
a test can pass any object with the same members.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

_Child_co = TypeVar("_Child_co", covariant=True)


class Gauge(Protocol):
    def set(self, value: float, /) -> None: ...


class Counter(Protocol):
    def inc(self, amount: float = 1, /) -> None: ...


class Labelled(Protocol[_Child_co]):
    """A metric with labels: `labels(reason="...")` gives the child to set or increment."""

    def labels(self, **labels: str) -> _Child_co: ...


PHI_BUCKETS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0, 32.0, float("inf"))
"""Upper bounds of the phi distribution's buckets: around the default threshold of 8, plus the tails."""


class Distribution(Protocol):
    """The phi distribution, replaced wholesale: detectors per bucket of `PHI_BUCKETS` (the first
    bound phi is at or under), all detectors, and the sum of their finite phi."""

    def set(self, buckets: list[int], count: int, total: float, /) -> None: ...


class AgeSummary(Protocol):
    """The heartbeat age summary, replaced wholesale (`core.heartbeat_ages.heartbeat_ages`): datanodes
    per bucket, datanodes, sum of ages in seconds, and (datanode, age) of the oldest few."""

    def set(self, buckets: list[int], count: int, total: float, oldest: list[tuple[int, float]], /) -> None: ...


class CoreMetrics(Protocol):
    """Every metric the core sets, and only those (read-only members: any subtype will do)."""

    @property
    def detectors(self) -> Gauge: ...
    @property
    def detector_groups(self) -> Gauge: ...
    @property
    def phi(self) -> Distribution: ...
    @property
    def failures_detected(self) -> Counter: ...
    @property
    def failover_regions(self) -> Labelled[Counter]: ...
    @property
    def failover_errors(self) -> Labelled[Counter]: ...
    @property
    def failover_skipped(self) -> Labelled[Counter]: ...
    @property
    def inflight(self) -> Gauge: ...
    @property
    def drains(self) -> Labelled[Gauge]: ...
    @property
    def drain_regions(self) -> Labelled[Gauge]: ...
    @property
    def failover_history(self) -> Gauge: ...
    @property
    def submissions(self) -> Labelled[Gauge]: ...
    @property
    def submit_retries(self) -> Counter: ...
    @property
    def migration_not_found(self) -> Counter: ...
    @property
    def selector_invalid(self) -> Labelled[Counter]: ...
    @property
    def maintenance(self) -> Gauge: ...
    @property
    def maintenance_datanodes(self) -> Gauge: ...
    @property
    def failover_hold(self) -> Labelled[Gauge]: ...
    @property
    def failed_datanode_fraction(self) -> Gauge: ...
    @property
    def leader(self) -> Gauge: ...
    @property
    def leader_term(self) -> Gauge: ...
    @property
    def heartbeat_ages(self) -> AgeSummary: ...
    @property
    def leadership_changes(self) -> Labelled[Counter]: ...
