"""What if these datanodes stopped heartbeating now (docs/design.md §18)?

Computed on the supervisor thread from the same table and guards, read only: each datanode's
conviction (the first instant phi of one of its regions reaches the threshold with no heartbeat),
the holds that would keep it (the same `reasons.HOLD_RULES`, and the mass-failure guard as it
would count the silent datanodes at each conviction), and when the global rate limit (a copy of
its bucket) would let each datanode go, the longest-failed first as the tick orders them. The
real submission happens at the first tick at or after `earliest_submit_millis`, plus the
Selector's answer. Per-target budgets depend on the Selector's choice and are not modelled.
No remote call, no state change.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

from supervisor_service.core.guards import Guards
from supervisor_service.core.inflight import InFlight
from supervisor_service.core.phivec import safe_y
from supervisor_service.core.reasons import RuleState, clock_text, holds_of
from supervisor_service.core.table import SILENT_INTERVALS, DetectorTable, GroupSnapshot, NodeSnapshot

MAX_WHATIF_DATANODES = 2000
"""Datanodes one WhatIf may name: it runs on the supervisor thread (about 45 µs per datanode)."""
_FAR = 2**62


@functools.lru_cache(maxsize=8)
def _safe_y(threshold: float) -> float:
    return safe_y(threshold)


def crossing_ms(g: GroupSnapshot, threshold: float) -> int:
    """The first millisecond at which phi of the group reaches `threshold` if no heartbeat arrives.

    phi is below the threshold up to mean + safe_y * std (core.phivec); from there the crossing is a
    few milliseconds on, found by galloping then bisecting over the detector's own phi (its bits)."""
    last = g.last
    if g.phi(last) >= threshold:
        return last
    lo = max(int(min(g.mean + _safe_y(threshold) * g.std, _FAR)) - 2, 0)
    if g.phi(last + lo) >= threshold:  # not expected (the bound is safe): search from the last heartbeat
        lo = 0
    step = 1
    hi = lo + step  # phi(last + lo) < threshold
    while g.phi(last + hi) < threshold:
        lo, step = hi, step * 2
        hi = lo + step
        if hi > _FAR:
            return _FAR
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if g.phi(last + mid) >= threshold:
            hi = mid
        else:
            lo = mid
    return last + hi


@dataclass(frozen=True, slots=True)
class PlannedFailover:
    datanode_id: int
    regions: int
    predicted_failure_millis: int
    earliest_submit_millis: int  # 0: held, nothing would be submitted


@dataclass(frozen=True, slots=True)
class WhatIfPlan:
    held_by: tuple[str, ...]
    plans: tuple[PlannedFailover, ...]
    all_submitted_by_millis: int  # 0: something would stay held (or nothing to move)
    summary: str


@dataclass(slots=True)
class _Node:
    datanode_id: int
    regions: int
    convicted: int  # first crossing of its regions not in flight
    silent_at: int  # when the mass-failure guard would count it silent


class _SilentCount:
    """How many datanodes the mass-failure guard would count silent at a time: those already silent, and
    the named ones whose silence has lasted long enough by then (a sorted list: one bisection per time)."""

    def __init__(self, nodes: list[_Node], already: int) -> None:
        self._times = sorted(n.silent_at for n in nodes)
        self._already = already

    def at(self, t: int) -> int:
        return self._already + bisect.bisect_right(self._times, t)


