"""Several replicas on a shared store, each test once on etcd and once on PostgreSQL (the `backend`
fixture): election, takeover, fencing, step-down."""

from __future__ import annotations

import signal
import time
import urllib.request

import grpc
import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from tests.support.fakes import FakeRegionMigration
from tests.support.readiness import leading, says_it_leads
from tests.support.roles import IDENTITIES, LEGACY_TOKEN, write_security_files
from tests.support.servers import ServiceProcess
from tests.support.waiting import wait_ticks

pytestmark = pytest.mark.realtime

TTL_MS = 2000
TICK_MS = 100




@pytest.fixture
def migration():
    fake = FakeRegionMigration()
    yield fake
    fake.stop()


def _regions_of(migration: FakeRegionMigration, datanode_id: int) -> list[int]:
    return [r for c in migration.submissions if c.request.from_peer.id == datanode_id for r in c.request.region_ids]


def _replicas(tmp_path, backend, migration, n=3, prefix="/region-supervisor/test-ha", extra_env=None):
    env = {
        "SUPERVISOR_STORE": backend.store(),
        "SUPERVISOR_STORE_PREFIX": prefix,
        "SUPERVISOR_LEADER_LEASE_TTL_MS": str(TTL_MS),
        "SUPERVISOR_TICK_INTERVAL_MS": str(TICK_MS),
        "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "1000",
        "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "200",
        "SUPERVISOR_WARMUP_GRACE_MS": "1500",
        "SUPERVISOR_WARMUP_FRACTION": "0.6",
        "SUPERVISOR_REGION_MIGRATION_ENDPOINT": migration.endpoint,
        "SUPERVISOR_MIGRATION_STATUS_POLL_INTERVAL_MS": "60000",
        **(extra_env or {}),
    }
    return [ServiceProcess(env, str(tmp_path / f"replica-{i}.log")) for i in range(n)]


def _leader(replicas, timeout: float) -> ServiceProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for replica in replicas:
            if replica.proc.poll() is not None:
                continue
            if says_it_leads(replica.addr):
                return replica
        time.sleep(0.05)
    raise AssertionError(f"no leader within {timeout} s")


