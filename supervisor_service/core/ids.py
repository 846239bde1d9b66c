"""The identifiers the core hands out: selection jobs and submission attempts, and request ids."""

from __future__ import annotations

import uuid


class Ids:
    """One sequence for selection job ids and submission attempt (task) ids."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 1

    def next(self) -> int:
        self._next += 1
        return self._next - 1

    @staticmethod
    def request_id(term: int) -> str:
        """A decision's idempotency key. Unique across leaders and lives (a term alone can repeat if a
        store is lost): a key that two decisions share would make RegionMigration answer one with the
        other."""
        return f"{term}-{uuid.uuid4().hex}"
