"""Roles and identity against the real service over the wire (named tokens; certificates in
test_mtls_identity.py): every RPC x every role, health open, a datanode speaking only for itself,
the policy re-read on change, and the audit trail of accepted and refused calls."""

from __future__ import annotations

import queue
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from supervisor_service.app.settings import ConfigError, load_settings
from supervisor_service.proto import pb
from tests.support.roles import IDENTITIES, LEGACY_TOKEN, bearer, write_security_files
from tests.support.roles import allowed as role_allows
from tests.support.service import ServiceFactory

SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"]
TIMEOUT = 10


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    factory = ServiceFactory()
    files = write_security_files(tmp_path_factory.mktemp("security"))
    svc = factory(security_file_check_interval_ms=0, audit_refusal_interval_ms=60_000, **files)
    channel = grpc.insecure_channel(svc.addresses.grpc)
    yield svc, channel
    channel.close()
    factory.close()


class Heartbeats:
    """One SendHeartbeat stream: `send` writes a request and reads its answer."""

    def __init__(self, channel, metadata) -> None:
        self._outbox: queue.Queue = queue.Queue()
        call = channel.stream_stream("/supervisor.v1.RegionSupervisor/SendHeartbeat",
                                     request_serializer=pb.HeartbeatRequest.SerializeToString,
                                     response_deserializer=pb.HeartbeatResponse.FromString)
        self._answers = call(iter(self._outbox.get, None), metadata=metadata, timeout=TIMEOUT)

    def send(self, datanode_id: int, region_ids=()) -> pb.HeartbeatResponse:
        self._outbox.put(pb.HeartbeatRequest(datanode_id=datanode_id, region_ids=list(region_ids)))
        return next(self._answers)

    def close(self) -> None:
        self._outbox.put(None)
        self._answers.cancel()


def call_rpc(channel, method, metadata) -> grpc.StatusCode:
    """`method` of the descriptor called with an empty request (a heartbeat of datanode 1): its code."""
    path = f"/{SERVICE.full_name}/{method.name}"
    request_type = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]._concrete_class
    try:
        if method.client_streaming:
            stream = Heartbeats(channel, metadata)
            try:
                stream.send(1, [1])
            finally:
                stream.close()
        elif method.server_streaming:
            list(channel.unary_stream(path, request_serializer=request_type.SerializeToString)(
                request_type(), metadata=metadata, timeout=TIMEOUT))
        else:
            channel.unary_unary(path, request_serializer=request_type.SerializeToString)(
                request_type(), metadata=metadata, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_each_role_may_call_exactly_its_rpcs_and_is_refused_the_others(secured):
    svc, channel = secured
    wrong = []
    for identity, (_, role) in IDENTITIES.items():
        for method in SERVICE.methods:
            code = call_rpc(channel, method, bearer(identity))
            refused = code == grpc.StatusCode.PERMISSION_DENIED
            if refused == role_allows(role, method.name) or code == grpc.StatusCode.UNAUTHENTICATED:
                wrong.append(f"{identity} ({role}) {method.name}: {code.name}")
    assert not wrong, "\n".join(wrong)


def test_a_refusal_names_the_identity_the_rpc_and_the_role_it_needs(secured):
    svc, channel = secured
    stub_call = channel.unary_unary(f"/{SERVICE.full_name}/SetMaintenanceMode",
                                    request_serializer=pb.SetMaintenanceModeRequest.SerializeToString)
    with pytest.raises(grpc.RpcError) as err:
        stub_call(pb.SetMaintenanceModeRequest(enabled=True), metadata=bearer("reader-bob"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = err.value.details()
    assert "'reader-bob'" in details and "SetMaintenanceMode" in details and "role operator" in details
    assert "role reader" in details
    with pytest.raises(grpc.RpcError) as err:
        stub_call(pb.SetMaintenanceModeRequest(enabled=True), metadata=bearer("stranger"), timeout=TIMEOUT)
    assert "'stranger'" in err.value.details() and "no role" in err.value.details()


def test_without_a_known_token_every_call_but_health_is_unauthenticated(secured):
    svc, channel = secured
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "Basic YWxpY2U6eA=="),),
                     (("authorization", "Bearer " + "x" * 5000),)):
        for method in SERVICE.methods:
            assert call_rpc(channel, method, metadata) == grpc.StatusCode.UNAUTHENTICATED, (metadata[:1], method.name)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
    assert svc.registry.get_sample_value(
        "supervisor_calls_refused_total", {"method": "RegisterDetectors", "code": "UNAUTHENTICATED"}) >= 4


