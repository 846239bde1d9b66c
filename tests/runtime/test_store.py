"""The state store's writer: group commits, transaction boundaries, fencing, the bounded queue, and one
failover decision as one transaction. (The codec alone: tests/unit/test_store_codec.py; a real etcd:
tests/integration/test_store_etcd.py.)"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    ClockMark,
    CountsDrop,
    CountsSet,
    FailoverPolicy,
    Heartbeat,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    JournalAppend,
    JournalEntry,
    MaintenanceSet,
    MigrationResult,
    Peer,
    PhiAccrualOptions,
    RegistryAdd,
    RegistryRemove,
    SelectionDone,
    SelectPeers,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    TermSet,
    Tick,
)
from supervisor_service.store import EtcdKV, FencedOut, MemoryKV, StateStore, StoreError
from supervisor_service.store.txn import txn_bytes  # internal to the writer: how it measures a transaction
from tests.support import store_golden as golden


def _u64(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.uint64)


def _entry(i: int, term: int = 1) -> JournalEntry:
    return JournalEntry(1000 + i, (i,), Peer(1, "a:1"), Peer(2, "b:2"), 120_000, "FAILOVER", f"dry-run-{i}", term)


def _apply(store: StateStore, changes) -> None:
    done = threading.Event()
    errors = []
    store.submit(changes, lambda exc: (errors.append(exc), done.set()))
    assert done.wait(10)
    assert errors == [None]


@pytest.fixture
def store():
    s = StateStore(MemoryKV(), "/cluster-a", flush_interval_s=0, journal_capacity=3)
    s.load()
    s.start()
    yield s
    s.stop(5)


def test_every_change_round_trips(store):
    big = (1 << 64) - 1
    flight = InFlightRecord("3-a", 1, Peer(1, "a:1"), Peer(2, "b:2"), (5, big), 240_000, "submitted", "p-1", 2,
                            ClockMark("boot", 123, 4000))
    _apply(store, [
        RegistryAdd(1, _u64(5, 3, big)),
        RegistryAdd(2, _u64(7)),
        RegistryRemove(1, _u64(3)),
        CountsSet((((1, 5), 2), ((2, 7), 1))),
        CountsDrop(((2, 7),)),
        InFlightSet("3-a", flight),
        InFlightSet("3-b", InFlightRecord("3-b", 1, Peer(1), Peer(2, "b:2"), (6,), 120_000, "intent")),
        InFlightDrop("3-b"),
        MaintenanceSet(True, 5000, ((4, 0), (9, 7000)), ClockMark("boot", 123, 4000)),
        JournalAppend(_entry(1, term=3), 3),
        TermSet(4),
    ])
    state = StateStore(store.kv, "/cluster-a").load()
    assert {d: r.tolist() for d, r in state.registry.items()} == {1: [5, big], 2: [7]}
    assert state.failover_counts == {(1, 5): 2}
    assert state.inflight == {"3-a": flight}
    assert (state.maintenance, state.maintenance_until_ms, state.datanode_maintenance) == (True, 5000, {4: 0, 9: 7000})
    assert state.maintenance_mark == ClockMark("boot", 123, 4000)
    assert state.journal == [_entry(1, term=3)] and state.journal_term == 3
    assert state.term == 4


def test_registry_emptied_datanode_disappears(store):
    _apply(store, [RegistryAdd(1, _u64(1, 2))])
    _apply(store, [RegistryRemove(1, _u64(1, 2))])
    assert StateStore(store.kv, "/cluster-a").load().registry == {}
    assert not [k for k in store.kv.data if "registry" in k]


def test_journal_keeps_the_newest_capacity_entries(store):
    for i in range(5):
        _apply(store, [JournalAppend(_entry(i), 1)])
    state = StateStore(store.kv, "/cluster-a").load()
    assert [e.procedure_id for e in state.journal] == ["dry-run-2", "dry-run-3", "dry-run-4"]


def test_prefixes_keep_clusters_apart(store):
    other = StateStore(store.kv, "/cluster-b", flush_interval_s=0)
    other.load()
    other.start()
    _apply(other, [RegistryAdd(1, _u64(1))])
    other.stop(5)
    _apply(store, [RegistryAdd(2, _u64(2))])
    assert list(StateStore(store.kv, "/cluster-a").load().registry) == [2]
    assert list(StateStore(store.kv, "/cluster-b").load().registry) == [1]


def test_changes_submitted_together_are_one_commit():
    kv = MemoryKV()
    store = StateStore(kv, "/c", flush_interval_s=0.2)
    store.load()
    store.start()
    for i in range(50):
        store.submit([RegistryAdd(i % 5, _u64(i))])
    store.flush()
    assert kv.commits <= 2  # group commit, not one write per region
    assert StateStore(kv, "/c").load().region_count == 50
    store.stop(5)


# ---------------------------------------------------------------- transaction boundaries and fencing


class _RecordingKV(MemoryKV):
    """A MemoryKV with transaction limits that records every transaction (one per `commit` call): its keys in
    `transactions`, its puts and deletes in `log`."""

    def __init__(self, max_ops: int | None = None, max_bytes: int | None = None) -> None:
        super().__init__()
        self.max_ops, self.max_bytes = max_ops, max_bytes
        self.transactions: list[set[str]] = []
        self.log: list[tuple[dict[str, bytes], set[str]]] = []

    def commit(self, puts, deletes, fence=None):
        assert self.max_ops is None or len(puts) + len(deletes) <= self.max_ops
        assert self.max_bytes is None or txn_bytes(puts, deletes) <= self.max_bytes
        super().commit(puts, deletes, fence)
        self.transactions.append(set(puts) | set(deletes))
        self.log.append((dict(puts), set(deletes)))


def _registry_call(first_datanode: int, n: int) -> list:
    return [RegistryAdd(first_datanode + i, _u64(first_datanode + i)) for i in range(n)]


def _wait_all(events: list[threading.Event], timeout: float = 10) -> None:
    for e in events:
        assert e.wait(timeout)


def test_writer_splits_transactions_only_between_submit_calls():
    kv = _RecordingKV(max_ops=10)
    store = StateStore(kv, "/c", flush_interval_s=0.2)  # the 30 calls below form one group commit
    store.load()
    store.start()
    try:
        done = []
        for call in range(30):
            e = threading.Event()
            store.submit(_registry_call(call * 3, 3), lambda exc, e=e: e.set())  # three keys per call
            done.append(e)
        _wait_all(done)
        for call in range(30):
            keys = {f"/c/registry/{call * 3 + i:020d}" for i in range(3)}
            holding = [t for t in kv.transactions if t & keys]
            assert len(holding) == 1 and keys <= holding[0], f"call {call} was split: {holding}"
        assert len(kv.transactions) == 10  # three calls (9 ops) per transaction of at most 10
    finally:
        store.stop(5)


def test_a_call_too_big_for_one_transaction_is_split_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger="supervisor_service.store")
    kv = _RecordingKV(max_ops=10)
    store = StateStore(kv, "/c", flush_interval_s=0)
    store.load()
    store.start()
    try:
        _apply(store, _registry_call(0, 25))
        assert [len(t) for t in kv.transactions] == [10, 10, 5]
        assert StateStore(kv, "/c").load().region_count == 25
        split = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "store_batch_split"]
        assert split == [{"ops": 25, "bytes": split[0]["bytes"], "transactions": 3, "calls": 1,
                          "max_ops": 10, "max_bytes": None}]
    finally:
        store.stop(5)


class _GatedKV(MemoryKV):
    """Commits wait for `gate` (a link that hangs), then fail with `fail_with` if set, else land."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_with: Exception | None = None
        self.attempts = 0
        self.before_return = None  # called after a commit landed, before it returns

    def commit(self, puts, deletes, fence=None):
        self.attempts += 1
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail_with is not None:
            raise self.fail_with
        super().commit(puts, deletes, fence)
        if self.before_return is not None:
            self.before_return()


