"""The key-value contract of every backend (one atomic, fenced commit), its errors, and the memory backend."""

from __future__ import annotations

import threading
from typing import Protocol


class StoreError(Exception):
    """The backend failed; the write is retried. `reason` labels the failure in metrics."""

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class FencedOut(StoreError):
    """Not committed under its term: this replica no longer holds the leadership it wrote under.

    `definite` is False when an earlier attempt of the same write may have
    reached the store before the term ended (then it may have been committed).
    """

    reason = "fenced"

    def __init__(self, message: str, *, definite: bool = True, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.definite = definite


class StoreGone(StoreError):
    """The store's file was deleted or replaced under the running service: nothing can be committed any more."""

    reason = "gone"


Fence = tuple[str, int]
"""(key, term): commit only if the key still says `term` (etcd: its create revision; SQLite, memory: its value)."""


class KV(Protocol):
    max_ops: int | None
    """Most puts and deletes one transaction may carry (None: no limit)."""
    max_bytes: int | None
    """Most key and value bytes one transaction may carry (None: no limit)."""
    fence_key: str
    """Name, under the store prefix, of the key a fenced commit checks."""

    def read_prefix(self, prefix: str) -> dict[str, bytes]: ...

    def commit(self, puts: dict[str, bytes], deletes: set[str], fence: Fence | None = None) -> None:
        """Apply all puts and deletes in one transaction, only if `fence` holds (else `FencedOut`)."""

    def check(self) -> None:
        """Raise `StoreGone` if the store was deleted or replaced under the service."""

    def term_floor(self) -> int:
        """A leader term at least as high as any this store was used under (0: unknown)."""

    def note_term(self, term: int) -> None:
        """Remember that `term` is in use, before anything is written under it."""

    def close(self) -> None: ...


def _stored_term(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class MemoryKV:
    """A dict; survives nothing, for tests and `store=memory`."""

    max_ops: int | None = None
    max_bytes: int | None = None
    fence_key = "term"

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.commits = 0

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        with self._lock:
            return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    def commit(self, puts: dict[str, bytes], deletes: set[str], fence: Fence | None = None) -> None:
        with self._lock:
            if fence is not None and _stored_term(self.data.get(fence[0])) != fence[1]:
                raise FencedOut(
                    f"not committed: the store's term is {_stored_term(self.data.get(fence[0]))}, not {fence[1]}"
                )
            for key in deletes:
                self.data.pop(key, None)
            self.data.update(puts)
            self.commits += 1

    def check(self) -> None:
        pass

    def term_floor(self) -> int:
        return 0

    def note_term(self, term: int) -> None:
        pass

    def close(self) -> None:
        pass