def test_the_legacy_auth_token_is_the_identity_token(secured):
    svc, channel = secured
    legacy = (("authorization", f"Bearer {LEGACY_TOKEN}"),)
    assert call_rpc(channel, SERVICE.methods_by_name["GetMaintenanceMode"], legacy) == grpc.StatusCode.OK
    assert call_rpc(channel, SERVICE.methods_by_name["SetMaintenanceMode"], legacy) == grpc.StatusCode.PERMISSION_DENIED


def test_reflection_is_a_reader_call(secured):
    svc, channel = secured
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def services(metadata):
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            metadata=metadata, timeout=TIMEOUT)
        return [s.name for a in answers for s in a.list_services_response.service]

    assert SERVICE.full_name in services(bearer("reader-bob"))
    assert SERVICE.full_name in services(bearer("ops-alice"))
    for identity in ("datanode-1", "stranger"):
        with pytest.raises(grpc.RpcError) as err:
            services(bearer(identity))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _rows(channel, metadata, datanode_id):
    dump = channel.unary_stream(f"/{SERVICE.full_name}/Dump", request_serializer=pb.DumpRequest.SerializeToString,
                                response_deserializer=pb.DumpResponse.FromString)
    pages = dump(pb.DumpRequest(datanode_ids=[datanode_id]), metadata=metadata, timeout=TIMEOUT)
    return {r.region_id: r for p in pages for r in p.detectors}


def _audit(channel, **fields) -> list[pb.AuditEntry]:
    call = channel.unary_unary(f"/{SERVICE.full_name}/ListAudit", request_serializer=pb.ListAuditRequest.SerializeToString,
                               response_deserializer=pb.ListAuditResponse.FromString)
    return list(call(pb.ListAuditRequest(**fields), metadata=bearer("reader-bob"), timeout=TIMEOUT).entries)


