"""Failover under ambiguous and wrong answers, clock steps and re-elections, on a fake clock.

Each test drives `Supervisor.handle(event, now)` with explicit times and feeds
the remote services' answers back as events, as the runtime's workers would.
Durable state goes through a real `StateStore` (on a `MemoryKV`), so what a
successor recovers is exactly what was committed.

- one failover step is one store write of a handful of keys, whatever the
  number of regions;
- a SubmitRegionMigration that may have happened (DEADLINE_EXCEEDED,
  UNAVAILABLE, ...) is retried to the same target with the same request_id,
  never sent elsewhere; a failover is counted when a migration is accepted;
- GetMigrationStatus NOT_FOUND is resubmitted with a backoff and a limit per
  window; the Selector's answer is validated; a region in two result
  categories stays in flight;
- a successor resolves an orphaned intent at once;
- a wall-clock step between two lives never ends a migration or a
  maintenance window early, and extends it by a bounded amount;
- a new leader does not mistake the time it was not leading for a local pause.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    BecomeLeader,
    Dump,
    FailoverPolicy,
    FakeClock,
    Guards,
    GuardSettings,
    Heartbeat,
    LoseLeadership,
    MigrationResult,
    MigrationState,
    Peer,
    PhiAccrualOptions,
    PollMigration,
    SelectionDone,
    SelectPeers,
    SetMaintenance,
    StatusPolled,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    Tick,
    as_region_array,
)
from supervisor_service.store import MemoryKV, StateStore

OPTS = PhiAccrualOptions()
START = 1_700_000_000_000
TICK = 1000
BASE = 120_000
HOUR = 3_600_000
SRC = Peer(1, "dn1:4001")
PEERS = [Peer(d, f"dn{d}:4001") for d in (5, 6, 7)]
NO_MASS = GuardSettings(max_failed_datanode_fraction=1.0, target_holddown_ms=0)


class RecordingKV(MemoryKV):
    """A MemoryKV that remembers the keys of every commit."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[set[str], set[str]]] = []

    def commit(self, puts, deletes, fence=None) -> None:
        self.log.append((set(puts), set(deletes)))
        super().commit(puts, deletes, fence)


def _ambiguous(task, code: str = "DEADLINE_EXCEEDED") -> SubmissionDone:
    return SubmissionDone(task, error=f"RegionMigration.SubmitRegionMigration failed: {code}: no answer",
                          error_kind="ambiguous")


def _refused(task, code: str = "INVALID_ARGUMENT") -> SubmissionDone:
    return SubmissionDone(task, error=f"RegionMigration.SubmitRegionMigration failed: {code}: bad request",
                          error_kind="refused")


class Sim:
    """A Supervisor, a clock, a store, and helpers that feed answers back as the runtime would."""

    def __init__(
        self,
        policy: FailoverPolicy | None = None,
        *,
        guards: GuardSettings | None = None,
        clock: FakeClock | None = None,
        kv: MemoryKV | None = None,
        term: int = 1,
        leader: bool = True,
    ) -> None:
        self.clock = clock or FakeClock(START, boot_id="boot-a")
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.guards = Guards(guards) if guards is not None else None
        self.sup = Supervisor(
            OPTS, self.metrics, policy or FailoverPolicy(), guards=self.guards, is_leader=False, leader_term=0,
            clock_base=self.clock.base(),
        )
        self.kv = kv if kv is not None else RecordingKV()
        self.store = StateStore(self.kv, "/test", flush_interval_s=0)
        self.effects: list[tuple[int, object]] = []  # (time, effect), all ever emitted
        self.change_lists: list[list] = []  # one per handled event that changed state
        if leader:
            self.become_leader(term)

    @property
    def now(self) -> int:
        return self.clock.now_ms()

    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    def handle(self, event) -> object:
        value = self.sup.handle(event, self.now)
        changes = self.sup.drain_changes()
        if changes:
            self.change_lists.append(changes)
            self.commit(changes)
        out = self.sup.drain_outbox()
        self.effects.extend((self.now, e) for e in out)
        self.last = out
        return value

    def commit(self, changes) -> None:
        done = threading.Event()
        errors: list = []
        self.store.submit(changes, lambda exc: (errors.append(exc), done.set()))
        if self.store._thread is None:
            self.store.start()
        assert done.wait(10) and errors == [None], errors

    def become_leader(self, term: int) -> None:
        self.handle(BecomeLeader(term, self.store.load()))

    def beat(self, datanode_id: int, regions) -> None:
        self.handle(Heartbeat(datanode_id, as_region_array(list(regions)), self.now))

    def tick(self) -> list:
        self.handle(Tick())
        return self.last

    def stop(self) -> None:
        self.store.stop(5)

    # -- observations

    def value(self, name: str, **labels) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def of(self, kind) -> list:
        return [e for _, e in self.effects if isinstance(e, kind)]

    def tasks(self) -> list:
        return [e.task for e in self.of(SubmitMigration)]

    def migrating(self) -> frozenset[int]:
        return self.sup.handle(Dump(Future()), self.now).migrating


