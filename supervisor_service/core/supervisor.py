"""The supervisor: events in, state changes and effects out (docs/design.md §3, §4, §9).

`Supervisor.handle(event, now_ms)` is called by the supervisor thread only. It reads no clock
and does no I/O: remote calls leave as effects (run by `runtime.SupervisorRuntime` on worker
threads, their results come back as events), state changes leave for the store, and after
each event a new `CoreStatus` is published for other threads.

The decisions are split by concern, into plain objects this class owns and wires:

- `registry.Registry`: who is watched (the detector table), failover counts and their decay;
- `maintenance.Maintenance`: the maintenance switches, their expiry and checkpoints;
- `detection.Detection`: what failed at a tick; `holds.Holds`, `holds.Warmup`: what holds failover;
- `planning.Planner`: a tick's failover planning (SelectPeers); `targets.TargetSelection`: the answer;
- `migrations.Migrations` over `inflight.InFlight`: a decision from its intent to its end;
  `backoff.ResubmitBackoff`: when a region whose decision ended unsettled may go again;
- `recovery.Recovery`: BecomeLeader and LoseLeadership; `leadership.LeaderState`: the leader check;
- `snapshot.Snapshots`: Dump and the published status.
"""

from __future__ import annotations

import logging
from typing import assert_never

from supervisor_service.core.backoff import ResubmitBackoff
from supervisor_service.core.changes import Change
from supervisor_service.core.clock import ClockBase
from supervisor_service.core.detection import Detection
from supervisor_service.core.detector import PhiAccrualOptions
from supervisor_service.core.drainbook import DrainRefused
from supervisor_service.core.drains import Drains
from supervisor_service.core.effects import Effect
from supervisor_service.core.events import (
    BecomeLeader,
    Clear,
    Deregister,
    Dump,
    Event,
    Heartbeat,
    Inspect,
    LoseLeadership,
    Register,
    ReleaseHold,
    Reset,
    SelectionDone,
    SetMaintenance,
    StatusPolled,
    Stop,
    SubmissionDone,
    Tick,
)
from supervisor_service.core.failovers import FailoverHistory
from supervisor_service.core.guards import Guards
from supervisor_service.core.holds import HoldLog, Holds, Warmup
from supervisor_service.core.ids import Ids
from supervisor_service.core.inflight import InFlight
from supervisor_service.core.insight import Insight
from supervisor_service.core.leadership import LeaderState
from supervisor_service.core.logs import log_event, sample
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.migrations import Migrations
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.planned_events import CancelDrain, GetDrain, ListTablePolicies, SetTablePolicy, StartDrain
from supervisor_service.core.planning import Planner
from supervisor_service.core.policy import PolicyRefused, TablePolicies
from supervisor_service.core.ports import CoreMetrics
from supervisor_service.core.reasons import RuleState
from supervisor_service.core.recovery import Recovery
from supervisor_service.core.registry import Registry
from supervisor_service.core.snapshot import Snapshots
from supervisor_service.core.status import CoreStatus
from supervisor_service.core.table import DetectorTable
from supervisor_service.core.targets import TargetSelection
from supervisor_service.core.types import DetectingRegion, RegionArray

log = logging.getLogger("supervisor_service.supervisor")


