"""End to end over real gRPC on loopback: datanodes heartbeat, one dies, the cluster is asked to move it.

Three datanode threads each hold one SendHeartbeat stream and heartbeat
every 200 ms; datanode 3 stops. The remote services are the in-process fakes
of `tests/fakes.py`, reached through the `*_endpoint` settings. Detection is
made fast with small detector settings (a detection period of about 1.5 s)
and a 100 ms tick; every bound is derived from the phi math, not guessed.
"""

from __future__ import annotations

import time

import grpc
import pytest

from supervisor_service.client import SupervisorClient
from supervisor_service.core import PhiAccrualFailureDetector, PhiAccrualOptions
from supervisor_service.proto import pb
from tests.support.datanodes import Cluster, dn_addr, regions_of
from tests.support.fakes import FakePeerLookup, FakeRegionMigration, FakeSelector, peer, wait_for
from tests.support.waiting import wait_ticks

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(60)]

TICK_MS = 100
THRESHOLD = 8.0
FAST = dict(
    tick_interval_ms=TICK_MS,
    phi_threshold=THRESHOLD,
    acceptable_heartbeat_pause_ms=1000,
    min_std_deviation_ms=100,
    first_heartbeat_estimate_ms=200,
)
OPTS = PhiAccrualOptions(
    threshold=THRESHOLD,
    min_std_deviation_ms=100,
    acceptable_heartbeat_pause_ms=1000,
    first_heartbeat_estimate_ms=200,
)
# Time for a detector fed every 200 ms to cross the threshold once heartbeats stop (about 1.5 s), plus room.
DETECTION_S = 2.0
SCHEDULING_SLACK_MS = 1500
BASE_TIMEOUT_MS = 30_000


def predicted_crossing_ms(heartbeat_ms: list[int], opts: PhiAccrualOptions = OPTS) -> int:
    """First millisecond at which the scalar reference, fed these heartbeats, reaches the threshold."""
    fd = PhiAccrualFailureDetector(opts)
    for t in heartbeat_ms:
        fd.heartbeat(t)
    t = heartbeat_ms[-1]
    while fd.phi(t) < opts.threshold:
        t += 1
        assert t - heartbeat_ms[-1] < 60_000, "phi never crosses the threshold"
    return t


def service_ms_offset(svc) -> float:
    """service clock (ms) - time.monotonic() (ms): the SystemClock advances with the monotonic clock."""
    return svc.clock.now_ms() - time.monotonic() * 1000


def sample(svc, name: str, **labels) -> float:
    return svc.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def fakes():
    rm = FakeRegionMigration()
    sel = FakeSelector([peer(d, dn_addr(d)) for d in (1, 2, 3)], per_call=True)
    lookup = FakePeerLookup({d: dn_addr(d) for d in (1, 2, 3)})
    yield rm, sel, lookup
    for fake in (rm, sel, lookup):
        fake.stop()


def remote_settings(rm, sel, lookup, **extra) -> dict:
    return dict(
        FAST,
        region_migration_endpoint=rm.endpoint,
        selector_endpoint=sel.endpoint,
        peer_lookup_endpoint=lookup.endpoint,
        migration_base_timeout_ms=BASE_TIMEOUT_MS,
        **extra,
    )


@pytest.fixture
def cluster_factory():
    clusters: list[Cluster] = []

    def make(addr: str) -> Cluster:
        clusters.append(Cluster(addr))
        return clusters[-1]

    yield make
    for c in clusters:
        c.close()


# ---------------------------------------------------------------- tests


