"""Maintenance: the global switch and the per-datanode ones, their expiry, their checkpoints (docs/design.md §5, §6).

While maintenance is on, nothing is failed over (globally, or that datanode's regions). When
it ends, what it covered is re-baselined, so an upgrade window does not end in a burst of
failovers. Every change is stored with a mark of this clock, and while an expiry is pending
the time it has left is checkpointed: a successor trusts only the time an expiry had left,
never a wall-clock difference.
"""

from __future__ import annotations

import logging

from supervisor_service.core.changes import ClockMark, MaintenanceSet, StoredState
from supervisor_service.core.clock import ClockBase
from supervisor_service.core.detection import Detection
from supervisor_service.core.logs import log_event
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.ports import CoreMetrics

log = logging.getLogger("supervisor_service.supervisor")


class Maintenance:
    """The maintenance switches, with expiries (0: none) on this life's clock."""

    def __init__(self, policy: FailoverPolicy, metrics: CoreMetrics, clock: ClockBase, detection: Detection,
                 out: Outbox, enabled: bool) -> None:
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._detection = detection
        self._out = out
        self.enabled = enabled
        self.until_ms = 0  # expiry of the global switch (0: none)
        self.datanodes: dict[int, int] = {}  # datanode -> expiry (0: none)
        self._last_checkpoint_ms = 0
        metrics.maintenance.set(int(enabled))

    def covers(self, datanode_id: int) -> bool:
        """Whether no migration of this datanode's regions may start now (globally, or its own switch)."""
        return self.enabled or datanode_id in self.datanodes

    def state(self, now: int | None = None) -> MaintenanceSet:
        """The switches; with `now`, marked with this clock (what is stored)."""
        return MaintenanceSet(
            self.enabled, self.until_ms, tuple(sorted(self.datanodes.items())),
            None if now is None else self._clock.mark(now),
        )

    def set(self, enabled: bool, datanode_ids: tuple[int, ...], ttl_ms: int, now: int) -> MaintenanceSet:
        """SetMaintenance: global, or per datanode when `datanode_ids` is set. Returns the new switches."""
        until = now + ttl_ms if enabled and ttl_ms > 0 else 0
        if datanode_ids:
            ended = []
            for d in datanode_ids:
                if enabled:
                    self.datanodes[d] = until
                elif self.datanodes.pop(d, None) is not None:
                    ended.append(d)
            log_event(log, logging.WARNING, "datanode_maintenance_changed", enabled=enabled,
                      datanodes=",".join(map(str, datanode_ids)), until_ms=until)
            self._end(ended, now)
        else:
            was = self.enabled
            if enabled != was or until != self.until_ms:
                log_event(log, logging.WARNING, "maintenance_mode_changed", enabled=enabled, until_ms=until)
            self.enabled, self.until_ms = enabled, until
            if was and not enabled:
                self._end(None, now)
        self._publish()
        self._checkpoint(now)
        return self.state()

    def expire(self, now: int) -> None:
        """At each tick: switches past their expiry end; a pending expiry is checkpointed."""
        changed = False
        if self.enabled and 0 < self.until_ms <= now:
            log_event(log, logging.WARNING, "maintenance_mode_expired", until_ms=self.until_ms)
            self.enabled, self.until_ms = False, 0
            self._end(None, now)
            changed = True
        expired = [d for d, until in self.datanodes.items() if 0 < until <= now]
        if expired:
            for d in expired:
                del self.datanodes[d]
            log_event(log, logging.WARNING, "datanode_maintenance_expired", datanodes=",".join(map(str, expired)))
            self._end(expired, now)
            changed = True
        if changed:
            self._publish()
            self._checkpoint(now)
        elif (self.until_ms or any(self.datanodes.values())) and (
            now - self._last_checkpoint_ms >= self._policy.expiry_checkpoint_interval_ms
        ):
            # Checkpoint of the time left: a successor on another machine (or after a reboot) ends
            # the window at most this interval plus the time without a leader late, never early.
            self._checkpoint(now)

    def load(self, state: StoredState, now: int) -> None:
        """A leader's recovery: the stored switches, their expiries on this life's clock."""
        self.enabled = state.maintenance
        mark = state.maintenance_mark
        self.until_ms = self._recover_expiry(state.maintenance_until_ms, mark, now)
        self.datanodes = {d: self._recover_expiry(until, mark, now) for d, until in state.datanode_maintenance.items()}
        self._last_checkpoint_ms = now
        if mark is not None or self.until_ms or any(self.datanodes.values()):
            self._out.changes.append(self.state(now))
        self._publish()

    def _recover_expiry(self, until: int, mark: ClockMark | None, now: int) -> int:
        """A stored expiry (0: none) on this life's clock: the time it had left at its mark, less the
        time since (on this boot). The first format had no mark: its absolute time is kept."""
        if until <= 0:
            return 0
        if mark is None:
            return until
        left = until - mark.wall_ms - self._clock.elapsed_since(mark, now)
        return now + max(left, 1)

    def _end(self, datanode_ids: list[int] | None, now: int) -> None:
        """Maintenance ended for these datanodes (all: None): re-baseline what it covered."""
        if datanode_ids == [] or not self._policy.rebaseline_after_maintenance:
            return
        self._detection.rebaseline(datanode_ids, now)

    def _checkpoint(self, now: int) -> None:
        self._last_checkpoint_ms = now
        self._out.changes.append(self.state(now))

    def _publish(self) -> None:
        self._metrics.maintenance.set(int(self.enabled))
        self._metrics.maintenance_datanodes.set(len(self.datanodes))
