"""The state store: encoding of every change, group commits, journal trimming, etcd backend and fencing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from supervisor_service.clock import FakeClock
from supervisor_service.events import MigrationTask, Peer
from supervisor_service.remotes import DryRunJournal, JournalEntry, StaleLeaderTerm
from supervisor_service.store import (
    CountsDrop,
    CountsSet,
    FencedOut,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    JournalAppend,
    MaintenanceSet,
    MemoryKV,
    RegistryAdd,
    RegistryRemove,
    StateStore,
    TermSet,
    decode_maintenance,
    parse_endpoints,
)
from tests._servers import EtcdServer


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
    _apply(store, [
        RegistryAdd(1, _u64(5, 3, big)),
        RegistryAdd(2, _u64(7)),
        RegistryRemove(1, _u64(3)),
        CountsSet((((1, 5), 2), ((2, 7), 1))),
        CountsDrop(((2, 7),)),
        InFlightSet(5, InFlightRecord(1, "p-1", 99_000)),
        InFlightSet(6, InFlightRecord(1, "", 98_000)),
        InFlightDrop(6),
        MaintenanceSet(True, 5000, ((4, 0), (9, 7000))),
        JournalAppend(_entry(1, term=3), 3),
        TermSet(4),
    ])
    state = StateStore(store.kv, "/cluster-a").load()
    assert {d: r.tolist() for d, r in state.registry.items()} == {1: [5, big], 2: [7]}
    assert state.failover_counts == {(1, 5): 2}
    assert state.inflight == {5: InFlightRecord(1, "p-1", 99_000)}
    assert (state.maintenance, state.maintenance_until_ms, state.datanode_maintenance) == (True, 5000, {4: 0, 9: 7000})
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
    from supervisor_service.etcd import EtcdKV

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
