"""The resubmission back-off of regions whose decision ended without moving them (docs/design.md §4).

A decision that ends unsettled (the procedure unknown or FAILED, the call refused, a
peer_conflict) leaves its regions failed, so they are failed over again: each no sooner than
a backoff that doubles per such end, and at most `max_resubmissions_per_window` times per
window, so that a RegionMigration that keeps saying no does not get a new migration, to a new
target, every tick.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from supervisor_service.core.logs import log_event, sample
from supervisor_service.core.options import FailoverPolicy

log = logging.getLogger("supervisor_service.supervisor")


class ResubmitBackoff:
    """Per region: when it may be submitted again, and when its decisions ended unsettled."""

    def __init__(self, policy: FailoverPolicy) -> None:
        self.policy = policy
        self.until_ms: dict[int, int] = {}  # region -> no new submission before
        self.ended_ms: dict[int, deque[int]] = {}  # region -> times a decision of it ended unsettled

    def __bool__(self) -> bool:
        """True while some region is backed off."""
        return bool(self.until_ms)

    def back_off(self, datanode_id: int, regions: Iterable[int], why: str, now: int, procedure_id: str = "") -> None:
        """A decision of these regions ended unsettled at `now` (`why`: not_found, failed, refused, ...)."""
        p = self.policy
        regions = list(regions)
        until_max = now
        for region_id in regions:
            times = self.ended_ms.setdefault(region_id, deque())
            while times and times[0] <= now - p.resubmit_window_ms:
                times.popleft()
            times.append(now)
            if len(times) > p.max_resubmissions_per_window:
                until = times[0] + p.resubmit_window_ms
            else:
                until = now + min(p.resubmit_backoff_ms * (1 << (len(times) - 1)), p.resubmit_backoff_max_ms)
            self.until_ms[region_id] = until
            until_max = max(until_max, until)
        event = "migration_not_found" if why == "not_found" else "failover_resubmission_backed_off"
        log_event(log, logging.WARNING, event, datanode_id=datanode_id, reason=why, procedure_id=procedure_id,
                  regions=len(regions), sample=sample(regions), resubmit_after_ms=until_max - now)

    def due(self, regions: list[int], now: int) -> tuple[list[int], int, int]:
        """(the regions that may be submitted now, how many wait for their backoff, how many for the
        window's limit)."""
        limit = self.policy.max_resubmissions_per_window
        ready, backoff, limited = [], 0, 0
        for region_id in regions:
            until = self.until_ms.get(region_id, 0)
            if now >= until:
                self.until_ms.pop(region_id, None)
                ready.append(region_id)
            elif len(self.ended_ms.get(region_id, ())) > limit:
                limited += 1
            else:
                backoff += 1
        return ready, backoff, limited

    def expire(self, now: int) -> None:
        """Backoffs that ran out end (a region that recovered meanwhile keeps none), and ends older than
        the window are forgotten."""
        if self.until_ms:
            for region_id in [r for r, until in self.until_ms.items() if until <= now]:
                del self.until_ms[region_id]
        if self.ended_ms:
            horizon = now - self.policy.resubmit_window_ms
            for region_id in list(self.ended_ms):
                times = self.ended_ms[region_id]
                while times and times[0] <= horizon:
                    times.popleft()
                if not times and region_id not in self.until_ms:
                    del self.ended_ms[region_id]

    def forget(self, region_id: int) -> None:
        """The region is no longer watched."""
        self.ended_ms.pop(region_id, None)
        self.until_ms.pop(region_id, None)

    def clear(self) -> None:
        self.ended_ms.clear()
        self.until_ms.clear()
