"""Holds: the reasons to hold all failover, and the rate-limited "held" log lines (docs/design.md §5).

The reasons are maintenance, warm-up and the guards' (local pause, overload, mass failure). A
hold is computed whatever `guards_enabled` says: maintenance and warm-up are not guards.
The holds of the last tick are published (the `failover_hold` gauges, `CoreStatus.holds`);
the log line of a repeated condition is rate-limited.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from supervisor_service.core.guards import Guards
from supervisor_service.core.logs import log_event
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.ports import CoreMetrics

log = logging.getLogger("supervisor_service.supervisor")

# Reasons to hold all failover on a tick (the order is the order they are checked in).
HOLD_REASONS = ("maintenance", "warmup", "local_pause", "overload", "mass_failure")


class HoldLog:
    """Log a repeated condition at most once per `log_interval_ms` (per kind of line, or per `key`)."""

    def __init__(self, policy: FailoverPolicy) -> None:
        self._interval_ms = policy.log_interval_ms
        self._last_ms: dict[str, int] = {}

    def __call__(self, now: int, event: str, /, **fields: object) -> None:
        self.keyed(now, event, event, **fields)

    def keyed(self, now: int, key: str, event: str, /, **fields: object) -> None:
        """As a call, with its own rate limit under `key` (one line of each kind of a condition)."""
        if now - self._last_ms.get(key, -(10**18)) >= self._interval_ms:
            self._last_ms[key] = now
            log_event(log, logging.WARNING, event, **fields)


class Warmup:
    """After becoming leader, no failover for `warmup_grace_ms`, or until `warmup_fraction` of the
    datanodes known then have been heard from, whichever comes first."""

    def __init__(self, policy: FailoverPolicy) -> None:
        self._policy = policy
        self._until_ms = 0
        self._known: set[int] = set()
        self._heard: set[int] = set()

    def start(self, known: Iterable[int], now: int) -> None:
        self._until_ms = now + self._policy.warmup_grace_ms
        self._known = set(known)
        self._heard = set()

    def heard(self, datanode_id: int) -> None:
        if self._known:
            self._heard.add(datanode_id)

    def active(self, now: int) -> bool:
        """Whether the warm-up still holds failover (once it ended, it stays ended)."""
        if not self._known or now >= self._until_ms:
            self._known = set()
            return False
        heard = len(self._known & self._heard) / len(self._known)
        if heard >= self._policy.warmup_fraction:
            self._known = set()
            return False
        return True

    def details(self) -> dict[str, object]:
        return {"heard": len(self._heard & self._known), "known": len(self._known), "until_ms": self._until_ms}

    def stop(self) -> None:
        self._known = set()


class Holds:
    """Every reason to hold all failover now, and the holds published at the last tick."""

    def __init__(self, metrics: CoreMetrics, maintenance: Maintenance, warmup: Warmup, guards: Guards | None) -> None:
        self._metrics = metrics
        self._maintenance = maintenance
        self._warmup = warmup
        self._guards = guards
        self.current: tuple[str, ...] = ()  # as published

    def compute(self, now: int, pause: str | None) -> tuple[str, ...]:
        """The holds of all failover at `now`, most fundamental first (`pause`: the guards' local_pause
        or overload, as the tick saw it)."""
        holds = []
        if self._maintenance.enabled:
            holds.append("maintenance")
        if self._warmup.active(now):
            holds.append("warmup")
        if pause is not None:
            holds.append(pause)
        if self._guards is not None and self._guards.mass_failure():
            holds.append("mass_failure")
        return tuple(holds)

    def details(self, reason: str, now: int = 0) -> dict[str, object]:
        """What the held log line of `reason` says besides the counts."""
        if reason == "warmup":
            return self._warmup.details()
        if reason == "overload" and self._guards is not None:
            return self._guards.overload_details(now)
        if reason == "mass_failure" and self._guards is not None:
            return {"failed_fraction": round(self._guards.mass_failure_fraction, 3),
                    "release": "supervisor-service hold release"}
        return {}

    def publish(self, holds: tuple[str, ...]) -> None:
        self.current = holds
        m = self._metrics
        for reason in HOLD_REASONS:
            m.failover_hold.labels(reason=reason).set(int(reason in holds))
        if self._guards is not None:
            m.failed_datanode_fraction.set(self._guards.mass_failure_fraction)

    def reset(self) -> None:
        """A leadership began or ended: what held the previous one is not this one's (the gauges
        follow at the next tick)."""
        self.current = ()
