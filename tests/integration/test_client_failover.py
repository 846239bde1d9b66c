"""Clients among several replicas: a replica that does not know who leads, names itself, or stops
answering never holds a `DatanodeHeartbeater` or a `SupervisorClient`; refused heartbeats are
surfaced to the datanode."""

from __future__ import annotations

import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient, reason_kind
from supervisor_service.proto import pb, pb_grpc
from tests.support.servers import ServiceProcess

NOT_LEADER = "not the leader; no leader is known right now"


class _FakeReplica(pb_grpc.RegionSupervisorServicer):
    """A tiny RegionSupervisor whose heartbeat answers come from `answer(request, own_addr)`.

    The default is a replica that does not know who leads (cut off from etcd): heartbeats are
    rejected "not the leader" with `leader_addr` = `names` ('' or its own address), writes are
    FAILED_PRECONDITION without a leader, reads say is_leader=false.
    """

    def __init__(self, names: str = "", answer=None) -> None:
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_RegionSupervisorServicer_to_server(self, self.server)
        self.addr = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self._names = self.addr if names == "self" else names
        self._answer = answer or self._not_leader
        self.heartbeats = 0
        self.server.start()

    def _not_leader(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(
            datanode_id=request.datanode_id, is_leader=False, leader_addr=self._names, rejected=True, reason=NOT_LEADER
        )

    def SendHeartbeat(self, request_iterator, context):
        for request in request_iterator:
            self.heartbeats += 1
            yield self._answer(request)

    def RegisterDetectors(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this replica is not the leader; {NOT_LEADER}")

    def GetMaintenanceMode(self, request, context):
        return pb.MaintenanceModeResponse(is_leader=False, leader_addr=self._names)

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def fake_replica():
    made = []

    def make(**kwargs) -> _FakeReplica:
        made.append(_FakeReplica(**kwargs))
        return made[-1]

    yield make
    for replica in made:
        replica.stop()


def _wait_for(predicate, timeout: float, what: str) -> float:
    begun = time.monotonic()
    while not predicate():
        if time.monotonic() - begun > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - begun


def _recorder():
    accepted: dict[str, int] = {}

    def record(addr: str, response: pb.HeartbeatResponse) -> None:
        if not response.rejected:
            accepted[addr] = accepted.get(addr, 0) + 1

    return accepted, record


@pytest.mark.parametrize("names", ["", "self"], ids=["names_no_leader", "names_itself"])
def test_heartbeater_leaves_a_replica_that_does_not_know_the_leader(service, fake_replica, names):
    leader = service()
    lost = fake_replica(names=names)
    accepted, record = _recorder()
    beater = DatanodeHeartbeater([lost.addr, leader.addresses.grpc], 1, lambda: [10], interval_s=0.1,
                                 on_response=record).start()
    try:
        _wait_for(lambda: accepted.get(leader.addresses.grpc, 0) >= 3, 5, "heartbeats accepted by the leader")
        assert beater.addr == leader.addresses.grpc
        heard, answered = lost.heartbeats, accepted[leader.addresses.grpc]
        # Five more heartbeats (0.1 s apart) answered by the leader: none may have gone to `lost`.
        _wait_for(lambda: accepted[leader.addresses.grpc] >= answered + 5, 5, "heartbeats accepted by the leader")
        assert lost.heartbeats == heard, "the heartbeater went back to the replica that does not lead"
        assert beater.rejections["not_leader"] >= 1
    finally:
        beater.stop()


def test_supervisor_client_leaves_a_replica_that_does_not_know_the_leader(service, fake_replica):
    leader = service()
    lost = fake_replica()
    begun = time.monotonic()
    with SupervisorClient([lost.addr, leader.addresses.grpc], timeout=5) as client:
        assert client.register([(1, 10)]) == 1
        assert client.addr == leader.addresses.grpc
    assert time.monotonic() - begun < 2
    # A read answered by a follower that knows no leader: the leader's answer is preferred.
    with SupervisorClient([lost.addr, leader.addresses.grpc], timeout=5) as client:
        assert client.maintenance_status().is_leader
        _, rows = client.dump()
        assert [(r.datanode_id, r.region_id) for r in rows] == [(1, 10)]


@pytest.mark.realtime
def test_stopped_leader_holds_no_client_past_the_answer_deadline(service, tmp_path):
    """A SIGSTOPped replica still accepts TCP connections (the kernel does) but never answers."""
    stopped = ServiceProcess({"SUPERVISOR_STORE": "memory", "GRPC_VERBOSITY": "NONE"}, str(tmp_path / "stopped.log"))
    live = service()
    accepted, record = _recorder()
    beater = None
    try:
        stopped.wait_serving()
        beater = DatanodeHeartbeater([stopped.addr, live.addresses.grpc], 1, lambda: [10], interval_s=0.2,
                                     answer_timeout_s=1.0, on_response=record).start()
        _wait_for(lambda: accepted.get(stopped.addr, 0) >= 2, 10, "heartbeats accepted by the first replica")
        stopped.kill(signal.SIGSTOP)
        took = _wait_for(lambda: accepted.get(live.addresses.grpc, 0) >= 1, 6,
                         "the heartbeater reaching the live replica")
        assert took <= 1.0 + 0.2 + 2.0, took  # the answer deadline, an interval, scheduling
        assert beater.errors["no_answer"] >= 1 and "no answer" in beater.last_error

        # A fresh client: the connection to the stopped process is made, the call is never answered.
        begun = time.monotonic()
        with SupervisorClient([stopped.addr, live.addresses.grpc], timeout=1) as client:
            assert client.register([(2, 20)]) == 1
            assert client.addr == live.addresses.grpc
        assert time.monotonic() - begun < 3
    finally:
        if beater is not None:
            beater.stop()
        stopped.kill(signal.SIGCONT)
        stopped.stop()


def test_heartbeater_surfaces_refused_heartbeats(service, caplog):
    """Two lives of datanode 5 at once: the older epoch's heartbeats are refused while the newer one
    is live. The datanode running the older life is told, and so is its operator."""
    svc = service()
    addr = svc.addresses.grpc
    seen = []
    newer = DatanodeHeartbeater(addr, 5, lambda: [50], interval_s=0.05, node_epoch=2).start()
    older = None
    try:
        _wait_for(lambda: newer.accepted >= 2, 5, "the newer life's heartbeats accepted")
        with caplog.at_level(logging.WARNING, logger="supervisor_service.client"):
            older = DatanodeHeartbeater(addr, 5, lambda: [50], interval_s=0.05, node_epoch=1,
                                        on_rejection=lambda note, response: seen.append(note)).start()
            _wait_for(lambda: sum(older.rejections.values()) >= 5, 5, "five refused heartbeats")
        assert older.rejected and older.accepted == 0
        note = older.last_rejection
        assert note is not None and note.addr == addr and "node_epoch 1" in note.reason
        assert older.rejections[note.kind] >= 5 and note.kind == reason_kind("node_epoch 7 is older than 8, x: y")
        assert len(seen) >= 5 and seen[-1].reason == note.reason
        assert older.addr == addr, "a refusal by the leader is no reason to leave it"
        lines = [r for r in caplog.records
                 if r.name == "supervisor_service.client" and r.getMessage() == "heartbeat_rejected"]
        assert len(lines) == 1, "rejections are logged once per kind per interval"
        assert lines[0].fields["datanode_id"] == 5 and "node_epoch" in lines[0].fields["reason"]
    finally:
        newer.stop()
        if older is not None:
            older.stop()


def test_heartbeater_surfaces_field_warnings_on_accepted_heartbeats(fake_replica):
    warning = "peer_addr ignored: expected host:port (e.g. 127.0.0.1:50051), got 'db-1'"
    replica = fake_replica(answer=lambda request: pb.HeartbeatResponse(
        datanode_id=request.datanode_id, accepted_regions=1, is_leader=True, reason=warning))
    beater = DatanodeHeartbeater(replica.addr, 3, lambda: [30], interval_s=0.05, peer_addr="db-1").start()
    try:
        _wait_for(lambda: beater.accepted >= 3, 5, "accepted heartbeats")
        assert not beater.rejected and beater.last_rejection is None
        assert beater.last_warning is not None and beater.last_warning.reason == warning
        assert beater.warnings["peer_addr ignored"] >= 3
    finally:
        beater.stop()


def test_reason_kinds_are_few_and_bounded():
    assert reason_kind("not the leader; send heartbeats to 10.0.0.1:50051") == "not_leader"
    assert reason_kind("becoming leader: loading the state; retry shortly") == "not_ready"
    assert reason_kind("3 regions in one heartbeat; the limit is 2") == reason_kind("9 regions in one heartbeat; x")
    assert len(reason_kind("x" * 10_000)) <= 60


@pytest.fixture
def blackhole():
    """A port whose connections the kernel accepts and nobody answers: a stopped process, cheaply."""
    import socket

    socks = []

    def make() -> str:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        socks.append(s)
        return f"127.0.0.1:{s.getsockname()[1]}"

    yield make
    for s in socks:
        s.close()


def test_no_replica_answering_is_one_deadline_per_replica_not_ten(blackhole):
    addrs = [blackhole(), blackhole()]
    begun = time.monotonic()
    with SupervisorClient(addrs, timeout=0.5) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.register([(1, 10)])
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - begun < 2 * 0.5 + 1.5


def test_heartbeater_cycling_among_bad_replicas_leaks_no_threads_and_survives_its_callbacks(fake_replica, blackhole):
    import threading

    lost = fake_replica()
    before = threading.active_count()

    def failing(*_):
        raise RuntimeError("a datanode's callback bug")

    beater = DatanodeHeartbeater([blackhole(), lost.addr], 1, lambda: [10], interval_s=0.05, answer_timeout_s=0.2,
                                 on_response=failing, on_rejection=failing).start()
    try:
        _wait_for(lambda: beater.switches >= 8, 10, "eight moves between the two replicas")
        assert threading.active_count() <= before + 3, threading.active_count() - before
        assert beater.errors["no_answer"] >= 4 and beater.errors["callback_failed"] >= 4
        assert beater._thread.is_alive()
    finally:
        beater.stop()
