"""A stateful hypothesis test of the supervisor core, guards on: registrations, heartbeats, maintenance,
ticks, time, the remote services' answers and new leaderships in any order (README "Fuzzing").

The machine drives `Supervisor.handle(event, now)` on a fake time line (time moves only by the
rules) with the guards of the service (`GuardSettings()`) and the default failover policy
(resubmission backoff included). It models, from the events it sent and the effects it took only,
which detectors must exist, which regions are in flight or in a call, and the failover counts.

Invariants, after every step:
- no detector without a registration or a heartbeat: the table holds exactly the (datanode, region)
  pairs registered, reset or heartbeat (with the right to create) and not since deregistered,
  cleared, or moved away by a migration;
- the failover counts are the model's, and never negative; no metric sample is negative or NaN;
  the core's changes, committed through the store's codec, give a new leadership the same counts
  (and it rebuilds the table from the stored registry);
- a region in flight, or in a call whose outcome is not known, is never selected or submitted
  again (a retry is the same request to the same target);
- nothing is selected while a hold of all failover is published (maintenance, warm-up, local pause,
  overload, mass failure), nor for a datanode in maintenance;
- a Dump is consistent with the table and the counts.
"""

from __future__ import annotations

import math
from concurrent.futures import Future

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    BecomeLeader,
    Clear,
    Deregister,
    Dump,
    FailoverPolicy,
    Guards,
    GuardSettings,
    Heartbeat,
    LoseLeadership,
    MigrationResult,
    MigrationState,
    MigrationTask,
    Peer,
    PhiAccrualOptions,
    PollMigration,
    Register,
    ReleaseHold,
    Reset,
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
from supervisor_service.core.clock import ClockBase
from supervisor_service.store import Mirror, decode_state, encode
from tests.support.fuzzing import examples

OPTS = PhiAccrualOptions()
DONE = ("migrated", "region_not_found", "table_not_found", "leader_changed")
STARTS = ("submitted", "migrating")
ANSWERS = DONE + STARTS + ("peer_conflict", "submitted", "submitted", "unanswered")
# Region 10 on two datanodes (a region moved from one to the other), the largest ids there are.
REGIONS = {0: (40,), 1: (10, 11, 12), 2: (10, 20, 21), 3: (30,), 2**64 - 1: (2**64 - 1, 0)}
DATANODES = sorted(REGIONS)
PEERS = [Peer(i, f"dn{i}:4001") for i in (1, 2, 3, 5, 6)]
ALL_FAILOVER_HOLDS = {"maintenance", "warmup", "local_pause", "overload", "mass_failure"}
STEPS = [0, 1, 500, 1000, 1000, 3000, 13_000, 60_000]