def _seeded(kv: MemoryKV, term: int) -> None:
    kv.data["/c/term"] = str(term).encode()


def test_write_of_an_ended_term_is_answered_at_once_and_never_retried():
    kv = _GatedKV()
    _seeded(kv, 1)
    held = {1}
    store = StateStore(kv, "/c", flush_interval_s=0, holds_term=lambda t: t in held)
    store.load()
    store.start()
    try:
        kv.gate.clear()  # the link hangs from now on
        answers: list = []
        answered = threading.Event()
        store.submit([RegistryAdd(9, _u64(9003))], lambda exc: (answers.append(exc), answered.set()), term=1)
        assert kv.entered.wait(5)
        held.clear()  # the election: term 1 ended
        started = time.monotonic()
        store.leadership_changed()
        assert answered.wait(1) and time.monotonic() - started < 0.5
        assert isinstance(answers[0], FencedOut) and not answers[0].definite  # it was with the backend
        assert "leadership of term 1 ended" in str(answers[0])
        later: list = []
        store.submit([RegistryAdd(9, _u64(9004))], later.append, term=1)
        kv.fail_with = StoreError("etcd write failed: deadline exceeded")
        kv.gate.set()
        _wait_for(lambda: later)
        assert isinstance(later[0], FencedOut) and later[0].definite and "not committed" in str(later[0])
        store.flush(5)  # a later pass of the writer, past the backoff after the failed attempt, has run
        assert kv.attempts == 1, "a write of an ended term was sent again"
        assert "/c/registry/00000000000000000009" not in kv.data
    finally:
        store.stop(5)


