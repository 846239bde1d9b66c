"""The audit trail's pure parts: bounded summaries, refusals coalesced per identity, RPC and code, and
its keys in the store (appended under the prefix, trimmed to the capacity, continued after a load)."""

from __future__ import annotations

from supervisor_service.core import AuditAppend, AuditEntry
from supervisor_service.proto import pb
from supervisor_service.security.audit import (
    MAX_SUMMARY_CHARS,
    OVERFLOW_IDENTITY,
    RefusalCoalescer,
    refusal_summary,
    summarize,
)
from supervisor_service.store import MemoryKV, Mirror, StateStore, encode
from supervisor_service.store.codec import audit_prefix, decode_audit

P = "/t/"


def entry(i: int, identity: str = "ops-alice") -> AuditEntry:
    return AuditEntry(i, identity, "ipv4:127.0.0.1:1", "SetMaintenanceMode", f"s{i}", "OK", "why", 3)


def test_summaries_say_counts_datanodes_enabled_and_ttl_and_are_bounded():
    regions = [pb.DetectingRegion(datanode_id=d, region_id=r) for d in (3, 1, 2) for r in range(2)]
    assert summarize("RegisterDetectors", pb.RegisterDetectorsRequest(regions=regions)) == (
        "RegisterDetectors: 6 regions, datanodes 1,2,3")
    assert summarize("SetMaintenanceMode", pb.SetMaintenanceModeRequest(enabled=True, ttl_millis=60_000)) == (
        "SetMaintenanceMode: enabled=true, global, ttl_millis=60000")
    assert summarize("SetMaintenanceMode", pb.SetMaintenanceModeRequest(datanode_ids=[9, 4, 4])) == (
        "SetMaintenanceMode: enabled=false, datanodes 4,9")
    assert summarize("ReleaseFailoverHold", pb.ReleaseFailoverHoldRequest()) == "ReleaseFailoverHold"
    many = pb.RegisterDetectorsRequest(regions=[pb.DetectingRegion(datanode_id=2**64 - 1 - d, region_id=d)
                                                for d in range(100_000)])
    text = summarize("RegisterDetectors", many)
    assert len(text) <= MAX_SUMMARY_CHARS and "100000 regions" in text and "(+99992 more)" in text
    wide = pb.SetMaintenanceModeRequest(enabled=True, datanode_ids=[2**64 - 1 - d for d in range(10_000)],
                                        ttl_millis=2**64 - 1)
    assert len(summarize("SetMaintenanceMode", wide)) <= MAX_SUMMARY_CHARS
    assert len(refusal_summary("x" * 10_000, 12345, 2**63 - 1)) <= MAX_SUMMARY_CHARS


def test_refusals_are_recorded_once_per_key_per_interval_and_the_rest_counted():
    c = RefusalCoalescer(interval_ms=1000)
    first = c.note("mallory", "SetMaintenanceMode", "PERMISSION_DENIED", 0)
    assert first is not None and first.suppressed == 0
    assert all(c.note("mallory", "SetMaintenanceMode", "PERMISSION_DENIED", t) is None for t in range(1, 1000))
    # Another key has its own window.
    assert c.note("mallory", "DeregisterDetectors", "PERMISSION_DENIED", 500) is not None
    assert c.note("anonymous", "SetMaintenanceMode", "UNAUTHENTICATED", 500) is not None
    later = c.note("mallory", "SetMaintenanceMode", "PERMISSION_DENIED", 1000)
    assert later is not None and (later.suppressed, later.since_ms) == (999, 0)


def test_a_sweep_reports_counts_of_windows_that_passed_once():
    c = RefusalCoalescer(interval_ms=1000)
    c.note("a", "X", "PERMISSION_DENIED", 0)
    c.note("a", "X", "PERMISSION_DENIED", 10)
    c.note("b", "X", "PERMISSION_DENIED", 0)
    assert c.sweep(999) == []
    due = c.sweep(1000)
    assert [(d.identity, d.suppressed) for d in due] == [("a", 1)]
    assert c.sweep(5000) == [] and len(c) == 0
    assert c.note("a", "X", "PERMISSION_DENIED", 5000).suppressed == 0  # reported by the sweep, not again


