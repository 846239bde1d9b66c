"""Drains and table policies over real gRPC, against fake remotes (docs/design.md §21): a datanode
with 1,000 regions drained at 200 regions/s in about 5 s, each region moved once, progress in
GetDrain; cancel stops new submissions; a leader killed mid-drain on etcd and the drain completes
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


def _wait_watched(client: SupervisorClient, n: int) -> None:
    wait_for(lambda: len(client.dump()[1]) >= n, 20, message=f"fewer than {n} detectors")


def test_a_drain_of_1000_regions_at_200_per_s_takes_about_5_s_and_moves_each_once(service):
    sel = _selector()
    cluster = MovingCluster({1: DRAINED, 2: [rid(9, 1)], 3: [rid(9, 2)]})
    try:
        svc = service(**FAST, selector_endpoint=sel.endpoint, region_migration_endpoint=cluster.migration.endpoint,
                      drain_regions_per_s=200, drain_burst_regions=200)
        cluster.start(svc.addresses.grpc)
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