def test_leader_killed_new_leader_fails_over_exactly_once(tmp_path, backend, migration):
    replicas = _replicas(tmp_path, backend, migration)
    beaters = []
    try:
        for replica in replicas:
            replica.wait_serving()
        leader = _leader(replicas, timeout=10)
        addrs = [r.addr for r in replicas]
        # Followers refuse admin calls with the leader's address; the client follows it.
        follower = next(r for r in replicas if r is not leader)
        with SupervisorClient(follower.addr, timeout=5, follow_leader=False) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.register([(1, 1)])
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert leader.addr in err.value.details()
            assert dict(err.value.trailing_metadata())["x-supervisor-leader"] == leader.addr
        with SupervisorClient(follower.addr, timeout=5) as client:
            assert client.register([(3, 300)]) == 1
            assert client.addr == leader.addr
        for datanode in (1, 2, 3):
            regions = [datanode * 100 + i for i in range(3)]
            # Every datanode starts at a follower: it must find the leader by itself.
            beaters.append(DatanodeHeartbeater(
                [follower.addr] + addrs, datanode, lambda regions=regions: regions, interval_s=0.2,
                peer_addr=f"127.0.0.1:{7000 + datanode}",
            ).start())
        time.sleep(1.5)
        assert all(b.addr == leader.addr for b in beaters), [b.addr for b in beaters]

        killed_at = time.monotonic()
        leader.kill(signal.SIGKILL)
        beaters[2].stop()  # datanode 3 dies with the leader
        survivors = [r for r in replicas if r is not leader]
        new_leader = _leader(survivors, timeout=TTL_MS / 1000 + 3)
        took = time.monotonic() - killed_at
        # Lease TTL, plus one campaign retry (ttl/3) and a tick, plus process scheduling.
        assert took <= TTL_MS / 1000 + TTL_MS / 3000 + TICK_MS / 1000 + 1.0, took

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sorted(_regions_of(migration, 3)) != [300, 301, 302]:
            time.sleep(0.1)
        assert sorted(_regions_of(migration, 3)) == [300, 301, 302]
        wait_ticks(new_leader, 2000 // TICK_MS, 20)  # and nothing more arrives in 2 s of the new leader's ticks
        assert sorted(_regions_of(migration, 3)) == [300, 301, 302], "a region was failed over twice"
        assert _regions_of(migration, 1) == [] and _regions_of(migration, 2) == []
        assert all(b.addr == new_leader.addr for b in beaters[:2])
        terms = [c.request.leader_term for c in migration.submissions]
        assert terms and min(terms) > 0
    finally:
        for b in beaters:
            b.stop()
        for replica in replicas:
            replica.stop()


def test_leader_steps_down_when_the_store_stops_and_submits_nothing(tmp_path, backend, migration):
    replicas = _replicas(tmp_path, backend, migration, n=1, prefix="/region-supervisor/test-stepdown")
    beaters = []
    try:
        replica = replicas[0]
        replica.wait_serving()
        _leader(replicas, timeout=10)
        for datanode in (1, 2):
            beaters.append(DatanodeHeartbeater(replica.addr, datanode, lambda d=datanode: [d * 10], interval_s=0.2).start())
        time.sleep(1.0)
        backend.pause()  # SIGSTOP: connections stay open, nothing answers
        paused_at = time.monotonic()
        beaters[1].stop()  # datanode 2 dies while the leader has no lease
        try:
            with SupervisorClient(replica.addr, timeout=2, follow_leader=False) as client:
                deadline = paused_at + TTL_MS / 1000 + 1.0
                stepped_down = None
                while time.monotonic() < deadline:
                    header, _ = client.dump()  # Dump answers on any replica without the store
                    if not header.is_leader:
                        stepped_down = time.monotonic()
                        break
                    time.sleep(0.05)
                assert stepped_down is not None, "leader kept its role without a lease"
                assert stepped_down - paused_at <= TTL_MS / 1000
            time.sleep(3)  # datanode 2's detection period passes: still nothing may leave
            assert migration.submissions == []
        finally:
            backend.resume()
    finally:
        for b in beaters:
            b.stop()
        for replica in replicas:
            replica.stop()



def test_the_audit_trail_survives_a_leader_change(tmp_path, backend, migration):
    files = write_security_files(tmp_path / "security")
    env = {f"SUPERVISOR_{k.upper()}": v for k, v in files.items()}
    replicas = _replicas(tmp_path, backend, migration, n=2, prefix="/region-supervisor/test-audit", extra_env=env)
    addrs = [r.addr for r in replicas]
    alice, bob = IDENTITIES["ops-alice"][0], IDENTITIES["reader-bob"][0]

    def leader_of(candidates, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for replica in candidates:
                with grpc.insecure_channel(replica.addr) as channel:
                    if replica.proc.poll() is None and leading(channel, LEGACY_TOKEN):
                        return replica
            time.sleep(0.05)
        raise AssertionError(f"no leader within {timeout} s")

    def trail(addr):
        with SupervisorClient(addr, token=bob, timeout=5, follow_leader=False) as client:
            return [(e.identity, e.rpc, e.code, e.reason, e.leader_term) for e in client.audit(limit=1000)]

    try:
        for replica in replicas:
            replica.wait_serving()
        leader = leader_of(replicas, 10)
        with SupervisorClient(addrs, token=alice, timeout=5) as client:
            client.set_maintenance_scope(True, [5], reason="upgrade of rack 3")
        with SupervisorClient(leader.addr, token=bob, timeout=5) as client, pytest.raises(grpc.RpcError) as err:
            client.set_maintenance(True, reason="not mine to do")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        deadline = time.monotonic() + 5
        while len(trail(leader.addr)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # a refusal's entry is not waited for
        before = trail(leader.addr)
        (_, _, _, _, term), = {e for e in before if e[0] == "ops-alice"}
        assert before == [("reader-bob", "SetMaintenanceMode", "PERMISSION_DENIED", "", term),
                          ("ops-alice", "SetMaintenanceMode", "OK", "upgrade of rack 3", term)], before
        follower = next(r for r in replicas if r is not leader)
        assert trail(follower.addr) == before  # any replica reads the trail from the store
        # A follower refuses too, and only counts and logs it: the trail is the leader's to write.
        with SupervisorClient(follower.addr, token=bob, timeout=5, follow_leader=False) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.release_hold(reason="from a follower")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        time.sleep(0.3)
        assert trail(follower.addr) == before
        url = f"http://{follower.metrics_addr}/metrics?name[]=supervisor_audit_entries_total"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert 'supervisor_audit_entries_total{result="not_leader"} 1.0' in resp.read().decode()

        leader.kill(signal.SIGKILL)
        new_leader = leader_of([follower], TTL_MS / 1000 + 5)
        with SupervisorClient(new_leader.addr, token=alice, timeout=5) as client:
            client.set_maintenance_scope(False, [5], reason="rack 3 done")
        after = trail(new_leader.addr)
        assert after[1:] == before, after
        identity, rpc, code, reason, new_term = after[0]
        assert (identity, rpc, code, reason) == ("ops-alice", "SetMaintenanceMode", "OK", "rack 3 done")
        assert new_term > term
    finally:
        for replica in replicas:
            replica.stop()