def test_the_windows_are_bounded_and_new_identities_share_one_past_the_bound():
    c = RefusalCoalescer(interval_ms=1000, max_keys=10)
    for i in range(10):
        assert c.note(f"id-{i}", "X", "PERMISSION_DENIED", 0) is not None
    overflow = c.note("id-new", "X", "PERMISSION_DENIED", 1)
    assert overflow is not None and overflow.identity == "id-new"
    assert c.note("id-newer", "X", "PERMISSION_DENIED", 2) is None  # counted in the shared window
    assert len(c) == 11 and (OVERFLOW_IDENTITY, "X", "PERMISSION_DENIED") in c._windows
    for i in range(1000):
        c.note(f"flood-{i}", "X", "PERMISSION_DENIED", 3)
    assert len(c) == 11
    # Expired windows without counts make room again.
    assert c.note("id-late", "X", "PERMISSION_DENIED", 5000) is not None and len(c) <= 11


def test_audit_keys_are_appended_beside_the_prefix_and_trimmed_to_the_capacity():
    mirror = Mirror()
    enc = encode([AuditAppend(entry(i)) for i in range(5)], mirror, P, 10, audit_capacity=3)
    trail = audit_prefix(P)
    assert trail == "/t@audit/" and not any(k.startswith(P) and "audit/" in k for k in enc.puts)
    keys = sorted(k for k in enc.puts if k.startswith(trail))
    assert len(keys) == 3 and not enc.deletes  # the two oldest of the batch were never written
    assert [e.at_millis for e in decode_audit({k: enc.puts[k] for k in keys})] == [2, 3, 4]
    assert enc.puts[P + "audit_next"] == b"5"
    mirror.apply(enc)
    more = encode([AuditAppend(entry(5))], mirror, P, 10, audit_capacity=3)
    assert more.deletes == {trail + f"{2:020d}"} and more.puts[P + "audit_next"] == b"6"
    mirror.apply(more)
    assert mirror.audit_seq == 6


def test_the_trail_survives_a_load_and_continues_after_the_newest_key():
    kv = MemoryKV()
    store = StateStore(kv, "/t", flush_interval_s=0, audit_capacity=4)
    store.start()
    try:
        for i in range(6):
            store.submit([AuditAppend(entry(i))])
        store.flush()
        assert [e.at_millis for e in store.read_audit()] == [2, 3, 4, 5]
        assert not any(k.startswith("/t/") and "@audit" in k for k in kv.read_prefix("/t/"))  # never loaded
        store.load()  # a new leadership: the writer's view comes from the keys
        store.submit([AuditAppend(entry(6, "metasrv"))])
        store.flush()
        assert [(e.at_millis, e.identity) for e in store.read_audit()][-2:] == [(5, "ops-alice"), (6, "metasrv")]
        assert len(store.read_audit()) == 4
    finally:
        store.stop(5)


def test_an_audit_value_that_does_not_decode_is_left_out():
    good = {k: v for k, v in encode([AuditAppend(entry(1))], Mirror(), P, 10).puts.items() if "@audit/" in k}
    trail = audit_prefix(P)
    raw = {**good, trail + "00000000000000000009": b"{not json", trail + "00000000000000000010": b'{"at_millis": 1}'}
    assert [e.at_millis for e in decode_audit(raw)] == [1]


def test_summaries_of_the_planned_operations_say_what_changes():
    assert summarize("DrainDatanodes", pb.DrainRequest(datanode_ids=[7, 3], reason="rack 3")) == (
        "DrainDatanodes: datanodes 3,7")
    assert summarize("CancelDrain", pb.GetDrainRequest(drain_id="drain-12")) == "CancelDrain: drain drain-12"
    off = pb.TablePolicyRequest(table_ids=[1024], failover_enabled=False)
    assert summarize("SetTablePolicy", off) == "SetTablePolicy: tables 1024, failover_enabled=false"
    first = pb.TablePolicyRequest(table_ids=[1, 2], priority=-5)
    assert summarize("SetTablePolicy", first) == "SetTablePolicy: tables 1,2, priority=-5"
    assert summarize("SetTablePolicy", pb.TablePolicyRequest(table_ids=[1])) == "SetTablePolicy: tables 1"
