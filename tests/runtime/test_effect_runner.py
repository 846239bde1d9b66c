"""The effect runner: every outcome of a remote call becomes the right result event (docs/design.md §3.2, §4.5).

Fake remotes answer or raise inline; `EffectRunner.run` makes the call on the
test's thread, so nothing sleeps or waits except the one test of the worker pool.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    SUBMIT_AMBIGUOUS,
    SUBMIT_NOT_SENT,
    SUBMIT_REFUSED,
    FakeClock,
    Heartbeat,
    MigrationResult,
    MigrationState,
    MigrationTask,
    Peer,
    PhiAccrualOptions,
    PollMigration,
    SelectionDone,
    SelectPeers,
    StatusPolled,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    Tick,
)
from supervisor_service.core.types import SelectJob  # not exported: only the core makes jobs; here one is given
from supervisor_service.remotes import RemoteError, Remotes, StaleLeaderTerm
from supervisor_service.runtime import AMBIGUOUS_CODES, Consumer, EffectRunner, EventQueue, not_durable

JOIN_S = 5.0

JOB = SelectJob(job_id=1, datanode_id=3, region_ids=(30, 31), exclude_targets=(7,))
TASK = MigrationTask(task_id=1, datanode_id=3, from_peer=Peer(3, "dn3:1"), to_peer=Peer(5, "dn5:1"),
                     region_ids=(30, 31), timeout_ms=1000, leader_term=2, request_id="2-x")


class FakeRemotes:
    """PeerLookup, Selector and RegionMigration in one: each answers `answers[method]`, or raises it."""

    def __init__(self, **answers) -> None:
        self.answers = {
            "get_datanode": Peer(3, "dn3:1"),
            "select": [Peer(5, "dn5:1"), Peer(6, "dn6:1")],
            "submit": MigrationResult(submitted=(30, 31), procedure_id="p-1"),
            "status": (MigrationState.RUNNING, "copying"),
            **answers,
        }
        self.calls: list[tuple] = []

    def _answer(self, method: str, *args):
        self.calls.append((method, *args))
        answer = self.answers[method]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def get_datanode(self, datanode_id):
        return self._answer("get_datanode", datanode_id)

    def select(self, min_required_items, exclude_peer_ids, from_peer_id, region_ids):
        return self._answer("select", min_required_items, exclude_peer_ids, from_peer_id, region_ids)

    def submit(self, task):
        return self._answer("submit", task)

    def status(self, procedure_id):
        return self._answer("status", procedure_id)

    def remotes(self) -> Remotes:
        return Remotes(peer_lookup=self, selector=self, region_migration=self)


class Harness:
    """A runner over fake remotes that records what it reports and when it says it was fenced."""

    def __init__(self, remotes: FakeRemotes | None = None, *, term: int = 2, leading: bool = True) -> None:
        self.fake = remotes or FakeRemotes()
        self.registry = CollectorRegistry()
        self.term, self.leading = term, leading
        self.log: list = []  # reported events and ("fenced", reason), in order
        self.runner = EffectRunner(
            self.fake.remotes(), Metrics(self.registry), self.log.append,
            leader_term=lambda: self.term, is_leader=lambda: self.leading,
            on_fenced=lambda reason: self.log.append(("fenced", reason)),
        )

    def run(self, effect):
        """The one result event of `effect` (and nothing else reported)."""
        self.runner.run(effect)
        [result] = self.log
        return result

    def errors(self, service: str, method: str, code: str) -> float | None:
        return self.registry.get_sample_value(
            "supervisor_remote_call_errors_total", {"service": service, "method": method, "code": code}
        )


def remote_error(code: str, service: str = "RegionMigration", method: str = "SubmitRegionMigration"):
    return RemoteError(service, method, code, "from the fake")


# ---------------------------------------------------------------- SelectPeers


def test_a_selection_asks_peer_lookup_then_the_selector_and_reports_both_answers():
    h = Harness()
    result = h.run(SelectPeers(JOB))
    assert result == SelectionDone(JOB, from_peer=Peer(3, "dn3:1"), peers=(Peer(5, "dn5:1"), Peer(6, "dn6:1")))
    assert h.fake.calls == [("get_datanode", 3), ("select", 2, {3, 7}, 3, (30, 31))]


@pytest.mark.parametrize(
    "failing, stage, service, method",
    [("get_datanode", "peer_lookup", "PeerLookup", "GetDatanode"), ("select", "select", "Selector", "Select")],
)
def test_a_failed_selection_call_names_its_stage(failing, stage, service, method):
    h = Harness(FakeRemotes(**{failing: remote_error("UNAVAILABLE", service, method)}))
    result = h.run(SelectPeers(JOB))
    assert isinstance(result, SelectionDone) and result.error_stage == stage
    assert "UNAVAILABLE" in result.error and result.peers == () and result.from_peer is None
    assert h.errors(service, method, "UNAVAILABLE") == 1
    if failing == "get_datanode":
        assert [c[0] for c in h.fake.calls] == ["get_datanode"]  # the selector is not asked


def test_a_bug_in_an_embedded_service_is_an_internal_error_not_a_dead_worker():
    h = Harness(FakeRemotes(select=ValueError("boom")))
    result = h.run(SelectPeers(JOB))
    assert result.error_stage == "select" and "INTERNAL" in result.error and "boom" in result.error
    assert h.errors("Selector", "Select", "INTERNAL") == 1


# ---------------------------------------------------------------- SubmitMigration


def test_an_answered_submission_reports_its_result():
    h = Harness()
    assert h.run(SubmitMigration(TASK)) == SubmissionDone(TASK, result=MigrationResult(submitted=(30, 31),
                                                                                       procedure_id="p-1"))
    assert h.fake.calls == [("submit", TASK)]


@pytest.mark.parametrize("code", sorted(AMBIGUOUS_CODES))
def test_a_submission_that_may_have_happened_is_ambiguous(code):
    result = Harness(FakeRemotes(submit=remote_error(code))).run(SubmitMigration(TASK))
    assert result.error_kind == SUBMIT_AMBIGUOUS and code in result.error and result.result is None


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED",
                                  "UNIMPLEMENTED", "UNAUTHENTICATED", "OUT_OF_RANGE", "ABORTED"])
def test_a_submission_the_service_answered_it_did_not_do_is_refused(code):
    result = Harness(FakeRemotes(submit=remote_error(code))).run(SubmitMigration(TASK))
    assert result.error_kind == SUBMIT_REFUSED and code in result.error


def test_a_refusal_of_the_current_term_is_not_sent_and_fences_after_the_result():
    h = Harness(FakeRemotes(submit=StaleLeaderTerm("RegionMigration", "SubmitRegionMigration",
                                                   "FAILED_PRECONDITION", "term 3 seen")))
    h.runner.run(SubmitMigration(TASK))
    result, fenced = h.log
    assert isinstance(result, SubmissionDone) and result.error_kind == SUBMIT_NOT_SENT
    assert fenced[0] == "fenced" and "term 3 seen" in fenced[1]  # reported first: queued ahead of the step-down


def test_a_refusal_of_a_term_that_already_ended_does_not_fence_the_current_one():
    fake = FakeRemotes()
    h = Harness(fake)

    def refuse_after_a_new_term(task):
        h.term = 3  # this replica led again while the call was under way
        raise StaleLeaderTerm("RegionMigration", "SubmitRegionMigration", "FAILED_PRECONDITION", "term 3 seen")

    fake.submit = refuse_after_a_new_term
    assert h.run(SubmitMigration(TASK)).error_kind == SUBMIT_NOT_SENT  # and no ("fenced", ...) after it


@pytest.mark.parametrize("term, leading", [(3, True), (2, False)], ids=["term_ended", "not_leading"])
def test_a_submission_is_not_sent_once_its_term_no_longer_leads(term, leading):
    h = Harness(term=term, leading=leading)
    result = h.run(SubmitMigration(TASK))
    assert result.error_kind == SUBMIT_NOT_SENT and "term 2 ended" in result.error
    assert h.fake.calls == []


# ---------------------------------------------------------------- PollMigration


def test_a_poll_reports_the_state_and_message():
    h = Harness()
    assert h.run(PollMigration("p-1")) == StatusPolled("p-1", state=MigrationState.RUNNING, message="copying")


def test_a_failed_poll_reports_the_error():
    h = Harness(FakeRemotes(status=remote_error("DEADLINE_EXCEEDED", method="GetMigrationStatus")))
    result = h.run(PollMigration("p-1"))
    assert result.procedure_id == "p-1" and result.state is None and "DEADLINE_EXCEEDED" in result.error


# ---------------------------------------------------------------- state not durable


def test_an_effect_whose_state_is_not_durable_gets_its_result_without_a_call():
    exc = RuntimeError("fenced")
    submitted = not_durable(SubmitMigration(TASK), exc)
    assert submitted == SubmissionDone(TASK, error="state not durable: fenced", error_kind=SUBMIT_NOT_SENT)
    assert not_durable(SelectPeers(JOB), exc) == SelectionDone(JOB, error="state not durable: fenced",
                                                                error_stage="store")
    assert not_durable(PollMigration("p-1"), exc) is None  # a poll changes nothing: it may run anyway


class FailingStore:
    """A StateStore whose every commit fails (as when fenced or gone): the callback gets the error."""

    def __init__(self) -> None:
        self.submitted: list = []

    def submit(self, changes, on_durable=None, *, term=None):
        self.submitted.append((changes, term))
        if on_durable is not None:
            on_durable(RuntimeError("the term ended"))


def test_the_consumer_sends_no_submission_whose_intent_did_not_commit():
    """A datanode silent past the threshold: the tick's selection changes nothing (it leaves at once);
    its answer records the intent, which the store refuses: the submission never reaches a worker,
    and its result (not sent) is queued instead."""
    clock = FakeClock()
    metrics = Metrics(CollectorRegistry())
    queue = EventQueue(16, clock=clock)
    supervisor = Supervisor(PhiAccrualOptions(), metrics)
    handed: list = []
    store = FailingStore()
    consumer = Consumer(supervisor, queue, clock, metrics, handed.append, store=store)
    for d in (3, 5):
        queue.offer(Heartbeat(d, np.array([d * 10], dtype=np.uint64), clock.now_ms()))
        assert consumer.step(timeout=0)
    clock.advance(60_000)
    queue.offer(Heartbeat(5, np.array([50], dtype=np.uint64), clock.now_ms()))
    queue.put_control(Tick())
    assert consumer.step(timeout=0) and consumer.step(timeout=0)
    [select] = handed
    assert isinstance(select, SelectPeers) and select.job.datanode_id == 3
    queue.put_control(SelectionDone(select.job, from_peer=Peer(3, "dn3:1"), peers=(Peer(5, "dn5:1"),)))
    assert consumer.step(timeout=0)
    assert handed == [select]  # the SubmitMigration was not handed on
    [result] = queue.drain()
    assert isinstance(result, SubmissionDone) and result.error_kind == SUBMIT_NOT_SENT
    assert "state not durable" in result.error and result.task.region_ids == (30,)


# ---------------------------------------------------------------- workers


def test_start_runs_the_effect_on_a_failover_worker_and_reports_from_there():
    reported = threading.Event()
    seen: list = []

    def report(event):
        seen.append((event, threading.current_thread().name))
        reported.set()

    runner = EffectRunner(FakeRemotes().remotes(), Metrics(CollectorRegistry()), report, leader_term=lambda: 2)
    try:
        runner.start(PollMigration("p-1"))
        assert reported.wait(JOIN_S)
    finally:
        runner.shutdown()
    [(event, thread)] = seen
    assert isinstance(event, StatusPolled) and thread.startswith("failover-worker")


def test_an_effect_started_after_shutdown_is_dropped_with_a_log_line(caplog):
    seen: list = []
    runner = EffectRunner(FakeRemotes().remotes(), Metrics(CollectorRegistry()), seen.append, leader_term=lambda: 2)
    runner.shutdown()
    runner.start(SubmitMigration(TASK))
    assert seen == [] and "effect_dropped_at_shutdown" in caplog.text
