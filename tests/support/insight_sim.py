"""A supervisor core on a fake clock with datanodes and automatic remotes: for the history, Explain and WhatIf tests.

Every alive datanode heartbeats once per tick; the Selector answers each SelectPeers at once
with the lowest alive datanodes; RegionMigration accepts each submission under a procedure
(or answers with `submit_category`), and reports it `poll_state` when polled. Every effect
is kept in `timeline` with the time it left.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    FailoverPolicy,
    Guards,
    GuardSettings,
    Heartbeat,
    MigrationResult,
    MigrationState,
    Peer,
    PhiAccrualOptions,
    PollMigration,
    SelectionDone,
    SelectPeers,
    StatusPolled,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    Tick,
    as_region_array,
)
from supervisor_service.core.events import Inspect

TICK = 1000
START = 1_700_000_000_000


def regions_of(datanode_id: int, n: int = 2) -> list[int]:
    return [(datanode_id << 32) | i for i in range(n)]


class InsightSim:
    def __init__(self, datanodes: int = 10, regions: int = 2, guards: GuardSettings | None = GuardSettings(),
                 policy: FailoverPolicy | None = None, opts: PhiAccrualOptions | None = None) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.guards = Guards(guards) if guards is not None else None
        self.sup = Supervisor(opts or PhiAccrualOptions(), self.metrics, policy or FailoverPolicy(),
                              guards=self.guards)
        self.now = START
        self.regions = {d: regions_of(d, regions) for d in range(1, datanodes + 1)}
        self.alive = set(self.regions)
        self.timeline: list[tuple[int, object]] = []
        self.changes: list[object] = []
        self.submit_category = "submitted"
        self.submit_error: str | None = None
        self.submit_error_kind = "refused"
        self.poll_state = MigrationState.RUNNING
        self._procedures = 0

    def handle(self, event):
        value = self.sup.handle(event, self.now)
        self.changes += self.sup.drain_changes()
        return value

    def ask(self, query):
        return self.handle(Inspect(query))

    def step(self, ms: int = TICK) -> None:
        self.now += ms
        for d in sorted(self.alive):
            self.sup.handle(Heartbeat(d, as_region_array(self.regions[d]), self.now), self.now)
        self.handle(Tick())
        self._run_effects()

    def run_to(self, t: int) -> None:
        while self.now < t:
            self.step()

    def _run_effects(self) -> None:
        effects = self.sup.drain_outbox()
        while effects:
            for e in effects:
                self.timeline.append((self.now, e))
                self._answer(e)
            effects = self.sup.drain_outbox()

    def _answer(self, e) -> None:
        match e:
            case SelectPeers(job):
                targets = sorted(self.alive - {job.datanode_id}) or [job.datanode_id]
                peers = tuple(Peer(targets[0], f"10.0.0.{targets[0]}:4001") for _ in job.region_ids)
                self.handle(SelectionDone(job, from_peer=Peer(job.datanode_id, f"10.0.0.{job.datanode_id}:4001"),
                                          peers=peers))
            case SubmitMigration(task):
                if self.submit_error is not None:
                    self.handle(SubmissionDone(task, error=self.submit_error, error_kind=self.submit_error_kind))
                    return
                self._procedures += 1
                pid = f"proc-{self._procedures}" if self.submit_category == "submitted" else ""
                self.handle(SubmissionDone(task, result=MigrationResult(
                    **{self.submit_category: task.region_ids}, procedure_id=pid)))
            case PollMigration(procedure_id):
                self.handle(StatusPolled(procedure_id, self.poll_state, "moved" if self.poll_state.value == 2 else ""))

    def submissions(self) -> list[tuple[int, object]]:
        """(time, task) of every SubmitRegionMigration that left."""
        return [(t, e.task) for t, e in self.timeline if isinstance(e, SubmitMigration)]

    def selections(self) -> list[tuple[int, int]]:
        """(time, datanode) of every SelectPeers that left (the tick that convicted it)."""
        return [(t, e.job.datanode_id) for t, e in self.timeline if isinstance(e, SelectPeers)]
