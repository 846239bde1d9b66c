"""The failover history: one durable record per decision, with its evidence, checks and end (docs/design.md §18).

A decision (one SubmitRegionMigration of regions of one datanode to one target, under one
request_id) is recorded when it is made, whatever the RegionMigration behind it: the evidence
of each region (phi, last heartbeat, observed mean and std, samples, count) as a Dump would
have shown it at that instant, the threshold and pause in force, every guard and rule checked
and how it came out, the target, the peers excluded. The record is updated when the submit is
answered (per region) and when the migration ends (state, time). Each change of a record is
one `FailoverSet` in the same store transaction as the step it records; the oldest records
beyond `failover_history_capacity` are dropped (`FailoverDrop`). Owned by the supervisor thread.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np

from supervisor_service.core.changes import FailoverDrop, FailoverSet
from supervisor_service.core.logs import log_event
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.ports import Gauge
from supervisor_service.core.records import TRIGGER_FAILOVER, FailoverRecord, RegionEvidence
from supervisor_service.core.table import DetectorTable, NodeSnapshot
from supervisor_service.core.types import MigrationState, MigrationTask

MAX_EVIDENCE = 1000
"""Regions whose evidence a record keeps (the rest are counted in a check): a record stays one small key."""
MAX_RESULT_LEN = 300
"""Longest call error kept in a record."""


def evidence_of(
    node: NodeSnapshot, region_ids: Sequence[int], at: int, counts: dict[tuple[int, int], int]
) -> list[RegionEvidence]:
    """The evidence of `region_ids` (those `node` has) at `at`: what a Dump at `at` shows of them."""
    wanted = np.asarray(region_ids, dtype=np.uint64)
    pos = np.searchsorted(node.regions, wanted)
    pos = np.minimum(pos, max(node.regions.size - 1, 0))
    present = node.regions.size > 0
    groups = node.groups
    samples, means, stds = (a.tolist() for a in node.observed())  # the Dump's columns, the same bits
    out = []
    for region_id, p in zip(wanted.tolist(), pos.tolist()):
        if not present or int(node.regions[p]) != region_id:
            continue
        gi = int(node.gids[p])
        g = groups[gi]
        out.append(RegionEvidence(region_id, g.phi(at), g.last, means[gi], stds[gi], samples[gi],
                                  counts.get((node.datanode_id, region_id), 0)))
    return out


log = logging.getLogger("supervisor_service.supervisor")

__all__ = ["FailoverHistory", "FailoverRecord", "RegionEvidence", "evidence_of"]


class FailoverHistory:
    """The records of the decisions, oldest first, bounded by `capacity`."""

    def __init__(self, table: DetectorTable, out: Outbox, capacity: int, gauge: Gauge | None = None) -> None:
        self._table = table
        self._out = out
        self.capacity = max(1, capacity)
        self._gauge = gauge  # supervisor_failover_history_records
        self._records: dict[str, FailoverRecord] = {}  # by failover_id, oldest first

    def __len__(self) -> int:
        return len(self._records)

    def restore(self, records: Iterable[FailoverRecord], unreadable: Sequence[str] = ()) -> None:
        """The stored records (a new leadership): the newest `capacity` of them, oldest first. Those
        beyond the capacity (it was lowered) are dropped from the store; unreadable ones are logged."""
        ordered = sorted(records, key=lambda r: (r.decided_at_millis, r.failover_id))
        keep = ordered[-self.capacity:]
        self._records = {r.failover_id: r for r in keep}
        self._out.changes.extend(FailoverDrop(r.failover_id) for r in ordered[:len(ordered) - len(keep)])
        if unreadable:
            log_event(log, logging.ERROR, "failover_records_unreadable", records=len(unreadable),
                      sample=",".join(unreadable[:5]), kept="left in the store, not shown")
        if self._gauge is not None:
            self._gauge.set(len(self._records))

    def get(self, failover_id: str) -> FailoverRecord | None:
        return self._records.get(failover_id)

    # ------------------------------------------------------------ the hooks

    def decided(self, tasks: list[MigrationTask], checks: list[str], counts: dict[tuple[int, int], int],
                now: int, trigger_reason: str = TRIGGER_FAILOVER) -> None:
        """New decisions (one per task): recorded with the regions' evidence at `now`."""
        if not tasks:
            return
        opts = self._table.opts
        datanode_id = tasks[0].datanode_id
        nodes = self._table.snapshot({datanode_id})
        for task in tasks:
            evidence = evidence_of(nodes[0], task.region_ids[:MAX_EVIDENCE], now, counts) if nodes else []
            own = list(checks)
            if len(task.region_ids) > MAX_EVIDENCE:
                own.append(f"evidence: the first {MAX_EVIDENCE} of {len(task.region_ids)} regions are kept")
            self._put(FailoverRecord(
                failover_id=task.request_id, decided_at_millis=now, leader_term=task.leader_term,
                datanode_id=task.datanode_id, from_peer=task.from_peer, to_peer=task.to_peer,
                region_ids=task.region_ids, timeout_ms=task.timeout_ms, evidence=tuple(evidence),
                threshold=opts.threshold, acceptable_heartbeat_pause_ms=float(opts.acceptable_heartbeat_pause_ms),
                checks=tuple(own), trigger_reason=trigger_reason,
            ))

    def answered(self, failover_id: str, categories: dict[int, list[str]], procedure_id: str,
                 in_flight: bool, now: int) -> None:
        """The submit's answer, region by region; a decision with nothing left in flight ends now."""
        rec = self._records.get(failover_id)
        if rec is None:
            return
        per_region = {r: "+".join(c) for r, c in categories.items()}
        tally: dict[str, int] = {}
        for region_id in rec.region_ids:
            cat = per_region.get(region_id, "unanswered")
            tally[cat] = tally.get(cat, 0) + 1
        result = ", ".join(f"{c}: {n}" for c, n in sorted(tally.items()))
        evidence = tuple(dataclasses.replace(e, result=per_region.get(e.region_id, "unanswered")) for e in rec.evidence)
        changes: dict[str, object] = {"procedure_id": procedure_id, "result": result, "evidence": evidence}
        if not in_flight:
            state = MigrationState.SUCCEEDED if set(tally) == {"migrated"} else MigrationState.UNSPECIFIED
            changes.update(final_state=state, finished_at_millis=now)
        self._put(dataclasses.replace(rec, **changes))  # type: ignore[arg-type]

    def call_failed(self, failover_id: str, error: str, ends: bool, now: int) -> None:
        """The submit call failed: `ends` when the decision ends with it (refused), else it is retried."""
        rec = self._records.get(failover_id)
        if rec is None:
            return
        result = error[:MAX_RESULT_LEN]
        if ends:
            self._put(dataclasses.replace(rec, result=f"refused: {result}", final_state=MigrationState.FAILED,
                                          finished_at_millis=now))
        else:
            self._put(dataclasses.replace(rec, result=f"call failed, retried: {result}"))

    def finished(self, failover_id: str, state: MigrationState | None, now: int, why: str = "") -> None:
        """The migration ended: its procedure's final state, or None when it ended at its timeout."""
        rec = self._records.get(failover_id)
        if rec is None or rec.finished_at_millis:
            return
        changes: dict[str, object] = {"finished_at_millis": now}
        if state is not None:
            changes["final_state"] = state
        if why:
            changes["result"] = f"{rec.result}; {why}" if rec.result else why
        self._put(dataclasses.replace(rec, **changes))  # type: ignore[arg-type]

    # ------------------------------------------------------------ readings

    def query(self, datanode_ids: Iterable[int] = (), region_ids: Iterable[int] = (), since_ms: int = 0,
              limit: int = 100) -> list[FailoverRecord]:
        """Newest first: the records of those datanodes and regions (empty: any) decided at or after `since_ms`."""
        nodes, regions = set(datanode_ids), set(region_ids)
        out: list[FailoverRecord] = []
        for rec in reversed(self._records.values()):
            if len(out) >= limit:
                break
            if rec.decided_at_millis < since_ms:
                continue
            if nodes and rec.datanode_id not in nodes:
                continue
            if regions and regions.isdisjoint(rec.region_ids):
                continue
            out.append(rec)
        return out

    def _put(self, rec: FailoverRecord) -> None:
        new = rec.failover_id not in self._records
        self._records[rec.failover_id] = rec
        self._out.changes.append(FailoverSet(rec))
        while new and len(self._records) > self.capacity:
            oldest = next(iter(self._records))
            del self._records[oldest]
            self._out.changes.append(FailoverDrop(oldest))
        if new and self._gauge is not None:
            self._gauge.set(len(self._records))
