"""Migration tracking on its own: `inflight.InFlight` and `migrations.Migrations` (docs/design.md §4, §6).

The rules: one step of a decision is one store transaction (its changes are handed to the
store as one list), a region is never in two submissions, and the records in the store
describe exactly the decisions held in memory (what a successor reloads).
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from supervisor_service.core import (
    SUBMIT_AMBIGUOUS,
    SUBMIT_NOT_SENT,
    SUBMIT_REFUSED,
    CountsSet,
    FailoverPolicy,
    InFlightDrop,
    InFlightSet,
    MigrationResult,
    MigrationState,
    MigrationTask,
    Peer,
    PhiAccrualOptions,
    PollMigration,
    RegistryRemove,
    StatusPolled,
    SubmissionDone,
    SubmitMigration,
    as_region_array,
)
from supervisor_service.core.backoff import ResubmitBackoff
from supervisor_service.core.changes import AMBIGUOUS, INTENT, MIGRATING, SUBMITTED
from supervisor_service.core.clock import ClockBase
from supervisor_service.core.detection import Detection
from supervisor_service.core.holds import HoldLog
from supervisor_service.core.ids import Ids
from supervisor_service.core.inflight import InFlight, Submission
from supervisor_service.core.leadership import LeaderState
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.migrations import Migrations
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.registry import Registry
from supervisor_service.core.table import DetectorTable
from tests.support.core_fakes import FakeMetrics

# Internal modules are imported directly: these tests are of the concerns the Supervisor wires.

POLICY = FailoverPolicy(status_poll_interval_ms=5000, submit_retry_backoff_ms=1000, resubmit_backoff_ms=0)
SRC, P5, P6 = Peer(1, "dn1:4001"), Peer(5, "dn5:4001"), Peer(6, "dn6:4001")
TERM = 3


class Parts:
    """The concerns Migrations works with, wired as the Supervisor wires them; datanode 1 watches 10..19."""

    def __init__(self, policy: FailoverPolicy = POLICY) -> None:
        self.metrics = FakeMetrics()
        self.out = Outbox()
        self.table = DetectorTable(PhiAccrualOptions())
        self.table.register(1, as_region_array(range(10, 20)), 0)
        self.backoff = ResubmitBackoff(policy)
        self.registry = Registry(self.table, policy, self.out, self.backoff)
        self.maintenance = Maintenance(policy, self.metrics, ClockBase("boot", 0), Detection(self.table, self.metrics),
                                       self.out, False)
        self.leadership = LeaderState(self.metrics, True, TERM)
        self.ids = Ids()
        self.inflight = InFlight()
        self.migrations = Migrations(policy, self.metrics, self.out, self.inflight, self.registry, self.backoff,
                                     self.maintenance, self.leadership, self.ids, ClockBase("boot", 0), HoldLog(policy))

    def task(self, regions, to_peer: Peer = P5, request_id: str = "") -> MigrationTask:
        return MigrationTask(self.ids.next(), 1, SRC, to_peer, tuple(regions), 120_000, TERM,
                             request_id or self.ids.request_id(TERM))

    def step(self) -> tuple[list, list]:
        """What the last event handed to the store (one list: one transaction) and to the runtime."""
        return self.out.take_changes(), self.out.take_effects()

    def answer(self, task: MigrationTask, now: int, **categories) -> tuple[list, list]:
        self.migrations.on_submission(SubmissionDone(task, result=MigrationResult(**categories)), now)
        return self.step()


def records(changes) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {c.submission_id: (c.record.state, c.record.region_ids) for c in changes if isinstance(c, InFlightSet)}


# ================================================================ InFlight


def test_inflight_indexes_regions_and_procedures_by_add_and_remove_only():
    flight = InFlight()
    t = MigrationTask(1, 1, SRC, P5, (10, 11), 1000, 1, "r1")
    u = MigrationTask(2, 1, SRC, P6, (12,), 1000, 1, "r2")
    flight.add(Submission("r1", t, SUBMITTED, "p"), poll_at_ms=500)
    flight.add(Submission("r2", u, SUBMITTED, "p"), poll_at_ms=700)
    assert set(flight.regions) == {10, 11, 12} and flight.holds(11)
    proc = flight.procedure("p")
    assert proc is not None and proc.sids == {"r1", "r2"} and proc.next_poll_ms == 700
    assert flight.remove("r1").regions == (10, 11)
    assert set(flight.regions) == {12} and not flight.holds(10)
    assert flight.procedure("p").sids == {"r2"}
    flight.remove("r2")
    assert flight.procedure("p") is None and len(flight) == 0 and not flight.regions


def test_inflight_remove_frees_only_the_regions_it_still_holds():
    """Two stored records naming one region (a damaged store): the later one holds it."""
    flight = InFlight()
    flight.add(Submission("a", MigrationTask(1, 1, SRC, P5, (10, 11), 1000, 1, "a"), MIGRATING))
    flight.add(Submission("b", MigrationTask(2, 1, SRC, P6, (11,), 1000, 1, "b"), MIGRATING))
    flight.remove("a")
    assert set(flight.regions) == {11}


# ================================================================ one decision, one transaction


def test_a_failover_of_a_datanode_is_one_store_transaction():
    """Its decisions (one per target) are stored together, before any call leaves."""
    parts = Parts()
    t5, t6 = parts.task((10, 11), P5), parts.task((12,), P6)
    parts.migrations.submit([t5, t6])
    changes, effects = parts.step()
    assert records(changes) == {t5.request_id: (INTENT, (10, 11)), t6.request_id: (INTENT, (12,))}
    assert len(changes) == 2
    assert effects == [SubmitMigration(t5), SubmitMigration(t6)]
    assert set(parts.inflight.regions) == {10, 11, 12}


def test_an_answer_is_one_store_transaction_with_the_counts_and_the_registry_changes():
    parts = Parts()
    task = parts.task((10, 11, 12, 13, 14))
    parts.migrations.submit([task])
    parts.step()
    changes, effects = parts.answer(task, 1000, submitted=(10,), migrating=(11,), migrated=(12,),
                                    peer_conflict=(13,), procedure_id="p-1")
    sid = task.request_id
    # 14 is unanswered: in flight under the procedure, not counted.
    assert records(changes) == {sid: (SUBMITTED, (10, 14)), sid + ".m": (MIGRATING, (11,))}
    assert [c.region_ids.tolist() for c in changes if isinstance(c, RegistryRemove)] == [[12]]
    assert [c.counts for c in changes if isinstance(c, CountsSet)] == [(((1, 10), 1), ((1, 11), 1))]
    assert not any(isinstance(c, InFlightDrop) for c in changes)
    assert effects == []
    assert set(parts.inflight.regions) == {10, 11, 14}
    assert not parts.table.contains(1, 12) and parts.table.contains(1, 13)
    assert 13 in parts.backoff.until_ms


def test_an_answer_that_moves_nothing_drops_the_record():
    parts = Parts()
    task = parts.task((10, 11))
    parts.migrations.submit([task])
    parts.step()
    changes, _ = parts.answer(task, 1000, migrated=(10,), peer_conflict=(11,))
    assert changes[-1] == InFlightDrop(task.request_id)
    assert records(changes) == {} and len(parts.inflight) == 0


def test_status_succeeded_ends_every_submission_of_the_procedure_in_one_transaction():
    parts = Parts()
    task = parts.task((10, 11, 12))
    parts.migrations.submit([task])
    parts.step()
    parts.answer(task, 1000, submitted=(10, 12), procedure_id="p-1")
    parts.migrations.expire_and_poll(6000)
    assert parts.step()[1] == [PollMigration("p-1")]
    parts.migrations.on_status(StatusPolled("p-1", MigrationState.SUCCEEDED), 6000)
    changes, _ = parts.step()
    # Region 11 (unanswered) was held under the procedure too: it ends with it.
    assert [c for c in changes if isinstance(c, InFlightDrop)] == [InFlightDrop(task.request_id)]
    assert sorted(r for c in changes if isinstance(c, RegistryRemove) for r in c.region_ids.tolist()) == [10, 11, 12]
    assert len(parts.inflight) == 0 and parts.inflight.procedure("p-1") is None


# ================================================================ calls without a definite answer


def test_an_ambiguous_call_is_retried_to_the_same_target_under_the_same_request_id():
    parts = Parts()
    task = parts.task((10,))
    parts.migrations.submit([task])
    parts.step()
    parts.migrations.on_submission(SubmissionDone(task, error="deadline", error_kind=SUBMIT_AMBIGUOUS), 1000)
    changes, effects = parts.step()
    assert records(changes) == {task.request_id: (AMBIGUOUS, (10,))} and effects == []
    parts.migrations.expire_and_poll(1999)
    assert parts.step() == ([], [])
    parts.migrations.expire_and_poll(2000)
    changes, effects = parts.step()
    assert changes == []
    (retry,) = effects
    assert retry.task == dataclasses.replace(task, task_id=retry.task.task_id)
    assert retry.task.task_id != task.task_id
    assert parts.metrics.submit_retries.value == 1


def test_a_retry_waits_while_its_datanode_is_in_maintenance():
    parts = Parts()
    task = parts.task((10,))
    parts.migrations.submit([task])
    parts.migrations.on_submission(SubmissionDone(task, error="deadline", error_kind=SUBMIT_AMBIGUOUS), 1000)
    parts.maintenance.set(True, (1,), 0, 1500)
    parts.step()
    parts.migrations.expire_and_poll(5000)
    assert parts.step() == ([], [])
    parts.maintenance.set(False, (1,), 0, 6000)
    parts.step()
    parts.migrations.expire_and_poll(6000)
    assert [type(e) for e in parts.step()[1]] == [SubmitMigration]


def test_a_call_not_sent_writes_its_intent_again_before_the_next_call():
    parts = Parts()
    task = parts.task((10,))
    parts.migrations.submit([task])
    parts.step()
    parts.migrations.on_submission(SubmissionDone(task, error="not durable", error_kind=SUBMIT_NOT_SENT), 1000)
    assert parts.step() == ([], [])
    parts.migrations.expire_and_poll(2000)
    changes, effects = parts.step()
    assert records(changes) == {task.request_id: (INTENT, (10,))}
    assert len(effects) == 1 and effects[0].task.request_id == task.request_id


def test_a_refused_call_ends_the_decision_and_backs_its_regions_off():
    parts = Parts()
    task = parts.task((10, 11))
    parts.migrations.submit([task])
    parts.step()
    parts.migrations.on_submission(SubmissionDone(task, error="INVALID_ARGUMENT", error_kind=SUBMIT_REFUSED), 1000)
    changes, _ = parts.step()
    assert changes == [InFlightDrop(task.request_id)]
    assert len(parts.inflight) == 0 and set(parts.backoff.until_ms) == {10, 11}


def test_an_answer_to_an_attempt_no_longer_current_is_ignored():
    parts = Parts()
    task = parts.task((10,))
    parts.migrations.submit([task])
    parts.step()
    stale = dataclasses.replace(task, task_id=task.task_id + 100)
    assert parts.answer(stale, 1000, migrated=(10,)) == ([], [])
    assert parts.inflight.holds(10)


def test_a_migration_past_its_timeout_ends():
    parts = Parts()
    task = parts.task((10,))
    parts.migrations.submit([task])
    parts.answer(task, 1000, migrating=(10,))
    parts.migrations.expire_and_poll(1000 + task.timeout_ms - 1)
    assert parts.inflight.holds(10)
    parts.migrations.expire_and_poll(1000 + task.timeout_ms)
    assert parts.step()[0] == [InFlightDrop(task.request_id)]
    assert not parts.inflight.holds(10)


# ================================================================ random sequences

_REGIONS = tuple(range(10, 20))
_CATEGORIES = ("migrated", "region_not_found", "migrating", "peer_conflict", "submitted", "submitted", "unanswered")


class MigrationsMachine(RuleBasedStateMachine):
    """Random decisions, answers, failed calls, polls and ticks. Throughout: no region in two
    submissions, the indexes agree with the submissions, and the store (the changes applied in
    order, one list per step) holds a record for exactly the submissions in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = Parts()
        self.now = 0
        self.store: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.calls: dict[int, MigrationTask] = {}  # task id -> call out
        self.polls: set[str] = set()
        self.next_proc = 0

    def _step(self) -> None:
        changes, effects = self.parts.step()
        for change in changes:
            if isinstance(change, InFlightSet):
                self.store[change.submission_id] = (change.record.state, change.record.region_ids)
            elif isinstance(change, InFlightDrop):
                self.store.pop(change.submission_id, None)
        for effect in effects:
            if isinstance(effect, SubmitMigration):
                self.calls[effect.task.task_id] = effect.task
            else:
                assert isinstance(effect, PollMigration)
                self.polls.add(effect.procedure_id)

    @rule(data=st.data(), two=st.booleans())
    def decide(self, data, two):
        free = [r for r in _REGIONS if not self.parts.inflight.holds(r)]
        regions = data.draw(st.lists(st.sampled_from(free), min_size=1, max_size=4, unique=True)) if free else []
        if not regions:
            return
        cut = data.draw(st.integers(1, len(regions))) if two else len(regions)
        tasks = [self.parts.task(regions[:cut], P5)] + ([self.parts.task(regions[cut:], P6)] if regions[cut:] else [])
        self.parts.migrations.submit(tasks)
        self._step()

    @precondition(lambda self: self.calls)
    @rule(data=st.data(), outcome=st.sampled_from(["answer", "answer", "answer", SUBMIT_AMBIGUOUS, SUBMIT_NOT_SENT,
                                                    SUBMIT_REFUSED]))
    def answer_call(self, data, outcome):
        task = self.calls.pop(data.draw(st.sampled_from(sorted(self.calls))))
        if outcome != "answer":
            self.parts.migrations.on_submission(SubmissionDone(task, error="x", error_kind=outcome), self.now)
        else:
            categories: dict[str, list[int]] = {}
            for r in task.region_ids:
                categories.setdefault(data.draw(st.sampled_from(_CATEGORIES)), []).append(r)
            categories.pop("unanswered", None)
            self.next_proc += 1
            result = MigrationResult(**{c: tuple(rs) for c, rs in categories.items()},
                                     procedure_id=f"p-{self.next_proc}" if data.draw(st.booleans()) else "")
            self.parts.migrations.on_submission(SubmissionDone(task, result=result), self.now)
        self._step()

    @precondition(lambda self: self.polls)
    @rule(data=st.data(), state=st.sampled_from(list(MigrationState) + [None]))
    def answer_poll(self, data, state):
        proc = data.draw(st.sampled_from(sorted(self.polls)))
        self.polls.discard(proc)
        self.parts.migrations.on_status(StatusPolled(proc, state, error="x" if state is None else None), self.now)
        self._step()

    @rule(dt=st.sampled_from([1000, 5000, 60_000, 130_000]))
    def tick(self, dt):
        self.now += dt
        self.parts.migrations.expire_and_poll(self.now)
        self._step()

    @invariant()
    def one_submission_per_region_and_the_store_agrees(self):
        flight = self.parts.inflight
        subs = list(flight.submissions())
        held = [r for sub in subs for r in sub.regions]
        assert len(held) == len(set(held)), "a region in two submissions"
        assert set(flight.regions) == set(held)
        for sub in subs:
            assert all(flight.holds(r) for r in sub.regions)
        for procedure_id, proc in flight.procedures():
            assert proc.sids and all(flight.get(sid).procedure_id == procedure_id for sid in proc.sids)
        assert self.store == {sub.sid: (sub.state, sub.regions) for sub in subs}


MigrationsMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_migration_tracking_holds_on_random_sequences = MigrationsMachine.TestCase