@pytest.fixture
def sims():
    made: list[Sim] = []

    def make(*args, **kwargs) -> Sim:
        made.append(Sim(*args, **kwargs))
        return made[-1]

    yield make
    for sim in made:
        sim.stop()




def heartbeat_then_die(sim: Sim, datanode_id: int = 1, regions=(10,), seconds: int = 5, others=()) -> None:
    """`datanode_id` heartbeats every second for `seconds`, then stops; `others` keep going."""
    for _ in range(seconds):
        sim.beat(datanode_id, regions)
        for d, rs in others:
            sim.beat(d, rs)
        sim.advance(TICK)
        sim.tick()


Answer = Callable[[Sim, object], object | None]


def drive(sim: Sim, ms: int, *, select: Answer, submit: Answer, poll: Answer | None = None, others=(),
          after_tick: Callable[[Sim], None] | None = None) -> None:
    """Tick every second for `ms`; every effect is answered at once by the given callables (None: left out)."""
    end = sim.now + ms
    while sim.now < end:
        sim.advance(TICK)
        for d, rs in others:
            sim.beat(d, rs)
        pending = list(sim.tick())
        if after_tick is not None:
            after_tick(sim)
        while pending:
            effect = pending.pop(0)
            match effect:
                case SelectPeers(job):
                    answer = select(sim, job)
                case SubmitMigration(task):
                    answer = submit(sim, task)
                case PollMigration():
                    answer = poll(sim, effect) if poll is not None else None
            if answer is not None:
                sim.handle(answer)
                pending.extend(sim.last)


def rotating_selector() -> Answer:
    """Every call picks the next target of PEERS for all its regions (a new target per call)."""
    calls = iter(range(10**9))

    def select(sim: Sim, job) -> SelectionDone:
        target = PEERS[next(calls) % len(PEERS)]
        return SelectionDone(job, from_peer=SRC, peers=(target,) * len(job.region_ids))

    return select


def accept(procedures=None) -> Answer:
    ids = iter(range(1, 10**9))

    def submit(sim: Sim, task) -> SubmissionDone:
        pid = f"proc-{next(ids)}"
        if procedures is not None:
            procedures.append(pid)
        return SubmissionDone(task, result=MigrationResult(submitted=task.region_ids, procedure_id=pid))

    return submit


# ================================================================ finding 2: one failover step, one write


def test_failover_of_a_thousand_regions_writes_a_handful_of_keys_per_step(sims):
    sim = sims(guards=None)
    regions = list(range(1000, 2000))
    sim.beat(2, [20])
    heartbeat_then_die(sim, 1, regions, others=[(2, [20])])
    while not sim.of(SelectPeers):
        sim.advance(TICK)
        sim.beat(2, [20])
        sim.tick()
    [select] = sim.of(SelectPeers)
    sim.kv.log.clear()
    lists_before = len(sim.change_lists)
    # Two targets: two submissions, still one step.
    peers = tuple(PEERS[i % 2] for i in range(len(regions)))
    sim.handle(SelectionDone(select.job, from_peer=SRC, peers=peers))
    tasks = sim.tasks()
    assert len(tasks) == 2 and sum(len(t.region_ids) for t in tasks) == 1000
    assert len(sim.change_lists) == lists_before + 1, "the intent step is one list of changes"
    [(puts, deletes)] = sim.kv.log
    # Each decision: its in-flight record and its failover record (the history).
    assert len(puts) + len(deletes) <= 2 * len(tasks), sorted(puts | deletes)

    for i, task in enumerate(tasks):
        sim.kv.log.clear()
        sim.handle(SubmissionDone(task, result=MigrationResult(submitted=task.region_ids, procedure_id=f"p-{i}")))
        [(puts, deletes)] = sim.kv.log
        # The record of the submission, the datanode's counts and the failover record.
        assert len(puts) + len(deletes) <= 4, sorted(puts | deletes)
    assert sim.migrating() == frozenset(regions)
    sim.kv.log.clear()
    sim.handle(StatusPolled("p-0", state=MigrationState.SUCCEEDED))
    [(puts, deletes)] = sim.kv.log
    # The record, the datanode's registry and counts, the target's registry (watched from the end) and
    # the failover's history record.
    assert len(puts) + len(deletes) <= 5, sorted(puts | deletes)