def test_a_late_answer_of_an_old_term_never_reaches_the_reloaded_mirror():
    """Term 1's commit lands, its answer is late; meanwhile another leader adds 9002 and this
    replica wins again (term 3) and reloads. Term 1's view of datanode 9 must not come back."""
    kv = _GatedKV()
    _seeded(kv, 1)
    held = {1}
    store = StateStore(kv, "/c", flush_interval_s=0, holds_term=lambda t: t in held)
    store.load()
    store.start()
    reloaded = threading.Event()
    try:
        _apply_term(store, [RegistryAdd(9, _u64(9001))], 1)

        def meanwhile() -> None:
            kv.before_return = None
            held.clear()
            kv.data["/c/registry/00000000000000000009"] = _u64(9001, 9002, 9003).tobytes()  # term 2's leader
            kv.data["/c/term"] = b"3"
            held.add(3)
            store.load()
            reloaded.set()

        kv.before_return = meanwhile
        late: list = []
        store.submit([RegistryAdd(9, _u64(9003))], late.append, term=1)
        _wait_for(lambda: late)
        assert reloaded.is_set()
        # It did land, but the term ended before the answer: the caller is told it may not have.
        assert isinstance(late[0], FencedOut) and not late[0].definite
        _apply_term(store, [RegistryAdd(9, _u64(9004))], 3)
        assert StateStore(kv, "/c").load().registry[9].tolist() == [9001, 9002, 9003, 9004]
    finally:
        store.stop(5)


