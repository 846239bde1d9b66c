"""Crash safety of the SQLite store: SIGKILL while registrations and heartbeats flow, then restart."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.store import MemoryKV, SqliteKV, StateStore, StoreError
from tests.support.servers import ServiceProcess

pytestmark = pytest.mark.realtime

FAST = {
    "SUPERVISOR_TICK_INTERVAL_MS": "100",
    "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "1000",
    "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "200",
    "SUPERVISOR_WARMUP_GRACE_MS": "0",
}


def test_sigkill_loses_no_acknowledged_registration(tmp_path):
    # Most registered datanodes never heartbeat here: the mass-failure guard would rightly hold
    # failover after the restart, so it is off for this test (it has tests of its own).
    env = {**FAST, "SUPERVISOR_STORE": "sqlite", "SUPERVISOR_DATA_DIR": str(tmp_path / "data"),
           "SUPERVISOR_MAX_FAILED_DATANODE_FRACTION": "1"}
    first = ServiceProcess(env, str(tmp_path / "first.log"))
    acknowledged: list[tuple[int, int]] = []
    stop = threading.Event()
    try:
        first.wait_serving()
        with SupervisorClient(first.addr, timeout=5) as client:
            assert client.set_maintenance(True) is True

        def register_forever() -> None:
            region = 0
            with SupervisorClient(first.addr, timeout=5, follow_leader=False) as client:
                while not stop.is_set():
                    batch = [(100 + region % 7, region + i) for i in range(5)]
                    try:
                        client.register(batch)
                    except grpc.RpcError:
                        return  # the process is gone: this batch was never acknowledged
                    acknowledged.extend(batch)
                    region += 5

        writer = threading.Thread(target=register_forever)
        writer.start()
        # Datanode 9 heartbeats a region of its own (learned from heartbeats, not Register).
        beater = DatanodeHeartbeater(first.addr, 9, lambda: [900, 901], interval_s=0.1).start()
        time.sleep(1.5)
        beater.stop()
        first.kill(signal.SIGKILL)
        first.proc.wait(10)
        stop.set()
        writer.join(10)
    finally:
        first.stop()
    assert len(acknowledged) > 50, "too few registrations acknowledged to mean anything"

    second = ServiceProcess(env, str(tmp_path / "second.log"))
    try:
        second.wait_serving()
        with SupervisorClient(second.addr, timeout=10) as client:
            assert client.get_maintenance() is True
            _, rows = client.dump()
            present = {(r.datanode_id, r.region_id) for r in rows}
            missing = set(acknowledged) - present
            assert not missing, f"{len(missing)} acknowledged registrations lost, e.g. {sorted(missing)[:5]}"
            # Regions learned from heartbeats were committed within the flush window, long before the kill.
            assert {(9, 900), (9, 901)} <= present
            # Datanode 9 died while the service was down: after restart it is failed over
            # (maintenance off) to datanode 10, the only live one.
            live = DatanodeHeartbeater(second.addr, 10, lambda: [1000], interval_s=0.1).start()
            client.set_maintenance(False)
            deadline = time.monotonic() + 20
            entries = []
            while time.monotonic() < deadline:
                _, entries = client.journal()
                if any(e.from_peer.id == 9 for e in entries):
                    break
                time.sleep(0.2)
            live.stop()
            assert any(
                e.from_peer.id == 9 and e.to_peer.id == 10 and set(e.region_ids) <= {900, 901} for e in entries
            ), entries
    finally:
        second.stop()


def test_second_process_on_same_data_dir_is_refused(tmp_path):
    kv = SqliteKV(tmp_path)
    try:
        with pytest.raises(StoreError, match="another supervisor process"):
            SqliteKV(tmp_path)
    finally:
        kv.close()


def test_store_retries_failed_commit_and_loses_nothing():
    class Flaky(MemoryKV):
        def __init__(self) -> None:
            super().__init__()
            self.failures_left = 3

        def commit(self, puts, deletes, fence=None):
            if self.failures_left:
                self.failures_left -= 1
                raise StoreError("disk full")
            super().commit(puts, deletes, fence)

    import numpy as np

    from supervisor_service.core import MaintenanceSet, RegistryAdd

    kv = Flaky()
    store = StateStore(kv, "/c", flush_interval_s=0)
    store.load()
    store.start()
    done = threading.Event()
    store.submit([RegistryAdd(1, np.array([5, 6], dtype=np.uint64)), MaintenanceSet(True)], lambda exc: done.set())
    assert done.wait(10)
    state = StateStore(kv, "/c").load()
    assert state.registry[1].tolist() == [5, 6] and state.maintenance is True
    assert store.failures == 3
    store.stop(5)
