"""Identity from real client certificates made in the test run: an in-process service whose port
speaks mTLS through its own TLS settings (tls_cert_file, tls_key_file, tls_client_ca_file)."""

from __future__ import annotations

import queue
import time

import grpc
import pytest

from supervisor_service.app.service import Service
from supervisor_service.app.settings import load_settings
from supervisor_service.proto import pb, pb_grpc
from supervisor_service.security.certs import write_bundle
from tests.support.roles import POLICY, sha256_ref
from tests.support.service import SERVICE_DEFAULTS, ServiceThread

TIMEOUT = 10


@pytest.fixture
def mtls_service(tmp_path):
    files = write_bundle(tmp_path / "certs", datanodes=3)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[tokens]\n"datanode-3" = "{sha256_ref("dn3-token")}"\n')
    svc = Service(load_settings(**{**SERVICE_DEFAULTS, "authz_policy_file": str(policy),
                                   "auth_tokens_file": str(tokens), "tls_cert_file": str(files["server"]),
                                   "tls_key_file": str(files["server-key"]), "tls_client_ca_file": str(files["ca"])}))
    runner = ServiceThread(svc)
    runner.start(15)

    def channel(identity: str) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(files["ca"].read_bytes(), files[f"{identity}-key"].read_bytes(),
                                             files[identity].read_bytes())
        return grpc.secure_channel(svc.addresses.grpc, creds)

    with channel("admin") as admin:
        stub = pb_grpc.RegionSupervisorStub(admin)
        deadline = time.monotonic() + 15
        while True:
            try:
                if stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=1).is_leader:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the mTLS service did not lead within 15 s"
            time.sleep(0.05)
    yield svc, channel
    runner.stop(15)


def heartbeat(channel: grpc.Channel, datanode_id: int, metadata=()) -> pb.HeartbeatResponse:
    outbox: queue.Queue = queue.Queue()
    answers = pb_grpc.RegionSupervisorStub(channel).SendHeartbeat(iter(outbox.get, None), metadata=metadata,
                                                                  timeout=TIMEOUT)
    outbox.put(pb.HeartbeatRequest(datanode_id=datanode_id, region_ids=[datanode_id * 10]))
    try:
        return next(answers)
    finally:
        outbox.put(None)
        answers.cancel()


def test_the_certificate_is_the_identity_and_its_role_applies(mtls_service):
    svc, channel = mtls_service
    with channel("datanode-1") as dn1:
        assert not heartbeat(dn1, 1).rejected
        forged = heartbeat(dn1, 2)
        assert forged.rejected and "'datanode-1' may heartbeat as datanode 1 only" in forged.reason
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RegionSupervisorStub(dn1).Dump(pb.DumpRequest(), timeout=TIMEOUT).next()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'datanode-1'" in err.value.details()
    with channel("metasrv") as metasrv:
        stub = pb_grpc.RegionSupervisorStub(metasrv)
        assert stub.RegisterDetectors(pb.RegisterDetectorsRequest(
            regions=[pb.DetectingRegion(datanode_id=2, region_id=20)]), timeout=TIMEOUT).affected == 1
        with pytest.raises(grpc.RpcError) as err:
            stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=True), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'metasrv'" in err.value.details() and "role operator" in err.value.details()
    with channel("ops-alice") as ops:
        stub = pb_grpc.RegionSupervisorStub(ops)
        stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=True, reason="rack 3 firmware"), timeout=TIMEOUT)
        entries = stub.ListAudit(pb.ListAuditRequest(identity="ops-alice"), timeout=TIMEOUT).entries
        assert [(e.rpc, e.reason) for e in entries] == [("SetMaintenanceMode", "rack 3 firmware")]
        assert entries[0].peer.startswith("ipv4:127.0.0.1:")


def test_a_token_on_a_certificate_connection_is_the_identity_and_a_bad_one_is_refused(mtls_service):
    svc, channel = mtls_service
    with channel("datanode-1") as dn1:
        # The token names datanode-3: it speaks for 3 on this connection, not for 1.
        assert not heartbeat(dn1, 3, (("authorization", "Bearer dn3-token"),)).rejected
        assert heartbeat(dn1, 1, (("authorization", "Bearer dn3-token"),)).rejected
        with pytest.raises(grpc.RpcError) as err:
            heartbeat(dn1, 1, (("authorization", "Bearer not-a-token"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
