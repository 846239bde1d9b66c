"""The store's codec and transaction fitting, without threads: changes -> puts and deletes -> StoredState.

The golden transactions pin the stored bytes; the round trips (hypothesis,
one per change type and one for runs of all of them) pin what decoding the
encoding gives back, against a model written with plain sets and dicts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from supervisor_service.core import (
    ClockMark,
    CountsDrop,
    CountsSet,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    JournalAppend,
    JournalEntry,
    LegacyInFlight,
    MaintenanceSet,
    Peer,
    RegistryAdd,
    RegistryRemove,
    TermSet,
)
from supervisor_service.store import (
    FencedOut,
    MemoryKV,
    Mirror,
    decode_maintenance,
    decode_state,
    encode,
    parse_endpoints,
)
from supervisor_service.store.txn import longest_head, split, txn_bytes  # internal to the writer, tested alone
from tests.support import store_golden as golden

P = "/c/"
CAPACITY = 4


def _commit(stored: dict[str, bytes], puts: dict[str, bytes], deletes: set[str]) -> None:
    """What every backend's commit does to the keys."""
    for key in deletes:
        stored.pop(key, None)
    stored.update(puts)


def _run(calls, stored=None, mirror=None, prefix=P, capacity=CAPACITY):
    """Encode and commit each call in turn, as the writer does: (stored keys, mirror, [(puts, deletes)])."""
    stored = {} if stored is None else stored
    mirror = Mirror() if mirror is None else mirror
    transactions = []
    for changes in calls:
        encoding = encode(changes, mirror, prefix, capacity)
        transactions.append((encoding.puts, encoding.deletes))
        _commit(stored, encoding.puts, encoding.deletes)
        mirror.apply(encoding)
    return stored, mirror, transactions


def _decoded(stored: dict[str, bytes], prefix: str = P):
    return decode_state(dict(sorted(stored.items())), prefix)


# ---------------------------------------------------------------- the bytes stored


def test_the_stored_bytes_are_those_of_the_golden_run():
    stored, _, transactions = _run(golden.CALLS, prefix=golden.PREFIX, capacity=golden.JOURNAL_CAPACITY)
    # A second life: the mirror is what a load of the stored keys gives.
    mirror = Mirror.loaded(stored, golden.PREFIX, decode_state(stored, golden.PREFIX))
    _, _, more = _run(golden.RELOADED_CALLS, stored, mirror, prefix=golden.PREFIX, capacity=golden.JOURNAL_CAPACITY)
    assert len(transactions + more) == len(golden.TRANSACTIONS)
    for i, (got, want) in enumerate(zip(transactions + more, golden.TRANSACTIONS, strict=True)):
        assert got == want, f"call {i} stores other bytes than it did"


def test_first_formats_still_read():
    """Maintenance without a mark, and in-flight records of one key per region (read for their upgrade)."""
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


def test_encoding_leaves_the_mirror_alone():
    _, mirror, _ = _run(golden.CALLS[:4])
    before = (_plain(mirror), list(mirror.journal_keys), mirror.journal_seq)
    first = encode(golden.CALLS[9], mirror, P, CAPACITY)
    assert (_plain(mirror), list(mirror.journal_keys), mirror.journal_seq) == before
    again = encode(golden.CALLS[9], mirror, P, CAPACITY)
    assert (first.puts, first.deletes) == (again.puts, again.deletes)


def test_parse_endpoints_names_the_bad_part():
    assert parse_endpoints("etcd://a:1,b:2") == [("a", 1), ("b", 2)]
    with pytest.raises(ValueError, match="'b'"):
        parse_endpoints("etcd://a:1,b")


def test_memory_kv_commits_only_under_its_term():
    kv = MemoryKV()
    kv.data["/c/term"] = b"3"
    kv.commit({"/c/a": b"1"}, set(), ("/c/term", 3))
    with pytest.raises(FencedOut):
        kv.commit({"/c/b": b"1"}, {"/c/a"}, ("/c/term", 2))
    assert kv.read_prefix("/c/") == {"/c/term": b"3", "/c/a": b"1"}


# ---------------------------------------------------------------- round trips, one change type at a time

U64 = st.integers(0, 2**64 - 1)
INT = st.integers(0, 2**63 - 1)
TEXT = st.text(max_size=8)
IDENT = st.text("abcdef0123456789-", min_size=1, max_size=10)
IDS = st.lists(U64, max_size=12)
UNIQUE_IDS = st.lists(U64, max_size=12, unique=True)
DATANODES = st.integers(0, 5) | st.just(2**64 - 1)
MARKS = st.none() | st.builds(ClockMark, TEXT, INT, INT)
PEERS = st.builds(Peer, U64, TEXT)


