"""Migration tracking: a decision from its intent to its end (docs/design.md §4, §6).

An intent is stored before its SubmitRegionMigration leaves; a call that may have been
carried out is retried, backed off, to the same target under the same request_id until a
definite answer; an accepted migration is in flight until its procedure ends (polled) or its
timeout passes. Every step of a decision is one store transaction: its record (one key
whatever the number of regions), and the counts or registry changes that go with it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from supervisor_service.core.backoff import ResubmitBackoff
from supervisor_service.core.changes import AMBIGUOUS, INTENT, MIGRATING, SUBMITTED, InFlightDrop, InFlightSet
from supervisor_service.core.clock import ClockBase
from supervisor_service.core.effects import PollMigration, SubmitMigration
from supervisor_service.core.events import SUBMIT_NOT_SENT, SUBMIT_REFUSED, StatusPolled, SubmissionDone
from supervisor_service.core.failovers import FailoverHistory
from supervisor_service.core.holds import HoldLog
from supervisor_service.core.ids import Ids
from supervisor_service.core.inflight import InFlight, Submission
from supervisor_service.core.leadership import LeaderState
from supervisor_service.core.logs import log_event, sample
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.ports import CoreMetrics
from supervisor_service.core.registry import Registry
from supervisor_service.core.table import as_region_array
from supervisor_service.core.types import (
    DONE_CATEGORIES,
    KEPT_CATEGORIES,
    MigrationResult,
    MigrationState,
    MigrationTask,
)

log = logging.getLogger("supervisor_service.supervisor")

EndListener = Callable[[int, Sequence[int], str, str, int], None]
"""Told of every end of a migration of regions off a datanode: (datanode, regions, outcome, why, now);
outcome "moved" (migrated, SUCCEEDED), "gone" (region_not_found, table_not_found, leader_changed) or
"not_moved" (FAILED, NOT_FOUND, timed out, refused, peer_conflict). core.drains settles drains by it."""


def _nobody(datanode_id: int, regions: Sequence[int], outcome: str, why: str, now: int) -> None:
    return None


@dataclass(slots=True)
class _Answer:
    """A SubmitRegionMigration answer, region by region (each asked region is in one list, or two)."""

    categories: dict[int, list[str]] = field(default_factory=dict)  # asked region -> the categories naming it
    polled: list[int] = field(default_factory=list)  # in flight under the procedure
    migrating: list[int] = field(default_factory=list)  # in flight until the timeout (nothing of ours to poll)
    done: list[int] = field(default_factory=list)
    contradictory: list[int] = field(default_factory=list)  # named by two categories: kept in flight
    conflicted: list[int] = field(default_factory=list)
    counted: list[str] = field(default_factory=list)  # the category of each region named once


def _sort_answer(task: MigrationTask, result: MigrationResult) -> _Answer:
    asked = set(task.region_ids)
    answer = _Answer()
    categories = answer.categories
    for category in DONE_CATEGORIES + KEPT_CATEGORIES:
        for region_id in getattr(result, category):
            if region_id in asked and category not in categories.setdefault(region_id, []):
                categories[region_id].append(category)
    in_flight = answer.polled if result.procedure_id else answer.migrating
    for region_id in task.region_ids:
        cats = categories.get(region_id)
        if not cats:
            # An answer that does not mention a region is no word that it was not moved (a
            # service may have started it all the same): in flight, like a contradictory one.
            in_flight.append(region_id)
            continue
        if len(cats) > 1:
            # Two answers for one region: the service may be moving it; never drop it (or its
            # procedure id) on the word of one category.
            answer.contradictory.append(region_id)
            in_flight.append(region_id)
            continue
        category = cats[0]
        answer.counted.append(category)
        if category in DONE_CATEGORIES:
            answer.done.append(region_id)
        elif category == "submitted" and result.procedure_id:
            answer.polled.append(region_id)
        elif category in ("submitted", "migrating"):
            answer.migrating.append(region_id)
        else:  # peer_conflict: not accepted; failed over again later (a new decision), backed off
            answer.conflicted.append(region_id)
    return answer


class Migrations:
    """Submissions, their answers, retries, timeouts and status polls."""

    def __init__(
        self,
        policy: FailoverPolicy,
        metrics: CoreMetrics,
        out: Outbox,
        inflight: InFlight,
        registry: Registry,
        backoff: ResubmitBackoff,
        maintenance: Maintenance,
        leadership: LeaderState,
        ids: Ids,
        clock: ClockBase,
        held_log: HoldLog,
    ) -> None:
        self._policy = policy
        self._metrics = metrics
        self._out = out
        self._inflight = inflight
        self._registry = registry
        self._backoff = backoff
        self._maintenance = maintenance
        self._leadership = leadership
        self._ids = ids
        self._clock = clock
        self._held_log = held_log
        self.on_end: EndListener = _nobody
        self.history: FailoverHistory | None = None
        """The failover history, told of each answer and end (core/failovers.py)."""

    # ------------------------------------------------------------ decisions

    def submit(self, tasks: list[MigrationTask]) -> None:
        """New decisions: each is stored as an intent, and its call leaves once that is durable."""
        for task in tasks:
            sub = Submission(task.request_id, task, INTENT, sending=True)
            self._inflight.add(sub)
            # The intent is stored before the call leaves (the runtime sends it once this is
            # durable): a successor that finds it sends the same request to the same target, so the
            # regions go to one place whatever happens to this leader or to the call. One key per
            # submission, whatever the number of regions: the step is one small write.
            self._out.changes.append(InFlightSet(sub.sid, sub.record()))
            self._out.effects.append(SubmitMigration(task))
            log_event(
                log, logging.WARNING, "failover_submitting", datanode_id=task.datanode_id,
                from_peer=task.from_peer.id, to_peer=task.to_peer.id, regions=len(task.region_ids),
                timeout_ms=task.timeout_ms, request_id=task.request_id, sample=sample(task.region_ids),
            )
        self.publish()

    def on_submission(self, ev: SubmissionDone, now: int) -> None:
        task = ev.task
        sub = self._inflight.get(task.request_id)
        if sub is None or not sub.sending or sub.task.task_id != task.task_id:
            # An answer to an attempt no longer current (an earlier leadership of this replica):
            # the decision, if still open, is resolved by its own next attempt (same request_id).
            log_event(log, logging.INFO, "failover_submit_answer_ignored", datanode_id=task.datanode_id,
                      request_id=task.request_id, task_id=task.task_id)
            return
        sub.sending = False
        if ev.error is not None or ev.result is None:
            self._on_submit_error(sub, ev, now)
            self.publish()
            return
        m = self._metrics
        d = task.datanode_id
        result = ev.result
        procedure_id = result.procedure_id
        answer = _sort_answer(task, result)
        categories = answer.categories
        for category in answer.counted:
            m.failover_regions.labels(result=category).inc()
        if answer.contradictory:
            m.failover_regions.labels(result="contradictory").inc(len(answer.contradictory))
            log_event(log, logging.ERROR, "failover_result_contradictory", datanode_id=d,
                      regions=len(answer.contradictory), sample=sample(answer.contradictory), procedure_id=procedure_id,
                      categories=",".join(sorted({c for r in answer.contradictory for c in categories[r]})),
                      kept="polled under the procedure" if procedure_id else "in flight until the timeout")
        if answer.done:
            self._registry.drop(d, as_region_array(answer.done))
            moved = [r for r in answer.done if categories[r][0] == "migrated"]
            self.on_end(d, moved, "moved", "migrated", now)
            self.on_end(d, [r for r in answer.done if categories[r][0] != "migrated"], "gone",
                        "not on the datanode", now)
        if answer.conflicted:
            self._backoff.back_off(d, answer.conflicted, "peer_conflict", now, procedure_id)
            self.on_end(d, answer.conflicted, "not_moved", "peer_conflict", now)
        # The step's record: the submission becomes its in-flight part, or ends. Counts of the
        # accepted regions go in the same write.
        self._inflight.remove(sub.sid)
        parts = [(sub.sid, SUBMITTED, answer.polled, procedure_id), (sub.sid + ".m", MIGRATING, answer.migrating, "")]
        if not answer.polled:
            parts = [(sub.sid, MIGRATING, answer.migrating, "")]
        kept_main = False
        for sid, state, regions, pid in parts:
            if not regions:
                continue
            kept_main |= sid == sub.sid
            flight = Submission(sid, dataclasses.replace(task, region_ids=tuple(regions)), state, pid,
                                sub.attempts, deadline_ms=now + task.timeout_ms, mark=self._clock.mark(now))
            self._inflight.add(flight, now + self._policy.status_poll_interval_ms if pid else None)
            self._out.changes.append(InFlightSet(sid, flight.record()))
        if not kept_main:
            self._out.changes.append(InFlightDrop(sub.sid))
        if self.history is not None:
            self.history.answered(task.request_id, categories, procedure_id,
                                  bool(answer.polled or answer.migrating), now)
        # An unanswered region is held, not counted.
        accepted = [r for r in answer.polled + answer.migrating if r in categories]
        if accepted:
            self._registry.count_accepted(d, accepted, now)
        unanswered = set(task.region_ids) - categories.keys()
        if unanswered:
            m.failover_regions.labels(result="unanswered").inc(len(unanswered))
            log_event(log, logging.ERROR, "failover_regions_unanswered", datanode_id=d,
                      regions=len(unanswered), sample=sample(sorted(unanswered)),
                      kept="polled under the procedure" if procedure_id else "in flight until the timeout")
        log_event(
            log, logging.WARNING, "failover_submitted", datanode_id=d, to_peer=task.to_peer.id,
            procedure_id=procedure_id, request_id=task.request_id,
            **{c: len(getattr(result, c)) for c in DONE_CATEGORIES + KEPT_CATEGORIES if getattr(result, c)},
        )
        self.publish()

    def _on_submit_error(self, sub: Submission, ev: SubmissionDone, now: int) -> None:
        """A failed call. Refused: the decision ends (the regions may be failed over afresh). Not sent:
        sent again later. Ambiguous: it may have been carried out, so the regions stay held and the
        same request goes to the same target again, backed off, until a definite answer."""
        task = sub.task
        m = self._metrics
        m.failover_errors.labels(stage="submit").inc()
        fields: dict[str, object] = {"datanode_id": task.datanode_id, "to_peer": task.to_peer.id,
                                     "regions": len(task.region_ids), "request_id": task.request_id, "error": ev.error}
        if self.history is not None:
            self.history.call_failed(task.request_id, f"{ev.error_kind}: {ev.error}", ev.error_kind == SUBMIT_REFUSED,
                                     now)
        if ev.error_kind == SUBMIT_REFUSED:
            m.failover_regions.labels(result="call_refused").inc(len(task.region_ids))
            self._end(sub.sid)
            log_event(log, logging.ERROR, "failover_submit_refused", **fields)
            self._backoff.back_off(task.datanode_id, task.region_ids, "refused", now)
            self.on_end(task.datanode_id, task.region_ids, "not_moved", f"refused: {ev.error}", now)
            return
        sub.attempts += 1
        sub.retry_at_ms = now + self._retry_delay(sub.attempts)
        if ev.error_kind == SUBMIT_NOT_SENT:
            sub.rewrite = True  # its intent may not be durable: written again before the next call
            log_event(log, logging.WARNING, "failover_submit_not_sent", retry_in_ms=sub.retry_at_ms - now, **fields)
            return
        m.failover_regions.labels(result="call_failed").inc(len(task.region_ids))
        if sub.state == INTENT:
            sub.state = AMBIGUOUS  # a successor then knows the call may have been carried out
            self._out.changes.append(InFlightSet(sub.sid, sub.record()))
        log_event(log, logging.ERROR, "failover_submit_ambiguous", attempts=sub.attempts,
                  retry_in_ms=sub.retry_at_ms - now, **fields)

    def _retry_delay(self, attempts: int) -> int:
        p = self._policy
        return min(p.submit_retry_backoff_ms * (1 << min(max(attempts - 1, 0), 30)), p.submit_retry_backoff_max_ms)

    # ------------------------------------------------------------ in flight

    def on_status(self, ev: StatusPolled, now: int) -> None:
        proc = self._inflight.procedure(ev.procedure_id)
        if proc is None:
            return
        proc.polling = False
        state = ev.state
        if ev.error is not None or state in (None, MigrationState.RUNNING, MigrationState.UNSPECIFIED):
            proc.next_poll_ms = now + self._policy.status_poll_interval_ms
            if ev.error is not None:
                self._metrics.failover_errors.labels(stage="status").inc()
            if ev.error is None and state is MigrationState.RUNNING:
                # Known to run: ending it at its timeout would move its regions a second time while
                # it goes on. The timeout counts from the last RUNNING answer instead.
                for sid in proc.sids:
                    sub = self._inflight.get(sid)
                    if sub is not None and sub.deadline_ms:
                        sub.deadline_ms = max(sub.deadline_ms, now + sub.task.timeout_ms)
            return
        ended = [self._end(sid) for sid in sorted(proc.sids)]  # the procedure goes with its last one
        regions = sum(len(sub.regions) for sub in ended)
        for sub in ended:
            d = sub.task.datanode_id
            if self.history is not None:
                self.history.finished(sub.task.request_id, state, now, ev.message[:200])
            if state is MigrationState.SUCCEEDED:
                # The regions live elsewhere now: the old detectors would only fire again. The target
                # is watched from now on, fresh (GreptimeDB #8234, #1762; docs/design.md §16).
                self._registry.drop(d, as_region_array(list(sub.regions)))
                if self._policy.watch_target_on_success:
                    self._registry.watch_target(d, sub.task.to_peer.id, sub.regions, now)
            elif state is MigrationState.NOT_FOUND:
                self._metrics.migration_not_found.inc(len(sub.regions))
                self._backoff.back_off(d, sub.regions, "not_found", now, sub.procedure_id)
            else:
                if state is MigrationState.FAILED:  # the candidate never got them (GreptimeDB #7212)
                    self._registry.drop_candidate(d, sub.task.to_peer.id, sub.regions)
                self._backoff.back_off(d, sub.regions, state.name.lower(), now, sub.procedure_id)
            moved = state is MigrationState.SUCCEEDED
            self.on_end(d, sub.regions, "moved" if moved else "not_moved", state.name, now)
        log_event(
            log,
            logging.INFO if state is MigrationState.SUCCEEDED else logging.WARNING,
            "migration_finished",
            procedure_id=ev.procedure_id,
            state=state.name,
            regions=regions,
            message=ev.message,
        )
        self.publish()

    def expire_and_poll(self, now: int) -> None:
        """At each tick of a leader: in-flight migrations past their deadline end; decisions not yet
        answered are sent again (backed off); procedures due are polled."""
        subs = self._inflight.submissions()
        for sid in [sub.sid for sub in subs if sub.deadline_ms and now >= sub.deadline_ms]:
            sub = self._end(sid)
            if self.history is not None:
                self.history.finished(sub.task.request_id, None, now, f"timed out after {sub.task.timeout_ms} ms")
            log_event(
                log, logging.WARNING, "migration_timed_out", datanode_id=sub.task.datanode_id,
                regions=len(sub.regions), sample=sample(sub.regions), procedure_id=sub.procedure_id,
                timeout_ms=sub.task.timeout_ms,
            )
            self.on_end(sub.task.datanode_id, sub.regions, "not_moved", "timed out", now)
        for sub in subs:
            if sub.state in (INTENT, AMBIGUOUS) and not sub.sending and now >= sub.retry_at_ms:
                if self._maintenance.covers(sub.task.datanode_id):
                    # An operator said "no migration now": even one that may have started waits.
                    self._held_log(now, "failover_retry_held_maintenance", datanode_id=sub.task.datanode_id,
                                   request_id=sub.task.request_id)
                    continue
                self._metrics.submit_retries.inc()
                log_event(log, logging.WARNING, "failover_submit_retried", datanode_id=sub.task.datanode_id,
                          to_peer=sub.task.to_peer.id, request_id=sub.task.request_id, state=sub.state,
                          attempts=sub.attempts, regions=len(sub.regions))
                self._send(sub)
        for procedure_id, proc in self._inflight.procedures():
            if not proc.polling and now >= proc.next_poll_ms:
                proc.polling = True
                self._out.effects.append(PollMigration(procedure_id))
        self._backoff.expire(now)
        self.publish()

    def _send(self, sub: Submission) -> None:
        """One call of the decision: a fresh attempt id, the current term, the same request_id."""
        sub.task = dataclasses.replace(sub.task, task_id=self._ids.next(), leader_term=self._leadership.term)
        sub.sending = True
        if sub.rewrite:  # the runtime sends it once this is durable
            sub.rewrite = False
            self._out.changes.append(InFlightSet(sub.sid, sub.record()))
        self._out.effects.append(SubmitMigration(sub.task))

    def _end(self, sid: str) -> Submission:
        """The decision ends: its regions are free again and its record is dropped."""
        sub = self._inflight.remove(sid)
        self._out.changes.append(InFlightDrop(sid))
        return sub

    def publish(self) -> None:
        """The submission gauges: decisions by state, regions in flight."""
        by_state = dict.fromkeys((INTENT, AMBIGUOUS, SUBMITTED, MIGRATING), 0)
        in_flight = 0
        for sub in self._inflight.submissions():
            by_state[sub.state] += 1
            if sub.state in (SUBMITTED, MIGRATING):
                in_flight += len(sub.regions)
        for state, n in by_state.items():
            self._metrics.submissions.labels(state=state).set(n)
        self._metrics.inflight.set(in_flight)
