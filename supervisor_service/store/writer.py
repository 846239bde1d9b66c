"""The group-commit writer: what a restart or a new leader must not lose reaches the backend (docs/design.md §6).

`StateStore` writes the state from its own thread in group commits, so the
supervisor thread never waits for a disk or a network: it hands over a list
of changes and, for calls that must be durable before they are acknowledged
(Register, Deregister, Reset, maintenance), a callback that runs once the
batch is committed. How changes become keys is `codec.py`; how calls are fit
into transactions is `txn.py`; the queue of writes is `pending.py`.

Fencing: every write carries the leader term it was made under and is
committed only if that term still holds at the store, checked in the same
transaction (etcd: the leader key's create revision is the term; SQLite and
memory: the `term` key). A write whose term has ended is answered with
`FencedOut` and never retried. One `submit()` call is never split across
transactions unless it alone exceeds the backend's limits (`max_ops`,
`max_bytes`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from supervisor_service.core import AuditEntry, Change, StoredState, log_event
from supervisor_service.store.codec import (
    DEFAULT_AUDIT_CAPACITY,
    MAINTENANCE_KEY,
    Encoding,
    Mirror,
    audit_prefix,
    decode_audit,
    decode_maintenance,
    decode_state,
    encode,
)
from supervisor_service.store.health import StoreHealth, StoreMetrics
from supervisor_service.store.kv import KV, Fence, FencedOut, StoreError, StoreGone
from supervisor_service.store.pending import PendingWrite, PendingWrites
from supervisor_service.store.txn import fits, longest_head, split, txn_bytes

log = logging.getLogger("supervisor_service.store")

_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0
_CHECK_INTERVAL_S = 1.0  # an idle writer checks this often that the store is still there
# Writes queued at most. Far above what a healthy store ever holds (a group commit takes them all); reached
# only when the store has been failing or too slow for long: then a write is refused, not kept without bound.
MAX_PENDING_WRITES = 100_000


class StateStore:
    """Commits state changes from a writer thread, in batches.

    The writer keeps a mirror of the registry and counts (a datanode's keys are
    rewritten whole), loaded by `load`. A failed commit is retried with backoff
    and the batch is kept: nothing acknowledged is dropped. A write made under
    a leader term is committed only with that term's fence; once
    `holds_term(term)` says the term has ended, its writes are answered with
    `FencedOut` and never retried. A compare that fails at the backend is
    reported through `on_fenced` as well. A store found deleted or replaced
    (`StoreGone`) answers everything with that error and calls `on_gone`. A
    write is never refused for the queue's length (the core applied it already);
    while `max_pending` writes wait, `backlogged` turns new durable calls away at
    the edge instead, before the core applies them (counted, logged).
    """

    def __init__(
        self,
        kv: KV,
        prefix: str,
        *,
        flush_interval_s: float = 0.01,
        journal_capacity: int = 10_000,
        audit_capacity: int = DEFAULT_AUDIT_CAPACITY,
        max_pending: int = MAX_PENDING_WRITES,
        on_fenced: Callable[[], None] | None = None,
        holds_term: Callable[[int], bool] | None = None,
        on_health: Callable[[bool, str], None] | None = None,
        on_gone: Callable[[StoreGone], None] | None = None,
        metrics: StoreMetrics | None = None,
    ) -> None:
        self.kv = kv
        self.prefix = prefix.rstrip("/") + "/"
        self._fence_key = self.prefix + kv.fence_key
        self._flush_interval = flush_interval_s
        self._journal_capacity = journal_capacity
        self._audit_capacity = audit_capacity
        self._on_fenced = on_fenced
        self._holds_term = holds_term or (lambda term: True)
        self._on_gone = on_gone
        self._metrics = metrics
        self._health = StoreHealth(on_health, metrics)
        # Replaced whole by `load`: a batch encoded against an older mirror is not applied to the new one.
        self._mirror = Mirror()
        self._mirror_lock = threading.Lock()
        self._queue = PendingWrites(max_pending)
        self._interrupt = threading.Event()  # cuts a retry backoff short (stop, leadership changes)
        self._left_uncommitted = 0  # writes the writer gave up on at shutdown
        self._thread: threading.Thread | None = None
        self.commits = 0
        if metrics is not None:
            metrics.bind_store(self._queue.unanswered)

    # ------------------------------------------------------------ lifecycle

    def load(self) -> StoredState:
        """Read everything under the prefix; the writer's mirror starts from it.

        Called when this replica becomes leader, before anything is written
        under the new term; writes of older terms still queued are dropped by
        the writer, and one in flight is not applied to the new mirror.
        """
        raw = self.kv.read_prefix(self.prefix)
        state = decode_state(raw, self.prefix)
        with self._mirror_lock:
            self._mirror = Mirror.loaded(raw, self.prefix, state)
        self.leadership_changed()
        state.journal.sort(key=lambda e: e.at_millis)
        return state

    def read_maintenance(self) -> tuple[bool, int, dict[int, int]]:
        """The stored maintenance state, read directly (followers)."""
        key = self.prefix + MAINTENANCE_KEY
        return decode_maintenance(self.kv.read_prefix(key).get(key))

    def read_audit(self) -> list[AuditEntry]:
        """The stored audit trail, oldest first, read directly (any replica)."""
        return decode_audit(self.kv.read_prefix(audit_prefix(self.prefix)))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="state-store-writer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Commit what is pending (within `timeout` seconds), then stop.

        True if nothing was left uncommitted; what was (the store kept failing)
        is answered with a StoreError. Writes dropped because their term ended
        were answered already and do not count.
        """
        self._queue.stop()
        self._interrupt.set()
        if self._thread is None:
            return not self._queue
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return self._health.gone is None and self._left_uncommitted == 0 and self._queue.all_answered()
        left = self._queue.abandon()
        self._interrupt.set()
        why = self._health.last_error or "the store did not answer"
        error = StoreError(f"state store unavailable: not committed at shutdown ({why})", reason="shutdown")
        self._health.count_error(error.reason, len(left))
        for item in left:
            item.answer(error)
        return not left

    def close(self) -> None:
        self.kv.close()

    # ------------------------------------------------------------ health (any thread)

    @property
    def healthy(self) -> bool:
        return self._health.healthy

    @property
    def failures(self) -> int:
        """Attempts that failed (and were retried) so far."""
        return self._health.failures

    def unavailable(self, after_s: float = 0.0) -> str:
        """The error that keeps writes from committing, once it has lasted `after_s` seconds; '' otherwise."""
        return self._health.unavailable(after_s)

    # ------------------------------------------------------------ writes (any thread)

    def submit(
        self,
        changes: list[Change],
        on_durable: Callable[[BaseException | None], None] | None = None,
        *,
        term: int | None = None,
    ) -> None:
        """Queue changes made under leader `term` (thread-safe, never blocks on I/O).

        `on_durable(None)` runs once they are committed under that term;
        `on_durable(exc)` once they cannot be (`FencedOut`: the term ended;
        `StoreGone`; a StoreError at shutdown). It is queued whatever the
        queue's length (see `backlogged`). `term=None` writes without a fence:
        only for a single replica's bootstrap (TermSet).
        """
        item = PendingWrite(changes, on_durable, term)
        refused = self._queue.add(item)
        if refused is None:
            return
        item.answered = True
        item.answer(refused)

    def backlogged(self) -> StoreError | None:
        """Any thread: the error to turn a new durable call away with while `max_pending` writes wait
        (counted and logged), before the core applies it; None while there is room."""
        error = self._queue.backlog()
        if error is not None:
            self._health.queue_full(error, len(self._queue), self._queue.capacity)
        return error

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything submitted so far is committed (for tests and shutdown)."""
        if self._thread is None:
            raise StoreError("the state store's writer is not running")
        done = threading.Event()
        error: list[BaseException] = []

        def on_durable(exc: BaseException | None) -> None:
            if exc is not None:
                error.append(exc)
            done.set()

        self.submit([], on_durable)
        if not done.wait(timeout):
            raise StoreError(f"store did not commit within {timeout} s" + (
                f": {self._health.last_error}" if self._health.last_error and not self.healthy else ""))
        if error:
            raise error[0]

    def leadership_changed(self) -> None:
        """Answer at once the writes whose term has ended, even one the writer is sending now."""
        ended = self._queue.end_terms(self._holds_term)
        self._interrupt.set()
        self._drop(ended)

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        backoff = _BACKOFF_MIN_S
        backlog = False  # the last transaction left writes behind (a backend limit): no group-commit wait
        while True:
            if not self._queue.wait(_CHECK_INTERVAL_S):
                if self._queue.finished():
                    return
                self._probe()
                continue
            if self._health.failing_since is None and self._flush_interval and not backlog:
                # Group commit: give concurrent writers a moment to join this batch.
                time.sleep(self._flush_interval)
            if self._write_once():
                backoff = _BACKOFF_MIN_S
                backlog = bool(self._queue)
                continue
            backlog = False
            if self._health.gone is not None:
                continue  # everything was answered; the loop ends once nothing is pending
            if self._queue.abandoned:
                self._left_uncommitted = self._queue.unanswered()
                return
            self._interrupt.wait(backoff)
            self._interrupt.clear()
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _probe(self) -> None:
        try:
            self.kv.check()
        except StoreGone as exc:
            self._store_gone(exc)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run says nothing about the store
            log_event(log, logging.WARNING, "store_check_failed", error=str(exc))

    def _write_once(self) -> bool:
        """One transaction's worth of the queue, attempted once. False if the store failed."""
        # The run and the mirror it is encoded against are taken together: a `load` (a new term's
        # mirror) lands wholly before the run (its writes see the new mirror) or wholly after it
        # (they are of the ended term: fenced at the backend, and never applied to the new mirror).
        with self._mirror_lock:
            ended, run = self._queue.next_run(self._holds_term)
            mirror = self._mirror
        self._drop(ended)
        if not run:
            return True
        term = run[0].term
        n, encoding = longest_head([item.changes for item in run], self._encoder(mirror),
                                   self.kv.max_ops, self.kv.max_bytes)
        batch = run[:n]
        fence = None if term is None else (self._fence_key, term)
        self._queue.sending(batch)
        try:
            commit_within_limits(self.kv, encoding.puts, encoding.deletes, fence, len(batch), self._metrics)
        except StoreGone as exc:
            self._store_gone(exc)
            return False
        except FencedOut as exc:
            self._fenced(batch, exc, term)
            return True
        except Exception as exc:  # a backend fault: keep the batch and retry
            self._queue.failed(batch)
            self._health.failed(exc, len(self._queue))
            return False
        with self._mirror_lock:
            if self._mirror is mirror:
                mirror.apply(encoding)
        answer = self._queue.done(batch)
        self.commits += 1
        self._health.committed()
        for item in answer:
            item.answer(None)
        return True

    def _encoder(self, mirror: Mirror) -> Callable[[Sequence[Sequence[Change]]], Encoding]:
        def encode_calls(calls: Sequence[Sequence[Change]]) -> Encoding:
            return encode((change for changes in calls for change in changes), mirror, self.prefix,
                          self._journal_capacity, self._audit_capacity)

        return encode_calls

    # ------------------------------------------------------------ outcomes

    def _drop(self, ended: list[PendingWrite]) -> None:
        """Answer writes whose term ended (already claimed by the caller)."""
        if not ended:
            return
        self._health.count_error("term_ended", len(ended))
        log_event(log, logging.WARNING, "store_writes_dropped", reason="term_ended", writes=len(ended),
                  terms=",".join(sorted({str(item.term) for item in ended})))
        for item in ended:
            item.answer(item.term_ended())
        self._health.recovered_if(self._queue.all_answered)

    def _fenced(self, batch: list[PendingWrite], exc: FencedOut, term: int | None) -> None:
        log_event(log, logging.ERROR, "store_write_fenced", term=term, writes=len(batch), error=str(exc))
        answer = self._queue.done(batch)
        self._health.count_error(exc.reason, len(batch))
        for item in answer:
            item.answer(item.fenced(term, exc))
        self._health.recovered_if(self._queue.all_answered)
        still_held = term is not None and self._holds_term(term)
        if still_held and self._on_fenced is not None:
            self._on_fenced()

    def _store_gone(self, exc: StoreGone) -> None:
        self._health.gone = exc
        first, answer = self._queue.refuse(exc)
        if not first:
            return
        self._health.store_gone(exc, len(answer))
        for item in answer:
            item.answer(exc)
        if self._on_gone is not None:
            self._on_gone(exc)


