"""The drains a leader knows, as records and views (docs/design.md §17): what is stored of a drain,
what GetDrain shows, and the indexes the drain logic (core.drains) keeps over them: which drain
holds each region not settled yet, which regions a drain moved off which datanode, and which
datanodes are being drained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from supervisor_service.core.changes import DrainDrop, DrainSet
from supervisor_service.core.inflight import InFlight
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.ports import CoreMetrics
from supervisor_service.core.types import SelectJob, region_label

RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"
DRAIN_STATES = (RUNNING, DONE, CANCELLED, FAILED)
MAX_KEPT_DRAINS = 100  # finished drains kept (their records, for GetDrain and the moved regions' holds)
MAX_FAILURES_SHOWN = 100
MAX_DRAIN_REGIONS = 200_000  # per drain: its record is one stored value (store/planned_codec.py)
# Holds of all failover that hold drains too. Warm-up does not: a drain does not rest on detection.
DRAIN_HOLDS = ("maintenance", "local_pause", "overload", "mass_failure")


class DrainRefused(Exception):
    """A drain that cannot start (FAILED_PRECONDITION at the edge)."""


@dataclass(frozen=True, slots=True)
class DrainRecord:
    """A drain as stored: written whole on every change (regions are few thousand at most per drain)."""

    drain_id: str
    datanode_ids: tuple[int, ...]
    regions: tuple[tuple[int, tuple[int, ...]], ...]  # (datanode, its regions when the drain started)
    state: str
    started_at_ms: int
    finished_at_ms: int = 0
    reason: str = ""
    moved: tuple[int, ...] = ()
    gone: tuple[int, ...] = ()
    failed: tuple[tuple[int, str], ...] = ()  # (region, why)
    attempts: tuple[tuple[int, int], ...] = ()  # (region, migrations of it that ended without moving it)


@dataclass(frozen=True, slots=True)
class DrainView:
    """What GetDrain shows of a drain at one moment."""

    drain_id: str
    datanode_ids: tuple[int, ...]
    regions_total: int
    regions_moved: int
    regions_in_flight: int
    regions_pending: int
    regions_failed: int
    regions_gone: int
    state: str
    started_at_ms: int
    finished_at_ms: int
    reason: str
    failures: tuple[str, ...]


@dataclass(slots=True)
class Drain:
    drain_id: str
    datanode_ids: tuple[int, ...]
    regions: dict[int, tuple[int, ...]]
    state: str
    started_at_ms: int
    finished_at_ms: int = 0
    reason: str = ""
    moved: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    retry_at: dict[int, int] = field(default_factory=dict)  # not stored: a new leader retries at once

    @classmethod
    def of(cls, rec: DrainRecord) -> Drain:
        return cls(rec.drain_id, rec.datanode_ids, dict(rec.regions), rec.state, rec.started_at_ms,
                   rec.finished_at_ms, rec.reason, set(rec.moved), set(rec.gone), dict(rec.failed),
                   dict(rec.attempts))

    def record(self) -> DrainRecord:
        return DrainRecord(self.drain_id, self.datanode_ids, tuple(sorted(self.regions.items())), self.state,
                           self.started_at_ms, self.finished_at_ms, self.reason, tuple(sorted(self.moved)),
                           tuple(sorted(self.gone)), tuple(sorted(self.failed.items())),
                           tuple(sorted(self.attempts.items())))

    @property
    def total(self) -> int:
        return sum(len(r) for r in self.regions.values())

    def settled(self, region_id: int) -> bool:
        return region_id in self.moved or region_id in self.gone or region_id in self.failed

    def open_regions(self) -> Iterable[tuple[int, int]]:
        """(datanode, region) of the regions not settled yet."""
        for d, regions in self.regions.items():
            for r in regions:
                if not self.settled(r):
                    yield d, r


class DrainBook:
    """The drains (running and recently finished, in start order) and their indexes."""

    def __init__(self, metrics: CoreMetrics, out: Outbox, inflight: InFlight) -> None:
        self._metrics = metrics
        self._out = out
        self._inflight = inflight
        self._drains: dict[str, Drain] = {}  # in start order
        self._owner: dict[int, tuple[str, int]] = {}  # open region -> (drain, its drained datanode)
        self._moved_from: dict[tuple[int, int], str] = {}  # (datanode, region) moved off it -> the drain
        self._selecting: dict[tuple[str, int], SelectJob] = {}  # (drain, datanode) -> the job asked for
        self._draining: frozenset[int] = frozenset()

    def _find(self, drain_id: str) -> Drain | None:
        """The drain with that id, or the newest one for ''."""
        return self._drains.get(drain_id) if drain_id else next(reversed(self._drains.values()), None)

    def view(self, drain: Drain) -> DrainView:
        # From the regions in flight and asked for, not from the drain's own (a drain may hold 100,000).
        did = drain.drain_id
        in_flight = sum(1 for r in self._inflight.regions if (o := self._owner.get(r)) is not None and o[0] == did)
        asked = {r for (d, _), job in self._selecting.items() if d == did for r in job.region_ids}
        in_flight += sum(1 for r in asked if not self._inflight.holds(r) and not drain.settled(r))
        open_count = drain.total - len(drain.moved) - len(drain.gone) - len(drain.failed)
        failures = tuple(f"{region_label(r)}: {why}" for r, why in sorted(drain.failed.items())[:MAX_FAILURES_SHOWN])
        return DrainView(drain.drain_id, drain.datanode_ids, drain.total, len(drain.moved), in_flight,
                         max(open_count - in_flight, 0), len(drain.failed), len(drain.gone), drain.state,
                         drain.started_at_ms, drain.finished_at_ms, drain.reason, failures)

    def draining(self) -> frozenset[int]:
        """The datanodes of running drains: no failover or drain picks them as a target."""
        return self._draining

    def load(self, records: Iterable[DrainRecord]) -> None:
        """A leader's recovery: the stored drains, running ones continued."""
        self.forget()
        for rec in sorted(records, key=lambda r: (r.started_at_ms, r.drain_id)):
            drain = self._drains[rec.drain_id] = Drain.of(rec)
            self._index(drain)
        self.publish()

    def forget(self) -> None:
        self._drains.clear()
        self._owner.clear()
        self._moved_from.clear()
        self._selecting.clear()
        self._draining = frozenset()

    def _running(self) -> list[Drain]:
        return [d for d in self._drains.values() if d.state == RUNNING]

    def _index(self, drain: Drain) -> None:
        for d, r in drain.open_regions():
            self._owner[r] = (drain.drain_id, d)
        for d, regions in drain.regions.items():
            for r in regions:
                if r in drain.moved:
                    self._moved_from[(d, r)] = drain.drain_id
        self._refresh_draining()

    def _settle(self, region_id: int) -> None:
        self._owner.pop(region_id, None)

    def _refresh_draining(self) -> None:
        self._draining = frozenset(d for drain in self._running() for d in drain.datanode_ids)

    def _trim(self) -> None:
        finished = [d for d in self._drains.values() if d.state != RUNNING]
        for drain in finished[:max(len(finished) - MAX_KEPT_DRAINS, 0)]:
            del self._drains[drain.drain_id]
            for key in [k for k, v in self._moved_from.items() if v == drain.drain_id]:
                del self._moved_from[key]
            for r in [r for r, o in self._owner.items() if o[0] == drain.drain_id]:
                del self._owner[r]
            self._out.changes.append(DrainDrop(drain.drain_id))

    def _store(self, drain: Drain) -> None:
        self._out.changes.append(DrainSet(drain.drain_id, drain.record()))

    def publish(self) -> None:
        """The drain gauges: drains by state, and the regions of running drains by state."""
        m = self._metrics
        by_state = dict.fromkeys(DRAIN_STATES, 0)
        regions = dict.fromkeys(("moved", "in_flight", "pending", "failed", "gone"), 0)
        for drain in self._drains.values():
            by_state[drain.state] += 1
            if drain.state == RUNNING:
                v = self.view(drain)
                regions["moved"] += v.regions_moved
                regions["in_flight"] += v.regions_in_flight
                regions["pending"] += v.regions_pending
                regions["failed"] += v.regions_failed
                regions["gone"] += v.regions_gone
        for state, n in by_state.items():
            m.drains.labels(state=state).set(n)
        for state, n in regions.items():
            m.drain_regions.labels(state=state).set(n)
