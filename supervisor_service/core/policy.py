"""Per-table failover policy: failover disabled for a table, and a priority (docs/design.md §17).

A region's table is the high 32 bits of its id (`region_id >> 32`, GreptimeDB's RegionId). A
table without a policy fails over, at priority 0. A disabled table's regions are never failed
over (a planned drain still moves them: the operator asked for it); under a rate limit, and in
drains, regions of higher-priority tables are submitted first, and equal priorities keep the
order they came in (the oldest failure first). The whole policy is one small stored value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from supervisor_service.core.changes import TablePoliciesSet
from supervisor_service.core.outbox import Outbox

MAX_TABLE_ID = 2**32 - 1
MAX_TABLE_POLICIES = 10_000  # tables with a policy: the whole policy is one stored value (a few hundred KB at most)


class PolicyRefused(Exception):
    """A policy change that cannot be applied (FAILED_PRECONDITION at the edge)."""
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1


def table_of(region_id: int) -> int:
    """The table of a region: the high 32 bits of its id."""
    return region_id >> 32


@dataclass(frozen=True, slots=True)
class TablePolicy:
    table_id: int
    failover_enabled: bool = True
    priority: int = 0

    @property
    def is_default(self) -> bool:
        return self.failover_enabled and self.priority == 0


class TablePolicies:
    """The policies of the tables that have one (owned by the supervisor thread)."""

    def __init__(self, out: Outbox) -> None:
        self._out = out
        self._by_table: dict[int, TablePolicy] = {}
        self._disabled: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self._by_table)

    def set(self, table_ids: Iterable[int], enabled: bool | None, priority: int | None) -> tuple[TablePolicy, ...]:
        """Give each table this policy (None: keep the table's own); the default one removes it. The
        whole policy is stored."""
        ids = sorted(set(table_ids))
        new = {t: self._changed_policy(t, enabled, priority) for t in ids}
        after = len(self._by_table) + sum(1 for t, p in new.items() if not p.is_default and t not in self._by_table)
        if after > MAX_TABLE_POLICIES:
            raise PolicyRefused(f"{after} tables would have a policy; at most {MAX_TABLE_POLICIES} may: "
                                "remove some first (policy set TABLE... --failover on --priority 0)")
        for t, policy in new.items():
            if policy.is_default:
                self._by_table.pop(t, None)
            else:
                self._by_table[t] = policy
        self._changed()
        self._out.changes.append(TablePoliciesSet(self.all()))
        return tuple(self.get(t) for t in ids)

    def _changed_policy(self, table_id: int, enabled: bool | None, priority: int | None) -> TablePolicy:
        old = self.get(table_id)
        return TablePolicy(table_id, old.failover_enabled if enabled is None else enabled,
                           old.priority if priority is None else priority)

    def load(self, policies: Iterable[TablePolicy]) -> None:
        self._by_table = {p.table_id: p for p in policies if not p.is_default}
        self._changed()

    def _changed(self) -> None:
        self._disabled = frozenset(t for t, p in self._by_table.items() if not p.failover_enabled)

    def get(self, table_id: int) -> TablePolicy:
        return self._by_table.get(table_id) or TablePolicy(table_id)

    def all(self) -> tuple[TablePolicy, ...]:
        return tuple(self._by_table[t] for t in sorted(self._by_table))

    def disabled(self, region_id: int) -> bool:
        return table_of(region_id) in self._disabled

    def priority(self, region_id: int) -> int:
        p = self._by_table.get(table_of(region_id))
        return 0 if p is None else p.priority

    def failover_allowed(self, region_ids: Sequence[int]) -> list[int]:
        """The regions whose table may fail over, in their order."""
        if not self._disabled:
            return list(region_ids)
        return [r for r in region_ids if table_of(r) not in self._disabled]

    def by_priority(self, region_ids: Sequence[int]) -> list[int]:
        """Highest priority first; equal priorities keep their order."""
        if not self._by_table:
            return list(region_ids)
        return sorted(region_ids, key=lambda r: -self.priority(r))

    def top_priority(self, region_ids: Iterable[int]) -> int:
        """The highest priority among the regions (0 without any policy)."""
        if not self._by_table:
            return 0
        return max((self.priority(r) for r in region_ids), default=0)
