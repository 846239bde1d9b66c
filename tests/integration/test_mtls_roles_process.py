"""Certificates, roles and the audit trail together, from outside: a real `serve` process with TLS, mTLS
and a policy file, callers identified by the client certificates made in the test run (no token at
all). Each identity may do what its role allows and nothing else; a datanode certificate speaks only
for its own datanode; the trail names the certificate's identity, its reason and the refusals."""

from __future__ import annotations

import time

import grpc
import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.security.tls import ClientTLS
from tests.support.roles import POLICY
from tests.support.servers import ServiceProcess

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]


@pytest.fixture
def mtls_service(tmp_path, cert_files):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    env = {
        "SUPERVISOR_TLS_CERT_FILE": str(cert_files["server"]), "SUPERVISOR_TLS_KEY_FILE": str(cert_files["server-key"]),
        "SUPERVISOR_TLS_CLIENT_CA_FILE": str(cert_files["ca"]), "SUPERVISOR_AUTHZ_POLICY_FILE": str(policy),
        "SUPERVISOR_STORE": "sqlite", "SUPERVISOR_DATA_DIR": str(tmp_path / "data"), "SUPERVISOR_METRICS_ADDR": "",
        "SUPERVISOR_TICK_INTERVAL_MS": "100", "SUPERVISOR_AUDIT_REFUSAL_INTERVAL_MS": "60000",
    }
    proc = ServiceProcess(env, str(tmp_path / "service.log"), client_tls=tls_of(cert_files, "admin"))
    try:
        proc.wait_serving(30, leader=True)
        yield proc
    finally:
        proc.stop()


def tls_of(files, identity: str) -> ClientTLS:
    return ClientTLS(str(files["ca"]), str(files[identity]), str(files[f"{identity}-key"]))


def test_certificate_identities_get_their_roles_and_the_trail_names_them(mtls_service, cert_files):
    addr = mtls_service.addr
    with SupervisorClient(addr, tls=tls_of(cert_files, "ops-alice"), timeout=5) as alice:
        assert alice.set_maintenance(True, reason="upgrade of rack 3") is True
        with pytest.raises(grpc.RpcError) as refused:
            alice.register([(1, 10)])
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = refused.value.details() or ""
        assert "ops-alice" in details and "RegisterDetectors" in details and "metasrv" in details, details
    with SupervisorClient(addr, tls=tls_of(cert_files, "metasrv"), timeout=5) as metasrv:
        assert metasrv.register([(2, 20)], reason="table 7 created") == 1
        with pytest.raises(grpc.RpcError) as refused:
            metasrv.set_maintenance(False)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with SupervisorClient(addr, tls=tls_of(cert_files, "admin"), timeout=5) as admin:
        assert admin.get_maintenance() is True  # metasrv's refused call changed nothing
        # Accepted calls are answered once recorded; refusals are recorded without making the caller wait.
        deadline = time.monotonic() + 10
        while True:
            by = {(e.identity, e.rpc, e.code): e for e in admin.audit(limit=100)}
            if ("metasrv", "SetMaintenanceMode", "PERMISSION_DENIED") in by or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    on = by[("ops-alice", "SetMaintenanceMode", "OK")]
    assert on.reason == "upgrade of rack 3" and "enabled=true" in on.summary and on.leader_term >= 1
    assert by[("metasrv", "RegisterDetectors", "OK")].reason == "table 7 created"
    assert ("ops-alice", "RegisterDetectors", "PERMISSION_DENIED") in by
    assert ("metasrv", "SetMaintenanceMode", "PERMISSION_DENIED") in by


def test_a_datanode_certificate_heartbeats_as_its_own_datanode_only(mtls_service, cert_files):
    addr = mtls_service.addr
    own = DatanodeHeartbeater(addr, 1, lambda: [10], interval_s=0.1, tls=tls_of(cert_files, "datanode-1")).start()
    forged = DatanodeHeartbeater(addr, 2, lambda: [20], interval_s=0.1, tls=tls_of(cert_files, "datanode-1")).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (forged.rejections and own.last_response is not None):
            time.sleep(0.1)
        assert own.last_response is not None and not own.rejected and own.rejections == {}
        assert forged.rejected and forged.last_rejection is not None
        assert "datanode-1" in forged.last_rejection.reason and "datanode 1 only" in forged.last_rejection.reason
        with SupervisorClient(addr, tls=tls_of(cert_files, "admin"), timeout=5) as admin:
            _, rows = admin.dump()
        assert {(r.datanode_id, r.region_id) for r in rows} == {(1, 10)}  # nothing of datanode 2 was taken
    finally:
        own.stop()
        forged.stop()


def test_a_datanode_certificate_may_not_read(mtls_service, cert_files):
    with SupervisorClient(mtls_service.addr, tls=tls_of(cert_files, "datanode-2"), timeout=5) as dn2:
        with pytest.raises(grpc.RpcError) as refused:
            dn2.dump()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = refused.value.details() or ""
    assert "datanode-2" in details and "Dump" in details and "reader" in details, details
