"""One chaos run: bring the cluster up, let the nemesis and the metasrv writer loose, heal, observe,
and hand the recorded history to the checker.

    result = run_chaos(seed=1, seconds=120, datanodes=24)
    result.violations  # [] when every invariant held
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field

import grpc

from supervisor_service.proto import pb
from tests.chaos.cluster import ChaosCluster
from tests.chaos.history import Ack, Death, History, Poll, Submit, Violation, check
from tests.chaos.nemesis import KIND_NAMES, Fault, Nemesis, deaths, schedule

PHANTOM_MAINTENANCE = 9000  # datanode ids switched into maintenance by the writer: no datanode has them


@dataclass
class RunResult:
    seed: int
    history: History
    violations: list[Violation]
    faults: list[Fault]
    work_dir: str
    numbers: dict[str, object] = field(default_factory=dict)
    nemesis_errors: list[str] = field(default_factory=list)


class MetasrvWriter:
    """Registers new regions of live datanodes and switches phantom datanodes into maintenance,
    recording every call that was acknowledged."""

    def __init__(self, cluster: ChaosCluster, started_at: float, seed: int, protected: set[int]) -> None:
        self.cluster = cluster
        self.started_at = started_at
        self.rng = random.Random(seed ^ 0xAC)
        self.protected = protected  # datanodes that will die: no new regions (they would be lost with them)
        self.acks: list[Ack] = []
        self.attempts = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metasrv-writer", daemon=True)
        self._next_region: dict[int, int] = {}
        self._next_phantom = PHANTOM_MAINTENANCE

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with self.cluster.client(timeout=2.0) as client:
            while not self._stop.wait(self.rng.uniform(0.3, 1.2)):
                self.attempts += 1
                try:
                    if self.rng.random() < 0.7:
                        self._register(client)
                    else:
                        self._maintenance(client)
                except grpc.RpcError:
                    self.failures += 1  # not acknowledged: it may or may not have happened

    def _register(self, client) -> None:
        live = [d for d, dn in self.cluster.datanodes.items() if dn.died_at is None and d not in self.protected]
        if not live:
            return
        d = self.rng.choice(live)
        dn = self.cluster.datanodes[d]
        n = self._next_region.get(d, 100)
        self._next_region[d] = n + 1
        region = dn.regions[0] - (dn.regions[0] % 1000) + n  # same table, a new region number
        dn.add_region(region)  # heartbeated from now on: a registered region nobody reports would die
        client.register([(d, region)])
        self.acks.append(Ack(time.monotonic() - self.started_at, "register", pairs=[[d, region]]))

    def _maintenance(self, client) -> None:
        phantom = self._next_phantom
        self._next_phantom += 1
        client.set_maintenance_scope(True, [phantom])
        self.acks.append(Ack(time.monotonic() - self.started_at, "maintenance", datanode_ids=[phantom]))


def harness_log(work_dir: str) -> logging.Handler:
    """The datanodes' and clients' own log lines (streams broken by the faults) into work_dir/harness.log."""
    handler = logging.FileHandler(os.path.join(work_dir, "harness.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s %(fields)s",
                                           defaults={"fields": ""}))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def close_harness_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def _wait(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def run_chaos(*, seed: int, seconds: float, datanodes: int = 24, deaths_count: int | None = None,
              kinds: tuple[str, ...] = KIND_NAMES, work_dir: str | None = None, log=print,
              failover_bound_s: float = 60.0, recovery_bound_s: float = 30.0,
              extra_env: dict[str, str] | None = None) -> RunResult:
    """`seconds` of faults (the whole run takes about a minute more: bring-up, heal, checks)."""
    cluster = ChaosCluster(seed=seed, datanodes=datanodes, work_dir=work_dir, extra_env=extra_env)
    handler = harness_log(cluster.work_dir)
    faults = schedule(seed, seconds, kinds)
    count = deaths_count if deaths_count is not None else max(1, min(datanodes // 8, 2 + int(seconds // 60)))
    plan = deaths(seed, seconds, list(range(1, datanodes + 1)), count)
    history = History(seed=seed, failover_bound_s=failover_bound_s, recovery_bound_s=recovery_bound_s)
    numbers: dict[str, object] = {}
    t0 = time.monotonic()
    nemesis = None
    try:
        log(f"chaos: seed {seed}, {seconds:g} s of faults, {datanodes} datanodes, work dir {cluster.work_dir}")
        cluster.start()
        leader = _wait(cluster.leader, 30)
        if leader is None:
            raise AssertionError("no leader after bring-up")
        # Every datanode heard a few times before the faults start.
        _wait(lambda: all(len(dn.accepted) >= 4 for dn in cluster.datanodes.values()), 30)
        numbers["bring_up_s"] = round(time.monotonic() - t0, 1)
        started = time.monotonic()
        history.started_at = 0.0
        writer = MetasrvWriter(cluster, started, seed, {d for _, d in plan})
        nemesis = Nemesis(cluster, faults, started, plan)
        writer.start()
        nemesis.start()
        time.sleep(seconds)
        nemesis.stop()
        cluster.heal()
        healed = time.monotonic()
        history.healed_at = healed - started
        log(f"chaos: healed at {history.healed_at:.1f} s; waiting for a leader, heartbeats and failovers")

        leader = _wait(cluster.leader, recovery_bound_s + 10)
        history.leader_at = (time.monotonic() - started) if leader is not None else None
        live = [d for d, dn in cluster.datanodes.items() if dn.died_at is None]
        _wait(lambda: all(cluster.datanodes[d].first_accepted_after(healed) for d in live), recovery_bound_s + 10)

        dead = [dn for dn in cluster.datanodes.values() if dn.died_at is not None]

        def all_dead_submitted() -> bool:
            done = {(c.request.from_peer.id, r) for c in cluster.migration.attempts
                    if c.outcome in ("OK", "CLIENT_GONE") for r in c.request.region_ids}
            return all((dn.datanode_id, r) in done for dn in dead for r in dn.current_regions())

        _wait(all_dead_submitted, failover_bound_s + 5)
        # Settle: a double submission or a late false one has time to show up.
        time.sleep(6)
        writer.stop()
        # The state a leader holds now: every acknowledged write must be in it.
        leader = _wait(cluster.leader, 20)
        if leader is not None:
            from supervisor_service.client import SupervisorClient

            with SupervisorClient(leader.addr, timeout=10, follow_leader=False) as client:
                try:
                    header, rows = client.dump()
                    status = client.maintenance_status()
                    if header.is_leader and status.is_leader:
                        history.final_pairs = [[row.datanode_id, row.region_id] for row in rows]
                        history.final_maintenance = [m.datanode_id for m in status.datanodes]
                        history.final_read = True
                except grpc.RpcError as exc:
                    log(f"chaos: final read failed: {exc.code().name}: {exc.details()}")
        history.ended_at = time.monotonic() - started

        # The history, from what the fakes recorded.
        for call in cluster.migration.attempts:
            req, resp = call.request, call.response
            cats = {}
            if resp is not None:
                for cat in ("migrated", "migrating", "region_not_found", "table_not_found", "leader_changed",
                            "peer_conflict", "submitted"):
                    if getattr(resp, cat):
                        cats[cat] = list(getattr(resp, cat))
            history.submits.append(Submit(
                at=call.at - started, replica=cluster.replica_of_peer(call.peer), term=req.leader_term,
                request_id=req.request_id, from_id=req.from_peer.id, to_id=req.to_peer.id,
                regions=list(req.region_ids), outcome=call.outcome, categories=cats,
                procedure_id=resp.procedure_id if resp is not None else ""))
        for call in cluster.migration.status_polls:
            state = pb.MigrationState.Name(call.response.state) if call.response is not None else ""
            history.polls.append(Poll(call.at - started, cluster.replica_of_peer(call.peer),
                                      call.request.procedure_id, state))
        history.acks = list(writer.acks)
        for dn in cluster.datanodes.values():
            if dn.died_at is not None:
                history.deaths.append(Death(dn.died_at - started, dn.datanode_id, dn.current_regions()))
            else:
                history.live_datanodes.append(dn.datanode_id)
                first = dn.first_accepted_after(healed)
                history.heartbeats_accepted_at[dn.datanode_id] = None if first is None else first - started
        history.faults = list(nemesis.records)

        executed = [s for s in history.submits if s.executed]
        after_death: list[float] = []  # death -> its first region submitted
        after_heal: list[float] = []  # heal -> the first submission of a datanode that died during the faults
        for death in history.deaths:
            times = [s.at for s in executed if s.from_id == death.datanode_id]
            if times:
                after_death.append(round(min(times) - death.at, 1))
                after_heal.append(round(max(0.0, min(times) - history.healed_at), 1))
        numbers.update({
            "faults_injected": len([f for f in history.faults if f.kind != "datanode_death"]),
            "datanodes": datanodes, "datanodes_died": len(history.deaths),
            "submit_calls": len(history.submits), "submits_carried_out": len(executed),
            "submit_decisions": len({s.request_id for s in executed}),
            "submits_refused_stale_term": sum(1 for s in history.submits if s.outcome == "FAILED_PRECONDITION"),
            "status_polls": len(history.polls),
            "terms_seen": sorted({s.term for s in history.submits}),
            "acked_writes": len(history.acks), "writes_attempted": writer.attempts,
            "writes_not_acked": writer.failures,
            "leader_after_heal_s": None if history.leader_at is None else round(history.leader_at - history.healed_at, 2),
            "worst_heartbeat_after_heal_s": round(max(
                ((v or 1e9) - history.healed_at for v in history.heartbeats_accepted_at.values()), default=0.0), 2),
            "failover_after_death_s": sorted(after_death),
            "failover_after_heal_s (0: before the heal)": sorted(after_heal),
            "procedures_answered_not_found": len({p.procedure_id for p in history.polls if p.state == "MIGRATION_STATE_NOT_FOUND"}),
            "proxy_connections": sum(p.connections for p in cluster.proxies),
            "total_s": round(time.monotonic() - t0, 1),
        })
    finally:
        if nemesis is not None and nemesis._thread.is_alive():
            nemesis.stop()
        cluster.close()
        close_harness_log(handler)
    violations = check(history)
    with open(os.path.join(cluster.work_dir, "history.json"), "w") as f:
        f.write(history.to_json())
    return RunResult(seed, history, violations, faults, cluster.work_dir, numbers,
                     list(nemesis.errors) if nemesis is not None else [])
