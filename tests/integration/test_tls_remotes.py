"""The supervisor as a TLS client: TLS-only (mTLS) fake Selector, PeerLookup and RegionMigration, and a
real etcd started with --cert-file, --key-file, --trusted-ca-file and --client-cert-auth."""

from __future__ import annotations

import signal

import grpc
import pytest

from supervisor_service.remotes import GrpcRegionMigration, RemoteError
from supervisor_service.security.tls import ClientTLS, channel
from supervisor_service.store import EtcdKV, StoreError, parse_endpoints
from tests.support.datanodes import Cluster
from tests.support.fakes import FakePeerLookup, FakeRegionMigration, FakeSelector, peer, wait_for
from tests.support.readiness import leading
from tests.support.servers import EtcdServer, ServiceProcess

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(90)]


def mtls_only(files) -> grpc.ServerCredentials:
    """What a remote service in a secured cluster serves: TLS only, a client certificate of `files`' CA required."""
    pair = (files["server-key"].read_bytes(), files["server"].read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=files["ca"].read_bytes(),
                                       require_client_auth=True)


def test_the_supervisor_fails_over_through_tls_only_remotes(service, cert_files):
    creds = mtls_only(cert_files)
    rm = FakeRegionMigration(credentials=creds)
    sel = FakeSelector([peer(d, f"10.0.0.{d}:4001") for d in (1, 2, 4)], credentials=creds)
    lookup = FakePeerLookup({d: f"10.0.0.{d}:4001" for d in (1, 2, 3)}, credentials=creds)
    try:
        svc = service(tick_interval_ms=100, acceptable_heartbeat_pause_ms=1000, first_heartbeat_estimate_ms=200,
                      max_failed_datanode_fraction=1, region_migration_endpoint=rm.endpoint,
                      selector_endpoint=sel.endpoint, peer_lookup_endpoint=lookup.endpoint,
                      remote_tls_ca_file=str(cert_files["ca"]), remote_tls_cert_file=str(cert_files["metasrv"]),
                      remote_tls_key_file=str(cert_files["metasrv-key"]))
        cluster = Cluster(svc.addresses.grpc)
        try:
            cluster.warm_up()
            cluster.nodes[3].stop()
            wait_for(lambda: rm.submissions, 20, message="no SubmitRegionMigration reached the TLS-only service")
        finally:
            cluster.close()
        assert rm.submissions[0].request.from_peer.id == 3
        assert svc.registry.get_sample_value("supervisor_remote_errors_total",
                                             {"service": "RegionMigration", "code": "UNAVAILABLE"}) is None
    finally:
        for fake in (rm, sel, lookup):
            fake.stop()


def test_a_tls_only_remote_refuses_plaintext_and_a_client_of_another_ca(cert_files, other_ca_files):
    rm = FakeRegionMigration(credentials=mtls_only(cert_files))
    try:
        for tls in (None, ClientTLS(str(cert_files["ca"])),
                    ClientTLS(str(cert_files["ca"]), str(other_ca_files["metasrv"]), str(other_ca_files["metasrv-key"]))):
            client = GrpcRegionMigration(rm.endpoint, 3.0, tls)
            with pytest.raises(RemoteError) as err:
                client.status("p-1")
            assert err.value.code == "UNAVAILABLE"
            client.close()
        good = GrpcRegionMigration(rm.endpoint, 3.0, ClientTLS(str(cert_files["ca"]), str(cert_files["metasrv"]),
                                                               str(cert_files["metasrv-key"])))
        good.status("p-1")
        good.close()
        # remote_tls_server_name: the name checked, whatever host the endpoint names.
        files = (str(cert_files["ca"]), str(cert_files["metasrv"]), str(cert_files["metasrv-key"]))
        named = GrpcRegionMigration(rm.endpoint, 3.0, ClientTLS(*files, server_name="region-supervisor"))
        named.status("p-1")
        named.close()
        wrong = GrpcRegionMigration(rm.endpoint, 3.0, ClientTLS(*files, server_name="selector.other-cluster"))
        with pytest.raises(RemoteError, match="UNAVAILABLE"):
            wrong.status("p-1")
        wrong.close()
    finally:
        rm.stop()


