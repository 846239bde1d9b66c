"""A Supervisor driven by hand in tests of the planned operations and the migration ends: its own
metrics registry, a clock the test moves, and short helpers for the events that matter there."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    FailoverPolicy,
    Guards,
    GuardSettings,
    Heartbeat,
    MigrationResult,
    Peer,
    PhiAccrualOptions,
    SelectionDone,
    SelectPeers,
    StatusPolled,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    Tick,
    as_region_array,
)

OPTS = PhiAccrualOptions()
POLICY = FailoverPolicy(resubmit_backoff_ms=0, max_resubmissions_per_window=1_000_000)


def quiet_guards(**overrides) -> Guards:
    """Guards with the holds that a hand-driven test does not exercise turned off."""
    base = dict(max_local_pause_ms=0, max_failed_datanode_fraction=1.0, overload_queue_fraction=1.0,
                overload_hold_ms=0, target_holddown_ms=0, flap_backoff_base_ms=0, failover_rate_per_s=0,
                target_regions_per_s=0)
    base.update(overrides)
    return Guards(GuardSettings(**base))


class CoreSim:
    def __init__(self, policy: FailoverPolicy | None = None, **kwargs) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.policy = policy or POLICY
        self.sup = Supervisor(OPTS, self.metrics, self.policy, **kwargs)

    def handle(self, event, now: int):
        return self.sup.handle(event, now)

    def beats(self, datanode_id: int, regions, start: int, count: int, every: int = 1000) -> int:
        ts = start
        for i in range(count):
            ts = start + i * every
            self.sup.handle(Heartbeat(datanode_id, as_region_array(list(regions)), ts), ts)
        return ts

    def tick(self, now: int) -> list:
        self.sup.handle(Tick(), now)
        return self.sup.drain_outbox()

    def select_done(self, job, peers, now: int, from_peer: Peer | None = None) -> list:
        self.sup.handle(SelectionDone(job, from_peer=from_peer or Peer(job.datanode_id), peers=tuple(peers)), now)
        return self.sup.drain_outbox()

    def submit_done(self, task, now: int, **categories) -> list:
        self.sup.handle(SubmissionDone(task, result=MigrationResult(**categories)), now)
        return self.sup.drain_outbox()

    def status(self, procedure_id: str, state, now: int) -> list:
        self.sup.handle(StatusPolled(procedure_id, state=state), now)
        return self.sup.drain_outbox()

    def value(self, name: str, **labels) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def skipped(self, reason: str) -> float:
        return self.value("supervisor_failover_skipped_regions_total", reason=reason)


def selects(effects) -> list[SelectPeers]:
    return [e for e in effects if isinstance(e, SelectPeers)]


def submits(effects) -> list[SubmitMigration]:
    return [e for e in effects if isinstance(e, SubmitMigration)]