def test_a_reload_while_the_writer_picks_its_run_never_encodes_a_new_terms_write_against_the_old_mirror():
    """The writer is between reading its mirror and taking its run when another leader has stored
    9002 and this replica wins again (term 3), reloads and writes 9004. That write must be encoded
    against the reloaded mirror (9002 kept), never against the one from before the reload."""
    kv = MemoryKV()
    _seeded(kv, 1)
    held = {1}
    store = StateStore(kv, "/c", flush_interval_s=0, holds_term=lambda t: t in held)
    store.load()
    store.start()
    new_term_answer: list = []
    try:
        _apply_term(store, [RegistryAdd(9, _u64(9001))], 1)

        def win_again() -> None:
            held.clear()
            kv.data["/c/registry/00000000000000000009"] = _u64(9001, 9002).tobytes()  # term 2's leader
            kv.data["/c/term"] = b"3"
            held.add(3)
            store.load()
            store.submit([RegistryAdd(9, _u64(9004))], new_term_answer.append, term=3)

        queue = store._queue  # private: the instant between the writer's two reads is the point
        real_next_run, armed = queue.next_run, threading.Event()

        def next_run(holds_term):
            if armed.is_set() and len(queue):
                armed.clear()
                other = threading.Thread(target=win_again)
                other.start()
                other.join(1.0)  # a writer that holds its mirror and run together keeps it waiting
            return real_next_run(holds_term)

        queue.next_run = next_run
        armed.set()
        old_term_answer: list = []
        store.submit([RegistryAdd(9, _u64(9003))], old_term_answer.append, term=1)
        _wait_for(lambda: new_term_answer and old_term_answer)
        assert new_term_answer == [None]
        assert isinstance(old_term_answer[0], FencedOut)
        assert StateStore(kv, "/c").load().registry[9].tolist() == [9001, 9002, 9004]
    finally:
        store.stop(5)


def _apply_term(store: StateStore, changes, term: int) -> None:
    done = threading.Event()
    errors = []
    store.submit(changes, lambda exc: (errors.append(exc), done.set()), term=term)
    assert done.wait(10)
    assert errors == [None]


def _wait_for(predicate, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_failing_callback_neither_ends_the_writer_nor_hides_uncommitted_writes(caplog):
    """A completion callback that raises (a caller's bug, or a worker pool already shut down) is
    logged; the writer goes on committing what is behind it, and a clean stop says so truthfully."""
    kv = MemoryKV()
    store = StateStore(kv, "/cb", flush_interval_s=0)
    store.load()
    store.start()

    def broken(exc):
        raise RuntimeError("cannot schedule new futures after shutdown")

    store.submit([RegistryAdd(1, _u64(10))], broken)
    store.submit([RegistryAdd(1, _u64(11))])
    store.flush()
    assert store._thread.is_alive()
    assert StateStore(kv, "/cb").load().registry[1].tolist() == [10, 11]
    assert any(r.getMessage() == "store_callback_failed" for r in caplog.records)
    assert store.stop(5)


def test_the_writer_stores_the_golden_bytes():
    """The golden run through the writer, one call per transaction (see tests/support/store_golden.py)."""
    kv = _RecordingKV()
    for prefix, calls in ((golden.PREFIX, golden.CALLS), (golden.PREFIX.rstrip("/"), golden.RELOADED_CALLS)):
        store = StateStore(kv, prefix, flush_interval_s=0, journal_capacity=golden.JOURNAL_CAPACITY)
        store.load()
        store.start()
        try:
            for changes in calls:
                _apply(store, changes)
        finally:
            store.stop(5)
    assert kv.log == golden.TRANSACTIONS


# ---------------------------------------------------------------- the bounded queue


def test_a_full_queue_loses_no_write_and_turns_new_calls_away_upstream(caplog):
    """Beyond `max_pending` queued writes every write is still taken (the core applied it already:
    refusing it would leave the store behind memory), and `backlogged` turns new durable calls away."""
    caplog.set_level(logging.ERROR, logger="supervisor_service.store")
    kv = _GatedKV()
    registry = CollectorRegistry()
    store = StateStore(kv, "/c", flush_interval_s=0, max_pending=3, metrics=Metrics(registry))
    store.load()
    store.start()
    try:
        kv.gate.clear()  # the store hangs: nothing commits
        answers: dict[int, list] = {i: [] for i in range(5)}
        assert store.backlogged() is None
        for i in range(5):
            store.submit([RegistryAdd(1, _u64(i))], answers[i].append)
            if i == 0:
                assert kv.entered.wait(5)  # the first is with the backend (still queued until it answers)
        store.submit([RegistryAdd(2, _u64(7))])  # a core write without a callback: taken too
        assert all(answers[i] == [] for i in range(5))
        for _ in range(2):
            error = store.backlogged()
            assert isinstance(error, StoreError) and error.reason == "queue_full"
            assert "not accepted" in str(error) and "6 writes are already waiting" in str(error)
        assert registry.get_sample_value("supervisor_store_errors_total", {"reason": "queue_full"}) == 2
        assert registry.get_sample_value("supervisor_store_pending_writes") == 6
        full = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "store_queue_full"]
        assert full == [{"pending": 6, "max_pending": 3, "error": "the store is not keeping up"}]  # once per interval
        kv.gate.set()
        _wait_for(lambda: all(answers[i] for i in range(5)))
        assert all(answers[i] == [None] for i in range(5))
        store.flush()
        assert store.backlogged() is None
        stored = StateStore(kv, "/c").load().registry
        assert stored[1].tolist() == [0, 1, 2, 3, 4] and stored[2].tolist() == [7]
    finally:
        kv.gate.set()
        store.stop(5)


