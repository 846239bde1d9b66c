"""Becoming and ceasing to be leader: the recovery from the stored state, and the warm-up (docs/design.md §6).

Recovery follows GreptimeDB's InitializeAllRegions: every registered region gets a heartbeat
at now, so a datanode that died while no leader ran is failed over one detection period
later. Migrations in flight are reloaded, not submitted again; a decision that may not have
reached RegionMigration (intent, ambiguous) is sent again at once, to the same target under
the same request_id. Stored durations are measured against this clock's mark, never against
the wall clock of another life.
"""

from __future__ import annotations

import logging

from supervisor_service.core.backoff import ResubmitBackoff
from supervisor_service.core.changes import (
    AMBIGUOUS,
    INTENT,
    MIGRATING,
    SUBMITTED,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    StoredState,
)
from supervisor_service.core.clock import ClockBase
from supervisor_service.core.detection import Detection
from supervisor_service.core.guards import Guards
from supervisor_service.core.holds import Holds, Warmup
from supervisor_service.core.ids import Ids
from supervisor_service.core.inflight import InFlight, Submission
from supervisor_service.core.leadership import LeaderState
from supervisor_service.core.logs import log_event
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.migrations import Migrations
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.planning import Planner
from supervisor_service.core.ports import CoreMetrics
from supervisor_service.core.registry import Registry
from supervisor_service.core.types import MigrationTask, Peer

log = logging.getLogger("supervisor_service.supervisor")


class Recovery:
    """BecomeLeader and LoseLeadership: what a leadership change rebuilds, forgets and loads."""

    def __init__(
        self,
        policy: FailoverPolicy,
        metrics: CoreMetrics,
        out: Outbox,
        leadership: LeaderState,
        registry: Registry,
        detection: Detection,
        maintenance: Maintenance,
        planner: Planner,
        inflight: InFlight,
        migrations: Migrations,
        backoff: ResubmitBackoff,
        warmup: Warmup,
        holds: Holds,
        guards: Guards | None,
        ids: Ids,
        clock: ClockBase,
    ) -> None:
        self._policy = policy
        self._metrics = metrics
        self._out = out
        self._leadership = leadership
        self._registry = registry
        self._detection = detection
        self._maintenance = maintenance
        self._planner = planner
        self._inflight = inflight
        self._migrations = migrations
        self._backoff = backoff
        self._warmup = warmup
        self._holds = holds
        self._guards = guards
        self._ids = ids
        self._clock = clock

    def become_leader(self, term: int, state: StoredState, now: int) -> None:
        self._forget()
        self._leadership.set(True, term)
        self._reset_guards()  # what the previous leadership saw is not this one's evidence
        self._registry.load(state.registry, state.failover_counts, now)
        self._maintenance.load(state, now)
        for sid, rec in state.inflight.items():
            self._load_submission(sid, rec, now)
        if state.legacy_inflight:
            self._upgrade_legacy(state, now)
        self._warmup.start(state.registry, now)
        self._metrics.detectors.set(len(self._registry.table))
        self._migrations.publish()
        subs = self._inflight.submissions()
        log_event(
            log, logging.WARNING, "leadership_started", term=term, datanodes=len(state.registry),
            regions=len(self._registry.table), in_flight=len(self._inflight.regions), submissions=len(subs),
            unresolved=sum(1 for sub in subs if sub.state in (INTENT, AMBIGUOUS)),
            maintenance=state.maintenance,
        )

    def lose_leadership(self) -> None:
        """Forget the table: the next leader rebuilds it from the store and the datanodes."""
        self._leadership.set(False, self._leadership.term)
        self._forget()
        self._reset_guards()
        log_event(log, logging.WARNING, "leadership_stopped", term=self._leadership.term)

    def _forget(self) -> None:
        """Everything a leadership change rebuilds: the table and the failover work under way."""
        self._registry.table.clear()
        self._detection.forget()
        self._planner.forget()
        self._inflight.clear()
        self._backoff.clear()
        self._warmup.stop()

    def _reset_guards(self) -> None:
        if self._guards is not None:
            self._guards.reset()
        self._holds.reset()

    def _load_submission(self, sid: str, rec: InFlightRecord, now: int) -> None:
        # A timeout stored under a larger cap (an earlier setting or version) is bounded by this one's.
        timeout_ms = min(rec.timeout_ms, self._policy.timeout_cap_ms)
        task = MigrationTask(self._ids.next(), rec.datanode_id, rec.from_peer, rec.to_peer, rec.region_ids,
                             timeout_ms, self._leadership.term, rec.request_id, rec.trigger_reason)
        sub = Submission(sid, task, rec.state, rec.procedure_id, rec.attempts, mark=rec.mark)
        poll_at = None
        if rec.state in (INTENT, AMBIGUOUS):
            sub.retry_at_ms = now  # resolved at once: the same request to the same target
        else:
            # On this boot the monotonic clock says exactly how long it has run; elsewhere a full
            # timeout from now (status polls learn the real end; at most one timeout longer).
            remaining = timeout_ms - self._clock.elapsed_since(rec.mark, now)
            if rec.procedure_id:
                poll_at = now
                # Its stored mark is the submission: RUNNING answers since then are not stored.
                # Long enough to be asked twice before it ends; a RUNNING answer extends it.
                remaining = max(remaining, 2 * self._policy.status_poll_interval_ms)
            sub.deadline_ms = now + max(remaining, 1)
        self._inflight.add(sub, poll_at)

    def _upgrade_legacy(self, state: StoredState, now: int) -> None:
        """Records of the first format (one key per region, an absolute deadline) become one record per
        (datanode, procedure), in flight for a full base timeout from now (polled at once when they
        have a procedure): the stored deadline was on another life's wall clock."""
        groups: dict[tuple[int, str], list[int]] = {}
        for ident, old in sorted(state.legacy_inflight.items()):
            self._out.changes.append(InFlightDrop(ident))
            if not self._inflight.holds(old.region_id):
                groups.setdefault((old.datanode_id, old.procedure_id), []).append(old.region_id)
        for (datanode_id, procedure_id), regions in groups.items():
            request_id = self._ids.request_id(self._leadership.term)
            rec = InFlightRecord(request_id, datanode_id, Peer(datanode_id), Peer(0), tuple(regions),
                                 self._policy.base_timeout_ms, SUBMITTED if procedure_id else MIGRATING,
                                 procedure_id, 0, self._clock.mark(now))
            self._load_submission(request_id, rec, now)
            self._out.changes.append(InFlightSet(request_id, rec))
        log_event(log, logging.WARNING, "inflight_records_upgraded", regions=len(state.legacy_inflight),
                  submissions=len(groups))