@pytest.fixture
def tls_etcd(tmp_path, cert_files):
    server = EtcdServer(str(tmp_path), tls=cert_files)
    yield server
    server.stop()


def test_the_store_and_the_election_run_on_a_tls_etcd(service, tls_etcd, cert_files):
    svc = service(store=f"etcds://{tls_etcd.endpoint}", etcd_tls_ca_file=str(cert_files["ca"]),
                  etcd_tls_cert_file=str(cert_files["metasrv"]), etcd_tls_key_file=str(cert_files["metasrv-key"]),
                  store_prefix="/region-supervisor/tls")
    assert svc.leadership.is_leader()
    kv = EtcdKV(parse_endpoints(f"etcds://{tls_etcd.endpoint}"), tls=ClientTLS(
        str(cert_files["ca"]), str(cert_files["admin"]), str(cert_files["admin-key"])))
    try:
        assert "/region-supervisor/tls/leader" in kv.read_prefix("/region-supervisor/tls/")
    finally:
        kv.close()


def test_a_tls_etcd_refuses_plaintext_and_a_client_without_a_certificate(tls_etcd, cert_files):
    for kv in (EtcdKV(parse_endpoints(f"etcd://{tls_etcd.endpoint}"), timeout_s=2),
               EtcdKV(parse_endpoints(f"etcds://{tls_etcd.endpoint}"), timeout_s=2,
                      tls=ClientTLS(str(cert_files["ca"])))):
        try:
            with pytest.raises(StoreError):
                kv.read_prefix("/x/")
        finally:
            kv.close()


def _leads(addr: str, tls: ClientTLS) -> bool:
    with channel(addr, tls) as ch:
        return leading(ch)


def test_two_replicas_all_tls_elect_and_take_over_on_a_tls_etcd(tmp_path, tls_etcd, cert_files):
    """Every link TLS: the replicas' ports (mTLS), their store and election on etcd (client certificates)."""
    env = {
        "SUPERVISOR_STORE": f"etcds://{tls_etcd.endpoint}", "SUPERVISOR_STORE_PREFIX": "/region-supervisor/tls-ha",
        "SUPERVISOR_LEADER_LEASE_TTL_MS": "2000",
        "SUPERVISOR_ETCD_TLS_CA_FILE": str(cert_files["ca"]),
        "SUPERVISOR_ETCD_TLS_CERT_FILE": str(cert_files["metasrv"]),
        "SUPERVISOR_ETCD_TLS_KEY_FILE": str(cert_files["metasrv-key"]),
        "SUPERVISOR_TLS_CERT_FILE": str(cert_files["server"]), "SUPERVISOR_TLS_KEY_FILE": str(cert_files["server-key"]),
        "SUPERVISOR_TLS_CLIENT_CA_FILE": str(cert_files["ca"]),
    }
    tls = ClientTLS(str(cert_files["ca"]), str(cert_files["admin"]), str(cert_files["admin-key"]))
    replicas = [ServiceProcess(env, str(tmp_path / f"replica-{i}.log"), client_tls=tls) for i in range(2)]
    try:
        for replica in replicas:
            replica.wait_serving(30)
        wait_for(lambda: any(_leads(r.addr, tls) for r in replicas), 20, message="no leader over TLS")
        leader = next(r for r in replicas if _leads(r.addr, tls))
        other = next(r for r in replicas if r is not leader)
        leader.kill(signal.SIGKILL)
        wait_for(lambda: _leads(other.addr, tls), 20, message="the other replica did not take over")
    finally:
        for replica in replicas:
            replica.stop()