def _array(ids: list[int]) -> np.ndarray:
    return np.array(ids, dtype=np.uint64)


registry_adds = st.builds(RegistryAdd, DATANODES, IDS.map(_array))
registry_removes = st.builds(RegistryRemove, DATANODES, UNIQUE_IDS.map(_array))
counts_sets = st.builds(CountsSet, st.lists(st.tuples(st.tuples(DATANODES, U64), U64), max_size=8).map(tuple))
counts_drops = st.builds(CountsDrop, st.lists(st.tuples(DATANODES, U64), max_size=8).map(tuple))
records = st.builds(InFlightRecord, IDENT, U64, PEERS, PEERS, IDS.map(tuple), INT, TEXT, TEXT, INT, MARKS)
inflight_sets = st.builds(lambda sid, rec: InFlightSet(sid, rec), st.sampled_from(["1-a", "1-b", "2-a"]), records)
inflight_drops = st.builds(InFlightDrop, st.sampled_from(["1-a", "1-b", "2-a", "9-z"]))
maintenance_sets = st.builds(MaintenanceSet, st.booleans(), INT,
                             st.lists(st.tuples(U64, INT), max_size=4).map(tuple), MARKS)
entries = st.builds(JournalEntry, INT, IDS.map(tuple), PEERS, PEERS, INT, TEXT, TEXT, INT, TEXT)
journal_appends = st.builds(JournalAppend, entries, INT)
term_sets = st.builds(TermSet, INT)
ANY_CHANGE = st.one_of(registry_adds, registry_removes, counts_sets, counts_drops, inflight_sets, inflight_drops,
                       maintenance_sets, journal_appends, term_sets)


class Model:
    """What the stored state must be after a run of changes, in plain Python."""

    def __init__(self) -> None:
        self.registry: dict[int, set[int]] = {}
        self.counts: dict[tuple[int, int], int] = {}
        self.inflight: dict[str, InFlightRecord] = {}
        self.maintenance: tuple = (False, 0, {}, None)
        self.journal: list[JournalEntry] = []
        self.journal_term = 0
        self.term = 0

    def call(self, changes) -> None:
        """One call's changes. The journal is trimmed once per call, of older entries only: a call keeps all
        its own (the next call trims them)."""
        before, new = self.journal, []
        for change in changes:
            if isinstance(change, JournalAppend):
                new.append(change.entry)
            self.apply(change)
        keep = max(CAPACITY - len(new), 0)
        self.journal = (before[-keep:] if keep else []) + new

    def apply(self, change) -> None:
        match change:
            case RegistryAdd(d, ids):
                self.registry.setdefault(d, set()).update(ids.tolist())
            case RegistryRemove(d, ids):
                self.registry.setdefault(d, set()).difference_update(ids.tolist())
            case CountsSet(pairs):
                self.counts.update(pairs)
            case CountsDrop(keys):
                for key in keys:
                    self.counts.pop(key, None)
            case InFlightSet(sid, rec):
                self.inflight[sid] = rec
            case InFlightDrop(sid):
                self.inflight.pop(sid, None)
            case MaintenanceSet(enabled, until_ms, datanodes, mark):
                self.maintenance = (enabled, until_ms, dict(datanodes), mark)
            case JournalAppend(_, term):
                self.journal_term = term
            case TermSet(term):
                self.term = term

    def check(self, stored: dict[str, bytes]) -> None:
        state = _decoded(stored)
        assert {d: r.tolist() for d, r in state.registry.items()} == {
            d: sorted(ids) for d, ids in self.registry.items() if ids}
        assert all(r.dtype == np.uint64 for r in state.registry.values())
        assert state.failover_counts == self.counts
        assert state.inflight == self.inflight and state.legacy_inflight == {}
        assert (state.maintenance, state.maintenance_until_ms, state.datanode_maintenance,
                state.maintenance_mark) == self.maintenance
        assert state.journal == self.journal
        assert (state.journal_term, state.term) == (self.journal_term, self.term)


def _round_trip(changes) -> None:
    model = Model()
    model.call(changes)
    stored, _, _ = _run([changes])
    model.check(stored)


@given(st.lists(registry_adds | registry_removes, max_size=6))
def test_registry_changes_round_trip(changes):
    _round_trip(changes)


@given(st.lists(counts_sets | counts_drops, max_size=6))
def test_count_changes_round_trip(changes):
    _round_trip(changes)


