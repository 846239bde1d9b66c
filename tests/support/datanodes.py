"""Datanodes for end-to-end tests: threads that each hold one SendHeartbeat stream over real gRPC.

`Cluster(addr)` starts datanodes 1, 2 and 3, each heartbeating its own
regions (`regions_of`) every `HEARTBEAT_S` seconds with its address
(`dn_addr`) until stopped; `warm_up()` waits until each has been answered a
few times. A datanode that is stopped has had its last heartbeat answered.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc

from supervisor_service.proto import pb, pb_grpc
from tests.support.waiting import wait_for

HEARTBEAT_S = 0.2
TABLE = 1024


def regions_of(datanode_id: int, n: int = 4) -> list[int]:
    """Region ids as GreptimeDB builds them: table id in the high 32 bits, region number in the low."""
    return [(TABLE << 32) | (datanode_id * 100 + i) for i in range(n)]


def dn_addr(datanode_id: int) -> str:
    return f"10.0.0.{datanode_id}:4001"


class Datanode:
    """One datanode: a thread holding one SendHeartbeat stream (fed by a queue), a heartbeat every interval."""

    def __init__(self, addr: str, datanode_id: int, regions: list[int], interval_s: float = HEARTBEAT_S) -> None:
        self.datanode_id = datanode_id
        self.regions = regions
        self._interval = interval_s
        self._channel = grpc.insecure_channel(addr)
        self._stub = pb_grpc.RegionSupervisorStub(self._channel)
        self._outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.responses: list[pb.HeartbeatResponse] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"datanode-{datanode_id}", daemon=True)
        self._thread.start()

    def _requests(self):
        while True:
            item = self._outbox.get()
            if item is None:
                return
            yield item

    def _run(self) -> None:
        responses = self._stub.SendHeartbeat(self._requests())
        try:
            while not self._stop.is_set():
                self._outbox.put(pb.HeartbeatRequest(
                    datanode_id=self.datanode_id,
                    timestamp_millis=int(time.time() * 1000),
                    region_ids=self.regions,
                    peer_addr=dn_addr(self.datanode_id),
                ))
                response = next(responses)
                with self._lock:
                    self.responses.append(response)
                self._stop.wait(self._interval)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            if not self._stop.is_set():
                self.error = exc
        finally:
            self._outbox.put(None)
            responses.cancel()

    def stop(self) -> None:
        """Stop heartbeating (the last heartbeat sent has been answered when this returns) and close."""
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), f"datanode {self.datanode_id} did not stop"
        self._channel.close()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def received(self) -> list[pb.HeartbeatResponse]:
        with self._lock:
            return list(self.responses)

    def accepted_times(self) -> list[int]:
        """server_time_millis of every heartbeat the supervisor applied."""
        with self._lock:
            rejected = [r.reason for r in self.responses if r.rejected]
            assert not rejected, f"datanode {self.datanode_id}: heartbeats rejected: {rejected[:3]}"
            assert all(r.accepted_regions == len(self.regions) for r in self.responses)
            return [r.server_time_millis for r in self.responses]

    def wait_heartbeats(self, n: int, timeout: float = 10.0) -> None:
        def enough() -> bool:
            if self.error is not None:
                raise AssertionError(f"datanode {self.datanode_id}: {self.error!r}")
            with self._lock:
                return len(self.responses) >= n

        wait_for(enough, timeout, message=f"datanode {self.datanode_id}: fewer than {n} heartbeats answered")


class Cluster:
    """Three datanodes heartbeating the supervisor."""

    def __init__(self, addr: str, ids=(1, 2, 3)) -> None:
        self.nodes = {d: Datanode(addr, d, regions_of(d)) for d in ids}

    def warm_up(self, heartbeats: int = 6) -> None:
        for node in self.nodes.values():
            node.wait_heartbeats(heartbeats)

    def close(self) -> None:
        for node in self.nodes.values():
            if not node.stopped:
                node.stop()
            assert node.error is None, f"datanode {node.datanode_id}: {node.error!r}"
