"""The recorded history of a chaos run and the checker of its invariants.

A `History` holds plain records (JSON in `history.json` of a run, hand-made
in the checker's unit tests): every SubmitRegionMigration and
GetMigrationStatus that reached the fake RegionMigration (with the replica
it came from and its term), every Register / SetMaintenanceMode the harness
had acknowledged, the datanodes that really died, the faults, and what was
observed after the faults healed. `check(history)` returns the violations;
an empty list means every invariant held.

Times are seconds on the harness's monotonic clock since the run started.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field

# The invariants, in the order of the report's columns.
SINGLE_SUBMITTER = "one_submitter_per_term"
TERMS_FORWARD = "terms_never_back"
NO_DOUBLE_SUBMIT = "no_double_submit"
DEAD_FAILED_OVER = "dead_failed_over"
LIVE_NOT_FAILED_OVER = "live_not_failed_over"
ACKED_KEPT = "acked_writes_kept"
RECOVERY = "leader_and_heartbeats"
INVARIANTS = (SINGLE_SUBMITTER, TERMS_FORWARD, NO_DOUBLE_SUBMIT, DEAD_FAILED_OVER, LIVE_NOT_FAILED_OVER,
              ACKED_KEPT, RECOVERY)

# Answers that start (or may have started) a migration of a region: the decision holds it.
_HOLDING = ("submitted", "migrating", "migrated")
# Ends of a migration that leave the region where it was: a new decision may move it again.
_RELEASING_STATES = ("MIGRATION_STATE_NOT_FOUND", "MIGRATION_STATE_FAILED")


@dataclass
class Submit:
    at: float
    replica: str
    term: int
    request_id: str
    from_id: int
    to_id: int
    regions: list[int]
    outcome: str  # "OK", "CLIENT_GONE" (carried out; the caller had given up), or the status it was refused with
    categories: dict[str, list[int]] = field(default_factory=dict)  # the answer: category -> regions
    procedure_id: str = ""

    @property
    def executed(self) -> bool:
        return self.outcome in ("OK", "CLIENT_GONE")


@dataclass
class Poll:
    at: float
    replica: str
    procedure_id: str
    state: str  # the MigrationState name answered, or "" when the call failed


@dataclass
class Ack:
    at: float
    kind: str  # "register" | "maintenance"
    pairs: list[list[int]] = field(default_factory=list)  # register: [datanode_id, region_id]
    datanode_ids: list[int] = field(default_factory=list)  # maintenance: switched on for these


@dataclass
class Death:
    at: float
    datanode_id: int
    regions: list[int]


@dataclass
class FaultRecord:
    kind: str
    target: str
    start: float
    end: float | None = None


@dataclass
class History:
    seed: int = 0
    started_at: float = 0.0
    submits: list[Submit] = field(default_factory=list)
    polls: list[Poll] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    deaths: list[Death] = field(default_factory=list)
    live_datanodes: list[int] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    healed_at: float = 0.0
    leader_at: float | None = None  # first time after healing a replica said it leads
    heartbeats_accepted_at: dict[int, float | None] = field(default_factory=dict)  # live datanode -> first after heal
    final_pairs: list[list[int]] = field(default_factory=list)  # the leader's Dump after healing
    final_maintenance: list[int] = field(default_factory=list)  # datanodes in maintenance after healing
    final_read: bool = False  # the final Dump and maintenance status were read from a leader
    ended_at: float = 0.0
    failover_bound_s: float = 60.0
    recovery_bound_s: float = 30.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> History:
        raw = json.loads(text)
        raw["submits"] = [Submit(**s) for s in raw["submits"]]
        raw["polls"] = [Poll(**p) for p in raw["polls"]]
        raw["acks"] = [Ack(**a) for a in raw["acks"]]
        raw["deaths"] = [Death(**d) for d in raw["deaths"]]
        raw["faults"] = [FaultRecord(**f) for f in raw["faults"]]
        raw["heartbeats_accepted_at"] = {int(k): v for k, v in raw["heartbeats_accepted_at"].items()}
        return cls(**raw)


@dataclass(frozen=True)
class Violation:
    invariant: str
    at: float  # when it happened (for attributing it to the faults active then)
    detail: str


def check(h: History) -> list[Violation]:
    out: list[Violation] = []
    for fn in (_one_submitter_per_term, _terms_never_back, _no_double_submit, _dead_failed_over,
               _live_not_failed_over, _acked_writes_kept, _leader_and_heartbeats):
        out.extend(fn(h))
    return out


def _one_submitter_per_term(h: History) -> list[Violation]:
    """Every SubmitRegionMigration that reached RegionMigration (whatever its answer) under one term
    came from one replica."""
    first: dict[int, Submit] = {}
    out = []
    for s in sorted(h.submits, key=lambda s: s.at):
        seen = first.setdefault(s.term, s)
        if seen.replica != s.replica:
            out.append(Violation(SINGLE_SUBMITTER, s.at, f"term {s.term} submitted by {seen.replica} at "
                                 f"{seen.at:.2f} s and by {s.replica} at {s.at:.2f} s"))
            first[s.term] = s  # one report per change of submitter
    return out


def _terms_never_back(h: History) -> list[Violation]:
    """What RegionMigration carried out arrived in non-decreasing term order: no deposed leader's
    submission was carried out after a newer leader's."""
    out = []
    highest: Submit | None = None
    for s in sorted((s for s in h.submits if s.executed), key=lambda s: s.at):
        if highest is not None and s.term < highest.term:
            out.append(Violation(TERMS_FORWARD, s.at, f"term {s.term} from {s.replica} carried out at {s.at:.2f} s "
                                 f"after term {highest.term} from {highest.replica} at {highest.at:.2f} s"))
        if highest is None or s.term > highest.term:
            highest = s
    return out


