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

from tests.support.fuzzed_service import SERVICE, Fuzzed
from tests.support.fuzzing import examples, wire
from tests.support.readiness import serving
from tests.support.wire import decodes

pytestmark = [pytest.mark.timeout(300)]

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
STATE_CHANGING = ("RegisterDetectors", "DeregisterDetectors", "ResetDetectors", "SetMaintenanceMode",
                  "ReleaseFailoverHold")


def _message_class(descriptor):
    return descriptor._concrete_class


METHODS = [m for m in SERVICE.methods if not m.client_streaming]  # SendHeartbeat: its own module


@pytest.fixture(scope="module")
def fuzzed():
    target = Fuzzed()
    yield target
    target.check_consistent()
    target.close()


def check_one(fuzzed: Fuzzed, method, raw: bytes) -> None:
    request_cls = _message_class(method.input_type)
    response_cls = _message_class(method.output_type)
    changing = method.name in STATE_CHANGING
    before = fuzzed.state() if changing else None  # (a read-only call cannot change it)
    code, details, answers = fuzzed.call(method, raw)
    assert code not in NEVER, (method.name, raw[:64], code, details)
    if not decodes(request_cls, raw):
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
            method.name, raw[:64], code, details)
    if code == grpc.StatusCode.OK:
        for answer in answers:
            response_cls.FromString(answer)
        if method.name in ("RegisterDetectors", "DeregisterDetectors", "ResetDetectors"):
            check_applied(method.name, request_cls.FromString(raw), response_cls.FromString(answers[0]),
                          set(before[0]), set(fuzzed.state()[0]))
    elif changing:
        assert fuzzed.state() == before, f"{method.name} refused with {code.name} ({details}) but changed the state"
    assert len(details) < 2000, "an error message that echoes the input"


def check_applied(name: str, request, response, before: set, after: set) -> None:
    """An accepted Register, Deregister or Reset did what it says, to those detectors only."""
    asked = {(r.datanode_id, r.region_id) for r in request.regions}
    assert after - asked == before - asked, f"{name} changed detectors it was not asked about"
    if name == "DeregisterDetectors":
        assert not asked & after
        assert response.affected == len(asked & before), (response.affected, len(asked & before))
    else:
        assert asked <= after
        if name == "RegisterDetectors":
            assert response.affected == len(asked - before), (response.affected, len(asked - before))


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@examples(30)
@given(data=st.data())
def test_every_rpc_answers_fuzzed_requests_with_a_status_of_its_own(fuzzed, method, data):
    raw = data.draw(wire(_message_class(method.input_type)), label="request")
    try:
        check_one(fuzzed, method, raw)
    finally:
        if method.name in STATE_CHANGING:
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
    if not decodes(health_pb2.HealthCheckRequest, raw):
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
