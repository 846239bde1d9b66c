"""What the detector table says failed at a tick, and the re-baseline that makes it forget (docs/design.md §2, §4)."""

from __future__ import annotations

import logging

import numpy as np

from supervisor_service.core.logs import log_event
from supervisor_service.core.ports import CoreMetrics
from supervisor_service.core.table import DetectorTable
from supervisor_service.core.types import RegionArray

log = logging.getLogger("supervisor_service.supervisor")


class Detection:
    """The failed regions of each tick; counts each crossing of the threshold once."""

    def __init__(self, table: DetectorTable, metrics: CoreMetrics) -> None:
        self._table = table
        self._metrics = metrics
        self._prev_failed: dict[int, RegionArray] = {}

    @property
    def last_failed(self) -> dict[int, RegionArray]:
        """The datanodes (and their regions) the last tick found at or above the threshold; do not modify."""
        return self._prev_failed

    def failed(self, now: int) -> dict[int, RegionArray]:
        """(datanode -> sorted failed region ids) at `now`; regions that were not failed at the last
        tick count as new failures."""
        failed = dict(self._table.failed(now))
        new = 0
        for datanode_id, region_ids in failed.items():
            before = self._prev_failed.get(datanode_id)
            new += region_ids.size if before is None else np.setdiff1d(region_ids, before).size
        if new:
            self._metrics.failures_detected.inc(new)
        self._prev_failed = failed
        return failed

    def rebaseline(self, datanode_ids: list[int] | None, now: int) -> None:
        """Every detector of the datanodes (all: None) starts afresh with a heartbeat at `now`: what
        maintenance covered does not end in a burst of failovers, and fails again only as a new failure."""
        count = self._table.rebaseline(datanode_ids, now)
        self._prev_failed = {}
        log_event(log, logging.WARNING, "detectors_rebaselined", detectors=count,
                  scope="all" if datanode_ids is None else ",".join(map(str, datanode_ids)))

    def forget(self) -> None:
        """The table was cleared (or a leadership changed): nothing failed before."""
        self._prev_failed.clear()