def test_a_successor_recovers_the_submission_records(sims):
    first = sims(guards=None)
    heartbeat_then_die(first, 1, (10, 11, 12))
    drive(first, 20_000, select=rotating_selector(), submit=accept())
    [task] = first.tasks()
    assert first.migrating() == {10, 11, 12}
    second = sims(guards=None, kv=first.kv, clock=FakeClock(first.now + 5000, boot_id="boot-b"), term=2)
    assert second.migrating() == {10, 11, 12}
    assert second.sup.failover_counts == {(1, 10): 1, (1, 11): 1, (1, 12): 1}
    second.advance(FailoverPolicy().status_poll_interval_ms)
    assert [e.procedure_id for e in second.tick() if isinstance(e, PollMigration)] == ["proc-1"]


def test_old_per_region_in_flight_records_are_upgraded(sims, logged):
    import json

    kv = RecordingKV()
    for region in (10, 11):
        kv.data[f"/test/inflight/{region:020d}"] = json.dumps(
            {"datanode_id": 1, "procedure_id": "old-proc", "deadline_ms": START + 60_000}).encode()
    kv.data[f"/test/inflight/{12:020d}"] = json.dumps(
        {"datanode_id": 1, "procedure_id": "", "deadline_ms": START + 60_000}).encode()
    sim = sims(guards=None, kv=kv)
    assert sim.migrating() == {10, 11, 12}
    assert logged("inflight_records_upgraded") == [{"regions": 3, "submissions": 2}]
    assert not [k for k in kv.data if k.endswith(f"{10:020d}")], "the old keys are replaced"
    sim.advance(FailoverPolicy().status_poll_interval_ms)
    assert [e.procedure_id for e in sim.tick() if isinstance(e, PollMigration)] == ["old-proc"]


# ================================================================ finding 7: ambiguous is not failed


