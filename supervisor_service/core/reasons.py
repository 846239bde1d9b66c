"""Why a failed datanode would not be failed over now, and what a decision checked (docs/design.md §18).

`HOLD_RULES` is the one list of the reasons that keep a failed datanode's regions where they
are, in the order the tick checks them: each rule reads the core's state (never changes it)
and says, in a sentence an operator can act on, whether it holds the datanode at `now`. Explain
and WhatIf read it; a new reason (a drain, a table policy) is one more function in the list.
`decision_checks` says how each guard and rule came out for a decision that was made (the
record's `checks`). Pure: no clock, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor_service.core.backoff import ResubmitBackoff
from supervisor_service.core.guards import Guards
from supervisor_service.core.holds import Warmup
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.types import Peer, SelectJob


def clock_text(ms: int) -> str:
    """An instant as an operator reads it in a log: `14:05:00 UTC`."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(ms / 1000))


def in_text(ms: int, now: int) -> str:
    return f"{clock_text(ms)} (in {max(ms - now, 0) / 1000:.1f} s)"


@dataclass(frozen=True, slots=True)
class Hold:
    """A reason that keeps a datanode's regions where they are: its name, until when (0: until something
    changes), and the sentence."""

    name: str
    until_ms: int
    text: str


@dataclass(frozen=True, slots=True)
class RuleState:
    """What the hold rules read: the core's concerns, as the supervisor owns them."""

    maintenance: Maintenance
    warmup: Warmup
    guards: Guards | None
    backoff: ResubmitBackoff
    planned: Callable[[int, int], str | None] | None = None
    """Why a table policy or a drain leaves (datanode, region) alone (`Drains.why_not_failed_over`)."""


def _maintenance(s: RuleState, datanode_id: int, region_id: int, now: int) -> Hold | None:
    m = s.maintenance
    if m.enabled:
        until = m.until_ms
        when = f"until {clock_text(until)}" if until else "until switched off (no expiry)"
        return Hold("maintenance", until, f"held: global maintenance {when}")
    if datanode_id in m.datanodes:
        until = m.datanodes[datanode_id]
        when = f"until {clock_text(until)}" if until else "until switched off (no expiry)"
        return Hold("maintenance_datanode", until, f"held: maintenance of datanode {datanode_id} {when}")
    return None


def _warmup(s: RuleState, datanode_id: int, region_id: int, now: int) -> Hold | None:
    if not s.warmup.active(now):
        return None
    d = s.warmup.details()
    until = int(d["until_ms"])  # type: ignore[call-overload]
    return Hold("warmup", until, f"held: warm-up of a new leader, {d['heard']} of {d['known']} known datanodes "
                                 f"heard, until {in_text(until, now)} at the latest")


def _local_pause(s: RuleState, datanode_id: int, region_id: int, now: int) -> Hold | None:
    g = s.guards
    if g is None:
        return None
    if g.local_pause_held(now):
        until = g.pause_hold_until
        return Hold("local_pause", until, "held: the supervisor itself stalled (local pause); convictions wait until "
                                          f"{in_text(until, now)}")
    if g.overload_held(now):
        until = g.overload_hold_until
        return Hold("overload", until, f"held: heartbeats were refused by the overloaded supervisor; convictions wait "
                                       f"until {in_text(until, now)}")
    return None


def _mass_failure(s: RuleState, datanode_id: int, region_id: int, now: int) -> Hold | None:
    g = s.guards
    if g is None or not g.mass_failure():
        return None
    return Hold("mass_failure", 0, f"held: mass failure, {g.silent_datanodes} datanodes silent "
                                   f"({g.mass_failure_fraction:.2f} > {g.s.max_failed_datanode_fraction:.2f}); "
                                   "nothing moves until fewer are silent or `supervisor-service hold release`")


def _flap_backoff(s: RuleState, datanode_id: int, region_id: int, now: int) -> Hold | None:
    g = s.guards
    if g is None:
        return None
    until = g.backoff_until(datanode_id)
    if now >= until:
        return None
    return Hold("flap_backoff", until, f"held: datanode {datanode_id} was failed over recently and failed again; "
                                       f"backed off until {in_text(until, now)}")