def _no_double_submit(h: History) -> list[Violation]:
    """A region of a datanode is in at most one live decision at a time: a second decision (another
    request_id) moving it again is allowed only once the first one ended without moving it (its
    answer left the region out or put it in peer_conflict, or GetMigrationStatus said NOT_FOUND or
    FAILED before the second arrived), or ended at all (SUCCEEDED) while the datanode was still alive.
    Retries of one decision share its request_id."""
    released_at: dict[str, float] = {}
    succeeded_at: dict[str, float] = {}
    for p in sorted(h.polls, key=lambda p: p.at):
        if p.state in _RELEASING_STATES:
            released_at.setdefault(p.procedure_id, p.at)
        elif p.state == "MIGRATION_STATE_SUCCEEDED":
            succeeded_at.setdefault(p.procedure_id, p.at)
    died = {d.datanode_id: d.at for d in h.deaths}
    decisions: dict[tuple[int, int], list[Submit]] = defaultdict(list)
    seen_requests: set[tuple[str, int, int]] = set()
    for s in sorted((s for s in h.submits if s.executed), key=lambda s: s.at):
        for r in s.regions:
            key = (s.request_id, s.from_id, r)
            if s.request_id and key in seen_requests:
                continue  # a retry of a decision already counted
            seen_requests.add(key)
            decisions[(s.from_id, r)].append(s)
    doubles: dict[tuple[str, int], tuple[Submit, Submit, list[int]]] = {}
    for (d, r), subs in sorted(decisions.items()):
        for earlier, later in zip(subs, subs[1:]):
            held = any(r in earlier.categories.get(c, ()) for c in _HOLDING)
            freed = released_at.get(earlier.procedure_id)
            done = succeeded_at.get(earlier.procedure_id)
            if freed is None and done is not None and not (d in died and died[d] <= done):
                # A datanode alive after the move ended heartbeats the region again (it was given
                # back): a new failure is a new decision. A dead one reports nothing: moving its
                # region again after the move ended is a double (a state that forgot the move).
                freed = done
            if held and not (earlier.procedure_id and freed is not None and freed <= later.at):
                doubles.setdefault((later.request_id, d), (earlier, later, []))[2].append(r)
    out = []
    for (_, d), (earlier, later, regions) in doubles.items():  # one report per decision that moved again
        out.append(Violation(NO_DOUBLE_SUBMIT, later.at, f"region {regions[0]} of datanode {d} ({len(regions)} "
                             f"in all) submitted again at {later.at:.2f} s (request {later.request_id}, term "
                             f"{later.term}, from {later.replica}) while request {earlier.request_id} of "
                             f"{earlier.at:.2f} s (term {earlier.term}, from {earlier.replica}, procedure "
                             f"{earlier.procedure_id or '-'}) had not ended"))
    return out


