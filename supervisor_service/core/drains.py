"""Planned drains: every region of some datanodes moved on purpose with the failover machinery
(docs/design.md §17).

A drain takes the regions watched on its datanodes when it starts, and at each leader tick asks
the Selector for targets for as many of those not yet moved as its budget allows
(`drain_regions_per_s`, highest table priority first), excluding every datanode being drained.
The answer becomes migration decisions like a failover's (`Migrations`: intent stored first, the
same request_id on every retry, in flight until the procedure ends), with `trigger_reason =
MANUAL`. Each end of a migration of one of its regions, whoever decided it (a drained datanode
that dies mid-drain is failed over), settles the region: moved, gone (no longer there without a
move of ours), or after `drain_max_attempts` failed. The record is stored on every change, in the
same write as the migration step that caused it, so a new leader continues the drain where this
one left it and never moves a region twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from supervisor_service.core.drainbook import (
    CANCELLED,
    DONE,
    DRAIN_HOLDS,
    FAILED,
    MAX_DRAIN_REGIONS,
    RUNNING,
    Drain,
    DrainBook,
    DrainRefused,
    DrainView,
)
from supervisor_service.core.effects import SelectPeers
from supervisor_service.core.events import SelectionDone
from supervisor_service.core.guards import Guards, TokenBucket
from supervisor_service.core.holds import HoldLog, Holds
from supervisor_service.core.ids import Ids
from supervisor_service.core.inflight import InFlight
from supervisor_service.core.leadership import LeaderState
from supervisor_service.core.logs import log_event, sample
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.migrations import Migrations
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.policy import TablePolicies, table_of
from supervisor_service.core.ports import CoreMetrics
from supervisor_service.core.registry import Registry
from supervisor_service.core.table import as_region_array
from supervisor_service.core.targets import TargetSelection
from supervisor_service.core.types import MANUAL, MigrationTask, Peer, RegionArray, SelectJob

log = logging.getLogger("supervisor_service.drains")


class Drains(DrainBook):
    """Drains from their start to their end: the operator's calls, the ticks, the answers, the ends."""

    def __init__(
        self, policy: FailoverPolicy, metrics: CoreMetrics, out: Outbox, registry: Registry, inflight: InFlight,
        migrations: Migrations, targets: TargetSelection, tables: TablePolicies, maintenance: Maintenance,
        holds: Holds, guards: Guards | None, leadership: LeaderState, ids: Ids, held_log: HoldLog,
    ) -> None:
        super().__init__(metrics, out, inflight)
        self._policy = policy
        self._registry = registry
        self._table = registry.table
        self._migrations = migrations
        self._targets = targets
        self._tables = self.tables = tables
        self._maintenance = maintenance
        self._holds = holds
        self._guards = guards
        self._leadership = leadership
        self._ids = ids
        self._held_log = held_log
        self._bucket: TokenBucket | None = None
        # The failover history's hook (core/insight.py): a drain's decisions, recorded before they leave.
        self.on_decision: Callable[[SelectJob, list[MigrationTask], int], None] | None = None

    # ------------------------------------------------------------ operator calls

    def start(self, datanode_ids: Sequence[int], reason: str, now: int) -> DrainView:
        busy = sorted(set(datanode_ids) & self._draining)
        if busy:
            owners = sorted({d.drain_id for d in self._running() if set(d.datanode_ids) & set(busy)})
            raise DrainRefused(f"datanode(s) {busy} are already being drained by {', '.join(owners)}: "
                               "wait for it to end or cancel it (drain cancel)")
        unknown = [d for d in sorted(set(datanode_ids)) if self._table.regions_of(d).size == 0]
        if unknown:
            raise DrainRefused(f"datanode(s) {unknown} have no watched region (unknown datanode, or already empty): "
                               "nothing to drain there; check the ids (Dump lists the datanodes)")
        term = self._leadership.term
        drain = Drain(f"drain-{self._ids.request_id(term)}", tuple(sorted(set(datanode_ids))), {}, RUNNING,
                       now, reason=reason)
        for d in drain.datanode_ids:
            drain.regions[d] = tuple(self._table.regions_of(d).tolist())
        if drain.total > MAX_DRAIN_REGIONS:
            raise DrainRefused(f"the datanodes hold {drain.total} regions; one drain moves at most {MAX_DRAIN_REGIONS}: "
                               "drain fewer datanodes at a time")
        self._drains[drain.drain_id] = drain
        self._index(drain)
        self._trim()
        self._store(drain)
        log_event(log, logging.WARNING, "drain_started", drain_id=drain.drain_id, datanodes=list(drain.datanode_ids),
                  regions=drain.total, reason=reason)
        self._finish_if_settled(drain, now)
        self.publish()
        return self.view(drain)

    def get(self, drain_id: str) -> DrainView | None:
        """The drain with that id, or the newest one for ''."""
        drain = self._find(drain_id)
        return None if drain is None else self.view(drain)

    def cancel(self, drain_id: str, reason: str, now: int) -> DrainView | None:
        """No new submission for the drain; what is in flight runs to its end (and is counted)."""
        drain = self._find(drain_id)
        if drain is None:
            return None
        if drain.state == RUNNING:
            drain.state, drain.finished_at_ms = CANCELLED, now
            for key in [k for k in self._selecting if k[0] == drain.drain_id]:
                del self._selecting[key]
            self._refresh_draining()
            self._store(drain)
            log_event(log, logging.WARNING, "drain_cancelled", drain_id=drain.drain_id, moved=len(drain.moved),
                      total=drain.total, reason=reason)
            self.publish()
        return self.view(drain)

    # ------------------------------------------------------------ what failover asks

    def failover_filter(self, datanode_id: int, region_ids: list[int]) -> list[int]:
        """The failed regions of a datanode that failover may move: not those of a table whose failover
        is disabled, not those a drain already moved off it (their detectors there go: a drained
        datanode that kept heartbeating them for a while made them again)."""
        m = self._metrics
        allowed = self._tables.failover_allowed(region_ids)
        if len(allowed) < len(region_ids):
            m.failover_skipped.labels(reason="table_disabled").inc(len(region_ids) - len(allowed))
        if self._moved_from:
            moved = [r for r in allowed if (datanode_id, r) in self._moved_from]
            if moved:
                m.failover_skipped.labels(reason="drained").inc(len(moved))
                self._registry.drop(datanode_id, as_region_array(moved))
                gone = set(moved)
                allowed = [r for r in allowed if r not in gone]
        return allowed

    def why_not_failed_over(self, datanode_id: int, region_id: int) -> str | None:
        """Why failover leaves this region (0: the datanode as a whole) alone (for Explain), or None."""
        if not region_id:
            ids = [i for i, dr in self._drains.items() if dr.state == RUNNING and datanode_id in dr.datanode_ids]
            return f"draining: datanode {datanode_id} is being drained by {ids[0]} (moved by the drain)" if ids else None
        if self._tables.disabled(region_id):
            return f"table_disabled: failover of table {table_of(region_id)} is disabled (policy set)"
        moved_by = self._moved_from.get((datanode_id, region_id))
        if moved_by is not None:
            return f"drained: moved off datanode {datanode_id} by {moved_by}"
        owner = self._owner.get(region_id)
        if owner is not None and owner[1] == datanode_id and self._drains[owner[0]].state == RUNNING:
            return f"draining: datanode {datanode_id} is being drained by {owner[0]} (moved by the drain, not failed over)"
        return None

    # ------------------------------------------------------------ a leader's tick

    def tick(self, now: int, failed: dict[int, RegionArray]) -> None:
        """Ask targets for the next regions of the running drains, within the budget."""
        running = self._running()
        if not running:
            return
        held = [h for h in self._holds.current if h in DRAIN_HOLDS]
        if held:
            self._held_log(now, f"drain_held_{held[0]}", drains=len(running))
            return
        budget = self._budget(now)
        tokens = budget.available(now)
        if tokens == 0:
            return  # nothing may leave before the budget refills: no need to look
        # Without table priorities the first `tokens` candidates are the ones taken: stop looking there.
        enough = tokens if not self._tables else None
        candidates: list[tuple[int, Drain, int]] = []  # (region, drain, datanode), in drain order
        for drain in running:
            changed = False
            for d in drain.datanode_ids:
                if (drain.drain_id, d) in self._selecting or (enough is not None and len(candidates) >= enough):
                    continue
                if self._maintenance.covers(d):
                    self._held_log(now, "drain_held_maintenance_datanode", drain_id=drain.drain_id, datanode_id=d)
                    continue
                failed_here = failed.get(d)
                failing = set(failed_here.tolist()) if failed_here is not None else set()
                on_table = set(self._table.regions_of(d).tolist())
                for r in drain.regions.get(d, ()):
                    if drain.settled(r) or self._inflight.holds(r) or r in failing:
                        continue  # settled, in flight, or failed: failover moves a failed one
                    if r not in on_table:
                        drain.gone.add(r)
                        self._settle(r)
                        changed = True
                        continue
                    if drain.retry_at.get(r, 0) <= now:
                        candidates.append((r, drain, d))
                        if enough is not None and len(candidates) >= enough:
                            break
            if changed:
                self._store(drain)
            self._finish_if_settled(drain, now)
        if not candidates:
            self.publish()
            return
        n = min(len(candidates), tokens)
        by_priority = sorted(candidates, key=lambda c: -self._tables.priority(c[0])) if self._tables else candidates
        chosen = by_priority[:n]
        budget.take(n, now)
        jobs: dict[tuple[str, int], list[int]] = {}
        for r, drain, d in chosen:
            jobs.setdefault((drain.drain_id, d), []).append(r)
        exclude = set(self._draining)
        if self._guards is not None:
            exclude |= self._guards.excluded_targets(now)
        for (drain_id, d), regions in jobs.items():
            job = SelectJob(self._ids.next(), d, tuple(regions), tuple(sorted(exclude)), drain_id=drain_id)
            self._selecting[(drain_id, d)] = job
            self._out.effects.append(SelectPeers(job))
            log_event(log, logging.INFO, "drain_selecting", drain_id=drain_id, datanode_id=d, regions=len(regions))
        self.publish()

    def _budget(self, now: int) -> TokenBucket:
        if self._bucket is None:
            p = self._policy
            self._bucket = TokenBucket(p.drain_regions_per_s, p.drain_burst_regions, now)
        return self._bucket

    def _give_back(self, n: int) -> None:
        if self._bucket is not None and n > 0:
            self._bucket.tokens = min(self._bucket.burst, self._bucket.tokens + n)

    # ------------------------------------------------------------ the Selector's answer

    def answered(self, ev: SelectionDone, now: int) -> None:
        job = ev.job
        key = (job.drain_id, job.datanode_id)
        current = self._selecting.get(key)
        if current is None or current.job_id != job.job_id:
            return  # cancelled, or asked under an earlier leadership
        del self._selecting[key]
        drain = self._drains.get(job.drain_id)
        wanted = len(job.region_ids)
        m = self._metrics
        why = None
        if not self._leadership.leads or drain is None or drain.state != RUNNING:
            why = "not running"
        elif ev.error is not None:
            m.failover_errors.labels(stage=f"drain_{ev.error_stage or 'select'}").inc()
            why = f"selector: {ev.error}"
        elif [h for h in self._holds.current if h in DRAIN_HOLDS]:
            why = "held"
        elif len(ev.peers) < wanted:
            m.failover_errors.labels(stage="drain_insufficient_peers").inc()
            why = f"insufficient peers: {len(ev.peers)} for {wanted} regions"
        elif ev.from_peer is not None and ev.from_peer.id != job.datanode_id:
            m.failover_errors.labels(stage="drain_invalid_lookup").inc()
            why = f"PeerLookup answered datanode {ev.from_peer.id} for {job.datanode_id}"
        else:
            invalid = self._targets.invalid_answer(job, ev.peers[:wanted])
            if invalid is not None:
                m.failover_errors.labels(stage="drain_invalid_selection").inc()
                m.selector_invalid.labels(reason=invalid[0]).inc()
                why = f"selector answer invalid: {invalid[0]} (peer {invalid[1].id})"
        if why is not None or drain is None:
            self._give_back(wanted)
            # Once per interval per drain and kind: a Selector that keeps answering so is asked every tick.
            self._held_log.keyed(now, f"drain_unused/{job.drain_id}/{(why or '').split(':')[0]}",
                                 "drain_selection_unused", drain_id=job.drain_id, datanode_id=job.datanode_id,
                                 regions=wanted, why=why, retry="next tick")
            return
        from_peer = ev.from_peer or Peer(job.datanode_id)
        by_target: dict[Peer, list[int]] = {}
        for r, to_peer in zip(job.region_ids, ev.peers):
            # Re-checked at answer time: a region settled, taken by a failover or deregistered meanwhile stays.
            if drain.settled(r) or self._inflight.holds(r) or not self._table.contains(job.datanode_id, r):
                continue
            if to_peer.id == job.datanode_id or to_peer.id in self._draining:
                continue
            by_target.setdefault(to_peer, []).append(r)
        if self._guards is not None:
            by_target = self._targets.limit_targets(self._guards, by_target, now)
        term = self._leadership.term
        tasks = [
            MigrationTask(self._ids.next(), job.datanode_id, from_peer, to_peer, tuple(regions),
                          self._policy.failover_timeout_ms(self._registry.next_count(job.datanode_id, regions)),
                          term, self._ids.request_id(term), trigger_reason=MANUAL)
            for to_peer, regions in by_target.items()
        ]
        self._give_back(wanted - sum(len(t.region_ids) for t in tasks))
        if tasks:
            if self.on_decision is not None:
                self.on_decision(job, tasks, now)
            self._migrations.submit(tasks)
        self.publish()

    # ------------------------------------------------------------ ends of migrations

    def ended(self, datanode_id: int, region_ids: Sequence[int], outcome: str, why: str, now: int) -> None:
        """A migration of these regions off `datanode_id` ended (`Migrations.on_end`): moved, gone, or
        not moved (retry); whoever decided it."""
        if not self._owner:
            return
        changed: dict[str, Drain] = {}
        for r in region_ids:
            owner = self._owner.get(r)
            if owner is None or owner[1] != datanode_id:
                continue
            drain = self._drains[owner[0]]
            if outcome == "moved":
                drain.moved.add(r)
                self._moved_from[(datanode_id, r)] = drain.drain_id
                self._settle(r)
            elif outcome == "gone":
                drain.gone.add(r)
                self._settle(r)
            else:
                attempts = drain.attempts[r] = drain.attempts.get(r, 0) + 1
                if attempts >= self._policy.drain_max_attempts:
                    drain.failed[r] = f"{why} ({attempts} attempts)"
                    self._settle(r)
                else:
                    drain.retry_at[r] = now + self._policy.submit_retry_backoff_ms * (1 << min(attempts - 1, 10))
            changed[drain.drain_id] = drain
        for drain in changed.values():
            self._store(drain)
            self._finish_if_settled(drain, now)
        if changed:
            self.publish()

    def _finish_if_settled(self, drain: Drain, now: int) -> None:
        if drain.state != RUNNING or any(True for _ in drain.open_regions()):
            return
        drain.state, drain.finished_at_ms = (FAILED if drain.failed else DONE), now
        self._refresh_draining()
        self._store(drain)
        log_event(log, logging.WARNING if drain.failed else logging.INFO, "drain_finished", drain_id=drain.drain_id,
                  state=drain.state, moved=len(drain.moved), gone=len(drain.gone), failed=len(drain.failed),
                  sample=sample(sorted(drain.failed)))