@given(st.lists(inflight_sets | inflight_drops, max_size=6))
def test_inflight_changes_round_trip(changes):
    _round_trip(changes)


@given(st.lists(maintenance_sets, min_size=1, max_size=3))
def test_maintenance_round_trips(changes):
    _round_trip(changes)


@given(st.lists(journal_appends, max_size=6))
def test_journal_appends_round_trip(changes):
    _round_trip(changes)


@given(st.lists(st.lists(journal_appends, max_size=3), max_size=6))
def test_the_journal_keeps_the_newest_capacity_entries_across_calls(calls):
    model = Model()
    for changes in calls:
        model.call(changes)
    stored, _, _ = _run(calls)
    model.check(stored)


@given(st.lists(term_sets, min_size=1, max_size=3))
def test_term_round_trips(changes):
    _round_trip(changes)


# ---------------------------------------------------------------- runs of calls

CALLS = st.lists(st.lists(ANY_CHANGE, max_size=5), max_size=6)


@settings(max_examples=200)
@given(CALLS)
def test_runs_of_calls_round_trip_and_a_reloaded_mirror_is_the_same(calls):
    model = Model()
    stored, mirror, _ = _run(calls)
    for changes in calls:
        model.call(changes)
    model.check(stored)
    reloaded = Mirror.loaded(stored, P, _decoded(stored))
    assert _plain(reloaded) == _plain(mirror)
    assert (reloaded.journal_keys, reloaded.journal_seq) == (mirror.journal_keys, mirror.journal_seq)


@given(CALLS, CALLS)
def test_one_group_commit_stores_what_the_calls_one_by_one_would(before, calls):
    """The writer encodes several calls as one transaction: the keys end the same as call by call (as long as
    they append no more journal entries than it keeps)."""
    assume(sum(isinstance(change, JournalAppend) for changes in calls for change in changes) <= CAPACITY)
    stored, mirror, _ = _run(before)
    one_by_one, _, _ = _run(calls, dict(stored), Mirror.loaded(stored, P, _decoded(stored)))
    together, _, _ = _run([[change for changes in calls for change in changes]], dict(stored), mirror)
    assert together == one_by_one


def _plain(mirror: Mirror):
    return ({d: r.tolist() for d, r in mirror.registry.items()}, mirror.counts)


# ---------------------------------------------------------------- fitting calls into transactions


@given(st.lists(st.integers(0, 6), min_size=1, max_size=12), st.integers(1, 10), st.none() | st.integers(40, 400))
def test_longest_head_takes_whole_calls_within_the_limits(sizes, max_ops, max_bytes):
    """Call i writes `sizes[i]` keys of its own: the head taken fits, or is one call alone."""
    calls = [[RegistryAdd(100 * i + k, _array([k])) for k in range(n)] for i, n in enumerate(sizes)]
    taken, encoding = longest_head(calls, lambda head: encode([c for call in head for c in call], Mirror(), P, 1),
                                   max_ops, max_bytes)
    assert 1 <= taken <= len(calls)
    assert len(encoding.puts) == sum(sizes[:taken])
    fits = len(encoding.puts) <= max_ops and (max_bytes is None or txn_bytes(encoding.puts, set()) <= max_bytes)
    assert fits or taken == 1
    if taken < len(calls):  # one more call would not have fit
        more = encode([c for call in calls[:taken + 1] for c in call], Mirror(), P, 1)
        assert (len(more.puts) > max_ops or (max_bytes is not None and txn_bytes(more.puts, set()) > max_bytes)
                or sum(bool(n) for n in sizes[:taken + 1]) > max_ops)


@given(st.dictionaries(st.text("abc", min_size=1, max_size=6), st.binary(max_size=30), max_size=20),
       st.sets(st.text("xyz", min_size=1, max_size=6), max_size=10), st.integers(1, 6), st.none() | st.integers(60, 200))
def test_split_keeps_every_operation_once_and_each_transaction_within_the_limits(puts, deletes, max_ops, max_bytes):
    chunks = split(puts, deletes, max_ops, max_bytes)
    assert {k: v for p, _ in chunks for k, v in p.items()} == puts
    assert sum(len(p) for p, _ in chunks) == len(puts)
    assert set().union(*(d for _, d in chunks)) == deletes and sum(len(d) for _, d in chunks) == len(deletes)
    for p, d in chunks:
        assert len(p) + len(d) <= max_ops
        # A single operation larger than the byte limit still goes, alone.
        assert max_bytes is None or txn_bytes(p, d) <= max_bytes or len(p) + len(d) == 1
