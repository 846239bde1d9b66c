"""The remote services of the chaos cluster: the recording fakes of tests.support.fakes, with the
behaviours the nemesis switches on and off.

RegionMigration carries out every submission it accepts (fenced on the leader
term, idempotent on request_id, as the real service must be) and reports a
procedure SUCCEEDED `complete_after_s` after it started (or `slow_s`, for one
started while the nemesis made migrations slow: longer than the supervisor's
migration timeout), unless the nemesis made it forget the procedure
(NOT_FOUND). The Selector picks round-robin
among the live datanodes; its lies are switched on by `lie`. Every call is
recorded with the caller's peer address, which names the replica (each
replica's proxy connects from its own 127.x address).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from supervisor_service.proto import pb
from tests.support.fakes import FakePeerLookup, FakeRegionMigration, FakeSelector


class ChaosRegionMigration(FakeRegionMigration):
    def __init__(self, *, complete_after_s: float = 2.0, seed: int = 0) -> None:
        self.complete_after_s = complete_after_s
        self._started: dict[str, float] = {}
        self._takes: dict[str, float] = {}  # procedure -> how long it runs (when not complete_after_s)
        self.slow_s = 0.0  # > 0: procedures started now run this long
        self._forgotten: set[str] = set()
        self.forget_next = 0
        self.contradict_next = 0
        self._rng = random.Random(seed)
        self._chaos_lock = threading.Lock()
        # A procedure's target opens its regions when it is first seen SUCCEEDED, as a real target
        # serves (and heartbeats) what it was given: on_success(to_peer_id, regions).
        self._moves: dict[str, tuple[int, list[int]]] = {}
        self.on_success: Callable[[int, list[int]], None] | None = None
        super().__init__(respond=self._respond, max_workers=32)

    def _respond(self, request: pb.SubmitRegionMigrationRequest) -> pb.SubmitRegionMigrationResponse:
        procedure = self.next_procedure_id()
        regions = list(request.region_ids)
        with self._chaos_lock:
            self._started[procedure] = time.monotonic()
            self._moves[procedure] = (request.to_peer.id, regions)
            if self.slow_s > 0:
                self._takes[procedure] = self.slow_s
            if self.forget_next > 0:
                self.forget_next -= 1
                self._forgotten.add(procedure)
            contradict = self.contradict_next > 0
            if contradict:
                self.contradict_next -= 1
        if contradict:  # every region in two categories: the supervisor must keep them in flight
            return pb.SubmitRegionMigrationResponse(submitted=regions, migrated=regions, procedure_id=procedure)
        return pb.SubmitRegionMigrationResponse(submitted=regions, procedure_id=procedure)

    def forget_one(self) -> bool:
        """GetMigrationStatus no longer knows one running procedure (or the next one started)."""
        now = time.monotonic()
        with self._chaos_lock:
            running = sorted(p for p, t in self._started.items()
                             if p not in self._forgotten and now - t < self._takes.get(p, self.complete_after_s))
            if running:
                self._forgotten.add(self._rng.choice(running))
                return True
            self.forget_next += 1
            return False

    def _status(self, request: pb.GetMigrationStatusRequest) -> pb.GetMigrationStatusResponse:
        with self._chaos_lock:
            started = self._started.get(request.procedure_id)
            forgotten = request.procedure_id in self._forgotten
            takes = self._takes.get(request.procedure_id, self.complete_after_s)
        if started is None or forgotten:
            state = pb.MIGRATION_STATE_NOT_FOUND
        elif time.monotonic() - started >= takes:
            state = pb.MIGRATION_STATE_SUCCEEDED
            with self._chaos_lock:
                move = self._moves.pop(request.procedure_id, None)
            if move is not None and self.on_success is not None:
                self.on_success(*move)
        else:
            state = pb.MIGRATION_STATE_RUNNING
        return pb.GetMigrationStatusResponse(state=state, message=f"chaos: {pb.MigrationState.Name(state)}")


class ChaosSelector(FakeSelector):
    """Round-robin over `candidates` (the live datanodes) minus the excluded; `lie` set to one of
    LIES answers wrongly until cleared."""

    LIES = ("self", "fewer", "duplicates", "zero_id")

    def __init__(self, candidates: list[pb.Peer]) -> None:
        self.lie = ""
        super().__init__(candidates, respond=self._answer, max_workers=16)

    def _answer(self, request: pb.SelectRequest) -> pb.SelectResponse:
        n = max(1, request.min_required_items)
        lie = self.lie
        if lie == "self":
            return pb.SelectResponse(peers=[pb.Peer(id=request.from_peer_id, addr=f"dn-{request.from_peer_id}")] * n)
        if lie == "zero_id":
            return pb.SelectResponse(peers=[pb.Peer(id=0, addr="dn-0:4001")] * n)
        excluded = set(request.exclude_peer_ids)
        eligible = [p for p in list(self.candidates) if p.id not in excluded]
        if not eligible:
            return pb.SelectResponse()
        with self._lock:
            start = self._cursor
            self._cursor += 1
        if lie == "duplicates":
            return pb.SelectResponse(peers=[eligible[start % len(eligible)]] * n)
        peers = [eligible[(start + i) % len(eligible)] for i in range(n)]
        if lie == "fewer":
            peers = peers[: n - 1]
        return pb.SelectResponse(peers=peers)


class ChaosPeerLookup(FakePeerLookup):
    pass
