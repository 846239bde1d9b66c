"""The nemesis: a fault schedule drawn from the seed, applied to a running `ChaosCluster`.

`schedule(seed, seconds)` is a pure function: the same seed gives the same
list of (start, duration, kind, choices) every time, which is what makes a
violation reproducible from its seed (the timing of the processes under it
is the machine's, so a rare race may need a few runs of the same seed).
Kinds come in rounds: every kind once per round, in a random order, so a
run of a few minutes injects each of them. Faults may overlap.

Which replica "the leader" is gets resolved when the fault starts, and is
recorded with the fault.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import grpc

from tests.chaos.cluster import MIGRATION_TIMEOUT_MS, REMOTE_TIMEOUT_MS, TTL_MS, ChaosCluster, Replica
from tests.chaos.history import FaultRecord

# (kind, family) in the order of the report's rows.
KINDS: tuple[tuple[str, str], ...] = (
    ("replica_kill", "process"),
    ("replica_pause", "process"),
    ("etcd_kill_one", "process"),
    ("etcd_pause_one", "process"),
    ("etcd_kill_majority", "process"),
    ("etcd_pause_majority", "process"),
    ("cut_etcd", "network"),
    ("cut_etcd_oneway", "network"),
    ("cut_datanodes", "network"),
    ("cut_datanodes_oneway", "network"),
    ("cut_remotes", "network"),
    ("cut_remotes_oneway", "network"),
    ("reset_links", "network"),
    ("delay", "network"),
    ("loss", "network"),
    ("migration_hang", "remote"),
    ("migration_unavailable", "remote"),
    ("migration_two_categories", "remote"),
    ("migration_unknown_procedure", "remote"),
    ("migration_slow", "remote"),
    ("selector_self", "remote"),
    ("selector_fewer", "remote"),
    ("selector_duplicates", "remote"),
    ("selector_zero_id", "remote"),
    ("clock_forward", "clock"),
    ("clock_back", "clock"),
)
KIND_NAMES = tuple(k for k, _ in KINDS)
DATANODE_DEATH = "datanode_death"


@dataclass(frozen=True)
class Fault:
    start: float  # seconds after the chaos phase began
    duration: float
    kind: str
    leader: bool  # aim at the leader (else a replica or member drawn from `pick`)
    pick: int  # which replica / member / link group / direction, drawn up front
    amount: float  # size of the fault: delay, loss, clock step, pause length, ...

    def describe(self) -> str:
        return (f"{self.start:6.1f}s +{self.duration:4.1f}s {self.kind:<28} "
                f"{'leader' if self.leader else f'pick {self.pick}'} amount {self.amount:g}")


def schedule(seed: int, seconds: float, kinds: tuple[str, ...] = KIND_NAMES) -> list[Fault]:
    rng = random.Random(seed)
    out: list[Fault] = []
    t = 1.0
    round_: list[str] = []
    while t < seconds - 2:
        if not round_:
            round_ = list(kinds)
            rng.shuffle(round_)
        kind = round_.pop()
        duration = rng.uniform(1.5, 5.0)
        if kind == "replica_pause":
            duration = TTL_MS / 1000 + rng.uniform(0.5, 3.0)  # past its lease
        amount = {
            "delay": rng.choice((0.05, 0.1, 0.2, 0.4)),
            "loss": rng.choice((0.05, 0.1, 0.2)),
            "clock_forward": rng.choice((30, 300, 3600)),
            "clock_back": -rng.choice((30, 300, 3600)),
            "migration_hang": REMOTE_TIMEOUT_MS / 1000 + rng.uniform(0.5, 2.0),
            "migration_slow": MIGRATION_TIMEOUT_MS / 1000 + rng.uniform(3.0, 8.0),
        }.get(kind, 0.0)
        duration = min(duration, max(1.0, seconds - t))
        out.append(Fault(round(t, 2), round(duration, 2), kind, rng.random() < 0.6, rng.randrange(1 << 30),
                         amount))
        # The next fault starts after a gap, or (one time in three) while this one is still on.
        t += duration * 0.5 if rng.random() < 0.33 else duration + rng.uniform(0.3, 1.5)
    return out


def deaths(seed: int, seconds: float, datanodes: list[int], count: int) -> list[tuple[float, int]]:
    """Which datanodes really die, and when (seconds after the chaos phase began)."""
    rng = random.Random(seed ^ 0x5EED)
    victims = rng.sample(datanodes, min(count, len(datanodes)))
    return sorted((round(rng.uniform(2.0, max(3.0, seconds * 0.8)), 2), d) for d in victims)


class Nemesis:
    """Applies a schedule to a cluster from a thread; records every fault it injected."""

    def __init__(self, cluster: ChaosCluster, faults: list[Fault], started_at: float,
                 death_plan: list[tuple[float, int]]) -> None:
        self.cluster = cluster
        self.faults = faults
        self.death_plan = death_plan
        self.started_at = started_at
        self.records: list[FaultRecord] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _now(self) -> float:
        return time.monotonic() - self.started_at

    def _run(self) -> None:
        events: list[tuple[float, int, str, object]] = []
        for i, f in enumerate(self.faults):
            events.append((f.start, i, "apply", f))
        for i, (at, d) in enumerate(self.death_plan):
            events.append((at, 10_000 + i, "death", d))
        events.sort(key=lambda e: (e[0], e[1]))
        active: list[tuple[float, FaultRecord, object]] = []  # (end, record, undo)
        pending = list(events)
        while not self._stop.is_set() and (pending or active):
            now = self._now()
            for item in [a for a in active if a[0] <= now]:
                active.remove(item)
                self._undo(item[1], item[2])
            while pending and pending[0][0] <= now:
                _, _, what, arg = pending.pop(0)
                if what == "death":
                    self.cluster.kill_datanode(arg)
                    self.records.append(FaultRecord(DATANODE_DEATH, f"datanode {arg}", now, None))
                    continue
                fault = arg
                try:
                    target, undo = self._apply(fault)
                except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported
                    self.errors.append(f"{fault.kind}: {exc!r}")
                    continue
                record = FaultRecord(fault.kind, target, now, None)
                self.records.append(record)
                active.append((now + fault.duration, record, undo))
            nxt = min([a[0] for a in active] + ([pending[0][0]] if pending else []) + [now + 0.5])
            self._stop.wait(max(0.01, nxt - now))
        for _, record, undo in active:
            self._undo(record, undo)

    def _undo(self, record: FaultRecord, undo) -> None:
        try:
            undo()
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"undo {record.kind}: {exc!r}")
        record.end = self._now()

    # ------------------------------------------------------------ faults

    def _replica(self, fault: Fault) -> Replica:
        c = self.cluster
        if fault.leader:
            leader = c.leader()
            if leader is not None:
                return leader
        return c.replicas[fault.pick % len(c.replicas)]

    def _apply(self, f: Fault):
        c = self.cluster
        kind = f.kind
        if kind == "replica_kill":
            r = self._replica(f)
            r.kill()
            return r.name, r.start
        if kind == "replica_pause":
            r = self._replica(f)
            r.pause()
            return r.name, r.resume
        if kind.startswith("etcd_"):
            members = list(c.etcd.members)
            start = f.pick % len(members)
            chosen = [members[(start + k) % len(members)] for k in range(2 if "majority" in kind else 1)]
            names = ",".join(m.name for m in chosen)
            if "kill" in kind:
                for m in chosen:
                    m.kill()
                return names, lambda: [m.start() for m in chosen if not m.running]
            for m in chosen:
                m.pause()
            return names, lambda: [m.resume() for m in chosen]
        if kind.startswith("cut_") or kind in ("reset_links", "delay", "loss"):
            r = self._replica(f)
            group = {"cut_etcd": "etcd", "cut_etcd_oneway": "etcd", "cut_datanodes": "datanodes",
                     "cut_datanodes_oneway": "datanodes", "cut_remotes": "remotes",
                     "cut_remotes_oneway": "remotes"}.get(kind) or ("etcd", "datanodes", "remotes")[f.pick % 3]
            links = r.links(group)
            if kind.endswith("_oneway"):
                up = (f.pick >> 3) % 2 == 0
                for p in links:
                    p.hold(up=up, down=not up)
                target = f"{r.name} {group} {'out' if up else 'in'}bound held"
            elif kind.startswith("cut_"):
                for p in links:
                    p.hold()
                target = f"{r.name} {group} both ways"
            elif kind == "reset_links":
                for p in links:
                    p.reset(refuse=True)
                target = f"{r.name} {group} reset, refused"
            elif kind == "delay":
                for p in links:
                    p.delay_s = f.amount
                target = f"{r.name} {group} +{f.amount * 1000:.0f} ms"
            else:
                for p in links:
                    p.loss, p.stall_s = f.amount, 0.5
                target = f"{r.name} {group} loss {f.amount:.0%}"
            return target, lambda: [p.heal() for p in links]
        if kind == "migration_hang":
            after = f.pick % 2 == 0
            c.migration.hang(f.amount, methods=["SubmitRegionMigration"], after=after)
            return f"{f.amount:.1f} s, {'answer' if after else 'call'} late", c.migration.clear_faults
        if kind == "migration_unavailable":
            c.migration.fail(grpc.StatusCode.UNAVAILABLE, details="chaos: RegionMigration unavailable")
            return "every method", c.migration.clear_faults
        if kind == "migration_slow":
            c.migration.slow_s = f.amount
            return f"procedures started now run {f.amount:.1f} s", lambda: setattr(c.migration, "slow_s", 0.0)
        if kind == "migration_two_categories":
            c.migration.contradict_next += 2
            return "next 2 submissions", lambda: setattr(c.migration, "contradict_next", 0)
        if kind == "migration_unknown_procedure":
            now = c.migration.forget_one()
            return "a running procedure" if now else "the next procedure", lambda: None
        if kind.startswith("selector_"):
            lie = {"selector_self": "self", "selector_fewer": "fewer", "selector_duplicates": "duplicates",
                   "selector_zero_id": "zero_id"}[kind]
            c.selector.lie = lie
            return lie, lambda: setattr(c.selector, "lie", "")
        if kind in ("clock_forward", "clock_back"):
            r = self._replica(f)
            c.set_clock_offset(r.index, int(f.amount * 1000))
            return f"{r.name} wall clock {f.amount:+g} s", lambda: c.set_clock_offset(r.index, 0)
        raise ValueError(f"unknown fault kind {kind!r}")
