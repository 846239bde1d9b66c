"""The writes handed to the state store and not yet done with: bounded, each answered once (docs/design.md §6).

Any thread adds writes; the store's writer thread takes runs of them to
commit. A write is answered (its `on_durable` called) by whoever claims it
first: the writer once it is committed or refused, `leadership_changed` when
its term ends, shutdown when it gives up. `PendingWrites` only keeps the
books; the callers answer, outside its lock.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from supervisor_service.core import Change, describe
from supervisor_service.store.kv import FencedOut, StoreError

log = logging.getLogger("supervisor_service.store")


@dataclass(slots=True, eq=False)
class PendingWrite:
    """One `submit()` call: its changes, the leader term they were made under, and how far it got."""

    changes: list[Change]
    on_durable: Callable[[BaseException | None], None] | None
    term: int | None
    sending: bool = False  # an attempt is with the backend now
    ambiguous: bool = False  # an attempt failed without saying whether it committed
    answered: bool = False  # on_durable was called (or is being called): never again

    def answer(self, exc: BaseException | None) -> None:
        """Call `on_durable` (once claimed). A failing callback is logged, never allowed to end the writer
        thread (the writes behind it would then be silently left uncommitted)."""
        if self.on_durable is not None:
            try:
                self.on_durable(exc)
            except Exception as error:  # noqa: BLE001 - the caller's bug, not the store's
                log.error("store_callback_failed", exc_info=error, extra={"fields": {"error": describe(error)}})

    def term_ended(self) -> FencedOut:
        """The answer when this replica's leadership of the write's term ended first."""
        if self.sending or self.ambiguous:
            return FencedOut(
                f"may not have been committed: leadership of term {self.term} ended before the state store "
                "confirmed this write; retry against the current leader", definite=False, reason="term_ended")
        return FencedOut(
            f"not committed: leadership of term {self.term} ended before this write reached the state store; "
            "retry against the current leader", reason="term_ended")

    def fenced(self, term: int | None, exc: FencedOut) -> FencedOut:
        """The answer when the store refused the write's term (another replica leads)."""
        if not self.ambiguous:
            return FencedOut(f"not committed: term {term} no longer holds in the state store (another replica "
                             f"leads); retry against the current leader ({exc})")
        return FencedOut(f"may not have been committed: term {term} no longer holds in the state store and an "
                         f"earlier attempt went unanswered; retry against the current leader ({exc})", definite=False)


def _claim(items: Iterable[PendingWrite]) -> list[PendingWrite]:
    """The writes among `items` not answered yet, marked answered (under the lock)."""
    claimed = [item for item in items if not item.answered]
    for item in claimed:
        item.answered = True
    return claimed


class PendingWrites:
    """The writes not yet taken off, in submission order, at most `capacity` of them.

    A full queue refuses a write (`add` returns the error to answer it with)
    rather than growing without bound while the store is down or slow.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a pending-write queue holds at least one write, not {capacity}")
        self.capacity = capacity
        self._items: deque[PendingWrite] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._refusal: StoreError | None = None  # once set, every write is answered with it
        self.abandoned = False  # shutdown gave up on what was left

    # ------------------------------------------------------------ any thread

    def add(self, item: PendingWrite) -> StoreError | None:
        """Queue `item`; or, once the store is gone or shut down, the error to answer it with (not queued).

        A write is never refused for the queue's length: the core has applied its changes already,
        so refusing it would leave the store behind memory for good. The bound is kept upstream,
        where a call can still be turned away before the core applies it (`backlog`)."""
        with self._cond:
            if self._refusal is not None:
                return self._refusal
            self._items.append(item)
            self._cond.notify()
        return None

    def backlog(self) -> StoreError | None:
        """The error for a new call while `capacity` writes or more wait; None while there is room."""
        waiting = len(self._items)
        if waiting < self.capacity:
            return None
        return StoreError(f"not accepted: {waiting} writes are already waiting for the state store "
                          f"(at most {self.capacity} are queued before calls are turned away); retry later",
                          reason="queue_full")

    def unanswered(self) -> int:
        """Writes not answered yet; lock-free (the metrics scrape reads it), so at most an instant old."""
        return sum(not item.answered for item in tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def refusal(self) -> StoreError | None:
        return self._refusal

    def all_answered(self) -> bool:
        with self._cond:
            return all(item.answered for item in self._items)

    def end_terms(self, holds: Callable[[int], bool]) -> list[PendingWrite]:
        """Claim the writes whose term no longer `holds`, even one being sent now; wakes the writer."""
        with self._cond:
            held: dict[int, bool] = {}
            ended = [item for item in self._items
                     if not item.answered and item.term is not None and not _held(held, holds, item.term)]
            for item in ended:
                item.answered = True
            self._cond.notify()
        return ended

    def stop(self) -> None:
        """The writer is to end once nothing is pending."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def abandon(self) -> list[PendingWrite]:
        """Shutdown gives up: claim everything not answered (the writer ends after its current attempt)."""
        with self._cond:
            self.abandoned = True
            return _claim(self._items)

    def refuse(self, error: StoreError) -> tuple[bool, list[PendingWrite]]:
        """From now on answer every write with `error`: (first refusal?, the writes claimed and taken off)."""
        with self._cond:
            first = self._refusal is None
            self._refusal = error
            claimed = _claim(self._items)
            self._items = deque()
        return first, claimed

    # ------------------------------------------------------------ the writer thread

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a write; False when there is none (at once when stopping or refused)."""
        with self._cond:
            if not self._items and not self._stopping and self._refusal is None:
                self._cond.wait(timeout)
            return bool(self._items)

    def finished(self) -> bool:
        """Nothing is pending and nothing more will be: the writer may end."""
        with self._cond:
            return not self._items and (self._stopping or self._refusal is not None)

    def next_run(self, holds: Callable[[int], bool]) -> tuple[list[PendingWrite], list[PendingWrite]]:
        """(writes whose term ended, now claimed; the writes to send next: the oldest ones of one term).

        Writes of a term that has ended are never sent again (nor for the first time); answered
        writes no longer being sent are taken off.
        """
        ended: list[PendingWrite] = []
        held: dict[int, bool] = {}  # asked once per term per pass, not once per queued write
        with self._cond:
            keep: deque[PendingWrite] = deque()
            for item in self._items:
                if item.term is not None and not _held(held, holds, item.term):
                    if not item.answered:
                        item.answered = True
                        ended.append(item)
                elif not (item.answered and not item.sending):
                    keep.append(item)
            self._items = keep
            run: list[PendingWrite] = []
            if keep:
                term = keep[0].term
                for item in keep:
                    if item.term != term:
                        break
                    run.append(item)
        return ended, run

    def sending(self, batch: list[PendingWrite]) -> None:
        with self._cond:
            for item in batch:
                item.sending = True

    def failed(self, batch: list[PendingWrite]) -> None:
        """The attempt failed without saying whether it committed: the batch stays, ambiguous."""
        with self._cond:
            for item in batch:
                item.sending = False
                item.ambiguous = True

    def done(self, batch: list[PendingWrite]) -> list[PendingWrite]:
        """Take the batch off; the writes of it not answered yet, now claimed."""
        with self._cond:
            taken = set(map(id, batch))
            self._items = deque(item for item in self._items if id(item) not in taken)
            return _claim(batch)


def _held(cache: dict[int, bool], holds: Callable[[int], bool], term: int) -> bool:
    if term not in cache:
        cache[term] = holds(term)
    return cache[term]