def _rate_limit(s: RuleState, datanode_id: int, region_id: int, now: int) -> Hold | None:
    g = s.guards
    budget = g.global_budget(now) if g is not None else None
    if budget is None or budget.available(now) >= 1:
        return None
    at = budget.ready_at(1, now)
    return Hold("rate_limited", at, f"rate limited: next token in {(at - now) / 1000:.1f} s "
                                    f"({budget.rate:g} failovers/s, burst {budget.burst:g})")


def _resubmit_backoff(s: RuleState, datanode_id: int, region_id: int, now: int) -> Hold | None:
    until = s.backoff.until_ms.get(region_id, 0) if region_id else 0
    if now >= until:
        return None
    limited = len(s.backoff.ended_ms.get(region_id, ())) > s.backoff.policy.max_resubmissions_per_window
    why = "its resubmission limit per window is reached" if limited else "its last migration ended unsettled"
    return Hold("resubmit_limit" if limited else "resubmit_backoff", until,
                f"held: region {region_id} backed off ({why}) until {in_text(until, now)}")


def _planned(s: RuleState, datanode_id: int, region_id: int, now: int) -> Hold | None:
    why = s.planned(datanode_id, region_id) if s.planned is not None else None
    if why is None:
        return None
    name, _, text = why.partition(": ")
    return Hold(name, 0, f"held: {text}")


HoldRule = Callable[[RuleState, int, int, int], "Hold | None"]
"""(the state, datanode, region or 0 for the datanode as a whole, now) -> the hold, or None."""

HOLD_RULES: tuple[HoldRule, ...] = (
    _planned, _maintenance, _warmup, _local_pause, _mass_failure, _flap_backoff, _resubmit_backoff, _rate_limit,
)
"""Every reason that holds a failed datanode (or one of its regions): a table policy or a drain first (they
hold for good, not for a while), then in the order the tick checks them."""


def holds_of(state: RuleState, datanode_id: int, region_id: int, now: int) -> list[Hold]:
    """The reasons that would hold the failover of `datanode_id` (of its `region_id`, 0: any) at `now`."""
    return [h for rule in HOLD_RULES if (h := rule(state, datanode_id, region_id, now)) is not None]


def decision_checks(state: RuleState, job: SelectJob, lookup: Peer | None, peers: int,
                    wanted: dict[int, int], granted: dict[int, int], phis: list[float], threshold: float,
                    datanodes: int) -> list[str]:
    """How each guard and rule came out for a decision that was made (a record's `checks`)."""
    d = job.datanode_id
    out = [f"phi: {sum(p >= threshold for p in phis)} of {len(phis)} regions at or above the threshold "
           f"{threshold:g} (max {max(phis, default=0.0):.2f})"]
    m = state.maintenance
    out.append(f"maintenance: off (global and datanode {d})" if not m.covers(d) else "maintenance: on")
    out.append("warmup: over")
    g = state.guards
    if g is None:
        out.append("guards: off (setting guards_enabled): no local pause, overload, mass failure or rate limit")
    else:
        s = g.s
        out.append(f"local_pause: no stall above {s.max_local_pause_ms} ms" if s.max_local_pause_ms else
                   "local_pause: off")
        out.append("overload: no heartbeat refused, event queue not saturated")
        silent = g.silent_datanodes
        out.append(f"mass_failure: {silent} of {datanodes} datanodes silent "
                   f"({g.mass_failure_fraction:.2f} <= {s.max_failed_datanode_fraction:.2f})"
                   if not g.released_mass_failure else "mass_failure: released by an operator")
        out.append(f"flap_backoff: none for datanode {d}")
        out.append(f"rate_limit: global token taken ({s.failover_rate_per_s:g}/s, burst {s.failover_burst})"
                   if s.failover_rate_per_s > 0 else "rate_limit: off")
        for target, n in sorted(wanted.items()):
            out.append(f"target_rate_limit: datanode {target} granted {granted.get(target, 0)} of {n} regions")
    if lookup is None:
        out.append(f"source: datanode {d} unknown to PeerLookup: a peer with id {d} and no address")
    else:
        out.append(f"source: datanode {d} at {lookup.addr or '(no address)'}")
    excluded = sorted(set(job.exclude_targets) | {d})
    out.append(f"targets: the Selector gave {peers} peers for {len(job.region_ids)} regions; "
               f"excluded datanodes {excluded}")
    return out
