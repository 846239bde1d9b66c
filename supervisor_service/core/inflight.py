"""The in-flight model: every failover decision not ended, by region and by procedure (docs/design.md §4, §6).

A decision (`Submission`) moves regions of one datanode to one target under one request_id,
and is stored under one key whatever the number of regions. `InFlight` holds the decisions
and the two indexes derived from them, kept only by `add` and `remove`: which submission holds
each region (a region is in at most one), and the submissions under each procedure id (what
is polled).
"""

from __future__ import annotations

from collections.abc import Collection, ItemsView, KeysView
from dataclasses import dataclass, field

from supervisor_service.core.changes import ClockMark, InFlightRecord
from supervisor_service.core.types import MigrationTask


@dataclass(slots=True)
class Submission:
    """One decision, from its intent to its end; the in-memory side of its InFlightRecord.

    intent / ambiguous: the regions are held (maybe submitted) and the call is retried, to the
    same target with the same request_id, until a definite answer; submitted / migrating: in
    flight until the procedure ends or `deadline_ms` passes.
    """

    sid: str  # its key in the store (the request_id, or request_id + ".m" for regions reported migrating)
    task: MigrationTask  # task_id is the attempt now out, or the last one
    state: str
    procedure_id: str = ""
    attempts: int = 0
    sending: bool = False
    retry_at_ms: int = 0
    rewrite: bool = False  # the record must be written again before the next call (its write failed)
    deadline_ms: int = 0
    mark: ClockMark | None = None

    @property
    def regions(self) -> tuple[int, ...]:
        return self.task.region_ids

    def record(self) -> InFlightRecord:
        t = self.task
        return InFlightRecord(t.request_id, t.datanode_id, t.from_peer, t.to_peer, t.region_ids, t.timeout_ms,
                              self.state, self.procedure_id, self.attempts, self.mark, t.trigger_reason)


@dataclass(slots=True)
class Procedure:
    """A RegionMigration procedure that submissions run under, and its polling."""

    sids: set[str] = field(default_factory=set)
    next_poll_ms: int = 0
    polling: bool = False


class InFlight:
    """The decisions not ended, and their indexes by region and by procedure."""

    def __init__(self) -> None:
        self._subs: dict[str, Submission] = {}
        self._by_region: dict[int, str] = {}  # region -> the submission holding it (in flight or maybe)
        self._procedures: dict[str, Procedure] = {}

    def __len__(self) -> int:
        return len(self._subs)

    def get(self, sid: str) -> Submission | None:
        return self._subs.get(sid)

    def submissions(self) -> Collection[Submission]:
        return self._subs.values()

    @property
    def regions(self) -> KeysView[int]:
        """The regions held by a submission (a live view)."""
        return self._by_region.keys()

    def holds(self, region_id: int) -> bool:
        return region_id in self._by_region

    def holder(self, region_id: int) -> Submission | None:
        """The submission holding the region, if one does."""
        sid = self._by_region.get(region_id)
        return None if sid is None else self._subs.get(sid)

    def procedure(self, procedure_id: str) -> Procedure | None:
        return self._procedures.get(procedure_id)

    def procedures(self) -> ItemsView[str, Procedure]:
        return self._procedures.items()

    def add(self, sub: Submission, poll_at_ms: int | None = None) -> None:
        """Hold the submission's regions; with `poll_at_ms`, it runs under its procedure, polled from then."""
        self._subs[sub.sid] = sub
        for region_id in sub.regions:
            self._by_region[region_id] = sub.sid
        if poll_at_ms is not None:
            proc = self._procedures.setdefault(sub.procedure_id, Procedure())
            proc.sids.add(sub.sid)
            proc.next_poll_ms = poll_at_ms

    def remove(self, sid: str) -> Submission:
        """Forget a submission: its regions are free again (those it still holds)."""
        sub = self._subs.pop(sid)
        for region_id in sub.regions:
            if self._by_region.get(region_id) == sid:
                del self._by_region[region_id]
        proc = self._procedures.get(sub.procedure_id) if sub.procedure_id else None
        if proc is not None:
            proc.sids.discard(sid)
            if not proc.sids:
                del self._procedures[sub.procedure_id]
        return sub

    def clear(self) -> None:
        self._subs.clear()
        self._by_region.clear()
        self._procedures.clear()