class Supervisor:
    """Owns the detector table, the failover counts and the in-flight migrations; dispatches events."""

    def __init__(
        self,
        opts: PhiAccrualOptions,
        metrics: CoreMetrics,
        policy: FailoverPolicy | None = None,
        *,
        is_leader: bool = True,
        leader_term: int = 1,
        maintenance: bool = False,
        guards: Guards | None = None,
        clock_base: ClockBase | None = None,
    ) -> None:
        policy = policy or FailoverPolicy()
        self.table = DetectorTable(opts)
        self.guards = guards
        # Durations that outlive this process are stored with a mark of this clock (see ClockBase).
        clock = clock_base or ClockBase()
        out = self._out = Outbox()
        ids, held_log = Ids(), HoldLog(policy)
        leadership = self._leadership = LeaderState(metrics, is_leader, leader_term)
        backoff = self._backoff = ResubmitBackoff(policy)
        registry = self._registry = Registry(self.table, policy, out, backoff)
        detection = self._detection = Detection(self.table, metrics)
        maint = self._maintenance = Maintenance(policy, metrics, clock, detection, out, maintenance)
        warmup = self._warmup = Warmup(policy)
        holds = self._holds = Holds(metrics, maint, warmup, guards)
        inflight = self._inflight = InFlight()
        migrations = self._migrations = Migrations(policy, metrics, out, inflight, registry, backoff, maint,
                                                   leadership, ids, clock, held_log)
        planner = self._planner = Planner(metrics, out, registry, detection, maint, holds, guards, inflight, backoff,
                                          ids, held_log)
        self._targets = TargetSelection(policy, metrics, registry, maint, holds, guards, inflight, migrations,
                                        leadership, ids, held_log)
        self._recovery = Recovery(policy, metrics, out, leadership, registry, detection, maint, planner, inflight,
                                  migrations, backoff, warmup, holds, guards, ids, clock)
        self._snapshots = Snapshots(registry, inflight, leadership, maint, holds, guards)
        # Planned operations (docs/design.md §17): drains reuse the failover machinery; policies filter it.
        tables = self._tables = TablePolicies(out)
        drains = self._drains = Drains(policy, metrics, out, registry, inflight, migrations, self._targets, tables,
                                       maint, holds, guards, leadership, ids, held_log)
        migrations.on_end = drains.ended
        planner.drains = drains
        # The failover history and the read-only questions (ListFailovers, Explain, WhatIf).
        self.history = FailoverHistory(self.table, out, policy.failover_history_capacity, metrics.failover_history)
        self._insight = Insight(registry, inflight, self.history, RuleState(maint, warmup, guards, backoff, drains.why_not_failed_over))
        self._targets.on_decision = self._insight.decided
        drains.on_decision = self._insight.decided_drain
        migrations.history = self.history
        self.status: CoreStatus = self._snapshots.status()
        """The status as of the last event (replaced, never changed: any thread may read it)."""

    # ------------------------------------------------------------ dispatch

    def handle(self, event: Event, now: int) -> object:
        """Apply one event at `now` (ms). Returns the reply value for events that carry one.

        The new status is published before this returns, so before the runtime resolves the reply.
        """
        value: object = None
        match event:
            case Heartbeat(datanode_id, region_ids, ts):
                # The hot path. Nothing the status shows changes: it is not published again.
                created = self._registry.heartbeat(datanode_id, region_ids, ts, not event.known_only)
                self._warmup.heard(datanode_id)
                return created
            case Register(regions):
                value = self._registry.register(regions, now)
            case Reset(regions):
                value = self._registry.reset(regions, now)
            case Deregister(regions):
                value = self._registry.deregister(regions, now)
            case Clear():
                self.table.clear()
                self._detection.forget()
                value = len(self.table)
            case Tick(lag_ms=lag_ms, queue_fill=queue_fill, heartbeats_refused=refused):
                self._tick(now, lag_ms, queue_fill, refused)
            case Dump(datanode_ids=datanode_ids):
                value = self._snapshots.dump(datanode_ids, now)
            case SetMaintenance(enabled, _, datanode_ids, ttl_ms):
                value = self._maintenance.set(enabled, datanode_ids, ttl_ms, now)
            case Inspect(query):
                return self._insight.answer(query, now)  # nothing changed: the status stands
            case ReleaseHold():
                value = self.guards.release() if self.guards is not None else False
                log_event(log, logging.WARNING, "failover_hold_released", was_held=value)
            case SelectionDone() if event.job.drain_id:
                self._drains.answered(event, now)
            case SelectionDone():
                current = self._planner.answered(event.job)
                if event.error is not None:
                    self._targets.failed(event)
                elif self._leadership.leads:
                    self._targets.answer(event, current, now)
            case SubmissionDone():
                self._migrations.on_submission(event, now)
            case StatusPolled():
                self._migrations.on_status(event, now)
            case BecomeLeader(term, state):
                self.history.restore(state.failovers, state.failovers_unreadable)
                self._recovery.become_leader(term, state, now)
                self._tables.load(state.table_policies)
                self._drains.load(state.drains.values())
            case LoseLeadership():
                self._recovery.lose_leadership()
                self._drains.forget()
            case StartDrain(datanode_ids, reason):
                try:
                    value = self._drains.start(datanode_ids, reason, now)
                except DrainRefused as exc:
                    value = exc
            case GetDrain(drain_id):
                value = self._drains.get(drain_id)
            case CancelDrain(drain_id, reason):
                value = self._drains.cancel(drain_id, reason, now)
            case SetTablePolicy(table_ids, enabled, priority):
                try:
                    value = self._tables.set(table_ids, enabled, priority)
                except PolicyRefused as exc:
                    value = exc
                else:
                    log_event(log, logging.WARNING, "table_policy_set", tables=len(table_ids), sample=sample(table_ids),
                              failover_enabled=enabled, priority=priority, reason=event.reason)
            case ListTablePolicies(table_ids):
                value = tuple(self._tables.get(t) for t in table_ids) if table_ids else self._tables.all()
            case Stop():
                pass
            case _:
                assert_never(event)
        self.status = self._snapshots.status()
        return value

    def _tick(self, now: int, lag_ms: float, queue_fill: float, heartbeats_refused: int) -> None:
        failed, pause = self._planner.observe(now, lag_ms, queue_fill, heartbeats_refused)
        if not self._leadership.leads:
            self._holds.publish(())
            return
        self._migrations.expire_and_poll(now)
        self._planner.plan(now, failed, pause)
        self._drains.tick(now, failed)

    # ------------------------------------------------------------ for the runtime

    def drain_outbox(self) -> list[Effect]:
        return self._out.take_effects()

    def drain_changes(self) -> list[Change]:
        return self._out.take_changes()

    @property
    def leader_term(self) -> int:
        return self._leadership.term

    def set_leadership(self, is_leader: bool, term: int) -> None:
        """Lead or not under `term`, without a recovery (BecomeLeader and LoseLeadership do one)."""
        self._leadership.set(is_leader, term)
        self.status = self._snapshots.status()

    # ------------------------------------------------------------ readings (supervisor thread, or tests)

    @property
    def last_failed(self) -> dict[int, RegionArray]:
        """The datanodes (and their regions) the last tick found at or above the threshold; do not modify."""
        return self._detection.last_failed

    @property
    def failover_counts(self) -> dict[DetectingRegion, int]:
        return self._registry.failover_counts

    def why_not_failed_over(self, datanode_id: int, region_id: int) -> str | None:
        """Why failover leaves this region alone by policy or drain (for Explain), or None."""
        return self._drains.why_not_failed_over(datanode_id, region_id)

    # For the supervisor thread and single-threaded tests; every other thread reads `status`.
    @property
    def is_leader(self) -> bool:
        return self._leadership.leads

    @property
    def maintenance(self) -> bool:
        return self._maintenance.enabled

    @property
    def maintenance_until_ms(self) -> int:
        return self._maintenance.until_ms

    @property
    def datanode_maintenance(self) -> dict[int, int]:
        return self._maintenance.datanodes
