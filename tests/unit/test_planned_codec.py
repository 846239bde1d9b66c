"""The planned operations' keys (store/planned_codec.py): what is written reads back the same, a
drain's decision keeps its MANUAL trigger, and a failover's record is the bytes it always was."""

from __future__ import annotations

from supervisor_service.core import (
    DrainDrop,
    DrainRecord,
    DrainSet,
    InFlightRecord,
    InFlightSet,
    Peer,
    TablePoliciesSet,
    TablePolicy,
)
from supervisor_service.store.codec import Mirror, decode_state, encode

PREFIX = "/c/"
U64 = 2**64 - 1


def _roundtrip(changes):
    enc = encode(changes, Mirror(), PREFIX, 10)
    return enc, decode_state(enc.puts, PREFIX)


def test_policies_and_drains_read_back_the_same_with_edge_values():
    policies = (TablePolicy(0, False, -(2**31)), TablePolicy(2**32 - 1, True, 2**31 - 1))
    drain = DrainRecord("drain-1-ab", (0, U64), ((0, (0, U64)), (U64, ())), "failed", 10, 20, "r\u00e9ason \"x\"",
                        (0,), (), ((U64, "FAILED (3 attempts)"),), ((U64, 3),))
    enc, state = _roundtrip([TablePoliciesSet(policies), DrainSet(drain.drain_id, drain)])
    assert state.table_policies == policies
    assert state.drains == {"drain-1-ab": drain}
    assert set(enc.puts) == {"/c/table_policies", "/c/drains/drain-1-ab"}


def test_a_dropped_drain_is_deleted_and_a_set_then_dropped_one_never_written():
    drain = DrainRecord("d", (1,), ((1, (5,)),), "done", 1)
    enc, _ = _roundtrip([DrainSet("d", drain), DrainDrop("d")])
    assert enc.puts == {} and enc.deletes == {"/c/drains/d"}


def test_the_trigger_reason_is_stored_only_when_manual():
    manual = InFlightRecord("1-a", 1, Peer(1), Peer(2), (7,), 1000, "intent", trigger_reason="MANUAL")
    failover = InFlightRecord("1-b", 1, Peer(1), Peer(2), (8,), 1000, "intent")
    enc, state = _roundtrip([InFlightSet("1-a", manual), InFlightSet("1-b", failover)])
    assert state.inflight["1-a"].trigger_reason == "MANUAL"
    assert state.inflight["1-b"].trigger_reason == "FAILOVER"
    assert b"trigger_reason" not in enc.puts["/c/inflight/1-b"]


def test_a_drain_of_200000_regions_is_one_value_etcd_takes():
    from supervisor_service.core.drainbook import MAX_DRAIN_REGIONS

    regions = tuple(sorted({(t << 32) | n for t in (3, 1024, 2**32 - 1) for n in range(MAX_DRAIN_REGIONS // 3)}))
    regions += ((2**64 - 1) - 1, 2**64 - 1)[: MAX_DRAIN_REGIONS - len(regions)]
    drain = DrainRecord("d", (1,), ((1, regions),), "running", 1, moved=regions[::2], gone=regions[1::7])
    enc, state = _roundtrip([DrainSet("d", drain)])
    assert state.drains["d"] == drain
    assert len(enc.puts["/c/drains/d"]) < 1_000_000, len(enc.puts["/c/drains/d"])