def _eventually(read, timeout: float = 5.0):
    """`read()` once it returns something: a refusal's entry is written without the refusal waiting for it."""
    deadline = time.monotonic() + timeout
    while not (found := read()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def test_a_datanode_heartbeats_only_as_itself(secured):
    svc, channel = secured
    register = channel.unary_unary(f"/{SERVICE.full_name}/RegisterDetectors",
                                   request_serializer=pb.RegisterDetectorsRequest.SerializeToString)
    register(pb.RegisterDetectorsRequest(regions=[pb.DetectingRegion(datanode_id=22, region_id=220)]),
             metadata=bearer("metasrv"), timeout=TIMEOUT)
    before = _rows(channel, bearer("admin"), 22)
    assert list(before) == [220]
    time.sleep(0.05)  # a heartbeat applied now would move last_heartbeat_millis
    outcome = {"outcome": "rejected_not_own_datanode"}
    counted = svc.registry.get_sample_value("supervisor_heartbeats_total", outcome) or 0
    stream = Heartbeats(channel, bearer("datanode-1"))
    try:
        for _ in range(3):
            answer = stream.send(22, [220, 221])
            assert answer.rejected and answer.accepted_regions == 0
            assert "'datanode-1' may heartbeat as datanode 1 only, not as datanode 22" in answer.reason
        # The same stream goes on, as itself.
        answer = stream.send(1, [10])
        assert not answer.rejected and answer.accepted_regions == 1
    finally:
        stream.close()
    after = _rows(channel, bearer("admin"), 22)
    assert list(after) == [220], "a forged heartbeat added a detector"
    assert after[220].last_heartbeat_millis == before[220].last_heartbeat_millis, "a forged heartbeat refreshed it"
    assert svc.registry.get_sample_value("supervisor_heartbeats_total", outcome) == counted + 3
    assert svc.registry.get_sample_value("supervisor_heartbeat_problems_total", {"reason": "not_own_datanode"}) >= 3
    assert svc.registry.get_sample_value(
        "supervisor_calls_refused_total", {"method": "SendHeartbeat", "code": "PERMISSION_DENIED"}) >= 3
    forged = _eventually(lambda: [e for e in _audit(channel, identity="datanode-1") if e.rpc == "SendHeartbeat"])
    assert forged and forged[0].code == "PERMISSION_DENIED" and "datanode 22" in forged[0].summary
    # datanode-2 is datanode 2.
    own = Heartbeats(channel, bearer("datanode-2"))
    try:
        assert not own.send(2, [20]).rejected
    finally:
        own.close()


def test_the_audit_trail_says_who_switched_maintenance_on_and_why(service, tmp_path):
    svc = service(audit_refusal_interval_ms=60_000, **write_security_files(tmp_path))
    channel = grpc.insecure_channel(svc.addresses.grpc)
    since = int(time.time() * 1000) - 1
    call = channel.unary_unary(f"/{SERVICE.full_name}/SetMaintenanceMode",
                               request_serializer=pb.SetMaintenanceModeRequest.SerializeToString,
                               response_deserializer=pb.MaintenanceModeResponse.FromString)
    answer = call(pb.SetMaintenanceModeRequest(enabled=True, datanode_ids=[7], ttl_millis=60_000,
                                               reason="upgrade of rack 3"),
                  metadata=bearer("ops-alice"), timeout=TIMEOUT)
    assert [d.datanode_id for d in answer.datanodes] == [7]
    entries = _audit(channel, since_millis=since, identity="ops-alice")
    mine = [e for e in entries if e.rpc == "SetMaintenanceMode" and e.code == "OK"]
    assert mine, entries
    e = mine[0]
    assert e.reason == "upgrade of rack 3" and e.leader_term >= 1 and e.peer.startswith("ipv")
    assert "enabled=true" in e.summary and "datanodes 7" in e.summary and "ttl_millis=60000" in e.summary
    # Refused calls are recorded too: a flood of them is one entry, the rest counted.
    for _ in range(50):
        with pytest.raises(grpc.RpcError):
            call(pb.SetMaintenanceModeRequest(enabled=False), metadata=bearer("datanode-2"), timeout=TIMEOUT)
    refused = _eventually(lambda: [x for x in _audit(channel, since_millis=since, identity="datanode-2")
                                   if x.rpc == "SetMaintenanceMode"])
    assert len(refused) == 1 and refused[0].code == "PERMISSION_DENIED", refused
    assert svc.registry.get_sample_value("supervisor_audit_entries_total", {"result": "coalesced"}) >= 49
    # A newest-first, limited read.
    assert len(_audit(channel, limit=1)) == 1
    all_entries = _audit(channel, limit=1000)
    assert [x.at_millis for x in all_entries] == sorted((x.at_millis for x in all_entries), reverse=True)


@pytest.mark.parametrize(("fields", "words"), [
    ({"limit": 10_001}, "limit"), ({"since_millis": -1}, "since_millis"), ({"identity": "x" * 254}, "identity"),
])
def test_list_audit_bounds(secured, fields, words):
    svc, channel = secured
    with pytest.raises(grpc.RpcError) as err:
        _audit(channel, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


@pytest.mark.parametrize("reason", ["x" * 1025, "two\nlines", "nul\x00"])
def test_a_reason_is_bounded_and_one_line(secured, reason):
    svc, channel = secured
    call = channel.unary_unary(f"/{SERVICE.full_name}/SetMaintenanceMode",
                               request_serializer=pb.SetMaintenanceModeRequest.SerializeToString)
    with pytest.raises(grpc.RpcError) as err:
        call(pb.SetMaintenanceModeRequest(enabled=False, reason=reason), metadata=bearer("admin"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in err.value.details()


def test_the_policy_is_re_read_when_it_changes_and_a_bad_change_keeps_the_last(service, tmp_path):
    files = write_security_files(tmp_path)
    svc = service(security_file_check_interval_ms=0, **files)
    channel = grpc.insecure_channel(svc.addresses.grpc)
    try:
        set_maintenance = SERVICE.methods_by_name["SetMaintenanceMode"]
        assert call_rpc(channel, set_maintenance, bearer("reader-bob")) == grpc.StatusCode.PERMISSION_DENIED
        policy = tmp_path / "policy.toml"
        policy.write_text(policy.read_text().replace('"reader-*" = "reader"', '"reader-*" = "operator"'))
        assert call_rpc(channel, set_maintenance, bearer("reader-bob")) == grpc.StatusCode.OK
        policy.write_text('[roles]\n"reader-*" = "superuser"\n')  # a mistake: the last valid policy stays
        assert call_rpc(channel, set_maintenance, bearer("reader-bob")) == grpc.StatusCode.OK
        assert svc.registry.get_sample_value("supervisor_security_file_reloads_total",
                                             {"file": "policy", "result": "rejected"}) == 1
        policy.write_text('bind_datanode_ids = false\n[roles]\n"datanode-*" = "datanode"\ntoken = "reader"\n')
        stream = Heartbeats(channel, bearer("datanode-1"))
        try:
            assert not stream.send(5, [50]).rejected  # lifted: datanode-1 may speak for 5
        finally:
            stream.close()
        assert call_rpc(channel, set_maintenance, bearer("reader-bob")) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()


def test_a_bad_policy_or_tokens_file_fails_the_start_with_one_line(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[roles]\n"ops-*" = "operater"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(authz_policy_file=str(policy))
    message = str(err.value)
    assert "\n" not in message and "authz_policy_file" in message and str(policy) in message
    assert "'ops-*'" in message and "unknown role 'operater'" in message
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[tokens]\nops = "hunter2"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(auth_tokens_file=str(tokens))
    assert "\n" not in str(err.value) and str(tokens) in str(err.value) and "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(authz_policy_file=str(tmp_path / "missing.toml"))


def test_an_open_stream_ends_when_its_token_is_revoked_or_its_role_taken(service, tmp_path):
    files = write_security_files(tmp_path)
    svc = service(security_file_check_interval_ms=0, **files)
    channel = grpc.insecure_channel(svc.addresses.grpc)
    tokens, policy = tmp_path / "tokens.toml", tmp_path / "policy.toml"
    try:
        one, two = Heartbeats(channel, bearer("datanode-1")), Heartbeats(channel, bearer("datanode-2"))
        assert not one.send(1, [10]).rejected and not two.send(2, [20]).rejected
        # datanode-1's token is revoked: its open stream ends at its next heartbeat; datanode-2's goes on.
        tokens.write_text("\n".join(line for line in tokens.read_text().splitlines()
                                    if not line.startswith('"datanode-1"')) + "\n")
        with pytest.raises(grpc.RpcError) as err:
            one.send(1, [10])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "no longer known" in err.value.details()
        assert not two.send(2, [20]).rejected
        # datanodes become readers: datanode-2's open stream ends too.
        policy.write_text(policy.read_text().replace('"datanode-*" = "datanode"', '"datanode-*" = "reader"'))
        with pytest.raises(grpc.RpcError) as err:
            two.send(2, [20])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'datanode-2'" in err.value.details()
        assert svc.registry.get_sample_value(
            "supervisor_calls_refused_total", {"method": "SendHeartbeat", "code": "UNAUTHENTICATED"}) == 1
    finally:
        channel.close()


@pytest.mark.parametrize(("metadata", "expected"), [
    ((("authorization", "Bearer " + "x" * 7000),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization-bin", b"\x00\xff" * 10),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer nope"), ("authorization", "Bearer bob-token")), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer  bob-token "),), grpc.StatusCode.OK),
    ((("authorization", "bearer bob-token"),), grpc.StatusCode.OK),
    ((("authorization", "Bearer bob-token"), ("x-identity", "admin")), grpc.StatusCode.OK),
])
def test_hostile_authorization_metadata_gets_a_clear_status(secured, metadata, expected):
    svc, channel = secured
    assert call_rpc(channel, SERVICE.methods_by_name["GetMaintenanceMode"], metadata) == expected
    # Whatever a caller claims in metadata, bob stays a reader.
    assert call_rpc(channel, SERVICE.methods_by_name["SetMaintenanceMode"], metadata) in (
        grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