def test_dead_datanode_is_failed_over_in_one_batch_when_phi_predicts(service, fakes, cluster_factory):
    rm, sel, lookup = fakes
    svc = service(**remote_settings(rm, sel, lookup))
    offset = service_ms_offset(svc)
    cluster = cluster_factory(svc.addresses.grpc)
    cluster.warm_up()
    dead = cluster.nodes[3]
    dead.stop()
    beats = dead.accepted_times()
    crossing = predicted_crossing_ms(beats)

    wait_for(lambda: rm.attempts, DETECTION_S + 5, message="no SubmitRegionMigration arrived")
    wait_ticks(svc, 10, 10)  # ten more ticks handled: nothing else may be submitted
    assert len(rm.attempts) == 1, [c.request for c in rm.attempts]
    call = rm.attempts[0]
    assert call.ok
    req = call.request

    # What was asked: the dead datanode's regions, in one batch, to the peer the selector chose.
    assert sorted(req.region_ids) == sorted(dead.regions)
    assert (req.from_peer.id, req.from_peer.addr) == (3, dn_addr(3))
    assert len(sel.calls) == 1
    chosen = sel.calls[0].response.peers
    assert len(chosen) == len(dead.regions) and len({p.id for p in chosen}) == 1
    assert req.to_peer.id == chosen[0].id != 3
    assert req.to_peer.addr == chosen[0].addr
    assert req.timeout_millis == BASE_TIMEOUT_MS * 1
    assert req.trigger_reason == pb.TRIGGER_REASON_FAILOVER
    assert req.leader_term >= 1

    select = sel.calls[0].request
    assert select.min_required_items == len(dead.regions)
    assert select.allow_duplication
    assert 3 in select.exclude_peer_ids and not {1, 2} & set(select.exclude_peer_ids)
    assert select.from_peer_id == 3
    assert sorted(select.region_ids) == sorted(dead.regions)
    assert [r.datanode_id for r in lookup.requests] == [3]

    # When: not before phi crosses the threshold, and within one tick (plus scheduling) after.
    arrived_ms = call.at * 1000 + offset
    assert arrived_ms >= crossing - 10, (arrived_ms, crossing)
    assert arrived_ms <= crossing + TICK_MS + SCHEDULING_SLACK_MS, (arrived_ms, crossing)

    # The table agrees with the reference to the millisecond on the heartbeats it really received.
    with SupervisorClient(svc.addresses.grpc) as client:
        _, before = client.dump(datanode_ids=[3], at_millis=crossing - 1)
        _, at = client.dump(datanode_ids=[3], at_millis=crossing)
        _, failed = client.dump(only_failed=True)
    assert len(before) == len(at) == len(dead.regions)
    assert all(r.available and r.phi < THRESHOLD for r in before), [r.phi for r in before]
    assert not any(r.available or r.phi < THRESHOLD for r in at), [r.phi for r in at]
    assert {r.last_heartbeat_millis for r in at} == {beats[-1]}
    assert {r.failover_count for r in at} == {1}

    # The live datanodes are untouched.
    assert {r.datanode_id for r in failed} == {3}
    assert sample(svc, "supervisor_failover_regions_total", result="submitted") == len(dead.regions)


def test_maintenance_holds_failover_until_turned_off(service, fakes, cluster_factory):
    rm, sel, lookup = fakes
    svc = service(**remote_settings(rm, sel, lookup))
    cluster = cluster_factory(svc.addresses.grpc)
    cluster.warm_up()
    with SupervisorClient(svc.addresses.grpc) as client:
        assert client.set_maintenance(True) is True
        dead = cluster.nodes[3]
        dead.stop()
        crossing = predicted_crossing_ms(dead.accepted_times())
        # Several detection periods: datanode 3 is seen failed, and nothing leaves.
        wait_ticks(svc, int(3 * DETECTION_S * 1000 / TICK_MS), 30)
        _, failed = client.dump(only_failed=True)
        assert {r.datanode_id for r in failed} == {3}
        assert client.get_maintenance() is True
        assert rm.attempts == [] and sel.calls == [] and lookup.calls == []
        assert sample(svc, "supervisor_failover_skipped_regions_total", reason="maintenance") > 0
        assert svc.clock.now_ms() > crossing + 3000

        assert client.set_maintenance(False) is False
    wait_for(lambda: rm.submissions, DETECTION_S + 5, message="no submission after maintenance ended")
    req = rm.submissions[0].request
    assert sorted(req.region_ids) == sorted(dead.regions)
    assert req.from_peer.id == 3 and req.to_peer.id in (1, 2)
    assert req.timeout_millis == BASE_TIMEOUT_MS


def test_second_failure_of_a_region_doubles_the_timeout(service, cluster_factory):
    rm = FakeRegionMigration(default_state=pb.MIGRATION_STATE_FAILED)
    sel = FakeSelector([peer(d, dn_addr(d)) for d in (1, 2, 3)], per_call=True)
    lookup = FakePeerLookup({d: dn_addr(d) for d in (1, 2, 3)})
    try:
        # A FAILED migration is decided again after resubmit_backoff_ms: short here.
        svc = service(**remote_settings(rm, sel, lookup, migration_status_poll_interval_ms=200,
                                        resubmit_backoff_ms=200))
        cluster = cluster_factory(svc.addresses.grpc)
        cluster.warm_up()
        dead = cluster.nodes[3]
        dead.stop()
        wait_for(lambda: len(rm.submissions) >= 2, DETECTION_S + 8, message="no second submission")
        first, second = (c.request for c in rm.submissions[:2])
        assert sorted(first.region_ids) == sorted(second.region_ids) == sorted(dead.regions)
        assert first.timeout_millis == BASE_TIMEOUT_MS
        assert second.timeout_millis == 2 * BASE_TIMEOUT_MS
        # The second came after the first procedure was reported FAILED.
        proc1 = rm.submissions[0].response.procedure_id
        polls = [c for c in rm.status_polls if c.request.procedure_id == proc1]
        assert polls and polls[0].at < rm.submissions[1].at
        with SupervisorClient(svc.addresses.grpc) as client:
            _, rows = client.dump(datanode_ids=[3])
        assert {r.failover_count for r in rows} >= {2}
    finally:
        for fake in (rm, sel, lookup):
            fake.stop()