# ---------------------------------------------------------------- one decision, one transaction


def test_one_failover_of_a_datanode_is_one_store_transaction():
    """A datanode of 50,000 regions fails: the decision (the intent of each target's migration) and each
    accepted submission (its record and the failover counts) are each one KV.commit, within etcd's limits."""
    kv = _RecordingKV(max_ops=EtcdKV.max_ops, max_bytes=EtcdKV.max_bytes)
    kv.data["/p/term"] = b"1"
    store = StateStore(kv, "/p", flush_interval_s=0)
    store.load()
    store.start()
    sup = Supervisor(PhiAccrualOptions(), Metrics(CollectorRegistry()), FailoverPolicy(), leader_term=1)

    def handle(event, now: int) -> list:
        """As the runtime hands over one event's changes: one submit() under the leader term."""
        sup.handle(event, now)
        changes = sup.drain_changes()
        if changes:
            store.submit(changes, term=sup.leader_term)
        store.flush()
        return sup.drain_outbox()

    try:
        regions = np.arange(1, 50_001, dtype=np.uint64)
        for i in range(5):
            handle(Heartbeat(1, regions, i * 1000), i * 1000)
        [select] = [e for e in handle(Tick(), 60_000) if isinstance(e, SelectPeers)]
        assert len(select.job.region_ids) == 50_000
        targets = (Peer(5, "dn5:4001"), Peer(6, "dn6:4001"))
        kv.log.clear()
        effects = handle(SelectionDone(select.job, Peer(1, "dn1:4001"), targets * 25_000), 60_000)
        tasks = [e.task for e in effects if isinstance(e, SubmitMigration)]
        assert len(tasks) == 2
        [(puts, deletes)] = kv.log  # the decision: one transaction
        assert set(puts) == {f"/p/{kind}/{task.request_id}" for task in tasks for kind in ("inflight", "failovers")}
        assert not deletes and max(len(v) for v in puts.values()) < 1_000_000  # within etcd's request limit
        for task in tasks:
            kv.log.clear()
            handle(SubmissionDone(task, MigrationResult(submitted=task.region_ids, procedure_id=f"p-{task.to_peer.id}")),
                   60_100)
            [(puts, deletes)] = kv.log  # the accepted submission: one transaction
            assert set(puts) == {f"/p/inflight/{task.request_id}", "/p/counts/00000000000000000001",
                                 f"/p/failovers/{task.request_id}"}
        state = StateStore(kv, "/p").load()
        assert {r.procedure_id for r in state.inflight.values()} == {"p-5", "p-6"}
        assert len(state.failover_counts) == 50_000
    finally:
        store.stop(5)
