"""What the edge answers from the core's published status (`CoreStatus`), over real loopback gRPC.

The edge reads the core's state only through the status the supervisor thread publishes: the
failover holds are reported whether the guards are on or off (maintenance and warm-up hold
failover either way), and releasing a hold still needs the guards.
"""

from __future__ import annotations

import grpc
import pytest

from supervisor_service.proto import pb, pb_grpc
from tests.support.fakes import wait_for

RPC_TIMEOUT = 10.0


@pytest.fixture
def stub_of():
    channels: list[grpc.Channel] = []

    def stub(svc) -> pb_grpc.RegionSupervisorStub:
        channel = grpc.insecure_channel(svc.addresses.grpc)
        channels.append(channel)
        return pb_grpc.RegionSupervisorStub(channel)

    yield stub
    for channel in channels:
        channel.close()


def holds(stub) -> list[str]:
    return list(stub.GetFailoverHolds(pb.GetFailoverHoldsRequest(), timeout=RPC_TIMEOUT).holds)


def set_maintenance(stub, enabled: bool) -> None:
    stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=enabled), timeout=RPC_TIMEOUT)


@pytest.mark.parametrize("guards_enabled", [False, True])
def test_maintenance_is_a_reported_hold_with_the_guards_on_or_off(service, stub_of, guards_enabled):
    """With guards_enabled=false the holds used to live on the (absent) guards: GetFailoverHolds
    reported none, although maintenance held every failover."""
    svc = service(guards_enabled=guards_enabled, warmup_grace_ms=0, tick_interval_ms=20)
    stub = stub_of(svc)
    assert "maintenance" not in holds(stub)
    set_maintenance(stub, True)
    wait_for(lambda: "maintenance" in holds(stub), 10, message="maintenance is not reported as a hold")
    answer = stub.GetFailoverHolds(pb.GetFailoverHoldsRequest(), timeout=RPC_TIMEOUT)
    assert answer.is_leader and answer.failed_datanode_fraction == 0.0
    set_maintenance(stub, False)
    wait_for(lambda: "maintenance" not in holds(stub), 10, message="maintenance still reported after it ended")


def test_releasing_a_hold_with_the_guards_off_is_a_failed_precondition(service, stub_of):
    svc = service(guards_enabled=False, warmup_grace_ms=0)
    stub = stub_of(svc)
    set_maintenance(stub, True)
    with pytest.raises(grpc.RpcError) as info:
        stub.ReleaseFailoverHold(pb.ReleaseFailoverHoldRequest(), timeout=RPC_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "guards are off (setting guards_enabled)" in info.value.details()


def test_releasing_with_the_guards_on_answers_the_holds(service, stub_of):
    """Nothing to release (no mass failure): released is false, and the answer lists the holds."""
    svc = service(guards_enabled=True, warmup_grace_ms=0, tick_interval_ms=20)
    stub = stub_of(svc)
    set_maintenance(stub, True)
    wait_for(lambda: "maintenance" in holds(stub), 10, message="maintenance is not reported as a hold")
    answer = stub.ReleaseFailoverHold(pb.ReleaseFailoverHoldRequest(), timeout=RPC_TIMEOUT)
    assert not answer.released and answer.is_leader
    assert "maintenance" in answer.holds


def test_the_server_is_not_serving_until_the_service_says_so():
    """grpc_health starts the whole server ("") at SERVING: a readiness probe would pass while the
    replica is still binding its leadership. Ours starts NOT_SERVING on both names."""
    import asyncio

    from grpc_health.v1 import health_pb2

    from supervisor_service.edge import SERVICE_NAME, HealthServicer, set_health

    async def check(servicer, name):
        return (await servicer.Check(health_pb2.HealthCheckRequest(service=name), None)).status

    async def scenario():
        servicer = HealthServicer()
        before = await check(servicer, "")
        await set_health(servicer, True)
        after = [await check(servicer, name) for name in ("", SERVICE_NAME)]
        await set_health(servicer, False)
        stopped = await check(servicer, "")
        return before, after, stopped

    before, after, stopped = asyncio.run(scenario())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert stopped == health_pb2.HealthCheckResponse.NOT_SERVING
