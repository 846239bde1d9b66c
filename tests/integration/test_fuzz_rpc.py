"""Every unary and server-streaming RPC of a real server, fuzzed (README "Fuzzing").

One real in-process service (grpc.aio, the memory store, small limits so that "huge" is reachable:
1,000 regions per request or heartbeat, 1 MiB messages) serves the whole module. Each example sends
one request, as bytes through a generic channel method so that the server's own parsing is
exercised: a message built from the request's descriptor with edge values in its fields
(`tests.support.fuzzing.message`), or such a message truncated, damaged, carrying non-UTF-8 bytes in
a string field, or plain garbage (`fuzzing.wire`).

Properties, for every example:
- the status is never UNKNOWN or INTERNAL, and bytes that do not parse are INVALID_ARGUMENT;
- an OK answer parses as the response type (every page of a Dump);
- a refused state-changing call (Register, Deregister, Reset, SetMaintenanceMode,
  ReleaseFailoverHold) leaves the state as it was (the detectors, the maintenance switches);
- the service stays SERVING, and a Dump of everything stays consistent (one `total` on every page,
  which is the number of rows, no detector twice).
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import example, given
from hypothesis import strategies as st

from supervisor_service.proto import pb
from tests.support.fuzzing import examples, wire
from tests.support.readiness import serving
from tests.support.service import ServiceFactory

pytestmark = [pytest.mark.timeout(300)]

SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
LIMIT = 1000
FUZZ_SETTINGS = dict(
    tick_interval_ms=600_000,  # no tick: the state changes only through the calls
    max_regions_per_request=LIMIT,
    max_regions_per_heartbeat=LIMIT,
    max_message_bytes=1 << 20,
    max_dump_page_size=LIMIT,
)
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
STATE_CHANGING = ("RegisterDetectors", "DeregisterDetectors", "ResetDetectors", "SetMaintenanceMode",
                  "ReleaseFailoverHold")
RPC_TIMEOUT = 20.0


def _message_class(descriptor):
    return descriptor._concrete_class


METHODS = [m for m in SERVICE.methods if not m.client_streaming]  # SendHeartbeat: its own module


class Fuzzed:
    """The service under fuzz, a channel to it, and the generic calls of every method."""

    def __init__(self) -> None:
        self.factory = ServiceFactory()
        self.svc = self.factory(**FUZZ_SETTINGS)
        self.channel = grpc.insecure_channel(self.svc.addresses.grpc)

    def call(self, method, raw: bytes) -> tuple[grpc.StatusCode, str, list[bytes]]:
        path = f"/{method.containing_service.full_name}/{method.name}"
        try:
            if method.server_streaming:
                stream = self.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
                call = stream(raw, timeout=RPC_TIMEOUT)
                answers = []
                for answer in call:
                    answers.append(answer)
                    if len(answers) > 10_000:
                        call.cancel()
                        raise AssertionError(f"{path}: endless stream")
                return grpc.StatusCode.OK, "", answers
            unary = self.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            return grpc.StatusCode.OK, "", [unary(raw, timeout=RPC_TIMEOUT)]
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", []

    def dump(self) -> list[pb.DumpResponse]:
        code, details, pages = self.call(SERVICE.methods_by_name["Dump"], pb.DumpRequest(page_size=LIMIT)
                                         .SerializeToString())
        assert code == grpc.StatusCode.OK, (code, details)
        return [pb.DumpResponse.FromString(p) for p in pages]

    def state(self) -> tuple:
        """What a refused call must not change: the detectors and the maintenance switches."""
        pages = self.dump()
        pairs = [(d.datanode_id, d.region_id) for p in pages for d in p.detectors]
        code, details, [raw] = self.call(SERVICE.methods_by_name["GetMaintenanceMode"], b"")
        maintenance = pb.MaintenanceModeResponse.FromString(raw)
        switches = (maintenance.enabled, sorted(d.datanode_id for d in maintenance.datanodes))
        return sorted(pairs), switches

    def check_consistent(self) -> None:
        pages = self.dump()
        totals = {p.total for p in pages}
        rows = [(d.datanode_id, d.region_id) for p in pages for d in p.detectors]
        assert len(totals) <= 1, totals
        assert not pages or pages[0].total == len(rows), (pages[0].total, len(rows))
        assert len(set(rows)) == len(rows), "a detector twice in one Dump"
        assert all(p.is_leader for p in pages)
        assert serving(self.channel, timeout=5), "the service is no longer SERVING"

    def clean(self) -> None:
        """Deregister every detector and switch maintenance off: each example starts from the same state."""
        pairs = self.state()[0]
        for i in range(0, len(pairs), LIMIT):
            chunk = [pb.DetectingRegion(datanode_id=d, region_id=r) for d, r in pairs[i:i + LIMIT]]
            code, details, _ = self.call(SERVICE.methods_by_name["DeregisterDetectors"],
                                         pb.DeregisterDetectorsRequest(regions=chunk).SerializeToString())
            assert code == grpc.StatusCode.OK, (code, details)
        off = SERVICE.methods_by_name["SetMaintenanceMode"]
        for datanodes in ([], self.state()[1][1]):
            for i in range(0, max(1, len(datanodes)), LIMIT):
                request = pb.SetMaintenanceModeRequest(enabled=False, datanode_ids=datanodes[i:i + LIMIT])
                code, details, _ = self.call(off, request.SerializeToString())
                assert code == grpc.StatusCode.OK, (code, details)

    def close(self) -> None:
        self.channel.close()
        self.factory.close()


@pytest.fixture(scope="module")
def fuzzed():
    target = Fuzzed()
    yield target
    target.check_consistent()
    target.close()


def _decodes(cls, raw: bytes) -> bool:
    try:
        cls.FromString(raw)
    except Exception:  # noqa: BLE001 - any parse failure
        return False
    return True


def check_one(fuzzed: Fuzzed, method, raw: bytes) -> None:
    request_cls = _message_class(method.input_type)
    response_cls = _message_class(method.output_type)
    changing = method.name in STATE_CHANGING
    before = fuzzed.state() if changing else None
    code, details, answers = fuzzed.call(method, raw)
    assert code not in NEVER, (method.name, raw[:64], code, details)
    if not _decodes(request_cls, raw):
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
            method.name, raw[:64], code, details)
    if code == grpc.StatusCode.OK:
        for answer in answers:
            response_cls.FromString(answer)
    elif changing:
        assert fuzzed.state() == before, f"{method.name} refused with {code.name} ({details}) but changed the state"
    assert len(details) < 2000, "an error message that echoes the input"


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@examples(40)
@given(data=st.data())
def test_every_rpc_answers_fuzzed_requests_with_a_status_of_its_own(fuzzed, method, data):
    raw = data.draw(wire(_message_class(method.input_type)), label="request")
    try:
        check_one(fuzzed, method, raw)
    finally:
        fuzzed.clean()
    fuzzed.check_consistent()


HEALTH_CHECK = HEALTH.methods_by_name["Check"]


@examples(30)
@given(raw=wire(health_pb2.HealthCheckRequest))
@example(raw=b"\x0a\x02\xff\xfe")  # a service name that is not UTF-8
@example(raw=b"\x0a" + b"\xff" * 5 + b"\x0f")  # a length of 2**35
def test_health_checks_answer_fuzzed_requests(fuzzed, raw):
    code, details, answers = fuzzed.call(HEALTH_CHECK, raw)
    assert code not in NEVER, (raw, code, details)
    if not _decodes(health_pb2.HealthCheckRequest, raw):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (raw, code, details)
    assert serving(fuzzed.channel, timeout=5)


def test_an_unknown_method_is_unimplemented(fuzzed):
    for name in ("Nope", "SendHeartbeat2", "dump", ""):
        code, details, _ = fuzzed.call(_FakeMethod(SERVICE.full_name, name), b"\x08\x01")
        assert code == grpc.StatusCode.UNIMPLEMENTED, (name, code, details)
    code, details, _ = fuzzed.call(_FakeMethod("supervisor.v2.RegionSupervisor", "Dump"), b"")
    assert code == grpc.StatusCode.UNIMPLEMENTED, (code, details)


class _FakeMethod:
    """A method descriptor's two names, for a method the server does not have."""

    server_streaming = False

    def __init__(self, service: str, name: str) -> None:
        self.name = name
        self.containing_service = type("S", (), {"full_name": service})