class WhatIf:
    """`plan(datanode_ids, now)`: the prediction, from the table, the guards and the holds (read only)."""

    def __init__(self, table: DetectorTable, inflight: InFlight, rules: RuleState) -> None:
        self._table = table
        self._inflight = inflight
        self._rules = rules

    def plan(self, datanode_ids: tuple[int, ...], now: int) -> WhatIfPlan:
        guards = self._rules.guards
        known = set(self._table.datanode_ids())
        unknown = sorted({d for d in datanode_ids if d not in known})
        snapshots = {node.datanode_id: node for node in self._table.snapshot(set(datanode_ids))}  # one pass
        nodes = [n for d in sorted(snapshots) if (n := self._node(snapshots[d], guards)) is not None]
        held_by: list[str] = [f"datanode {d} has no detector: nothing to fail over" for d in unknown]
        handled = {n.datanode_id for n in nodes}
        held_by += [f"datanode {d}: every region of it is already being migrated" for d in sorted(snapshots)
                    if d not in handled]
        silent = _SilentCount(nodes, self._already_silent(nodes, guards, now))
        mass_at = self._mass_failure_time(nodes, silent, guards)
        bucket = guards.global_budget(now) if guards is not None else None
        plans: dict[int, PlannedFailover] = {}
        gated: list[tuple[int, int, _Node]] = []
        for n in nodes:
            if mass_at is not None and n.convicted >= mass_at:
                plans[n.datanode_id] = PlannedFailover(n.datanode_id, n.regions, n.convicted, 0)
                continue
            gate, why = n.convicted, ""
            delay = guards.flap_delay(n.datanode_id) if guards is not None else 0
            gate = max(gate, n.convicted + delay)
            for hold in holds_of(self._rules, n.datanode_id, 0, now):
                if hold.name in ("rate_limited", "flap_backoff"):
                    continue  # simulated below / above
                if hold.until_ms == 0:
                    why = hold.text
                    break
                gate = max(gate, hold.until_ms)
            if why:
                held_by.append(f"datanode {n.datanode_id}: {why}")
                plans[n.datanode_id] = PlannedFailover(n.datanode_id, n.regions, n.convicted, 0)
                continue
            gated.append((gate, n.convicted, n))
        # The tick serves the longest-failed datanode first; each takes one global token at a tick.
        tick = guards.next_tick if guards is not None else (lambda t: t)
        for gate, _, n in sorted(gated, key=lambda x: (x[0], x[1], x[2].datanode_id)):
            at = tick(max(gate, now))  # one already failed goes at the next tick
            if bucket is not None:
                at = tick(bucket.ready_at(1, at))
                bucket.take(1, at)
            plans[n.datanode_id] = PlannedFailover(n.datanode_id, n.regions, n.convicted, at)
        if mass_at is not None:
            count = silent.at(mass_at)
            frac = count / max(self._table.datanode_count, 1)
            held_by.insert(0, f"mass_failure: {count} of {self._table.datanode_count} datanodes would be silent "
                              f"({frac:.2f} > {guards.s.max_failed_datanode_fraction:.2f}) from "  # type: ignore[union-attr]
                              f"{clock_text(mass_at)}: nothing convicted from then on would move")
        ordered = tuple(plans[n.datanode_id] for n in nodes)
        all_by = 0
        if ordered and all(p.earliest_submit_millis for p in ordered):
            all_by = max(p.earliest_submit_millis for p in ordered)
        return WhatIfPlan(tuple(held_by), ordered, all_by, self._summary(ordered, held_by, all_by, bucket, now))

    def _node(self, node: NodeSnapshot, guards: Guards | None) -> _Node | None:
        d = node.datanode_id
        threshold = self._table.opts.threshold
        groups = node.groups
        regions = [r for r in node.regions.tolist() if not self._inflight.holds(r)]
        gids = {int(g) for r, g in zip(node.regions.tolist(), node.gids.tolist()) if not self._inflight.holds(r)}
        if not gids:
            return None
        convicted = min(crossing_ms(groups[g], threshold) for g in gids)
        newest = max(g.last for g in groups.values())
        mean = max(g.observed_mean for g in groups.values())
        silence = guards.s.mass_failure_silence_ms if guards is not None else 0
        silent_at = newest + int(max(silence, SILENT_INTERVALS * mean)) + 1
        return _Node(d, len(regions), convicted, silent_at)

    def _already_silent(self, nodes: list[_Node], guards: Guards | None, now: int) -> int:
        """Datanodes silent now that were not named (they stay silent)."""
        if guards is None:
            return 0
        asked = {n.datanode_id for n in nodes}
        return sum(1 for d in self._table.silent_datanodes(now, guards.s.mass_failure_silence_ms) if d not in asked)

    def _mass_failure_time(self, nodes: list[_Node], silent: _SilentCount, guards: Guards | None) -> int | None:
        """The first conviction from which the mass-failure guard would hold (None: never)."""
        if guards is None:
            return None
        if guards.mass_failure():
            return min((n.convicted for n in nodes), default=0)
        s = guards.s
        total = self._table.datanode_count
        if s.max_failed_datanode_fraction >= 1 or not total:
            return None
        for at in sorted(n.convicted for n in nodes):
            count = silent.at(at)
            if count >= s.mass_failure_min_datanodes and count / total > s.max_failed_datanode_fraction:
                return at
        return None

    @staticmethod
    def _summary(plans: tuple[PlannedFailover, ...], held_by: list[str], all_by: int, bucket: object,
                 now: int) -> str:
        if not plans:
            return "nothing would be failed over: " + ("; ".join(held_by) if held_by else "no datanode named")
        regions = sum(p.regions for p in plans)
        moving = [p for p in plans if p.earliest_submit_millis]
        first = min(p.predicted_failure_millis for p in plans)
        out = (f"{_n(len(plans), 'datanode')} ({_n(regions, 'region')}) would be convicted from "
               f"{clock_text(first)}")
        if not moving:
            return f"{out}; nothing would move: {held_by[0] if held_by else 'held'}"
        if all_by:
            out += f"; all submitted by {clock_text(all_by)} (in {(all_by - now) / 1000:.1f} s"
            out += ", rate limits included)" if bucket is not None else ")"
        else:
            out += f"; {len(moving)} of {len(plans)} datanodes would move, the rest held: {held_by[0]}"
        return out


def _n(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"