def _dead_failed_over(h: History) -> list[Violation]:
    """Every region of a datanode that really died was submitted (and carried out) by
    max(its death, the heal) + failover_bound_s."""
    first: dict[tuple[int, int], float] = {}
    for s in h.submits:
        if s.executed:
            for r in s.regions:
                key = (s.from_id, r)
                first[key] = min(first.get(key, s.at), s.at)
    out = []
    for death in h.deaths:
        due = max(death.at, h.healed_at) + h.failover_bound_s
        missing = [r for r in death.regions if first.get((death.datanode_id, r), float("inf")) > due]
        if missing:
            out.append(Violation(DEAD_FAILED_OVER, due, f"datanode {death.datanode_id} died at {death.at:.2f} s: "
                                 f"{len(missing)} of {len(death.regions)} regions not submitted by {due:.2f} s "
                                 f"(e.g. {missing[:3]})"))
    return out


def _live_not_failed_over(h: History) -> list[Violation]:
    """No datanode was failed over while it was alive: never one that lived to the end, and a dead
    one only after its death."""
    died = {d.datanode_id: d.at for d in h.deaths}
    live = set(h.live_datanodes)
    out = []
    reported: set[int] = set()
    for s in sorted((s for s in h.submits if s.executed), key=lambda s: s.at):
        d = s.from_id
        alive = d in live or (d in died and s.at < died[d])
        if alive and d not in reported:
            reported.add(d)
            out.append(Violation(LIVE_NOT_FAILED_OVER, s.at, f"datanode {d}, alive, failed over at {s.at:.2f} s "
                                 f"(term {s.term}, from {s.replica}, regions {s.regions[:3]})"))
    return out


def _acked_writes_kept(h: History) -> list[Violation]:
    """Every Register and SetMaintenanceMode the harness saw acknowledged is in the leader's state
    after healing (a registered region of a datanode that died may have been failed over and
    deregistered since)."""
    if not h.final_read:
        return [Violation(ACKED_KEPT, h.ended_at, "the final Dump / maintenance status could not be read from a leader")]
    pairs = {tuple(p) for p in h.final_pairs}
    maintenance = set(h.final_maintenance)
    died = {d.datanode_id for d in h.deaths}
    out = []
    for ack in h.acks:
        lost_pairs = [p for p in ack.pairs if tuple(p) not in pairs and p[0] not in died]
        lost_dn = [d for d in ack.datanode_ids if d not in maintenance]
        if lost_pairs or lost_dn:
            what = f"registered pairs {lost_pairs[:3]}" if lost_pairs else f"maintenance of datanodes {lost_dn[:3]}"
            out.append(Violation(ACKED_KEPT, ack.at, f"acknowledged at {ack.at:.2f} s and lost: {what}"))
    return out


def _leader_and_heartbeats(h: History) -> list[Violation]:
    """After healing, a replica leads and every live datanode's heartbeats are accepted, each within
    recovery_bound_s."""
    due = h.healed_at + h.recovery_bound_s
    out = []
    if h.leader_at is None or h.leader_at > due:
        out.append(Violation(RECOVERY, due, f"no leader within {h.recovery_bound_s:g} s of healing "
                             f"(first seen: {h.leader_at})"))
    late = sorted(d for d in h.live_datanodes
                  if h.heartbeats_accepted_at.get(d) is None or h.heartbeats_accepted_at[d] > due)
    if late:
        out.append(Violation(RECOVERY, due, f"{len(late)} live datanodes without an accepted heartbeat within "
                             f"{h.recovery_bound_s:g} s of healing: {late[:5]}"))
    return out
