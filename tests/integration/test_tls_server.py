"""The gRPC port with TLS and mTLS, certificates made in the test run: who is refused, and a
certificate replaced on disk served to new connections without a restart while open heartbeat
streams keep flowing until the connection max age makes them handshake again."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.proto import pb, pb_grpc
from supervisor_service.security.tls import ClientTLS, channel

SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"].full_name


def client_tls(files, identity: str | None = "admin", ca=None) -> ClientTLS:
    ca_file = str(ca or files["ca"])
    if identity is None:
        return ClientTLS(ca_file)
    return ClientTLS(ca_file, str(files[identity]), str(files[f"{identity}-key"]))


def tls_settings(files, *, mtls: bool = True, **more):
    settings = {"tls_cert_file": str(files["server"]), "tls_key_file": str(files["server-key"]), **more}
    if mtls:
        settings["tls_client_ca_file"] = str(files["ca"])
    return settings


def check(addr: str, tls: ClientTLS | None, timeout: float = 3.0):
    """The health status, or the status code the call failed with."""
    with channel(addr, tls) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                        timeout=timeout).status
        except grpc.RpcError as exc:
            return exc.code()


def test_a_plaintext_client_is_refused_by_a_tls_port(service, cert_files):
    svc = service(**tls_settings(cert_files, mtls=False), client_tls=client_tls(cert_files, None))
    addr = svc.addresses.grpc
    assert check(addr, None) == grpc.StatusCode.UNAVAILABLE
    assert check(addr, client_tls(cert_files, None)) == health_pb2.HealthCheckResponse.SERVING
    # A client that trusts another CA does not accept the server either.
    assert check(addr, ClientTLS(str(cert_files["admin"]))) == grpc.StatusCode.UNAVAILABLE
    # The name checked is the server name given, not the host dialled.
    ca = str(cert_files["ca"])
    assert check(addr, ClientTLS(ca, server_name="region-supervisor")) == health_pb2.HealthCheckResponse.SERVING
    assert check(addr, ClientTLS(ca, server_name="someone-else")) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate_or_with_one_of_another_ca(service, cert_files, other_ca_files):
    svc = service(**tls_settings(cert_files), client_tls=client_tls(cert_files))
    addr = svc.addresses.grpc
    assert check(addr, client_tls(cert_files, None)) == grpc.StatusCode.UNAVAILABLE
    stranger = ClientTLS(str(cert_files["ca"]), str(other_ca_files["admin"]), str(other_ca_files["admin-key"]))
    assert check(addr, stranger) == grpc.StatusCode.UNAVAILABLE
    assert check(addr, None) == grpc.StatusCode.UNAVAILABLE
    with SupervisorClient(addr, tls=client_tls(cert_files, "ops-alice"), timeout=5) as client:
        assert client.maintenance_status().is_leader


def _replace(path, data: bytes) -> None:
    """Write `data` beside `path` and rename it over: how a deployment tool (or a Kubernetes secret
    volume) replaces a file, never a half-written one in place."""
    tmp = f"{path}.new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _open_stream(addr: str, tls: ClientTLS):
    """A raw heartbeat stream: (send queue, answers queue, the call)."""
    ch = channel(addr, tls)
    out: queue.Queue = queue.Queue()
    answers: queue.Queue = queue.Queue()

    def requests():
        while (item := out.get()) is not None:
            yield item

    call = pb_grpc.RegionSupervisorStub(ch).SendHeartbeat(requests())

    def read():
        try:
            for answer in call:
                answers.put(answer)
        except grpc.RpcError as exc:
            answers.put(exc)

    threading.Thread(target=read, daemon=True).start()
    return out, answers, call, ch


def test_a_replaced_certificate_serves_new_connections_and_open_streams_handshake_again(
        service, cert_files, other_ca_files):
    age_ms, grace_ms = 1500, 1500
    svc = service(**tls_settings(cert_files, tls_max_connection_age_ms=age_ms,
                                 tls_max_connection_age_grace_ms=grace_ms), client_tls=client_tls(cert_files))
    addr = svc.addresses.grpc
    old_trust = client_tls(cert_files, "datanode-1")
    new_trust = client_tls(cert_files, "datanode-1", ca=other_ca_files["ca"])
    out, answers, call, ch = _open_stream(addr, old_trust)
    out.put(pb.HeartbeatRequest(datanode_id=1, region_ids=[1]))
    assert isinstance(answers.get(timeout=5), pb.HeartbeatResponse)
    opened = time.monotonic()

    # The server certificate replaced by one of another CA (the client CA stays).
    _replace(cert_files["server-key"], other_ca_files["server-key"].read_bytes())
    _replace(cert_files["server"], other_ca_files["server"].read_bytes())
    assert check(addr, new_trust) == health_pb2.HealthCheckResponse.SERVING
    assert check(addr, old_trust) == grpc.StatusCode.UNAVAILABLE  # new connections: the new certificate
    assert svc.registry.get_sample_value("supervisor_tls_reloads_total", {"outcome": "reloaded"}) == 1

    # The stream opened before keeps flowing on its old handshake...
    out.put(pb.HeartbeatRequest(datanode_id=1, region_ids=[1]))
    assert isinstance(answers.get(timeout=5), pb.HeartbeatResponse)
    # ...until the connection's max age and grace end it (grpc adds up to 10% jitter to the age).
    ended = None
    while time.monotonic() - opened < (age_ms * 1.1 + grace_ms) / 1000 + 10:
        out.put(pb.HeartbeatRequest(datanode_id=1, region_ids=[1]))
        try:
            answer = answers.get(timeout=1)
        except queue.Empty:
            continue
        if isinstance(answer, grpc.RpcError):
            ended = time.monotonic() - opened
            break
        time.sleep(0.1)
    out.put(None)
    ch.close()
    assert ended is not None, "the old stream was never closed: a replaced certificate would stay in use"
    assert ended >= age_ms * 0.9 / 1000
    # Reconnecting means a new handshake: only the new certificate is served now.
    assert check(addr, old_trust) == grpc.StatusCode.UNAVAILABLE
    assert check(addr, new_trust) == health_pb2.HealthCheckResponse.SERVING


def test_a_datanode_heartbeats_through_a_rotation_without_a_gap(service, cert_files, other_ca_files, tmp_path):
    """The usual procedure: clients trust the old and the new CA first, then the server's certificate
    is replaced; a heartbeater reconnects when its connection ages out and goes on."""
    svc = service(**tls_settings(cert_files, tls_max_connection_age_ms=1000, tls_max_connection_age_grace_ms=500),
                  client_tls=client_tls(cert_files))
    both = tmp_path / "both-cas.pem"
    both.write_bytes(cert_files["ca"].read_bytes() + other_ca_files["ca"].read_bytes())
    tls = ClientTLS(str(both), str(cert_files["datanode-2"]), str(cert_files["datanode-2-key"]))
    hb = DatanodeHeartbeater(svc.addresses.grpc, 2, lambda: [7], interval_s=0.1, tls=tls).start()
    try:
        deadline = time.monotonic() + 10
        while hb.accepted < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hb.accepted >= 3
        _replace(cert_files["server-key"], other_ca_files["server-key"].read_bytes())
        _replace(cert_files["server"], other_ca_files["server"].read_bytes())
        before = hb.accepted
        time.sleep(4)  # a few connection ages
        assert hb.accepted - before >= 15, (hb.accepted, before, hb.errors)
        assert hb.last_accepted_at is not None and time.monotonic() - hb.last_accepted_at < 1.0
    finally:
        hb.stop()


def test_a_bad_replacement_keeps_the_certificate_in_force_and_is_counted(service, cert_files, logged):
    svc = service(**tls_settings(cert_files), client_tls=client_tls(cert_files))
    addr = svc.addresses.grpc
    _replace(cert_files["server"], b"-----BEGIN CERTIFICATE-----\nhalf")
    assert check(addr, client_tls(cert_files)) == health_pb2.HealthCheckResponse.SERVING
    assert check(addr, client_tls(cert_files, "metasrv")) == health_pb2.HealthCheckResponse.SERVING
    assert svc.registry.get_sample_value("supervisor_tls_reloads_total", {"outcome": "rejected"}) == 1
    assert any("holds no PEM certificate" in line.get("error", "") for line in logged("tls_reload_rejected"))


def test_a_datanode_whose_own_certificate_file_is_broken_keeps_trying_and_recovers(service, cert_files, tmp_path):
    """The heartbeater reads its files at each reconnection: a broken client certificate on disk is a
    client error, retried, not the end of its thread; a good file again and it heartbeats again."""
    svc = service(**tls_settings(cert_files, tls_max_connection_age_ms=500, tls_max_connection_age_grace_ms=200),
                  client_tls=client_tls(cert_files))
    cert = tmp_path / "dn3.pem"
    cert.write_bytes(cert_files["datanode-3"].read_bytes())
    tls = ClientTLS(str(cert_files["ca"]), str(cert), str(cert_files["datanode-3-key"]))
    hb = DatanodeHeartbeater(svc.addresses.grpc, 3, lambda: [9], interval_s=0.1, tls=tls).start()
    try:
        deadline = time.monotonic() + 10
        while hb.accepted < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        _replace(cert, b"-----BEGIN CERTIFICATE-----\ntrunc")
        deadline = time.monotonic() + 10
        while not hb.errors["client_error"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hb.errors["client_error"] >= 1, dict(hb.errors)
        _replace(cert, cert_files["datanode-3"].read_bytes())
        before = hb.accepted
        deadline = time.monotonic() + 10
        while hb.accepted < before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hb.accepted >= before + 5
    finally:
        hb.stop()


def test_stalled_handshakes_are_closed_and_do_not_hold_the_port(service, cert_files):
    svc = service(**tls_settings(cert_files, tls_handshake_timeout_ms=500), client_tls=client_tls(cert_files))
    host, _, port = svc.addresses.grpc.rpartition(":")
    stalled = []
    for i in range(300):
        s = socket.create_connection((host, int(port)))
        if i % 2:
            s.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello, never finished
        stalled.append(s)
    try:
        assert check(svc.addresses.grpc, client_tls(cert_files)) == health_pb2.HealthCheckResponse.SERVING
        begun = time.monotonic()
        for s in stalled:
            s.settimeout(10)
            assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - begun < 8
    finally:
        for s in stalled:
            s.close()