def test_heartbeats_are_applied_while_the_selector_hangs(service, fakes, cluster_factory):
    rm, sel, lookup = fakes
    sel.hang(5.0, times=1)
    svc = service(**remote_settings(rm, sel, lookup, remote_timeout_ms=10_000))
    cluster = cluster_factory(svc.addresses.grpc)
    cluster.warm_up()
    cluster.nodes[3].stop()
    wait_for(lambda: sel.in_progress, DETECTION_S + 5, message="the selector was never called")
    hang_started = time.monotonic()

    seen = []
    with SupervisorClient(svc.addresses.grpc) as client:
        for _ in range(4):
            _, rows = client.dump(datanode_ids=[1])
            assert len(rows) == len(regions_of(1))
            seen.append(max(r.last_heartbeat_millis for r in rows))
            time.sleep(0.7)
    assert sel.in_progress == 1, "the hang ended before the dumps were taken"
    assert time.monotonic() - hang_started < 5.0
    assert all(b > a for a, b in zip(seen, seen[1:])), seen
    # Datanodes 1 and 2 kept being answered during the hang.
    for d in (1, 2):
        beats = cluster.nodes[d].accepted_times()
        during = [t for t in beats if t >= seen[0]]
        assert len(during) >= 8, (d, len(during))

    # When the selector answers, the failover goes through.
    wait_for(lambda: rm.submissions, 10, message="no submission after the selector answered")
    assert rm.submissions[0].request.from_peer.id == 3


def test_remote_faults_are_survived_and_retried(service, fakes, cluster_factory):
    rm, sel, lookup = fakes
    rm.fail(grpc.StatusCode.UNAVAILABLE, times=2, methods=["SubmitRegionMigration"], details="not ready")
    svc = service(**remote_settings(rm, sel, lookup))
    cluster = cluster_factory(svc.addresses.grpc)
    cluster.warm_up()
    dead = cluster.nodes[3]
    dead.stop()
    wait_for(lambda: rm.submissions, DETECTION_S + 8, message="no successful submission")
    wait_ticks(svc, 10, 10)
    assert [c.outcome for c in rm.attempts] == ["UNAVAILABLE", "UNAVAILABLE", "OK"]
    assert len(rm.submissions) == 1
    req = rm.submissions[0].request
    assert sorted(req.region_ids) == sorted(dead.regions) and req.from_peer.id == 3
    errors = sample(
        svc, "supervisor_remote_call_errors_total",
        service="RegionMigration", method="SubmitRegionMigration", code="UNAVAILABLE",
    )
    assert errors == 2
    assert sample(svc, "supervisor_failover_errors_total", stage="submit") == 2


def test_embedded_services_journal_the_failover(service, cluster_factory):
    svc = service(**FAST)
    cluster = cluster_factory(svc.addresses.grpc)
    cluster.warm_up()
    dead = cluster.nodes[3]
    dead.stop()
    with SupervisorClient(svc.addresses.grpc) as client:
        def journaled():
            embedded, entries = client.journal()
            assert embedded
            moved = sorted(r for e in entries for r in e.region_ids)
            return entries if moved == sorted(dead.regions) else None

        entries = wait_for(journaled, DETECTION_S + 5, interval=0.1, message="datanode 3 was not journaled")
    for entry in entries:
        assert (entry.from_peer.id, entry.from_peer.addr) == (3, dn_addr(3))
        assert entry.to_peer.id in (1, 2)
        assert entry.to_peer.addr == dn_addr(entry.to_peer.id)
        assert entry.trigger_reason == pb.TRIGGER_REASON_FAILOVER
        assert entry.procedure_id


def test_heartbeat_responses_name_the_bound_leader_address(service, cluster_factory):
    """A single replica on port 0 must tell clients the address it is bound to, not "127.0.0.1:0".

    The leadership is built (`open_cluster`) before the port is bound; `Service.start` gives it the
    bound address before it starts, whichever kind it is.
    """
    svc = service(**FAST)
    cluster = cluster_factory(svc.addresses.grpc)
    cluster.warm_up(heartbeats=2)
    leader_addrs = {r.leader_addr for r in cluster.nodes[1].received()}
    assert leader_addrs == {svc.addresses.grpc}
    with SupervisorClient(svc.addresses.grpc) as client:
        assert client.maintenance_status().leader_addr == svc.addresses.grpc
        assert client.dump()[0].leader_addr == svc.addresses.grpc
