"""A key-value backend whose commits fail, or wait, when the test says: `FaultyKV`.

It is a `MemoryKV` (fenced commits compare the stored term, as SQLite and
memory do) that records every commit attempt, and:

- `fail(error)`: every commit raises `error` (a `StoreError`: the writer keeps
  the batch and retries it) until `heal()`;
- `hold()`: every commit waits, before it is applied, until the test lets it
  through with `release(n)` (n commits) or `heal()` (all, from now on);
- `take_over(term)`: another leader's term is in the store, so every commit
  fenced with an older term answers `FencedOut`, as etcd's compare would.

    kv = FaultyKV()
    kv.hold()
    ... the writer's next commit blocks in kv.commit ...
    assert kv.waiting.wait(5)
    kv.release(1)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from supervisor_service.store import FencedOut, MemoryKV, StoreError


@dataclass(frozen=True)
class Attempt:
    """One call of `commit`, whatever became of it."""

    puts: frozenset[str]
    deletes: frozenset[str]
    fence: tuple[str, int] | None
    outcome: str  # "committed", "failed", "fenced", or "waiting" while held


class FaultyKV(MemoryKV):
    def __init__(self) -> None:
        super().__init__()
        self._fault = threading.Condition()
        self._error: StoreError | None = None
        self._holding = False
        self._passes = 0  # held commits the test has let through and no commit has used yet
        self.attempts: list[Attempt] = []
        self.waiting = threading.Event()  # set while a commit is held

    # ------------------------------------------------------------ what the test says

    def fail(self, error: StoreError) -> None:
        with self._fault:
            self._error = error

    def hold(self) -> None:
        with self._fault:
            self._holding = True

    def release(self, n: int = 1) -> None:
        """Let the next `n` held commits through (the one waiting now first)."""
        with self._fault:
            self._passes += n
            self._fault.notify_all()

    def heal(self) -> None:
        with self._fault:
            self._error = None
            self._holding = False
            self._fault.notify_all()

    def take_over(self, term: int, prefix: str) -> None:
        """Another replica leads under `term` (written at `prefix` + the fence key)."""
        super().commit({prefix.rstrip("/") + "/" + self.fence_key: str(term).encode()}, set())

    def attempts_with(self, key_part: str) -> list[Attempt]:
        """The attempts that wrote a key containing `key_part`."""
        with self._fault:
            return [a for a in self.attempts if any(key_part in k for k in a.puts)]

    # ------------------------------------------------------------ the backend

    def commit(self, puts, deletes, fence=None) -> None:
        with self._fault:
            index = len(self.attempts)
            self.attempts.append(Attempt(frozenset(puts), frozenset(deletes), fence, "waiting"))
            while self._holding and not self._passes:
                self.waiting.set()
                self._fault.wait()
            self.waiting.clear()
            if self._holding:
                self._passes -= 1
            error = self._error
        try:
            if error is not None:
                raise error
            super().commit(puts, deletes, fence)
        except StoreError as exc:
            self._record(index, "fenced" if isinstance(exc, FencedOut) else "failed")
            raise
        self._record(index, "committed")

    def _record(self, index: int, outcome: str) -> None:
        with self._fault:
            a = self.attempts[index]
            self.attempts[index] = Attempt(a.puts, a.deletes, a.fence, outcome)
