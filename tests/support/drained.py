"""A small cluster for drain tests over real gRPC: datanodes heartbeating the regions they hold, and a
fake RegionMigration that moves the regions of every migration it starts (the source stops reporting
them, the target starts) and answers SUCCEEDED when polled. Regions of a table: (table << 32) | n."""

from __future__ import annotations

import threading
from collections import Counter

from supervisor_service.client import DatanodeHeartbeater
from supervisor_service.proto import pb
from tests.support.fakes import FakeRegionMigration


def rid(table: int, number: int) -> int:
    return (table << 32) | number


class MovingCluster:
    def __init__(self, holdings: dict[int, list[int]]) -> None:
        self._lock = threading.Lock()
        self.holdings = {d: set(regions) for d, regions in holdings.items()}
        self.moves: Counter[int] = Counter()  # region -> migrations started of it
        self.migration = FakeRegionMigration(self._respond, default_state=pb.MIGRATION_STATE_SUCCEEDED)
        self.beaters: dict[int, DatanodeHeartbeater] = {}

    def start(self, addrs, interval_s: float = 0.1) -> MovingCluster:
        """Every datanode heartbeats `addrs` (one or several replicas) every `interval_s`."""
        self.beaters = {
            d: DatanodeHeartbeater(addrs, d, lambda d=d: self.regions_of(d), interval_s=interval_s,
                                   peer_addr=f"127.0.0.1:{22_000 + d}").start()
            for d in self.holdings
        }
        return self

    def regions_of(self, d: int) -> list[int]:
        with self._lock:
            return sorted(self.holdings.get(d, ()))

    def _respond(self, request: pb.SubmitRegionMigrationRequest) -> pb.SubmitRegionMigrationResponse:
        with self._lock:
            for r in request.region_ids:
                self.moves[r] += 1
                self.holdings.get(request.from_peer.id, set()).discard(r)
                self.holdings.setdefault(request.to_peer.id, set()).add(r)
        return self.migration.submit_all(request)

    def stop_datanode(self, d: int) -> None:
        self.beaters.pop(d).stop()

    def close(self) -> None:
        for b in self.beaters.values():
            b.stop()
        self.beaters = {}
        self.migration.stop()
