"""Drains and table policies over real gRPC, against fake remotes (docs/design.md §17): a datanode
with 1,000 regions drained at 200 regions/s in about 5 s, each region moved once, progress in
GetDrain; cancel stops new submissions; a leader killed mid-drain (etcd, PostgreSQL) and the drain completes
without a second move; a disabled table's regions stay on a dead datanode while the others move."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from supervisor_service.client import SupervisorClient
from tests.support.drained import MovingCluster, rid
from tests.support.fakes import FakeSelector, peer
from tests.support.readiness import says_it_leads
from tests.support.servers import ServiceProcess
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]

FAST = dict(tick_interval_ms=100, acceptable_heartbeat_pause_ms=1000, first_heartbeat_estimate_ms=200,
            warmup_grace_ms=0, max_failed_datanode_fraction=1.0, migration_status_poll_interval_ms=200,
            target_holddown_ms=0)
DRAINED = [rid(1, i) for i in range(1000)]


def _selector():
    return FakeSelector([peer(d, f"127.0.0.1:{22_000 + d}") for d in (1, 2, 3)])


def _started(service, holdings, **settings):
    """A Selector, a cluster of `holdings` and an in-process service using both, the cluster heartbeating."""
    sel = _selector()
    cluster = MovingCluster(holdings)
    svc = service(**FAST, selector_endpoint=sel.endpoint, region_migration_endpoint=cluster.migration.endpoint,
                  **settings)
    cluster.start(svc.addresses.grpc)
    return sel, cluster, svc


def _wait_watched(client: SupervisorClient, n: int) -> None:
    wait_for(lambda: len(client.dump()[1]) >= n, 20, message=f"fewer than {n} detectors")


def test_a_drain_of_1000_regions_at_200_per_s_takes_about_5_s_and_moves_each_once(service):
    sel, cluster, svc = _started(service, {1: DRAINED, 2: [rid(9, 1)], 3: [rid(9, 2)]},
                                 drain_regions_per_s=200, drain_burst_regions=200)
    try:
        with SupervisorClient(svc.addresses.grpc, timeout=5) as client:
            _wait_watched(client, 1002)
            started = time.monotonic()
            drain_id = client.drain([1], reason="decommission rack 3")
            progress = []
            while True:
                status = client.get_drain(drain_id)
                progress.append(status.regions_moved)
                if status.state != "running" or time.monotonic() - started > 30:
                    break
                time.sleep(0.2)
            took = time.monotonic() - started
        print(f"drain of 1000 regions at 200/s: {took:.2f} s, progress {progress}")
        assert status.state == "done", status
        assert status.regions_total == 1000 and status.regions_moved == 1000 and status.regions_in_flight == 0
        assert status.reason == "decommission rack 3" and status.finished_at_millis >= status.started_at_millis
        assert 3.5 <= took <= 9.0, took
        assert progress == sorted(progress) and any(0 < p < 1000 for p in progress), progress
        assert sorted(cluster.moves) == DRAINED and set(cluster.moves.values()) == {1}, "a region moved twice"
        reqs = [c.request for c in cluster.migration.submissions]
        assert {r.trigger_reason for r in reqs} == {2}  # TRIGGER_REASON_MANUAL
        assert {r.to_peer.id for r in reqs} <= {2, 3}
        assert all(1 in r.exclude_peer_ids for r in sel.requests)
        assert cluster.regions_of(1) == []
        assert svc.registry.get_sample_value("supervisor_drains", {"state": "done"}) == 1
    finally:
        cluster.close()
        sel.stop()


def test_cancel_stops_new_submissions_and_reports_what_moved(service):
    sel, cluster, svc = _started(service, {1: DRAINED, 2: [rid(9, 1)], 3: [rid(9, 2)]},
                                 drain_regions_per_s=100, drain_burst_regions=50)
    try:
        with SupervisorClient(svc.addresses.grpc, timeout=5) as client:
            _wait_watched(client, 1002)
            drain_id = client.drain([1], reason="wrong rack")
            wait_for(lambda: client.get_drain(drain_id).regions_moved >= 100, 20)
            cancelled = client.cancel_drain(drain_id, reason="wrong rack after all")
            cancelled_at = time.monotonic()
            assert cancelled.state == "cancelled" and cancelled.finished_at_millis > 0
            time.sleep(1.5)  # 15 ticks: a running drain would have submitted 150 more regions
            after = client.get_drain(drain_id)
            late = [c for c in cluster.migration.submissions if c.at > cancelled_at + 0.05]
            assert late == [], f"{len(late)} submissions after the cancel"
            moved = sum(cluster.moves.values())
            assert after.state == "cancelled" and after.regions_moved == moved and after.regions_in_flight == 0
            assert 100 <= moved < 1000 and set(cluster.moves.values()) == {1}
            assert after.regions_pending == 1000 - moved
            # Cancelled: the drained datanode is a target again, and another drain of it may start.
            again = client.drain([1], reason="now for real")
            assert again != drain_id
            with pytest.raises(grpc.RpcError) as err:
                client.drain([1])
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "already being drained" in err.value.details()
            client.cancel_drain(again)
    finally:
        cluster.close()
        sel.stop()


def test_a_disabled_tables_regions_stay_on_a_dead_datanode_while_the_others_move(service):
    sel, cluster, svc = _started(service, {1: [rid(7, 1), rid(7, 2), rid(8, 1), rid(8, 2)], 2: [rid(9, 1)],
                                           3: [rid(9, 2)]})
    try:
        with SupervisorClient(svc.addresses.grpc, timeout=5) as client:
            _wait_watched(client, 6)
            policies = client.set_table_policy([7], failover_enabled=False, reason="stateful, moved by hand")
            assert [(p.table_id, p.failover_enabled, p.priority) for p in policies] == [(7, False, 0)]
            assert [(p.table_id, p.failover_enabled) for p in client.table_policies()] == [(7, False)]
            cluster.stop_datanode(1)
            wait_for(lambda: {rid(8, 1), rid(8, 2)} <= set(cluster.moves), 20)
            time.sleep(2.0)  # 20 ticks with table 7 failed and still not moved
            assert set(cluster.moves) == {rid(8, 1), rid(8, 2)}
            skipped = svc.registry.get_sample_value("supervisor_failover_skipped_regions_total",
                                                    {"reason": "table_disabled"})
            assert skipped and skipped >= 2
            for bad, code in (([], grpc.StatusCode.INVALID_ARGUMENT),):
                with pytest.raises(grpc.RpcError) as err:
                    client.set_table_policy(bad, False)
                assert err.value.code() == code and "table_ids is empty" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                client.set_table_policy([7], False, reason="x" * 5000)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as err:
                client.set_table_policy([7])  # neither part: nothing to change
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "neither" in err.value.details()
            # Only a priority: the table keeps its failover switch (proto3's false is not "off").
            assert [(p.failover_enabled, p.priority) for p in client.set_table_policy([7], priority=4)] == [(False, 4)]
            assert [(p.failover_enabled, p.priority) for p in client.set_table_policy([8], priority=4)] == [(True, 4)]
    finally:
        cluster.close()
        sel.stop()


def test_hostile_drain_requests_get_clear_statuses(service):
    svc = service(**FAST)
    with SupervisorClient(svc.addresses.grpc, timeout=5) as client:
        cases = [
            (lambda: client.drain([]), grpc.StatusCode.INVALID_ARGUMENT, "datanode_ids is empty"),
            (lambda: client.drain([42]), grpc.StatusCode.FAILED_PRECONDITION, "no watched region"),
            (lambda: client.drain([2**64 - 1], reason="r" * 1025), grpc.StatusCode.INVALID_ARGUMENT, "reason"),
            (lambda: client.drain(list(range(1001))), grpc.StatusCode.INVALID_ARGUMENT, "limit is 1000"),
            (lambda: client.get_drain("nope"), grpc.StatusCode.NOT_FOUND, "no drain 'nope'"),
            (lambda: client.get_drain(""), grpc.StatusCode.NOT_FOUND, "no drain yet"),
            (lambda: client.get_drain("d" * 10_000), grpc.StatusCode.INVALID_ARGUMENT, "drain_id"),
            (lambda: client.cancel_drain(""), grpc.StatusCode.INVALID_ARGUMENT, "drain_id is empty"),
            (lambda: client.cancel_drain("nope"), grpc.StatusCode.NOT_FOUND, "no drain"),
        ]
        for call, code, words in cases:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code and words in err.value.details(), (code, err.value.details())


def _leader(replicas, timeout: float) -> ServiceProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for replica in replicas:
            if replica.proc.poll() is None and says_it_leads(replica.addr):
                return replica
        time.sleep(0.05)
    raise AssertionError("no leader")


def test_a_leader_killed_mid_drain_and_the_drain_completes_without_a_second_move(tmp_path, backend):
    """On etcd, and on PostgreSQL (the `backend` fixture): the same guarantees."""
    sel = _selector()
    cluster = MovingCluster({1: DRAINED, 2: [rid(9, 1)], 3: [rid(9, 2)]})
    env = {
        "SUPERVISOR_STORE": backend.store(),
        "SUPERVISOR_STORE_PREFIX": "/region-supervisor/test-drain",
        "SUPERVISOR_LEADER_LEASE_TTL_MS": "2000",
        "SUPERVISOR_TICK_INTERVAL_MS": "100",
        "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "3000",
        "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "200",
        "SUPERVISOR_WARMUP_GRACE_MS": "1500",
        "SUPERVISOR_MAX_FAILED_DATANODE_FRACTION": "1",
        "SUPERVISOR_TARGET_HOLDDOWN_MS": "0",
        "SUPERVISOR_SELECTOR_ENDPOINT": sel.endpoint,
        "SUPERVISOR_REGION_MIGRATION_ENDPOINT": cluster.migration.endpoint,
        "SUPERVISOR_MIGRATION_STATUS_POLL_INTERVAL_MS": "200",
        "SUPERVISOR_DRAIN_REGIONS_PER_S": "100",
        "SUPERVISOR_DRAIN_BURST_REGIONS": "50",
    }
    replicas = [ServiceProcess(env, str(tmp_path / f"replica-{i}.log")) for i in range(2)]
    try:
        for replica in replicas:
            replica.wait_serving()
        leader = _leader(replicas, 15)
        addrs = [r.addr for r in replicas]
        cluster.start(addrs)
        with SupervisorClient(addrs, timeout=5) as client:
            _wait_watched(client, 1002)
            client.set_table_policy([9], failover_enabled=False, priority=3, reason="kept through the election")
            drain_id = client.drain([1], reason="hardware swap")
            wait_for(lambda: client.get_drain(drain_id).regions_moved >= 200, 30)
            leader.kill(signal.SIGKILL)
            survivor = next(r for r in replicas if r is not leader)
            _leader([survivor], 15)
            wait_for(lambda: client.get_drain(drain_id).state != "running", 60, message="the drain did not end")
            status = client.get_drain(drain_id)
            policies = [(p.table_id, p.failover_enabled, p.priority) for p in client.table_policies()]
        assert status.state == "done", status
        assert status.regions_moved == 1000 and client.addr == survivor.addr
        assert policies == [(9, False, 3)]
        assert sorted(cluster.moves) == DRAINED and set(cluster.moves.values()) == {1}, \
            sorted(r for r, n in cluster.moves.items() if n > 1)[:10]
        terms = {c.request.leader_term for c in cluster.migration.submissions}
        assert len(terms) == 2, terms  # both leaders moved some of it
    finally:
        cluster.close()
        sel.stop()
        for replica in replicas:
            replica.stop()


def test_a_drain_survives_a_kill_9_of_a_single_replica_on_sqlite(tmp_path):
    """The drain record, on the default store, after SIGKILL mid-drain: the restarted process (same data
    dir, same port) continues it and moves nothing twice."""
    sel = _selector()
    cluster = MovingCluster({1: DRAINED[:300], 2: [rid(9, 1)], 3: [rid(9, 2)]})
    env = {
        "SUPERVISOR_DATA_DIR": str(tmp_path / "data"),
        "SUPERVISOR_TICK_INTERVAL_MS": "100",
        "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "3000",
        "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "200",
        "SUPERVISOR_WARMUP_GRACE_MS": "1000",
        "SUPERVISOR_MAX_FAILED_DATANODE_FRACTION": "1",
        "SUPERVISOR_TARGET_HOLDDOWN_MS": "0",
        "SUPERVISOR_SELECTOR_ENDPOINT": sel.endpoint,
        "SUPERVISOR_REGION_MIGRATION_ENDPOINT": cluster.migration.endpoint,
        "SUPERVISOR_MIGRATION_STATUS_POLL_INTERVAL_MS": "200",
        "SUPERVISOR_DRAIN_REGIONS_PER_S": "50",
        "SUPERVISOR_DRAIN_BURST_REGIONS": "10",
    }
    first = ServiceProcess(env, str(tmp_path / "first.log"))
    second = None
    try:
        first.wait_serving(leader=True)
        cluster.start(first.addr)
        with SupervisorClient(first.addr, timeout=5) as client:
            _wait_watched(client, 302)
            drain_id = client.drain([1], reason="kill me")
            wait_for(lambda: client.get_drain(drain_id).regions_moved >= 60, 30)
        first.kill(signal.SIGKILL)
        first.proc.wait(10)
        second = ServiceProcess(env, str(tmp_path / "second.log"), grpc_port=first.port)
        second.wait_serving(leader=True)
        with SupervisorClient(second.addr, timeout=5) as client:
            wait_for(lambda: client.get_drain(drain_id).state != "running", 60, message="the drain did not end")
            status = client.get_drain(drain_id)
        assert status.state == "done" and status.regions_moved == 300, status
        assert sorted(cluster.moves) == DRAINED[:300] and set(cluster.moves.values()) == {1}
    finally:
        cluster.close()
        sel.stop()
        first.stop()
        if second is not None:
            second.stop()


def test_a_drained_datanode_that_dies_mid_drain_is_failed_over_for_the_rest_without_a_second_move(service):
    regions = DRAINED[:300]
    sel, cluster, svc = _started(service, {1: regions, 2: [rid(9, 1)], 3: [rid(9, 2)]},
                                 drain_regions_per_s=30, drain_burst_regions=10)
    try:
        with SupervisorClient(svc.addresses.grpc, timeout=5) as client:
            _wait_watched(client, 302)
            drain_id = client.drain([1], reason="dying disk")
            wait_for(lambda: client.get_drain(drain_id).regions_moved >= 30, 20)
            cluster.stop_datanode(1)  # it dies with most of its regions still on it
            wait_for(lambda: client.get_drain(drain_id).state != "running", 60, message="the drain did not end")
            status = client.get_drain(drain_id)
        assert status.state == "done" and status.regions_moved == 300, status
        assert sorted(cluster.moves) == regions and set(cluster.moves.values()) == {1}, "a region moved twice"
        reasons = {c.request.trigger_reason for c in cluster.migration.submissions}
        assert reasons == {1, 2}, reasons  # the drain's MANUAL moves, then failover for the rest
        assert all(1 in r.exclude_peer_ids for r in sel.requests)
    finally:
        cluster.close()
        sel.stop()
