"""gRPC server metrics in go-grpc-prometheus's names, over a real server: every kind of call, the
calls the auth interceptor refuses, garbage, a cancelled stream and a client deadline."""

from __future__ import annotations

import threading

import grpc
import pytest

from supervisor_service.proto import pb, pb_grpc
from tests.support.waiting import wait_for

SERVICE = "supervisor.v1.RegionSupervisor"
TOKEN = "s3cret"


def _value(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _handled(registry, method: str, code: str, kind: str = "unary", service: str = SERVICE) -> float:
    return _value(registry, "grpc_server_handled_total", grpc_type=kind, grpc_service=service,
                  grpc_method=method, grpc_code=code)


def _started(registry, method: str, kind: str = "unary", service: str = SERVICE) -> float:
    return _value(registry, "grpc_server_started_total", grpc_type=kind, grpc_service=service, grpc_method=method)


@pytest.fixture
def served(service):
    svc = service(auth_token=TOKEN)
    channel = grpc.insecure_channel(svc.addresses.grpc)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield svc, pb_grpc.RegionSupervisorStub(channel), channel
    channel.close()


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def test_every_method_is_zero_before_any_call_so_rates_exist_from_the_start(served):
    svc, _, _ = served
    r = svc.registry
    assert _started(r, "RegisterDetectors") == 0
    assert r.get_sample_value("grpc_server_started_total", dict(
        grpc_type="bidi_stream", grpc_service=SERVICE, grpc_method="SendHeartbeat")) == 0
    assert r.get_sample_value("grpc_server_started_total", dict(
        grpc_type="server_stream", grpc_service=SERVICE, grpc_method="Dump")) == 0
    assert r.get_sample_value("grpc_server_handled_total", dict(
        grpc_type="unary", grpc_service=SERVICE, grpc_method="RegisterDetectors", grpc_code="OK")) == 0


def test_unary_calls_are_counted_by_code_and_timed(served):
    svc, stub, _ = served
    r = svc.registry
    region = pb.DetectingRegion(datanode_id=1, region_id=10)
    assert stub.RegisterDetectors(pb.RegisterDetectorsRequest(regions=[region]), metadata=AUTH).affected == 1
    too_many = pb.RegisterDetectorsRequest(regions=[region] * 200_000)
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterDetectors(too_many, metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Bytes that are no RegisterDetectorsRequest: INVALID_ARGUMENT from the parser inside the handler.
    garbage = grpc.insecure_channel(svc.addresses.grpc).unary_unary(
        f"/{SERVICE}/RegisterDetectors", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        garbage(b"\xff\xff\xff\xff", metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _started(r, "RegisterDetectors") == 3
    # The client may have its answer a moment before the server's handler has returned.
    wait_for(lambda: _handled(r, "RegisterDetectors", "InvalidArgument") == 2, timeout=10)
    assert _handled(r, "RegisterDetectors", "OK") == 1
    labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="RegisterDetectors")
    assert r.get_sample_value("grpc_server_handling_seconds_count", labels) == 3
    assert r.get_sample_value("grpc_server_handling_seconds_bucket", {**labels, "le": "+Inf"}) == 3
    assert 0 < r.get_sample_value("grpc_server_handling_seconds_sum", labels) < 30
    assert _value(r, "grpc_server_msg_received_total", **labels) == 3
    assert _value(r, "grpc_server_msg_sent_total", **labels) == 1


def test_calls_the_auth_interceptor_refuses_are_counted_unauthenticated(served):
    svc, stub, _ = served
    r = svc.registry
    with pytest.raises(grpc.RpcError) as err:
        stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Dump(pb.DumpRequest(), metadata=(("authorization", "Bearer wrong"),)))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        next(stub.SendHeartbeat(iter([pb.HeartbeatRequest(datanode_id=1, region_ids=[1])])))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    wait_for(lambda: _handled(r, "GetMaintenanceMode", "Unauthenticated") == 1, timeout=10)
    wait_for(lambda: _handled(r, "Dump", "Unauthenticated", "server_stream") == 1, timeout=10)
    wait_for(lambda: _handled(r, "SendHeartbeat", "Unauthenticated", "bidi_stream") == 1, timeout=10)


def test_streams_count_their_messages_and_end_with_their_code(served):
    svc, stub, _ = served
    r = svc.registry
    stub.RegisterDetectors(pb.RegisterDetectorsRequest(
        regions=[pb.DetectingRegion(datanode_id=1, region_id=i) for i in range(1, 6)]), metadata=AUTH)
    beats = [pb.HeartbeatRequest(datanode_id=1, region_ids=[1, 2, 3]) for _ in range(4)]
    answers = list(stub.SendHeartbeat(iter(beats), metadata=AUTH))
    assert len(answers) == 4
    labels = dict(grpc_type="bidi_stream", grpc_service=SERVICE, grpc_method="SendHeartbeat")
    wait_for(lambda: _handled(r, "SendHeartbeat", "OK", "bidi_stream") == 1, timeout=10)
    assert _value(r, "grpc_server_msg_received_total", **labels) == 4
    assert _value(r, "grpc_server_msg_sent_total", **labels) == 4
    pages = list(stub.Dump(pb.DumpRequest(page_size=2), metadata=AUTH))
    assert len(pages) >= 3
    dump = dict(grpc_type="server_stream", grpc_service=SERVICE, grpc_method="Dump")
    wait_for(lambda: _handled(r, "Dump", "OK", "server_stream") == 1, timeout=10)
    assert _value(r, "grpc_server_msg_sent_total", **dump) == len(pages)
    assert _value(r, "grpc_server_msg_received_total", **dump) == 1


def test_a_cancelled_stream_and_an_expired_deadline_are_counted_once_each(served):
    svc, stub, _ = served
    r = svc.registry

    ended = threading.Event()

    def forever():  # one heartbeat, then nothing more: the stream stays open until the client ends it
        yield pb.HeartbeatRequest(datanode_id=2, region_ids=[7])
        ended.wait(30)

    def ended_streams() -> float:
        return sum(
            s.value for m in r.collect() for s in m.samples
            if s.name == "grpc_server_handled_total" and s.labels["grpc_method"] == "SendHeartbeat"
        )

    call = stub.SendHeartbeat(forever(), metadata=AUTH)
    next(call)
    call.cancel()
    # The client's cancel reaches the handler as the end of its stream: ended, once, whatever the code.
    wait_for(lambda: ended_streams() == 1, timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.SendHeartbeat(forever(), metadata=AUTH, timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: _handled(r, "SendHeartbeat", "DeadlineExceeded", "bidi_stream") == 1, timeout=10)
    assert _started(r, "SendHeartbeat", "bidi_stream") == 2
    ended.set()


def test_health_checks_are_counted_under_their_own_service_and_unknown_methods_are_not(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    svc, _, channel = served
    r = svc.registry
    before = _handled(r, "Check", "OK", service="grpc.health.v1.Health")  # the readiness probe's
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    wait_for(lambda: _handled(r, "Check", "OK", service="grpc.health.v1.Health") == before + 1, timeout=10)
    unknown = channel.unary_unary(f"/{SERVICE}/NoSuchMethod" + "x" * 500)
    with pytest.raises(grpc.RpcError) as err:
        unknown(b"", metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # A caller choosing method names must not make series: unknown methods are not counted.
    names = {s.labels.get("grpc_method") for m in r.collect() for s in m.samples if m.name.startswith("grpc_server")}
    assert not any(name and name.startswith("NoSuchMethod") for name in names)


def test_streams_ended_by_a_shutdown_are_counted_unavailable(service):
    svc = service()
    channel = grpc.insecure_channel(svc.addresses.grpc)
    stub = pb_grpc.RegionSupervisorStub(channel)
    ended = threading.Event()

    def open_stream():
        yield pb.HeartbeatRequest(datanode_id=3, region_ids=[5])
        ended.wait(30)

    calls = [stub.SendHeartbeat(open_stream()) for _ in range(3)]
    for call in calls:
        next(call)
    svc.request_stop()
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    codes = lambda: {c: _handled(svc.registry, "SendHeartbeat", c, "bidi_stream") for c in ("OK", "Unavailable", "Canceled", "Unknown")}  # noqa: E731
    wait_for(lambda: _handled(svc.registry, "SendHeartbeat", "Unavailable", "bidi_stream") == 3, timeout=10,
             message=f"{codes()}")
    ended.set()
    channel.close()
