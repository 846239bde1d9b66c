"""Synchronous clients of the RegionSupervisor service, for the CLI, tools, datanodes and tests.

Both follow the leader: a follower answers FAILED_PRECONDITION with the
leader's address in trailing metadata (`x-supervisor-leader`), or a rejected
heartbeat with `leader_addr`; the client reconnects there and retries.
Given several addresses, an unreachable one is skipped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from supervisor_service.events import DetectingRegion
from supervisor_service.proto import pb, pb_grpc


LEADER_METADATA_KEY = "x-supervisor-leader"


def _addresses(addr: str | Sequence[str]) -> list[str]:
    if isinstance(addr, str):
        return [a.strip() for a in addr.split(",") if a.strip()]
    return list(addr)


def leader_hint(exc: grpc.RpcError) -> str:
    """The leader address a follower put in its FAILED_PRECONDITION, or ''."""
    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return ""
    for key, value in exc.trailing_metadata() or ():
        if key == LEADER_METADATA_KEY:
            return value
    return ""


class SupervisorClient:
    """Admin client. `addr` may list several replicas (comma-separated or a sequence)."""

    def __init__(
        self, addr: str | Sequence[str], *, token: str = "", timeout: float = 10.0, follow_leader: bool = True
    ) -> None:
        self.addrs = _addresses(addr)
        if not self.addrs:
            raise ValueError("no address given")
        self._timeout = timeout
        self._follow = follow_leader
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._connect(self.addrs[0])

    def _connect(self, addr: str) -> None:
        self.addr = addr
        self._channel = grpc.insecure_channel(addr)
        self.stub = pb_grpc.RegionSupervisorStub(self._channel)

    def _switch(self, addr: str) -> None:
        self._channel.close()
        self._connect(addr)

    def _call(self, fn: Callable[[], object]) -> object:
        """Run `fn` against the current replica, following leader hints and skipping dead replicas."""
        attempts = max(10, len(self.addrs) + 1)
        for attempt in range(attempts):
            try:
                return fn()
            except grpc.RpcError as exc:
                if not self._follow or attempt == attempts - 1:
                    raise
                hint = leader_hint(exc)
                if hint and hint != self.addr:
                    self._switch(hint)
                elif exc.code() == grpc.StatusCode.UNAVAILABLE and "becoming leader" in (exc.details() or ""):
                    time.sleep(0.2)  # elected, loading its state
                elif exc.code() == grpc.StatusCode.UNAVAILABLE and len(self.addrs) > 1:
                    nxt = self.addrs[(self.addrs.index(self.addr) + 1) % len(self.addrs)] if self.addr in self.addrs else self.addrs[0]
                    self._switch(nxt)
                elif exc.code() == grpc.StatusCode.FAILED_PRECONDITION and not hint:
                    time.sleep(0.5)  # an election is under way
                else:
                    raise
        raise AssertionError("unreachable")

    def __enter__(self) -> SupervisorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _kw(self) -> dict:
        return {"timeout": self._timeout, "metadata": self._metadata}

    @staticmethod
    def _regions(pairs: list[DetectingRegion]) -> list[pb.DetectingRegion]:
        return [pb.DetectingRegion(datanode_id=d, region_id=r) for d, r in pairs]

    def register(self, pairs: list[DetectingRegion]) -> int:
        request = pb.RegisterDetectorsRequest(regions=self._regions(pairs))
        return self._call(lambda: self.stub.RegisterDetectors(request, **self._kw()).affected)

    def deregister(self, pairs: list[DetectingRegion]) -> int:
        request = pb.DeregisterDetectorsRequest(regions=self._regions(pairs))
        return self._call(lambda: self.stub.DeregisterDetectors(request, **self._kw()).affected)

    def reset(self, pairs: list[DetectingRegion]) -> int:
        request = pb.ResetDetectorsRequest(regions=self._regions(pairs))
        return self._call(lambda: self.stub.ResetDetectors(request, **self._kw()).affected)

    def dump(
        self, *, datanode_ids: list[int] = (), only_failed: bool = False, at_millis: int = 0, page_size: int = 0
    ) -> tuple[pb.DumpResponse, list[pb.DetectorState]]:
        """(first page header, all rows)."""
        request = pb.DumpRequest(
            datanode_ids=list(datanode_ids), only_failed=only_failed, at_millis=at_millis, page_size=page_size
        )

        def read() -> tuple[pb.DumpResponse, list[pb.DetectorState]]:
            header, rows = None, []
            for page in self.stub.Dump(request, **self._kw()):
                header = header or page
                rows.extend(page.detectors)
            return header or pb.DumpResponse(), rows

        return read()

    def set_maintenance(self, enabled: bool) -> bool:
        """The global switch; returns its new value."""
        return self.set_maintenance_scope(enabled).enabled

    def set_maintenance_scope(
        self, enabled: bool, datanode_ids: Sequence[int] = (), ttl_millis: int = 0
    ) -> pb.MaintenanceModeResponse:
        """Global (no datanodes) or per-datanode maintenance, optionally expiring after `ttl_millis`."""
        request = pb.SetMaintenanceModeRequest(enabled=enabled, datanode_ids=list(datanode_ids), ttl_millis=ttl_millis)
        return self._call(lambda: self.stub.SetMaintenanceMode(request, **self._kw()))

    def holds(self) -> pb.FailoverHoldsResponse:
        return self.stub.GetFailoverHolds(pb.GetFailoverHoldsRequest(), **self._kw())

    def release_hold(self) -> pb.FailoverHoldsResponse:
        return self._call(lambda: self.stub.ReleaseFailoverHold(pb.ReleaseFailoverHoldRequest(), **self._kw()))

    def get_maintenance(self) -> bool:
        return self.stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), **self._kw()).enabled

    def maintenance_status(self) -> pb.MaintenanceModeResponse:
        return self.stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), **self._kw())

    def journal(self, limit: int = 100) -> tuple[bool, list[pb.JournalEntry]]:
        resp = self.stub.ListJournal(pb.ListJournalRequest(limit=limit), **self._kw())
        return resp.embedded, list(resp.entries)


class DatanodeHeartbeater:
    """One datanode's heartbeat stream that follows the leader.

    Sends `regions()` every `interval_s` on one SendHeartbeat stream. A
    response rejected because this replica is not the leader switches to the
    `leader_addr` it names; a broken stream moves to the next address. Every
    response is passed to `on_response` (tests and tools record them).
    """

    def __init__(
        self,
        addrs: str | Sequence[str],
        datanode_id: int,
        regions: Callable[[], Sequence[int]],
        *,
        interval_s: float = 1.0,
        peer_addr: str = "",
        node_epoch: int = 0,
        token: str = "",
        on_response: Callable[[str, pb.HeartbeatResponse], None] | None = None,
    ) -> None:
        self.addrs = _addresses(addrs)
        self.datanode_id = datanode_id
        self._regions = regions
        self._interval = interval_s
        self._peer_addr = peer_addr
        self._epoch = node_epoch
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._on_response = on_response
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.addr = self.addrs[0]
        self.sent = 0

    def start(self) -> DatanodeHeartbeater:
        self._thread = threading.Thread(target=self._run, name=f"datanode-{self.datanode_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _requests(self, outbox: queue.Queue) -> object:
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item

    def _run(self) -> None:
        while not self._stop.is_set():
            next_addr = self._stream_once(self.addr)
            if self._stop.is_set():
                return
            self.addr = next_addr
            self._stop.wait(0.1)

    def _stream_once(self, addr: str) -> str:
        """Heartbeat on one stream until it breaks or points elsewhere; returns where to go next."""
        outbox: queue.Queue = queue.Queue()
        channel = grpc.insecure_channel(addr)
        stub = pb_grpc.RegionSupervisorStub(channel)
        responses = stub.SendHeartbeat(self._requests(outbox), metadata=self._metadata)
        try:
            while not self._stop.is_set():
                outbox.put(pb.HeartbeatRequest(
                    datanode_id=self.datanode_id,
                    timestamp_millis=int(time.time() * 1000),
                    region_ids=list(self._regions()),
                    peer_addr=self._peer_addr,
                    node_epoch=self._epoch,
                ))
                self.sent += 1
                response = next(responses)
                if self._on_response is not None:
                    self._on_response(addr, response)
                if response.rejected and not response.is_leader:
                    if response.leader_addr and response.leader_addr != addr:
                        return response.leader_addr
                    self._stop.wait(self._interval)
                    continue
                self._stop.wait(self._interval)
            return addr
        except (grpc.RpcError, StopIteration):
            if addr in self.addrs and len(self.addrs) > 1:
                return self.addrs[(self.addrs.index(addr) + 1) % len(self.addrs)]
            return self.addrs[0]
        finally:
            outbox.put(None)
            responses.cancel()
            channel.close()
