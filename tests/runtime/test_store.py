"""The state store: encoding of every change, group commits, journal trimming, etcd backend and fencing."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from supervisor_service.core import (
    ClockMark,
    CountsDrop,
    CountsSet,
    FakeClock,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    JournalAppend,
    JournalEntry,
    MaintenanceSet,
    MigrationTask,
    Peer,
    RegistryAdd,
    RegistryRemove,
    TermSet,
)
from supervisor_service.remotes import DryRunJournal, StaleLeaderTerm
from supervisor_service.store import FencedOut, MemoryKV, StateStore, decode_maintenance, parse_endpoints
from tests.support.servers import EtcdServer


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


def test_first_formats_still_read():
    """Maintenance without a mark, and in-flight records of one key per region (read for their upgrade)."""
    import json

    from supervisor_service.core import LegacyInFlight
    from supervisor_service.store import decode_state

    raw = {
        "/c/maintenance": json.dumps({"enabled": True, "until_ms": 9, "datanodes": [[4, 7]]}).encode(),
        f"/c/inflight/{5:020d}": json.dumps({"datanode_id": 1, "procedure_id": "p", "deadline_ms": 8}).encode(),
    }
    state = decode_state(raw, "/c/")
    assert (state.maintenance, state.maintenance_until_ms, state.datanode_maintenance) == (True, 9, {4: 7})
    assert state.maintenance_mark is None
    assert state.inflight == {} and state.legacy_inflight == {f"{5:020d}": LegacyInFlight(5, 1, "p", 8)}


def test_first_maintenance_format_still_reads():
    assert decode_maintenance(b"1") == (True, 0, {})
    assert decode_maintenance(b"0") == (False, 0, {})
    assert decode_maintenance(None) == (False, 0, {})


def test_parse_endpoints_names_the_bad_part():
    assert parse_endpoints("etcd://a:1,b:2") == [("a", 1), ("b", 2)]
    with pytest.raises(ValueError, match="'b'"):
        parse_endpoints("etcd://a:1,b")


def test_dry_run_journal_fences_a_lower_term():
    journal = DryRunJournal(FakeClock())
    task = MigrationTask(1, 1, Peer(1), Peer(2), (10,), 120_000, leader_term=5)
    journal.submit(task)
    with pytest.raises(StaleLeaderTerm):
        journal.submit(MigrationTask(2, 1, Peer(1), Peer(2), (11,), 120_000, leader_term=4))
    journal.restore([], highest_term=9)
    with pytest.raises(StaleLeaderTerm):
        journal.submit(task)


# ---------------------------------------------------------------- etcd


@pytest.mark.realtime
def test_etcd_kv_commits_reads_and_fences_every_write(tmp_path):
    from supervisor_service.store import EtcdKV

    etcd = EtcdServer(str(tmp_path))
    kv = EtcdKV(parse_endpoints(f"etcd://{etcd.endpoint}"))
    try:
        term = kv.conn.run(_put_leader(kv, b"/p/leader"))
        fence = ("/p/leader", term)
        puts = {f"/p/k{i:04d}": str(i).encode() for i in range(kv.max_ops)}  # the most one transaction takes
        kv.commit(puts, set(), fence)
        assert {k: v for k, v in kv.read_prefix("/p/k").items()} == puts
        kv.commit({}, {"/p/k0000"}, fence)
        assert "/p/k0000" not in kv.read_prefix("/p/")
        # A write without a term, or under a term that is not the leader key's create revision, never lands.
        with pytest.raises(FencedOut):
            kv.commit({"/p/x": b"1"}, set())
        with pytest.raises(FencedOut):
            kv.commit({"/p/y": b"1"}, set(), ("/p/leader", term + 1000))
        assert "/p/x" not in kv.read_prefix("/p/") and "/p/y" not in kv.read_prefix("/p/")
    finally:
        kv.close()
        etcd.stop()


async def _put_leader(kv, key: bytes) -> int:
    """Create `key` as an election would; its create revision is the term."""
    client = await kv.conn.client()
    await client.put(key, b"test")
    return (await client.get(key)).create_revision


async def _get_revision(kv, key: bytes) -> int:
    client = await kv.conn.client()
    return (await client.get(key)).create_revision


# ---------------------------------------------------------------- transaction boundaries and fencing


class _RecordingKV(MemoryKV):
    """A MemoryKV with transaction limits that records the keys of every transaction."""

    def __init__(self, max_ops: int | None = None, max_bytes: int | None = None) -> None:
        super().__init__()
        self.max_ops, self.max_bytes = max_ops, max_bytes
        self.transactions: list[set[str]] = []

    def commit(self, puts, deletes, fence=None):
        assert self.max_ops is None or len(puts) + len(deletes) <= self.max_ops
        super().commit(puts, deletes, fence)
        self.transactions.append(set(puts) | set(deletes))


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
    from supervisor_service.store import StoreError

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


@pytest.mark.realtime
def test_each_submit_call_is_one_etcd_transaction(tmp_path):
    """Calls the size of a failover step, many at once: each lands in one revision (one transaction)."""
    from supervisor_service.store import EtcdKV

    etcd = EtcdServer(str(tmp_path))
    kv = EtcdKV(parse_endpoints(f"etcd://{etcd.endpoint}"))
    store = StateStore(kv, "/p", flush_interval_s=0.3)
    try:
        term = kv.conn.run(_put_leader(kv, b"/p/leader"))
        store.load()
        store.start()
        calls = [_registry_call(1000 * c, 50) for c in range(6)]  # 300 keys: more than two transactions
        done = []
        for changes in calls:
            e = threading.Event()
            store.submit(changes, lambda exc, e=e: e.set(), term=term)
            done.append(e)
        _wait_all(done)
        revisions = kv.conn.run(_mod_revisions(kv, "/p/registry/"))
        for c in range(6):
            of_call = {revisions[f"/p/registry/{1000 * c + i:020d}"] for i in range(50)}
            assert len(of_call) == 1, f"call {c} spans revisions {sorted(of_call)}"
        assert len(set(revisions.values())) == 3  # two calls (100 ops) per transaction of at most 128
    finally:
        store.stop(5)
        kv.close()
        etcd.stop()


async def _mod_revisions(kv, prefix: str) -> dict[str, int]:
    client = await kv.conn.client()
    return {item.key.decode(): item.mod_revision for item in await client.get_prefix(prefix.encode())}


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
