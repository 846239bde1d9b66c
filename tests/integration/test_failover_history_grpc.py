"""The failover history over real gRPC, against real processes and a remote fake RegionMigration:
a datanode dies, ListFailovers returns one record whose evidence matches the Dump taken just before the
conviction, with the checks that passed and the target; its final state once the fake reports
SUCCEEDED; the record survives a restart (SQLite) and a leader change (etcd, PostgreSQL). Explain and
WhatIf answer over the wire, and refuse bad requests with a status a person can act on."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.proto import pb
from supervisor_service.store.failover_codec import failover_from_json
from tests.support.fakes import FakeRegionMigration, FakeSelector, peer, wait_for
from tests.support.readiness import says_it_leads
from tests.support.servers import ServiceProcess

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]

ENV = {
    "SUPERVISOR_TICK_INTERVAL_MS": "100",
    "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "1000",
    "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "200",
    "SUPERVISOR_WARMUP_GRACE_MS": "0",
    "SUPERVISOR_MAX_FAILED_DATANODE_FRACTION": "1",  # three datanodes: one silent is a third
    "SUPERVISOR_MIGRATION_STATUS_POLL_INTERVAL_MS": "200",
    "SUPERVISOR_LEADER_LEASE_TTL_MS": "2000",
}
DEAD = 3


def regions(d: int) -> list[int]:
    return [(1024 << 32) | (d * 100 + i) for i in range(3)]


def start_datanodes(addrs) -> dict[int, DatanodeHeartbeater]:
    return {d: DatanodeHeartbeater(addrs, d, lambda d=d: regions(d), interval_s=0.1,
                                   peer_addr=f"127.0.0.1:{21_000 + d}").start() for d in (1, 2, 3)}


def kill_and_watch(client: SupervisorClient, beaters) -> tuple[pb.FailoverRecord, dict[int, pb.DetectorState]]:
    """Datanode 3 stops; Dumps are taken until the record appears. Returns it and the last Dump before it."""
    wait_for(lambda: len(client.dump(datanode_ids=[DEAD])[1]) == 3, 15, message="datanode 3 never registered")
    time.sleep(1.0)  # a second of heartbeats: an interval history
    beaters[DEAD].stop()
    last_dump: dict[int, pb.DetectorState] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, rows = client.dump(datanode_ids=[DEAD])
        records = client.failovers(datanode_ids=[DEAD])
        if records:
            return records[0], last_dump
        last_dump = {r.region_id: r for r in rows}
        time.sleep(0.02)
    raise AssertionError("no failover record within 30 s")


def check_record(rec: pb.FailoverRecord, dump: dict[int, pb.DetectorState], target: int) -> None:
    assert sorted(rec.region_ids) == regions(DEAD)
    assert rec.from_peer.id == DEAD and rec.to_peer.id == target
    assert rec.threshold == 8.0 and rec.acceptable_heartbeat_pause_millis == 1000.0
    assert rec.trigger_reason == pb.TRIGGER_REASON_FAILOVER and rec.leader_term >= 1
    assert len(rec.evidence) == 3
    for e in rec.evidence:
        before = dump[e.region_id]
        assert e.phi >= rec.threshold and e.phi >= before.phi
        assert e.last_heartbeat_millis == before.last_heartbeat_millis
        assert e.mean_interval_millis == before.mean_interval_millis
        assert e.std_deviation_millis == before.std_deviation_millis
        assert e.sample_count == before.sample_count
        assert e.last_heartbeat_millis < rec.decided_at_millis
    checks = "\n".join(rec.checks)
    for expected in ("phi: 3 of 3 regions at or above the threshold 8", "maintenance: off", "warmup: over",
                     "mass_failure: 1 of 3 datanodes silent (0.33 <= 1.00)", "rate_limit: global token taken",
                     f"target_rate_limit: datanode {target} granted 3 of 3 regions",
                     f"source: datanode {DEAD} at 127.0.0.1:{21_000 + DEAD}", "excluded datanodes [3]"):
        assert expected in checks, checks


@pytest.fixture
def remotes():
    rm = FakeRegionMigration()
    sel = FakeSelector([peer(1, "127.0.0.1:21001")])
    yield rm, sel
    rm.stop()
    sel.stop()


def test_a_failover_is_recorded_with_its_evidence_ends_and_survives_a_restart(tmp_path, remotes):
    rm, sel = remotes
    env = dict(ENV, SUPERVISOR_STORE="sqlite", SUPERVISOR_DATA_DIR=str(tmp_path / "data"),
               SUPERVISOR_REGION_MIGRATION_ENDPOINT=rm.endpoint, SUPERVISOR_SELECTOR_ENDPOINT=sel.endpoint)
    proc = ServiceProcess(env, str(tmp_path / "first.log"))
    beaters = {}
    try:
        proc.wait_serving(leader=True)
        beaters = start_datanodes([proc.addr])
        with SupervisorClient(proc.addr, timeout=5) as client:
            rec, dump = kill_and_watch(client, beaters)
            check_record(rec, dump, target=1)
            assert len(client.failovers()) == 1
            wait_for(lambda: client.failovers()[0].procedure_id, 10, message="the submit was never answered")
            rec = client.failovers()[0]
            assert rec.procedure_id == rm.submissions[0].response.procedure_id
            assert rec.failover_id == rm.submissions[0].request.request_id
            assert rec.result == "submitted: 3" and {e.result for e in rec.evidence} == {"submitted"}
            assert rec.final_state == 0 and rec.finished_at_millis == 0
            ex = client.explain(DEAD, regions(DEAD)[0])
            assert ex.verdict == f"in flight: moving to datanode 1 under procedure {rec.procedure_id}"
            assert [f.failover_id for f in ex.failovers] == [rec.failover_id]
            rm.set_status(rec.procedure_id, pb.MIGRATION_STATE_SUCCEEDED)
            wait_for(lambda: client.failovers()[0].final_state == pb.MIGRATION_STATE_SUCCEEDED, 10,
                     message="the record never learnt that the migration succeeded")
            done = client.failovers()[0]
            assert done.finished_at_millis >= done.decided_at_millis
        proc.stop()
        proc = ServiceProcess(env, str(tmp_path / "second.log"))
        proc.wait_serving(leader=True)
        with SupervisorClient(proc.addr, timeout=5) as client:
            assert client.failovers() == [done]
    finally:
        for b in beaters.values():
            b.stop()
        proc.stop()


def test_the_record_survives_a_leader_change(tmp_path, backend, remotes):
    rm, sel = remotes
    env = dict(ENV, SUPERVISOR_STORE=backend.store(), SUPERVISOR_STORE_PREFIX="/region-supervisor/history",
               SUPERVISOR_REGION_MIGRATION_ENDPOINT=rm.endpoint, SUPERVISOR_SELECTOR_ENDPOINT=sel.endpoint)
    replicas = [ServiceProcess(env, str(tmp_path / f"replica-{i}.log")) for i in range(2)]
    beaters = {}
    try:
        for r in replicas:
            r.wait_serving()
        wait_for(lambda: any(says_it_leads(r.addr) for r in replicas), 15, message="no leader")
        leader = next(r for r in replicas if says_it_leads(r.addr))
        addrs = [r.addr for r in replicas]
        beaters = start_datanodes(addrs)
        with SupervisorClient(addrs, timeout=5) as client:
            rec, dump = kill_and_watch(client, beaters)
            check_record(rec, dump, target=1)
            wait_for(lambda: client.failovers()[0].procedure_id, 10, message="the submit was never answered")
            rm.set_status(client.failovers()[0].procedure_id, pb.MIGRATION_STATE_SUCCEEDED)
            wait_for(lambda: client.failovers()[0].finished_at_millis, 10, message="never ended")
            done = client.failovers()[0]
        # ListFailovers reads the leader's history, which may be ahead of its store by a commit: kill the
        # leader once the store holds the ended record (else the next leader learns the end again itself).
        key = f"/region-supervisor/history/failovers/{done.failover_id}"
        wait_for(lambda: (raw := backend.read_prefix("/region-supervisor/history/").get(key))
                 and failover_from_json(raw).finished_at_millis == done.finished_at_millis, 10,
                 message="the ended record never reached the store")
        leader.kill(signal.SIGKILL)
        other = next(r for r in replicas if r is not leader)
        wait_for(lambda: says_it_leads(other.addr), 15, message="the other replica never took over")
        with SupervisorClient(other.addr, timeout=5) as client:
            wait_for(lambda: client.failovers() == [done], 10,
                     message=f"the new leader lost the record: {done} != {client.failovers()}")
    finally:
        for b in beaters.values():
            b.stop()
        for r in replicas:
            r.stop()


def test_explain_and_whatif_over_the_wire_and_their_refusals(service):
    svc = service(tick_interval_ms=100, acceptable_heartbeat_pause_ms=1000, first_heartbeat_estimate_ms=200)
    beaters = start_datanodes([svc.addresses.grpc])
    try:
        with SupervisorClient(svc.addresses.grpc, timeout=5) as client:
            wait_for(lambda: len(client.dump()[1]) == 9, 15, message="the datanodes never registered")
            ex = client.explain(2)
            assert ex.verdict.startswith("datanode 2: 3 regions, 0 failing, 0 in flight; healthy")
            assert len(ex.detectors) == 3 and all(d.predicted_failure_millis > d.last_heartbeat_millis
                                                 for d in ex.detectors)
            w = client.what_if([1, 2])  # two silent: below mass_failure_min_datanodes (3)
            assert w.held_by == [] and len(w.plans) == 2 and w.all_submitted_by_millis > 0
            w = client.what_if([1, 2, 3])
            assert w.held_by[0].startswith("mass_failure: 3 of 3 datanodes would be silent (1.00 > 0.50)")
            assert all(p.earliest_submit_millis == 0 for p in w.plans)
            w = client.what_if([2, 2])
            assert [p.datanode_id for p in w.plans] == [2] and w.all_submitted_by_millis > 0
            stub = client.stub
            for call, request, code, words in (
                (stub.Explain, pb.ExplainRequest(datanode_id=77), grpc.StatusCode.NOT_FOUND, "no detector for datanode 77"),
                (stub.Explain, pb.ExplainRequest(datanode_id=2, region_id=5), grpc.StatusCode.NOT_FOUND, "region 5"),
                (stub.Explain, pb.ExplainRequest(datanode_id=2, at_millis=-1), grpc.StatusCode.INVALID_ARGUMENT,
                 "at_millis must be >= 0"),
                (stub.WhatIf, pb.WhatIfRequest(), grpc.StatusCode.INVALID_ARGUMENT, "at least one datanode"),
                (stub.WhatIf, pb.WhatIfRequest(datanode_ids=range(20_000)), grpc.StatusCode.INVALID_ARGUMENT,
                 "datanodes in one"),
                (stub.ListFailovers, pb.ListFailoversRequest(limit=1001), grpc.StatusCode.INVALID_ARGUMENT,
                 "limit 1001 is above 1000"),
                (stub.ListFailovers, pb.ListFailoversRequest(since_millis=-5), grpc.StatusCode.INVALID_ARGUMENT,
                 "since_millis must be >= 0"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=5)
                assert err.value.code() == code and words in err.value.details(), err.value.details()
            # Nothing was changed by any of it.
            assert client.failovers() == [] and len(client.dump()[1]) == 9
    finally:
        for b in beaters.values():
            b.stop()