@pytest.mark.parametrize("code", ["DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "INTERNAL", "CANCELLED"])
def test_ambiguous_submission_is_retried_to_the_same_target_with_the_same_request_id(sims, code):
    sim = sims(guards=None)
    heartbeat_then_die(sim, 1, (10, 11, 12))
    attempts = iter(range(10**9))

    def submit(sim: Sim, task):
        if next(attempts) < 5:  # the call times out five times, then answers
            return _ambiguous(task, code)
        return SubmissionDone(task, result=MigrationResult(submitted=task.region_ids, procedure_id="proc-1"))

    drive(sim, 60_000, select=rotating_selector(), submit=submit)
    tasks = sim.tasks()
    assert len(sim.of(SelectPeers)) == 1, "the regions were sent to the Selector again"
    assert len(tasks) == 6
    assert {t.to_peer for t in tasks} == {tasks[0].to_peer}
    assert {t.region_ids for t in tasks} == {(10, 11, 12)}
    assert tasks[0].request_id and {t.request_id for t in tasks} == {tasks[0].request_id}
    assert sim.migrating() == {10, 11, 12}
    assert sim.sup.failover_counts == {(1, 10): 1, (1, 11): 1, (1, 12): 1}
    # Retries back off: not every tick.
    times = [t for t, e in sim.effects if isinstance(e, SubmitMigration)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0], gaps
    assert sim.value("supervisor_failover_submit_retries_total") == 5


def test_ambiguous_regions_are_in_flight_and_never_selected_while_unresolved(sims):
    sim = sims(guards=None)
    heartbeat_then_die(sim, 1, (10,))
    drive(sim, 300_000, select=rotating_selector(), submit=lambda s, t: _ambiguous(t))
    assert len(sim.of(SelectPeers)) == 1
    assert {t.to_peer for t in sim.tasks()} == {sim.tasks()[0].to_peer}
    assert sim.migrating() == {10}
    assert sim.value("supervisor_failover_submissions", state="ambiguous") == 1
    assert sim.sup.failover_counts == {}, "a failover is counted when a migration is accepted"
    # The backoff is capped: the retries keep coming.
    times = [t for t, e in sim.effects if isinstance(e, SubmitMigration)]
    assert times[-1] > sim.now - 2 * FailoverPolicy().submit_retry_backoff_max_ms


def test_definite_refusal_frees_the_regions_for_a_new_decision(sims):
    sim = sims(guards=None)
    heartbeat_then_die(sim, 1, (10,))
    refusals = iter(range(10**9))

    def submit(sim: Sim, task):
        if next(refusals) == 0:
            return _refused(task)
        return SubmissionDone(task, result=MigrationResult(submitted=task.region_ids, procedure_id="p"))

    drive(sim, 40_000, select=rotating_selector(), submit=submit)  # the refusal backs off 10 s
    first, second = sim.tasks()
    assert first.request_id != second.request_id
    assert len(sim.of(SelectPeers)) == 2
    assert sim.sup.failover_counts == {(1, 10): 1}
    assert second.timeout_ms == BASE


def test_ambiguous_submission_waits_while_its_datanode_is_in_maintenance(sims):
    sim = sims(guards=None)
    heartbeat_then_die(sim, 1, (10,))
    drive(sim, 20_000, select=rotating_selector(), submit=lambda s, t: _ambiguous(t))
    sim.handle(SetMaintenance(True, datanode_ids=(1,)))
    before = len(sim.tasks())
    drive(sim, 120_000, select=rotating_selector(), submit=lambda s, t: _ambiguous(t))
    assert len(sim.tasks()) == before
    sim.handle(SetMaintenance(False, datanode_ids=(1,)))
    drive(sim, 40_000, select=rotating_selector(), submit=accept())
    assert len(sim.tasks()) == before + 1 and sim.tasks()[-1].request_id == sim.tasks()[0].request_id


# ================================================================ finding 8: count what was accepted


def test_thirty_seconds_of_unavailable_then_success_counts_one_failover_with_the_base_timeout(sims):
    sim = sims(guards=None)
    heartbeat_then_die(sim, 1, (10,))
    unavailable_until = sim.now + 45_000  # about 30 s of them once the region is convicted

    def submit(sim: Sim, task):
        if sim.now < unavailable_until:
            return _ambiguous(task, "UNAVAILABLE")
        return SubmissionDone(task, result=MigrationResult(submitted=task.region_ids, procedure_id="p"))

    drive(sim, 90_000, select=rotating_selector(), submit=submit)
    tasks = sim.tasks()
    assert len(tasks) >= 4
    assert sim.sup.failover_counts == {(1, 10): 1}
    assert {t.timeout_ms for t in tasks} == {BASE}


def test_failover_timeout_is_capped(sims):
    kv = RecordingKV()
    seed = sims(guards=None, kv=kv, leader=False)
    from supervisor_service.core import CountsSet

    seed.commit([CountsSet((((1, 10), 40),))])
    sim = sims(guards=None, kv=kv)
    heartbeat_then_die(sim, 1, (10,))
    drive(sim, 20_000, select=rotating_selector(), submit=accept())
    [task] = sim.tasks()
    assert task.timeout_ms == FailoverPolicy().max_failover_timeout_ms == 1_200_000
    assert sim.sup.failover_counts == {(1, 10): 41}


# ================================================================ finding 9: NOT_FOUND is bounded


def test_not_found_resubmissions_are_backed_off_limited_counted_and_held(sims, logged):
    policy = FailoverPolicy(status_poll_interval_ms=1000)
    sim = sims(policy, guards=NO_MASS)
    heartbeat_then_die(sim, 1, (10,), others=[(2, [20])])
    not_found = lambda sim, e: StatusPolled(e.procedure_id, state=MigrationState.NOT_FOUND)  # noqa: E731
    started = sim.now
    drive(sim, 20_000, select=rotating_selector(), submit=accept(), poll=not_found, others=[(2, [20])])
    assert len(sim.tasks()) <= 2, [t.to_peer.id for t in sim.tasks()]
    holds_seen: set[str] = set()
    drive(sim, policy.resubmit_window_ms - 20_000, select=rotating_selector(), submit=accept(), poll=not_found,
          others=[(2, [20])], after_tick=lambda sim: holds_seen.update(sim.sup.status.holds))
    times = [t - started for t, e in sim.effects if isinstance(e, SubmitMigration)]
    assert len(times) == 1 + policy.max_resubmissions_per_window, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= policy.resubmit_backoff_ms for g in gaps), gaps
    assert gaps == sorted(gaps), gaps
    assert sim.value("supervisor_migration_not_found_regions_total") == len(times)
    assert sim.value("supervisor_failover_skipped_regions_total", reason="resubmit_backoff") > 0
    assert sim.value("supervisor_failover_skipped_regions_total", reason="resubmit_limit") > 0
    assert "resubmit_limit" in holds_seen and "resubmit_backoff" in holds_seen
    assert len(logged("migration_not_found")) == len(times)
    assert logged("failover_resubmit_limited")
    # The window moves on: the region may be resubmitted again.
    drive(sim, 60_000, select=rotating_selector(), submit=accept(), poll=not_found, others=[(2, [20])])
    assert len(sim.tasks()) > len(times)


def test_grpc_not_found_from_get_migration_status_is_not_found():
    import grpc

    from supervisor_service.remotes import GrpcRegionMigration
    from tests.support.fakes import FakeRegionMigration

    with FakeRegionMigration() as rm:
        rm.fail(grpc.StatusCode.NOT_FOUND, methods=["GetMigrationStatus"], details="no such procedure")
        client = GrpcRegionMigration(rm.endpoint, 5)
        try:
            assert client.status("p-1")[0] is MigrationState.NOT_FOUND
        finally:
            client.close()


# ================================================================ finding 10: the Selector's answer is validated


@pytest.mark.parametrize("peers, exclude, reason", [
    ((Peer(0, ""), PEERS[0]), (), "zero_id"),
    ((Peer(0, "dn0:4001"), PEERS[0]), (), "zero_id"),
    ((Peer(5, ""), PEERS[1]), (), "no_address"),
    ((Peer(5, "a:4001"), Peer(5, "b:4001")), (), "conflicting_address"),
    ((Peer(9, "dn9:4001"), PEERS[0]), (9,), "excluded_peer"),
    ((Peer(5, "h" * 5_000_000 + ":1"), PEERS[1]), (), "address_too_long"),
])
def test_invalid_selector_answer_is_an_error_for_that_datanode(sims, logged, peers, exclude, reason):
    sim = sims(FailoverPolicy(require_target_addr=True), guards=None)
    heartbeat_then_die(sim, 1, (10, 11))
    while not sim.of(SelectPeers):
        sim.advance(TICK)
        sim.tick()
    [select] = sim.of(SelectPeers)
    job = dataclasses.replace(select.job, exclude_targets=exclude)
    sim.handle(SelectionDone(job, from_peer=SRC, peers=peers))
    assert sim.tasks() == []
    assert sim.value("supervisor_selector_invalid_answers_total", reason=reason) == 1
    assert [line["reason"] for line in logged("failover_selector_answer_invalid")] == [reason]
    assert sim.sup.failover_counts == {}
    sim.advance(TICK)
    assert [e.job.region_ids for e in sim.tick() if isinstance(e, SelectPeers)] == [(10, 11)]


@pytest.mark.parametrize("lookup", [Peer(2, "dn2:4001"), Peer(1, "x" * 100_000)])
def test_invalid_peer_lookup_answer_is_an_error_for_that_datanode(sims, lookup):
    sim = sims(guards=None)
    heartbeat_then_die(sim, 1, (10,))
    while not sim.of(SelectPeers):
        sim.advance(TICK)
        sim.tick()
    [select] = sim.of(SelectPeers)
    sim.handle(SelectionDone(select.job, from_peer=lookup, peers=(PEERS[0],)))
    assert sim.tasks() == []
    assert sim.value("supervisor_failover_errors_total", stage="invalid_lookup") == 1
    sim.advance(TICK)
    assert [e.job.region_ids for e in sim.tick() if isinstance(e, SelectPeers)] == [(10,)]


def test_the_embedded_selector_offers_only_datanodes_with_an_address():
    from supervisor_service.remotes import EmbeddedSelector, PeerDirectory

    clock = FakeClock(START)
    directory = PeerDirectory(clock)
    directory.observe(2, "")
    directory.observe(3, "dn3:4001")
    selector = EmbeddedSelector(directory, 10_000, require_addr=True)
    assert selector.select(2, {1}, 1, (10, 11)) == [Peer(3, "dn3:4001")] * 2


def test_region_in_two_result_categories_stays_in_flight_under_the_procedure(sims, logged):
    sim = sims(FailoverPolicy(status_poll_interval_ms=1000), guards=None)
    heartbeat_then_die(sim, 1, (10, 11))
    contradictory = lambda sim, t: SubmissionDone(t, result=MigrationResult(  # noqa: E731
        migrated=(10,), submitted=(10, 11), procedure_id="proc-7"))
    drive(sim, 20_000, select=rotating_selector(), submit=contradictory,
          poll=lambda sim, e: StatusPolled(e.procedure_id, state=MigrationState.RUNNING))
    assert sim.sup.table.contains(1, 10), "the region was dropped on the word of one category"
    assert sim.migrating() == {10, 11}
    assert {e.procedure_id for e in sim.of(PollMigration)} == {"proc-7"}
    assert logged("failover_result_contradictory")[0]["regions"] == 1
    assert sim.value("supervisor_failover_regions_total", result="contradictory") == 1
    sim.handle(StatusPolled("proc-7", state=MigrationState.SUCCEEDED))
    assert not sim.sup.table.contains(1, 10) and not sim.sup.table.contains(1, 11)


def test_contradictory_region_without_a_procedure_is_in_flight_until_its_timeout(sims):
    sim = sims(guards=None)
    heartbeat_then_die(sim, 1, (10,))
    contradictory = lambda sim, t: SubmissionDone(t, result=MigrationResult(  # noqa: E731
        migrated=(10,), peer_conflict=(10,)))
    drive(sim, 20_000, select=rotating_selector(), submit=contradictory)
    assert sim.sup.table.contains(1, 10) and sim.migrating() == {10}
    assert len(sim.tasks()) == 1
    drive(sim, BASE, select=rotating_selector(), submit=accept())
    assert len(sim.tasks()) == 2


# ================================================================ finding 11: an orphaned intent


@pytest.mark.parametrize("answer", ["none", "ambiguous"])
def test_orphaned_intent_is_resubmitted_to_the_same_target_at_once_after_recovery(sims, answer):
    first = sims(guards=None)
    heartbeat_then_die(first, 1, (10, 11))
    drive(first, 20_000, select=rotating_selector(),
          submit=(lambda s, t: None) if answer == "none" else (lambda s, t: _ambiguous(t)))
    original = first.tasks()[0]
    # The first leader is gone; a successor (another machine) recovers five seconds later.
    second = sims(guards=GuardSettings(), kv=first.kv, clock=FakeClock(first.now + 5000, boot_id="boot-b"), term=2)
    assert second.migrating() == {10, 11}
    second.advance(TICK)
    [resent] = [e.task for e in second.tick() if isinstance(e, SubmitMigration)]
    assert (resent.to_peer, resent.region_ids, resent.request_id) == (
        original.to_peer, original.region_ids, original.request_id)
    assert resent.leader_term == 2
    assert second.of(SelectPeers) == []


# ================================================================ finding 5: clock steps between lives

MAINTENANCE_TTL = 600_000


def _first_life(sims, *, scope: tuple[int, ...]) -> tuple[Sim, int]:
    """A leader with a migration in flight (proc-1, timeout 120 s) and a 10-minute maintenance window
    (of `scope`, or global when empty) switched on at the same moment; it dies 20 s later.
    Returns the sim and the moment (its clock) both started."""
    first = sims(guards=None)
    heartbeat_then_die(first, 1, (10,), others=[(2, [20])])
    procs: list[str] = []
    while not procs:
        drive(first, TICK, select=rotating_selector(), submit=accept(procs), others=[(2, [20])])
    started = first.now
    first.handle(SetMaintenance(True, datanode_ids=scope, ttl_ms=MAINTENANCE_TTL))
    drive(first, 20_000, select=rotating_selector(), submit=accept(), others=[(2, [20])],
          poll=lambda s, e: StatusPolled(e.procedure_id, state=MigrationState.RUNNING))
    return first, started


def test_a_migration_running_past_its_timeout_is_asked_again_after_a_recovery_on_the_same_boot(sims):
    """A leader kept a migration past its timeout on RUNNING answers (not stored), then lost and won
    the leadership again in the same process: the recovered decision is polled before it can end,
    and a RUNNING answer keeps it (found by the chaos suite's migration_slow, CHAOS_SEED=21)."""
    first = sims(guards=None)
    heartbeat_then_die(first, 1, (10,), others=[(2, [20])])
    procs: list[str] = []
    while not procs:
        drive(first, TICK, select=rotating_selector(), submit=accept(procs), others=[(2, [20])])
    running = lambda s, e: StatusPolled(e.procedure_id, state=MigrationState.RUNNING)  # noqa: E731
    drive(first, BASE + 30_000, select=rotating_selector(), submit=accept(procs), poll=running, others=[(2, [20])])
    assert procs == ["proc-1"] and first.migrating() == {10}
    # The same process (same boot, same clock) leads again, past the stored timeout of the decision.
    second = sims(guards=None, kv=first.kv, clock=FakeClock(first.now + 1000, boot_id="boot-a"), term=2)
    assert second.migrating() == {10}
    second.advance(TICK)
    assert [e for e in second.tick() if not isinstance(e, PollMigration)] == []
    second.handle(StatusPolled("proc-1", state=MigrationState.RUNNING))
    drive(second, BASE // 2, select=rotating_selector(), submit=accept(), poll=running, others=[(2, [20])])
    assert second.of(SelectPeers) == [] and second.of(SubmitMigration) == []
    assert second.migrating() == {10}


@pytest.mark.parametrize("step_ms", [HOUR, -HOUR], ids=["ahead", "behind"])
@pytest.mark.parametrize("same_boot", [True, False], ids=["same-boot", "other-boot"])
def test_clock_step_between_lives_ends_neither_migration_nor_maintenance_early(sims, step_ms, same_boot):
    first, started = _first_life(sims, scope=(2,))
    down_ms = 10_000
    # `real` is the first life's clock continued: what time it really is.
    real = first.now + down_ms
    clock = FakeClock(real + step_ms, monotonic_offset_ms=step_ms if same_boot else -7 * HOUR,
                      boot_id="boot-a" if same_boot else "boot-b")
    second = sims(guards=None, kv=first.kv, clock=clock, term=2)
    offset = step_ms  # second.now - real time
    assert second.migrating() == {10}
    assert 2 in second.sup.datanode_maintenance
    selected_2_at = None
    maintenance_end = None
    resubmitted_at = None
    while second.now - offset < started + MAINTENANCE_TTL + 60_000:
        second.advance(TICK)
        # Datanode 2 is silent from now on: only its maintenance keeps it from being failed over.
        effects = second.tick()
        for e in effects:
            if isinstance(e, SelectPeers) and e.job.datanode_id == 2 and selected_2_at is None:
                selected_2_at = second.now - offset
            if isinstance(e, SelectPeers) and e.job.datanode_id == 1 and resubmitted_at is None:
                resubmitted_at = second.now - offset
            if isinstance(e, PollMigration):
                # Nothing is learnt in the second life (a RUNNING answer would keep it in flight):
                # the migration ends at its timeout, which the clock step must not bring forward.
                second.handle(StatusPolled(e.procedure_id, state=None, error="unavailable"))
        if maintenance_end is None and 2 not in second.sup.datanode_maintenance:
            maintenance_end = second.now - offset
    migration_deadline = started + BASE
    recovered = real
    checkpoint = FailoverPolicy().expiry_checkpoint_interval_ms
    # Never early.
    assert resubmitted_at is not None and resubmitted_at >= migration_deadline, (resubmitted_at, migration_deadline)
    assert maintenance_end is not None and maintenance_end >= started + MAINTENANCE_TTL
    assert selected_2_at is None or selected_2_at >= started + MAINTENANCE_TTL
    # Extended by at most: same boot, a tick; another boot, one timeout from recovery (in flight) and
    # the checkpoint interval plus the time without a leader (maintenance).
    if same_boot:
        assert resubmitted_at <= migration_deadline + TICK
        assert maintenance_end <= started + MAINTENANCE_TTL + TICK
    else:
        assert resubmitted_at <= recovered + BASE + TICK
        assert maintenance_end <= started + MAINTENANCE_TTL + checkpoint + down_ms + TICK


@pytest.mark.parametrize("step_ms", [HOUR, -HOUR], ids=["ahead", "behind"])
def test_clock_step_between_lives_does_not_end_global_maintenance_early(sims, step_ms):
    first, started = _first_life(sims, scope=())
    real = first.now + 10_000
    second = sims(guards=None, kv=first.kv, clock=FakeClock(real + step_ms, boot_id="boot-b"), term=2)
    end = None
    while end is None:
        second.advance(TICK)
        second.tick()
        if not second.sup.maintenance:
            end = second.now - step_ms
        assert second.now - step_ms < started + 2 * MAINTENANCE_TTL, "maintenance never ended"
    assert started + MAINTENANCE_TTL <= end <= started + MAINTENANCE_TTL + FailoverPolicy().expiry_checkpoint_interval_ms \
        + 10_000 + TICK


def test_maintenance_checkpoint_is_rewritten_while_an_expiry_is_pending(sims):
    sim = sims(guards=None)
    sim.handle(SetMaintenance(True, datanode_ids=(2,), ttl_ms=MAINTENANCE_TTL))
    sim.kv.log.clear()
    for _ in range(60):
        sim.advance(TICK)
        sim.tick()
    writes = [p for p, _ in sim.kv.log if "/test/maintenance" in p]
    interval = FailoverPolicy().expiry_checkpoint_interval_ms
    assert 60_000 // interval - 1 <= len(writes) <= 60_000 // interval + 1
    assert all(p == {"/test/maintenance"} for p, _ in sim.kv.log), "a checkpoint is one key"


def test_the_reported_maintenance_expiry_is_on_the_current_clock(sims):
    first = sims(guards=None)
    first.handle(SetMaintenance(True, datanode_ids=(2,), ttl_ms=MAINTENANCE_TTL))
    first.advance(30_000)
    first.tick()
    second = sims(guards=None, kv=first.kv, clock=FakeClock(first.now + HOUR, boot_id="boot-b"), term=2)
    until = second.sup.datanode_maintenance[2]
    assert second.now + MAINTENANCE_TTL - 30_000 <= until <= second.now + MAINTENANCE_TTL


# ================================================================ finding 13: re-election is not a local pause


def test_new_leader_does_not_hold_for_a_local_pause_of_its_previous_leadership(sims):
    sim = sims(FailoverPolicy(warmup_grace_ms=0), guards=NO_MASS)
    for _ in range(10):
        sim.beat(2, [20])
        sim.advance(TICK)
        sim.tick()
    sim.handle(LoseLeadership())
    sim.advance(60_000)  # another replica led meanwhile
    sim.become_leader(3)
    sim.advance(TICK)
    sim.beat(2, [20])
    sim.tick()
    assert "local_pause" not in sim.sup.status.holds
    assert sim.value("supervisor_failover_hold", reason="local_pause") == 0
    # A real stall of the new leader is still one.
    sim.advance(10_000)
    sim.tick()
    assert "local_pause" in sim.sup.status.holds


def test_losing_leadership_resets_the_tick_baseline():
    guards = Guards(GuardSettings())
    assert guards.observe_tick(START, 0, 0) is None
    guards.reset()
    assert guards.observe_tick(START + 60_000, 0, 0) is None
    assert guards.observe_tick(START + 61_000, 0, 0) is None
    assert guards.observe_tick(START + 70_000, 0, 0) == "local_pause"


def test_a_decision_lost_with_the_leadership_does_not_damp_the_next_leaders_failover(sims):
    """A decision whose intent never became durable is gone with its leadership. When the same
    replica leads again and the datanode is still silent, it is failed over as soon as it is
    convicted again, as another replica would do: not held by flap damping, as if the lost
    decision had been an earlier failover and the recovery's fresh heartbeat a recovery."""
    guards = GuardSettings(max_failed_datanode_fraction=1.0)
    sim = sims(FailoverPolicy(warmup_grace_ms=0), guards=guards)
    heartbeat_then_die(sim, 3, (30, 31), seconds=5, others=[(2, [20])])
    while not sim.of(SelectPeers):
        sim.advance(TICK)
        sim.beat(2, [20])
        sim.tick()
    [select] = sim.of(SelectPeers)
    sim.handle(SelectionDone(select.job, from_peer=Peer(3, "dn3:4001"), peers=(PEERS[0], PEERS[0])))
    assert len(sim.tasks()) == 1  # decided; the lease is lost before the intent is durable
    sim.handle(LoseLeadership())
    sim.kv.data = {k: v for k, v in sim.kv.data.items() if "/inflight/" not in k}
    sim.advance(3_000)
    sim.become_leader(4)
    selected_at = None
    for _ in range(60):
        sim.advance(TICK)
        sim.beat(2, [20])
        if any(isinstance(e, SelectPeers) and e.job.datanode_id == 3 for e in sim.tick()):
            selected_at = sim.now
            break
    assert selected_at is not None, "datanode 3 was held after the new leadership"
    assert sim.value("supervisor_failover_skipped_regions_total", reason="flap_backoff") == 0


def test_a_leadership_that_flaps_gets_no_fresh_failover_burst():
    guards = Guards(GuardSettings(failover_rate_per_s=0.01, failover_burst=1))
    assert guards.take_global(START)
    assert not guards.take_global(START + 1)
    guards.reset()  # lost and won again a moment later
    assert not guards.take_global(START + 2)


def test_the_resubmission_backoff_of_a_region_that_recovered_is_forgotten(sims):
    policy = FailoverPolicy(status_poll_interval_ms=1000)
    sim = sims(policy, guards=NO_MASS)
    heartbeat_then_die(sim, 1, (10,), others=[(2, [20])])
    not_found = lambda sim, e: StatusPolled(e.procedure_id, state=MigrationState.NOT_FOUND)  # noqa: E731
    drive(sim, 12_000, select=rotating_selector(), submit=accept(), poll=not_found, others=[(2, [20])])
    assert sim.sup._backoff.until_ms, "the NOT_FOUND did not start a backoff"
    # Datanode 1 is back: region 10 never fails again, its backoff runs out and is dropped.
    drive(sim, policy.resubmit_window_ms + 10_000, select=rotating_selector(), submit=accept(),
          poll=not_found, others=[(1, [10]), (2, [20])])
    assert sim.sup._backoff.until_ms == {} and sim.sup._backoff.ended_ms == {}


def _answers(mode: str) -> tuple[Answer, Answer | None]:
    """A RegionMigration that never settles the region, one way or another."""
    ids = iter(range(1, 10**9))

    def submit(sim: Sim, task):
        match mode:
            case "refused":
                return _refused(task)
            case "peer_conflict":
                return SubmissionDone(task, result=MigrationResult(peer_conflict=task.region_ids))
            case "empty":
                return SubmissionDone(task, result=MigrationResult(procedure_id=f"p-{next(ids)}"))
            case "failed":
                return SubmissionDone(task, result=MigrationResult(submitted=task.region_ids,
                                                                   procedure_id=f"p-{next(ids)}"))

    def poll(sim: Sim, effect):
        state = MigrationState.FAILED if mode == "failed" else MigrationState.RUNNING
        return StatusPolled(effect.procedure_id, state=state)

    return submit, poll


@pytest.mark.parametrize("mode", ["refused", "peer_conflict", "failed", "empty"])
def test_a_region_that_is_never_settled_is_not_sent_to_a_new_target_every_tick(sims, mode):
    """A refusing, conflicting, failing or silent RegionMigration: the region is decided again at
    most `1 + max_resubmissions_per_window` times in a window, backed off in between (it used to
    be about once a tick, each time to another target under another request_id)."""
    policy = FailoverPolicy(status_poll_interval_ms=1000)
    sim = sims(policy, guards=NO_MASS)
    heartbeat_then_die(sim, 1, (10,), others=[(2, [20])])
    submit, poll = _answers(mode)
    drive(sim, 120_000, select=rotating_selector(), submit=submit, poll=poll, others=[(2, [20])])
    decisions = {t.request_id for t in sim.tasks()}
    bound = 1 if mode == "empty" else 1 + policy.max_resubmissions_per_window
    assert 1 <= len(decisions) <= bound, len(decisions)