def commit_within_limits(kv: KV, puts: dict[str, bytes], deletes: set[str], fence: Fence | None, calls: int,
                         metrics: StoreMetrics | None) -> None:
    """Commit in one transaction, or, when one call alone exceeds the backend's limits, in several,
    each under the fence (logged and counted); nothing to write is a check that the store is there."""
    if not puts and not deletes:
        kv.check()
        return
    chunks = [(puts, deletes)] if fits(puts, deletes, kv.max_ops, kv.max_bytes) else split(
        puts, deletes, kv.max_ops, kv.max_bytes)
    if len(chunks) > 1:
        log_event(log, logging.WARNING, "store_batch_split", ops=len(puts) + len(deletes),
                  bytes=txn_bytes(puts, deletes), transactions=len(chunks), calls=calls,
                  max_ops=kv.max_ops, max_bytes=kv.max_bytes)
        if metrics is not None:
            metrics.store_batch_splits.inc()
    for chunk_puts, chunk_deletes in chunks:
        begun = time.perf_counter()
        try:
            kv.commit(chunk_puts, chunk_deletes, fence)
        finally:  # a failed attempt is timed too: a backend timing out shows as the slow end
            if metrics is not None:
                metrics.store_commit_duration.observe(time.perf_counter() - begun)
        if metrics is not None:
            metrics.store_transactions.inc()