PAIRS = st.lists(st.sampled_from([(d, r) for d in DATANODES for r in REGIONS[d]]), max_size=6).map(tuple)


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        # One boot of one machine (a boot id): a new leadership in this process measures exactly how long
        # the migrations in flight have run, so their deadlines stay where they were.
        self.sup = Supervisor(OPTS, Metrics(self.registry), FailoverPolicy(), guards=Guards(GuardSettings()),
                              clock_base=ClockBase("fuzz-boot", 0))
        self.now = 1_700_000_000_000
        self.watched: set[tuple[int, int]] = set()
        self.counts: dict[tuple[int, int], int] = {}
        self.selects: dict[int, SelectPeers] = {}
        self.submits: dict[int, SubmitMigration] = {}
        self.ambiguous: dict[str, MigrationTask] = {}
        self.polls: set[str] = set()
        # region -> (datanode, procedure, deadline, deadline counted from the submission, timeout)
        self.inflight: dict[int, tuple[int, str, int, int, int]] = {}
        self.targets: dict[int, int] = {}  # region -> the target of its last submission
        self.next_proc = 0
        self.alive = set(DATANODES)
        # The store, as the writer keeps it: every change the core emits, committed in order.
        self.prefix = "/fuzz/"
        self.stored: dict[str, bytes] = {}
        self.mirror = Mirror()
        self.term = 1

    @initialize()
    def cluster(self) -> None:
        for d in DATANODES:
            self._beat(d, REGIONS[d], self.now)
        self._drain()

    # ------------------------------------------------------------ helpers

    def _beat(self, d: int, regions, ts: int, known_only: bool = False) -> None:
        self.sup.handle(Heartbeat(d, as_region_array(list(regions)), ts, 0.0, known_only), self.now)
        if not known_only:
            self.watched |= {(d, r) for r in regions}

    def _in_flight(self, r: int, task: MigrationTask, proc: str) -> None:
        deadline = self.now + task.timeout_ms
        self.inflight[r] = (task.datanode_id, proc, deadline, deadline, task.timeout_ms)
        self.targets[r] = task.to_peer.id

    def _busy(self) -> set[int]:
        return {r for s in self.submits.values() for r in s.task.region_ids} | {
            r for t in self.ambiguous.values() for r in t.region_ids}

    def _take(self, effects) -> None:
        holds = set(self.sup.status.holds) & ALL_FAILOVER_HOLDS
        for e in effects:
            if isinstance(e, SelectPeers):
                job = e.job
                assert not holds, f"selected {job.datanode_id} while failover is held: {holds}"
                assert job.datanode_id not in self.sup.datanode_maintenance
                assert all(s.job.datanode_id != job.datanode_id for s in self.selects.values())
                busy = self._busy()
                for r in job.region_ids:
                    assert r not in busy, "selected a region whose submission is pending or unresolved"
                    assert r not in self.inflight, "selected a region whose migration is in flight"
                    assert (job.datanode_id, r) in self.watched
                self.selects[job.job_id] = e
            elif isinstance(e, SubmitMigration):
                task = e.task
                assert task.to_peer.id != task.from_peer.id
                first = self.ambiguous.pop(task.request_id, None)
                if first is not None:  # a retry: the same request, to the same target
                    assert (task.to_peer, task.region_ids) == (first.to_peer, first.region_ids)
                else:
                    busy = self._busy()
                    for r in task.region_ids:
                        assert r not in busy and r not in self.inflight, f"region {r} submitted again while in flight"
                self.submits[task.task_id] = e
            elif isinstance(e, PollMigration):
                assert e.procedure_id not in self.polls, "a second poll while one is out"
                self.polls.add(e.procedure_id)
            else:  # pragma: no cover - an effect the model does not know
                raise AssertionError(e)

    def _drain(self) -> None:
        self._take(self.sup.drain_outbox())
        changes = self.sup.drain_changes()
        if changes:
            encoding = encode(changes, self.mirror, self.prefix, 10_000)
            for key in encoding.deletes:
                self.stored.pop(key, None)
            self.stored.update(encoding.puts)
            self.mirror.apply(encoding)

    # ------------------------------------------------------------ rules: the metasrv and the datanodes

    @rule(pairs=PAIRS)
    def register(self, pairs):
        self.sup.handle(Register(pairs), self.now)
        self.watched |= set(pairs)
        self._drain()

    @rule(pairs=PAIRS)
    def reset(self, pairs):
        self.sup.handle(Reset(pairs), self.now)
        self.watched |= set(pairs)
        self._drain()

    @rule(pairs=PAIRS)
    def deregister(self, pairs):
        self.sup.handle(Deregister(pairs), self.now)
        self.watched -= set(pairs)
        for key in pairs:
            self.counts.pop(key, None)
        self._drain()

    @rule()
    def clear(self):
        self.sup.handle(Clear(), self.now)
        self.watched.clear()  # the counts are kept
        self._drain()

    @rule(d=st.sampled_from(DATANODES), data=st.data(), dt=st.sampled_from(STEPS),
          late=st.sampled_from([0, 0, 0, 5000]), known_only=st.booleans())
    def heartbeat(self, d, data, dt, late, known_only):
        self.now += dt
        regions = data.draw(st.lists(st.sampled_from(REGIONS[d]), min_size=1, unique=True))
        self._beat(d, sorted(regions), self.now - late, known_only)  # late: a stamp older than the last
        self._drain()

    @rule(enabled=st.sampled_from([True, False, False]), scope=st.sampled_from([(), (1,), (2, 3), (2**64 - 1,)]),
          ttl=st.sampled_from([0, 0, 1000, 60_000]))
    def maintenance(self, enabled, scope, ttl):
        self.sup.handle(SetMaintenance(enabled, None, scope, ttl), self.now)
        self._drain()

    @rule()
    def release_hold(self):
        self.sup.handle(ReleaseHold(), self.now)
        self._drain()

    @rule()
    def new_leadership(self):
        """The leadership is lost and won again (a new term): the table, the failover work under way and
        the guards are rebuilt from the store. Calls still out are answered to nobody: the decisions
        they carried are resent, with their request ids."""
        self.sup.handle(LoseLeadership(), self.now)
        self._drain()
        state = decode_state(self.stored, self.prefix)
        assert state.failover_counts == self.counts, "the stored failover counts are not the ones in memory"
        for sub in self.submits.values():
            self.ambiguous[sub.task.request_id] = sub.task
        self.submits.clear()
        self.selects.clear()
        self.polls.clear()
        self.term += 1
        # The store keeps the submission, not the RUNNING answers since: on this boot a recovered
        # migration ends a timeout after its submission, one with a procedure no sooner than two
        # status polls from now (it is asked before it can end).
        poll_ms = FailoverPolicy().status_poll_interval_ms
        for r, (d, p, _, submitted, timeout) in list(self.inflight.items()):
            least = 2 * poll_ms if p else 1
            self.inflight[r] = (d, p, self.now + max(submitted - self.now, least), submitted, timeout)
        self.sup.handle(BecomeLeader(self.term, state), self.now)
        self.watched = {(d, r) for d, regions in state.registry.items() for r in regions.tolist()}
        self._drain()

    # ------------------------------------------------------------ rules: time

    def _tick(self, lag: float = 0.0, fill: float = 0.0, refused: int = 0) -> None:
        for r, (_, _, deadline, _, _) in list(self.inflight.items()):
            if self.now >= deadline:
                del self.inflight[r]
        assert self.sup.handle(Tick(lag_ms=lag, queue_fill=fill, heartbeats_refused=refused), self.now) is None
        self._drain()

    @rule(d=st.sampled_from(DATANODES))
    def die_or_revive(self, d):
        self.alive ^= {d}

    @rule(seconds=st.sampled_from([1, 3, 13, 30]))
    def run(self, seconds):
        """Time passes a second at a time: the live datanodes heartbeat all their regions, then a tick."""
        for _ in range(seconds):
            self.now += 1000
            for d in sorted(self.alive):
                self._beat(d, REGIONS[d], self.now)
            self._tick()

    @rule(dt=st.sampled_from(STEPS), lag=st.sampled_from([0.0, 0.0, 6000.0]),
          fill=st.sampled_from([0.0, 0.0, 0.95]), refused=st.sampled_from([0, 0, 0, 3]))
    def tick(self, dt, lag, fill, refused):
        """A tick after any time, late or with the queue full or heartbeats refused (the guards' inputs)."""
        self.now += dt
        self._tick(lag, fill, refused)

    # ------------------------------------------------------------ rules: the remote services answer

    @precondition(lambda self: self.selects)
    @rule(data=st.data(), outcome=st.sampled_from(["peers", "peers", "short", "error"]))
    def answer_select(self, data, outcome):
        job = self.selects.pop(data.draw(st.sampled_from(sorted(self.selects)))).job
        if outcome == "error":
            self.sup.handle(SelectionDone(job, error="down", error_stage="select"), self.now)
            assert self.sup.drain_outbox() == []
            return
        n = len(job.region_ids) - (outcome == "short")
        peers = data.draw(st.lists(st.sampled_from(PEERS), min_size=n, max_size=n))
        self.sup.handle(SelectionDone(job, from_peer=None, peers=tuple(peers)), self.now)
        effects = self.sup.drain_outbox()
        for e in effects:
            assert isinstance(e, SubmitMigration) and set(e.task.region_ids) <= set(job.region_ids)
        self._take(effects)

    @precondition(lambda self: self.submits)
    @rule(data=st.data(), how=st.sampled_from(["answer", "answer", "ambiguous", "refused"]))
    def answer_submit(self, data, how):
        task = self.submits.pop(data.draw(st.sampled_from(sorted(self.submits)))).task
        if how == "refused":
            self.sup.handle(SubmissionDone(task, error="INVALID_ARGUMENT: no", error_kind="refused"), self.now)
            self._drain()
            return
        if how == "ambiguous":
            self.sup.handle(SubmissionDone(task, error="unavailable"), self.now)
            self.ambiguous[task.request_id] = task
            self._drain()
            return
        categories: dict[str, list[int]] = {}
        for r in task.region_ids:
            categories.setdefault(data.draw(st.sampled_from(ANSWERS)), []).append(r)
        categories.pop("unanswered", None)
        self.next_proc += 1
        proc = f"proc-{self.next_proc}"
        result = MigrationResult(procedure_id=proc, **{c: tuple(rs) for c, rs in categories.items()})
        self.sup.handle(SubmissionDone(task, result=result), self.now)
        for category, regions in categories.items():
            for r in regions:
                key = (task.datanode_id, r)
                if category in DONE:
                    self.watched.discard(key)
                    self.counts.pop(key, None)
                elif category in STARTS:
                    self.counts[key] = self.counts.get(key, 0) + 1
                    self._in_flight(r, task, proc if category == "submitted" else "")
        answered = {r for rs in categories.values() for r in rs}
        for r in task.region_ids:
            if r not in answered:
                self._in_flight(r, task, proc)
        self._drain()

    @rule(d=st.sampled_from(DATANODES), seconds=st.sampled_from([13, 20]),
          calls=st.sampled_from(["answered", "answered", "ambiguous", "left_out"]))
    def drive(self, d, seconds, calls):
        """A datanode dies; time passes; every selection that follows succeeds at once, and every
        submission is accepted (or its call fails without a definite answer, or is still out)."""
        self.alive.discard(d)
        self.run(seconds)
        while self.selects:
            job = self.selects.pop(min(self.selects)).job
            target = next(p for p in PEERS if p.id != job.datanode_id)
            self.sup.handle(SelectionDone(job, from_peer=None, peers=(target,) * len(job.region_ids)), self.now)
            self._drain()
        if calls == "left_out":
            return
        while self.submits:
            task = self.submits.pop(min(self.submits)).task
            if calls == "ambiguous":
                self.sup.handle(SubmissionDone(task, error="unavailable"), self.now)
                self.ambiguous[task.request_id] = task
                self._drain()
                continue
            self.next_proc += 1
            proc = f"proc-{self.next_proc}"
            self.sup.handle(SubmissionDone(task, result=MigrationResult(submitted=task.region_ids,
                                                                        procedure_id=proc)), self.now)
            for r in task.region_ids:
                key = (task.datanode_id, r)
                self.counts[key] = self.counts.get(key, 0) + 1
                self._in_flight(r, task, proc)
            self._drain()

    @precondition(lambda self: self.polls)
    @rule(data=st.data(), state=st.sampled_from(list(MigrationState) + [None]))
    def answer_poll(self, data, state):
        proc = data.draw(st.sampled_from(sorted(self.polls)))
        self.polls.discard(proc)
        error = "unavailable" if state is None else None
        self.sup.handle(StatusPolled(proc, state=state, error=error), self.now)
        if state is MigrationState.RUNNING:
            # Known to run: its timeout counts from this answer.
            for r, (d, p, deadline, submitted, timeout) in list(self.inflight.items()):
                if p == proc:
                    self.inflight[r] = (d, p, max(deadline, self.now + timeout), submitted, timeout)
        if state in (MigrationState.SUCCEEDED, MigrationState.FAILED, MigrationState.NOT_FOUND):
            for r, (d, p, _, _, _) in list(self.inflight.items()):
                if p == proc:
                    del self.inflight[r]
                    to = self.targets.get(r, 0)
                    if state is MigrationState.SUCCEEDED:
                        self.watched.discard((d, r))
                        self.counts.pop((d, r), None)
                        if to and to != d:  # watched on the target from the end (docs/design.md §16)
                            self.watched.add((to, r))
                    if state is MigrationState.FAILED and to and to != d:  # the candidate's detector goes
                        self.watched.discard((to, r))
                        self.counts.pop((to, r), None)
        self._drain()

    # ------------------------------------------------------------ invariants

    @invariant()
    def detectors_only_for_registered_or_heartbeated_regions(self):
        table = self.sup.table
        held = {(d, r) for d in table.datanode_ids() for r in table.regions_of(d).tolist()}
        assert held == self.watched, (sorted(held - self.watched), sorted(self.watched - held))
        assert len(table) == len(held)

    @invariant()
    def counts_are_the_models_and_never_negative(self):
        assert self.sup.failover_counts == self.counts
        assert all(isinstance(c, int) and c >= 1 for c in self.sup.failover_counts.values())
        for family in self.registry.collect():
            for sample in family.samples:
                assert not math.isnan(sample.value) and sample.value >= 0, sample

    @invariant()
    def dump_is_consistent(self):
        snap = self.sup.handle(Dump(Future()), self.now)
        rows = {(node.datanode_id, r) for node in snap.nodes for r in node.regions.tolist()}
        assert rows == self.watched
        assert snap.failover_counts == self.counts
        assert snap.migrating <= set(self.inflight) | self._busy()
        assert self.sup.drain_outbox() == []


CoreMachine.TestCase.settings = settings(
    examples(100), stateful_step_count=50, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
test_core_invariants_hold_on_random_sequences = CoreMachine.TestCase
