"""Breaking the roles from outside: a real service process, callers in this process. A stolen
datanode credential cannot keep another, dead, datanode alive (it is failed over all the same), and
a flood of refused calls neither slows the datanodes' heartbeats nor floods the audit trail."""

from __future__ import annotations

import time

import grpc
import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.proto import pb, pb_grpc
from tests.support.roles import IDENTITIES, LEGACY_TOKEN, write_security_files
from tests.support.servers import ServiceProcess

pytestmark = pytest.mark.realtime

TOKEN = {name: token for name, (token, _) in IDENTITIES.items()}


@pytest.fixture
def secured_process(tmp_path):
    files = write_security_files(tmp_path / "security")
    env = {f"SUPERVISOR_{k.upper()}": v for k, v in files.items()}
    env.update({
        "SUPERVISOR_STORE": "sqlite", "SUPERVISOR_DATA_DIR": str(tmp_path / "data"),
        "SUPERVISOR_TICK_INTERVAL_MS": "100", "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "1000",
        "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "200", "SUPERVISOR_WARMUP_GRACE_MS": "0",
        "SUPERVISOR_WARMUP_FRACTION": "0", "SUPERVISOR_MAX_FAILED_DATANODE_FRACTION": "1",
        "SUPERVISOR_TARGET_HOLDDOWN_MS": "0", "SUPERVISOR_AUDIT_REFUSAL_INTERVAL_MS": "60000",
    })
    proc = ServiceProcess(env, str(tmp_path / "service.log"))
    try:
        proc.wait_serving(leader=True)
        yield proc
    finally:
        proc.stop()


def test_forged_heartbeats_do_not_keep_a_dead_datanode_alive(secured_process):
    addr = secured_process.addr
    beaters = [DatanodeHeartbeater(addr, d, lambda d=d: [d * 10, d * 10 + 1], interval_s=0.2,
                                   peer_addr=f"127.0.0.1:{7000 + d}", token=TOKEN[f"datanode-{d}"]).start()
               for d in (1, 2)]
    try:
        time.sleep(1.5)
        assert all(b.rejections == {} for b in beaters), [b.rejections for b in beaters]
        beaters[1].stop()  # datanode 2 dies; datanode 1's credential goes on heartbeating as datanode 2
        forger = DatanodeHeartbeater(addr, 2, lambda: [20, 21], interval_s=0.05, token=TOKEN["datanode-1"]).start()
        try:
            deadline = time.monotonic() + 15
            with SupervisorClient(addr, token=TOKEN["admin"], timeout=5) as client:
                while time.monotonic() < deadline:
                    _, entries = client.journal()
                    if any(e.from_peer.id == 2 for e in entries):
                        break
                    time.sleep(0.1)
                moved = [e for e in entries if e.from_peer.id == 2]
                assert moved and sorted(moved[0].region_ids) == [20, 21], entries
                assert not any(e.from_peer.id == 1 for e in entries), "the live datanode was failed over"
                assert forger.rejections and all("may heartbeat as datanode 1 only" in r.reason
                                                  for r in [forger.last_rejection])
                trail = [e for e in client.audit(identity="datanode-1", limit=1000) if e.rpc == "SendHeartbeat"]
            sent = sum(forger.rejections.values())
            assert sent >= 20 and len(trail) == 1, (sent, len(trail))  # coalesced: one entry per interval
        finally:
            forger.stop()
    finally:
        for b in beaters:
            b.stop()


def test_a_flood_of_refused_calls_neither_delays_heartbeats_nor_floods_the_trail(secured_process):
    addr = secured_process.addr
    beater = DatanodeHeartbeater(addr, 1, lambda: [10], interval_s=0.1, token=TOKEN["datanode-1"]).start()
    try:
        time.sleep(0.5)
        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.RegionSupervisorStub(channel)
            request = pb.SetMaintenanceModeRequest(enabled=True, reason="x" * 1000)
            started, refused = time.monotonic(), 0
            codes: dict[str, int] = {}
            for batch in range(30):  # 100 calls in flight at a time
                futures = []
                for i in range(batch * 100, batch * 100 + 100):
                    metadata = (("authorization", f"Bearer wrong-{i}"),) if i % 3 else (
                        ("authorization", f"Bearer {TOKEN['reader-bob']}"),)
                    futures.append(stub.SetMaintenanceMode.future(request, metadata=metadata, timeout=30))
                for f in futures:
                    try:
                        f.result()
                    except grpc.RpcError as exc:
                        codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
            refused = codes.get("UNAUTHENTICATED", 0) + codes.get("PERMISSION_DENIED", 0)
            took = time.monotonic() - started
        assert refused == 3000, codes
        with SupervisorClient(addr, token=LEGACY_TOKEN, timeout=5) as client:
            assert not client.get_maintenance(), "a refused call switched maintenance on"
            trail = client.audit(limit=10_000)
        assert len(trail) <= 4, [(e.identity, e.code) for e in trail]  # one per identity, RPC and code
        assert beater.rejections == {} and beater.errors == {}, (beater.rejections, beater.errors)
        print(f"3000 refused calls in {took:.2f} s; audit entries {len(trail)}")
    finally:
        beater.stop()
