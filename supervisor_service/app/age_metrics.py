"""The heartbeat age summary the supervisor thread publishes at each tick (`core.heartbeat_ages`),
exported as `supervisor_datanode_heartbeat_age_seconds` (a histogram over datanodes, a snapshot as
of the last tick) and `supervisor_datanode_heartbeat_age_oldest_seconds{datanode_id}` (the oldest
few; a datanode's series ends when it is no longer among them)."""

from __future__ import annotations

import threading

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from supervisor_service.app.histograms import cumulative_buckets
from supervisor_service.core import AGE_BUCKETS_S


class HeartbeatAges(Collector):
    """Replaced wholesale by the supervisor thread, read by the scrape: one lock, no per-datanode series."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._summary: tuple[list[int], int, float, list[tuple[int, float]]] = ([0] * len(AGE_BUCKETS_S), 0, 0.0, [])

    def set(self, buckets: list[int], count: int, total: float, oldest: list[tuple[int, float]]) -> None:
        with self._lock:
            self._summary = (list(buckets), count, total, list(oldest))

    def collect(self):
        with self._lock:
            buckets, _, total, oldest = self._summary
        family = HistogramMetricFamily(
            "supervisor_datanode_heartbeat_age_seconds",
            "Age of each datanode's newest heartbeat as of the last tick, over the datanodes with detectors "
            "(a snapshot, not a running total).",
        )
        family.add_metric([], cumulative_buckets(AGE_BUCKETS_S, buckets), total)
        yield family
        gauge = GaugeMetricFamily(
            "supervisor_datanode_heartbeat_age_oldest_seconds",
            "Age of the newest heartbeat of the datanodes heard from longest ago, as of the last tick.",
            labels=("datanode_id",),
        )
        for datanode_id, age in oldest:
            gauge.add_metric([str(datanode_id)], age)
        yield gauge
