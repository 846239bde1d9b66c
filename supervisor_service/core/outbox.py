"""What handling events produced, in order: effects for the runtime, state changes for the store.

Every concern of the core appends to the one `Outbox` its supervisor owns. The runtime drains
both after each event (or run of heartbeats): the changes of one event go to the store as one
list, one transaction, and its effects leave only once that is durable (docs/design.md §6).
"""

from __future__ import annotations

from supervisor_service.core.changes import Change
from supervisor_service.core.effects import Effect


class Outbox:
    __slots__ = ("changes", "effects")

    def __init__(self) -> None:
        self.effects: list[Effect] = []
        self.changes: list[Change] = []

    def take_effects(self) -> list[Effect]:
        out, self.effects = self.effects, []
        return out

    def take_changes(self) -> list[Change]:
        out, self.changes = self.changes, []
        return out
