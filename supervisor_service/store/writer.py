"""Durable state: what a restart or a new leader must not lose.

Two layers:

- a key-value backend (`KV`) with one atomic `commit(puts, deletes)`:
  `MemoryKV` (tests, `store=memory`), `SqliteKV` (the embedded default, WAL
  mode, one file under `data_dir`), `EtcdKV` (several replicas; in
  `supervisor_service.etcd`);
- `StateStore`, which encodes the state into keys and writes it from its own
  thread in group commits, so the supervisor thread never waits for a disk
  or a network: it hands over a list of changes and, for calls that must be
  durable before they are acknowledged (Register, Deregister, Reset,
  maintenance), a callback that runs once the batch is committed.

Keys under the prefix (one per cluster):
  registry/<datanode>   sorted uint64 region ids (little endian)
  counts/<datanode>     uint64 pairs (region, failover count)
  inflight/<submission> JSON: one SubmitRegionMigration decision (request_id, datanode, peers,
                        regions, timeout, state, procedure id, clock mark); see InFlightRecord
  maintenance           JSON {enabled, until_ms, datanodes, mark} (first format: b"1" or b"0")
  journal/<seq>         JSON dry-run journal entry
  journal_term          highest leader term the dry-run journal accepted
  term                  leadership counter of a single replica (SQLite, memory)

Fencing: every write carries the leader term it was made under and is
committed only if that term still holds at the store, checked in the same
transaction (etcd: the leader key's create revision is the term; SQLite and
memory: the `term` key). A write whose term has ended is answered with
`FencedOut` and never retried. One `submit()` call is never split across
transactions unless it alone exceeds the backend's limits (`max_ops`,
`max_bytes`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from supervisor_service.core import (
    Change,
    CountsDrop,
    CountsSet,
    InFlightDrop,
    InFlightSet,
    JournalAppend,
    MaintenanceSet,
    RegistryAdd,
    RegistryRemove,
    StoredState,
    TermSet,
    describe,
    log_event,
)
from supervisor_service.store.codec import (
    _U64,
    _entry_to_json,
    _inflight_to_json,
    _key_id,
    _mark_json,
    decode_maintenance,
    decode_state,
)
from supervisor_service.store.kv import KV, Fence, FencedOut, StoreError, StoreGone

if TYPE_CHECKING:
    from supervisor_service.app.metrics import Metrics

log = logging.getLogger("supervisor_service.store")


# ---------------------------------------------------------------- state and changes


_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0
_CHECK_INTERVAL_S = 1.0  # an idle writer checks this often that the store is still there
_OP_OVERHEAD_BYTES = 16  # per operation of a transaction, beyond its key and value (etcd request framing)
_FAILURE_LOG_INTERVAL_S = 10.0  # a store failing the same way is logged again this often


@dataclass(slots=True, eq=False)
class _Pending:
    changes: list[Change]
    on_durable: Callable[[BaseException | None], None] | None
    term: int | None
    sending: bool = False  # an attempt is with the backend now
    ambiguous: bool = False  # an attempt failed without saying whether it committed
    answered: bool = False  # on_durable was called (or is being called): never again


def _claim(items) -> list[_Pending]:
    """The writes among `items` not answered yet, marked answered: each is answered exactly once,
    by whoever claims it (under the store's lock)."""
    claimed = [item for item in items if not item.answered]
    for item in claimed:
        item.answered = True
    return claimed


class StateStore:
    """Encodes state changes into keys and commits them from a writer thread, in batches.

    The writer keeps a mirror of the registry and counts (a datanode's keys are
    rewritten whole), loaded by `load`. A failed commit is retried with backoff
    and the batch is kept: nothing acknowledged is dropped. A write made under
    a leader term is committed only with that term's fence; once
    `holds_term(term)` says the term has ended, its writes are answered with
    `FencedOut` and never retried. A compare that fails at the backend is
    reported through `on_fenced` as well. A store found deleted or replaced
    (`StoreGone`) answers everything with that error and calls `on_gone`.
    """

    def __init__(
        self,
        kv: KV,
        prefix: str,
        *,
        flush_interval_s: float = 0.01,
        journal_capacity: int = 10_000,
        on_fenced: Callable[[], None] | None = None,
        holds_term: Callable[[int], bool] | None = None,
        on_health: Callable[[bool, str], None] | None = None,
        on_gone: Callable[[StoreGone], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.kv = kv
        self.prefix = prefix.rstrip("/") + "/"
        self._fence_key = self.prefix + kv.fence_key
        self._flush_interval = flush_interval_s
        self._journal_capacity = journal_capacity
        self._on_fenced = on_fenced
        self._holds_term = holds_term or (lambda term: True)
        self._on_health = on_health
        self._on_gone = on_gone
        self._metrics = metrics
        self._registry: dict[int, np.ndarray] = {}
        self._counts: dict[int, dict[int, int]] = {}
        self._journal_keys: list[str] = []
        self._journal_seq = 0
        self._generation = 0  # bumped by `load`: a batch encoded against an older mirror is not applied to it
        self._pending: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._interrupt = threading.Event()  # cuts a retry backoff short (stop, leadership changes)
        self._stopping = False
        self._abandon = False
        self._gone: StoreGone | None = None
        self._failing_since: float | None = None  # monotonic time of the first failed attempt in a row
        self._last_error = ""
        self._last_logged = (0.0, "")
        self._left_uncommitted = 0  # writes the writer gave up on at shutdown
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.failures = 0
        if metrics is not None:
            metrics.bind_store(lambda: sum(not item.answered for item in tuple(self._pending)))

    # ------------------------------------------------------------ lifecycle

    def load(self) -> StoredState:
        """Read everything under the prefix; the writer's mirror starts from it.

        Called when this replica becomes leader, before anything is written
        under the new term; writes of older terms still queued are dropped by
        the writer, and one in flight is not applied to the new mirror.
        """
        raw = self.kv.read_prefix(self.prefix)
        state = decode_state(raw, self.prefix)
        with self._cond:
            self._generation += 1
            self._registry = dict(state.registry)
            self._counts = {}
            for (d, r), c in state.failover_counts.items():
                self._counts.setdefault(d, {})[r] = c
            self._journal_keys = sorted(k for k in raw if k.startswith(self.prefix + "journal/"))
            self._journal_seq = int(self._journal_keys[-1].rsplit("/", 1)[1]) + 1 if self._journal_keys else 0
        self.leadership_changed()
        state.journal.sort(key=lambda e: e.at_millis)
        return state

    def read_maintenance(self) -> tuple[bool, int, dict[int, int]]:
        """The stored maintenance state, read directly (followers)."""
        return decode_maintenance(self.kv.read_prefix(self.prefix + "maintenance").get(self.prefix + "maintenance"))

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
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._interrupt.set()
        if self._thread is None:
            return not self._pending
        self._thread.join(timeout)
        if not self._thread.is_alive():
            with self._cond:
                unanswered = any(not item.answered for item in self._pending)
            return self._gone is None and self._left_uncommitted == 0 and not unanswered
        with self._cond:
            self._abandon = True
            left = _claim(self._pending)
        self._interrupt.set()
        error = StoreError(
            f"state store unavailable: not committed at shutdown ({self._last_error or 'the store did not answer'})",
            reason="shutdown",
        )
        self._count_error(error.reason, len(left))
        for item in left:
            self._call(item, error)
        return not left

    def close(self) -> None:
        self.kv.close()

    # ------------------------------------------------------------ health (any thread)

    @property
    def healthy(self) -> bool:
        return self._failing_since is None and self._gone is None

    def unavailable(self, after_s: float = 0.0) -> str:
        """The error that keeps writes from committing, once it has lasted `after_s` seconds; '' otherwise."""
        if self._gone is not None:
            return str(self._gone)
        since = self._failing_since
        if since is not None and time.monotonic() - since >= after_s:
            return self._last_error
        return ""

    # ------------------------------------------------------------ writes

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
        `StoreGone`; a StoreError at shutdown). `term=None` writes without a
        fence: only for a single replica's bootstrap (TermSet).
        """
        item = _Pending(changes, on_durable, term)
        with self._cond:
            gone = self._gone
            if gone is None:
                self._pending.append(item)
                self._cond.notify()
        if gone is not None:
            item.answered = True
            self._call(item, gone)

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
                f": {self._last_error}" if self._last_error and not self.healthy else ""))
        if error:
            raise error[0]

    def leadership_changed(self) -> None:
        """Answer at once the writes whose term has ended, even one the writer is sending now (any thread)."""
        ended: list[_Pending] = []
        with self._cond:
            held: dict[int, bool] = {}
            for item in self._pending:
                if item.answered or item.term is None:
                    continue
                if not self._held(held, item.term):
                    item.answered = True
                    ended.append(item)
            self._cond.notify()
        self._interrupt.set()
        self._drop(ended)

    def _held(self, cache: dict[int, bool], term: int) -> bool:
        if term not in cache:
            cache[term] = self._holds_term(term)
        return cache[term]

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        backoff = _BACKOFF_MIN_S
        backlog = False  # the last transaction left writes behind (a backend limit): no group-commit wait
        while True:
            with self._cond:
                if not self._pending:
                    if self._stopping or self._gone is not None:
                        return
                    self._cond.wait(_CHECK_INTERVAL_S)
                idle = not self._pending
            if idle:
                self._probe()
                continue
            if self._failing_since is None and self._flush_interval and not backlog:
                # Group commit: give concurrent writers a moment to join this batch.
                time.sleep(self._flush_interval)
            if self._write_once():
                backoff = _BACKOFF_MIN_S
                with self._cond:
                    backlog = bool(self._pending)
                continue
            backlog = False
            if self._gone is not None:
                continue  # everything was answered; the loop ends once nothing is pending
            with self._cond:
                if self._abandon:
                    self._left_uncommitted = sum(not item.answered for item in self._pending)
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
        ended: list[_Pending] = []
        held: dict[int, bool] = {}  # asked once per term per pass, not once per queued write
        with self._cond:
            # Writes of a term that has ended are never sent again (nor for the first time).
            keep: deque[_Pending] = deque()
            for item in self._pending:
                if item.term is not None and not self._held(held, item.term):
                    if not item.answered:
                        item.answered = True
                        ended.append(item)
                elif not (item.answered and not item.sending):
                    keep.append(item)
            self._pending = keep
            run: list[_Pending] = []
            if keep:
                term = keep[0].term
                for item in keep:
                    if item.term != term:
                        break
                    run.append(item)
            generation = self._generation
        self._drop(ended)
        if not run:
            return True
        batch, puts, deletes = self._select(run)
        fence = None if term is None else (self._fence_key, term)
        with self._cond:
            for item in batch:
                item.sending = True
        try:
            self._commit(puts, deletes, fence, len(batch))
        except StoreGone as exc:
            self._store_gone(exc)
            return False
        except FencedOut as exc:
            self._fenced(batch, exc, term)
            return True
        except Exception as exc:  # a backend fault: keep the batch and retry
            with self._cond:
                for item in batch:
                    item.sending = False
                    item.ambiguous = True
            self._failed(exc)
            return False
        with self._cond:
            if generation == self._generation:
                self._apply()
            self._remove(batch)
            answer = _claim(batch)
        self.commits += 1
        if self._failing_since is not None:
            log_event(log, logging.WARNING, "store_recovered", failed_for_s=round(time.monotonic() - self._failing_since, 3),
                      failures=self.failures)
            self._failing_since = None
            self._last_error = ""
            self._health(True, "")
        for item in answer:
            self._call(item, None)
        return True

    def _select(self, run: list[_Pending]) -> tuple[list[_Pending], dict[str, bytes], set[str]]:
        """The longest head of `run` that fits one transaction, and its keys. Whole calls only: a
        call is split across transactions only when it alone is too big (`_commit` splits it)."""
        max_ops = self.kv.max_ops
        if max_ops is not None:
            # Every call with changes writes at least one key: no more of them fit.
            nonempty, limit = 0, len(run)
            for i, item in enumerate(run):
                nonempty += bool(item.changes)
                if nonempty > max_ops:
                    limit = i
                    break
            run = run[:limit]
        puts, deletes = self._encode(run)
        if self._fits(puts, deletes):
            return run, puts, deletes
        # Binary search for the longest head that fits (size grows with the calls taken).
        lo, hi = 1, len(run) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._fits(*self._encode(run[:mid])):
                lo = mid
            else:
                hi = mid - 1
        batch = run[:lo]
        puts, deletes = self._encode(batch)
        return batch, puts, deletes

    def _fits(self, puts: dict[str, bytes], deletes: set[str]) -> bool:
        max_ops, max_bytes = self.kv.max_ops, self.kv.max_bytes
        if max_ops is not None and len(puts) + len(deletes) > max_ops:
            return False
        return max_bytes is None or _txn_bytes(puts, deletes) <= max_bytes

    def _commit(self, puts: dict[str, bytes], deletes: set[str], fence: Fence | None, calls: int) -> None:
        if not puts and not deletes:
            self.kv.check()
            return
        if self._fits(puts, deletes):
            self.kv.commit(puts, deletes, fence)
            if self._metrics is not None:
                self._metrics.store_transactions.inc()
            return
        # One call alone is larger than a transaction: commit it in several, each under the fence.
        chunks = _chunks(puts, deletes, self.kv.max_ops, self.kv.max_bytes)
        log_event(log, logging.WARNING, "store_batch_split", ops=len(puts) + len(deletes),
                  bytes=_txn_bytes(puts, deletes), transactions=len(chunks), calls=calls,
                  max_ops=self.kv.max_ops, max_bytes=self.kv.max_bytes)
        if self._metrics is not None:
            self._metrics.store_batch_splits.inc()
        for chunk_puts, chunk_deletes in chunks:
            self.kv.commit(chunk_puts, chunk_deletes, fence)
            if self._metrics is not None:
                self._metrics.store_transactions.inc()

    # ------------------------------------------------------------ outcomes

    def _ended(self, item: _Pending) -> FencedOut:
        if item.sending or item.ambiguous:
            return FencedOut(
                f"may not have been committed: leadership of term {item.term} ended before the state store "
                "confirmed this write; retry against the current leader", definite=False, reason="term_ended")
        return FencedOut(
            f"not committed: leadership of term {item.term} ended before this write reached the state store; "
            "retry against the current leader", reason="term_ended")

    def _drop(self, ended: list[_Pending]) -> None:
        """Answer writes whose term ended (already marked answered by the caller)."""
        if not ended:
            return
        self._count_error("term_ended", len(ended))
        log_event(log, logging.WARNING, "store_writes_dropped", reason="term_ended", writes=len(ended),
                  terms=",".join(sorted({str(item.term) for item in ended})))
        for item in ended:
            self._call(item, self._ended(item))
        self._healthy_if_idle()

    def _healthy_if_idle(self) -> None:
        """A store that failed has nothing left it cannot commit once the failing writes were dropped."""
        with self._cond:
            recovered = self._failing_since is not None and self._gone is None and all(
                item.answered for item in self._pending)
            if recovered:
                self._failing_since = None
        if recovered:
            self._health(True, "")

    def _fenced(self, batch: list[_Pending], exc: FencedOut, term: int | None) -> None:
        log_event(log, logging.ERROR, "store_write_fenced", term=term, writes=len(batch), error=str(exc))
        with self._cond:
            self._remove(batch)
            answer = _claim(batch)
        self._count_error(exc.reason, len(batch))
        for item in answer:
            self._call(item, FencedOut(
                f"not committed: term {term} no longer holds in the state store (another replica leads); "
                f"retry against the current leader ({exc})" if not item.ambiguous else
                f"may not have been committed: term {term} no longer holds in the state store and an earlier "
                f"attempt went unanswered; retry against the current leader ({exc})",
                definite=not item.ambiguous))
        self._healthy_if_idle()
        still_held = term is not None and self._holds_term(term)
        if still_held and self._on_fenced is not None:
            self._on_fenced()

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        reason = getattr(exc, "reason", "error")
        self._count_error(reason, 1)
        now = time.monotonic()
        first = self._failing_since is None
        if first:
            self._failing_since = now
        error = self._last_error = describe(exc)
        last_at, last_error = self._last_logged
        if first or error != last_error or now - last_at >= _FAILURE_LOG_INTERVAL_S:
            self._last_logged = (now, error)
            log_event(log, logging.ERROR, "store_write_failed", error=error, reason=reason,
                      failures=self.failures, pending=len(self._pending),
                      failing_for_s=round(now - self._failing_since, 3))
        if first:
            self._health(False, error)

    def _store_gone(self, exc: StoreGone) -> None:
        with self._cond:
            first = self._gone is None
            self._gone = exc
            answer = _claim(self._pending)
            self._pending = deque()
        if not first:
            return
        log_event(log, logging.ERROR, "store_gone", error=describe(exc), writes_refused=len(answer))
        self._count_error(exc.reason, max(1, len(answer)))
        self._health(False, describe(exc))
        for item in answer:
            self._call(item, exc)
        if self._on_gone is not None:
            self._on_gone(exc)

    def _health(self, healthy: bool, error: str) -> None:
        if self._metrics is not None:
            self._metrics.store_healthy.set(int(healthy))
        if self._on_health is not None:
            self._on_health(healthy, error)

    def _count_error(self, reason: str, n: int) -> None:
        if self._metrics is not None and n:
            self._metrics.store_errors.labels(reason=reason).inc(n)

    def _remove(self, batch: list[_Pending]) -> None:
        """Take the batch's writes off the pending queue (under `_cond`)."""
        done = set(map(id, batch))
        self._pending = deque(item for item in self._pending if id(item) not in done)

    @staticmethod
    def _call(item: _Pending, exc: BaseException | None) -> None:
        """Answer one write. A failing callback is logged, never allowed to end the writer thread
        (the writes behind it would then be silently left uncommitted)."""
        if item.on_durable is not None:
            try:
                item.on_durable(exc)
            except Exception as error:  # noqa: BLE001 - the caller's bug, not the store's
                log.error("store_callback_failed", exc_info=error, extra={"fields": {"error": describe(error)}})

    def _encode(self, batch: list[_Pending]) -> tuple[dict[str, bytes], set[str]]:
        """Keys to write for the batch, computed against a copy of the mirror (applied after commit)."""
        p = self.prefix
        registry: dict[int, np.ndarray] = {}
        counts: dict[int, dict[int, int]] = {}
        puts: dict[str, bytes] = {}
        deletes: set[str] = set()
        journal_seq = self._journal_seq
        journal_new: list[str] = []

        def regions(d: int) -> np.ndarray:
            if d not in registry:
                registry[d] = self._registry.get(d, np.empty(0, dtype=np.uint64))
            return registry[d]

        def counts_of(d: int) -> dict[int, int]:
            if d not in counts:
                counts[d] = dict(self._counts.get(d, {}))
            return counts[d]

        for item in batch:
            for change in item.changes:
                match change:
                    case RegistryAdd(d, ids):
                        registry[d] = np.union1d(regions(d), ids)
                    case RegistryRemove(d, ids):
                        registry[d] = np.setdiff1d(regions(d), ids, assume_unique=True)
                    case CountsSet(pairs):
                        for (d, r), c in pairs:
                            counts_of(d)[r] = c
                    case CountsDrop(keys):
                        for d, r in keys:
                            counts_of(d).pop(r, None)
                    case InFlightSet(submission_id, rec):
                        key = f"{p}inflight/{submission_id}"
                        deletes.discard(key)
                        puts[key] = _inflight_to_json(rec)
                    case InFlightDrop(submission_id):
                        key = f"{p}inflight/{submission_id}"
                        puts.pop(key, None)
                        deletes.add(key)
                    case MaintenanceSet(enabled, until_ms, datanodes, mark):
                        puts[f"{p}maintenance"] = json.dumps(
                            {"enabled": enabled, "until_ms": until_ms, "datanodes": [list(x) for x in datanodes],
                             "mark": _mark_json(mark)}
                        ).encode()
                    case JournalAppend(entry, term):
                        key = f"{p}journal/{_key_id(journal_seq)}"
                        journal_seq += 1
                        puts[key] = _entry_to_json(entry)
                        puts[f"{p}journal_term"] = str(term).encode()
                        journal_new.append(key)
                    case TermSet(term):
                        puts[f"{p}term"] = str(term).encode()
        for d, ids in registry.items():
            key = f"{p}registry/{_key_id(d)}"
            if ids.size:
                puts[key] = ids.astype(_U64).tobytes()
            else:
                deletes.add(key)
        for d, by_region in counts.items():
            key = f"{p}counts/{_key_id(d)}"
            if by_region:
                pairs = np.array(sorted(by_region.items()), dtype=_U64).reshape(-1)
                puts[key] = pairs.tobytes()
            else:
                deletes.add(key)
        overflow = len(self._journal_keys) + len(journal_new) - self._journal_capacity
        if overflow > 0:
            deletes.update(self._journal_keys[:overflow])
        self._encoded = (registry, counts, journal_seq, journal_new, max(overflow, 0))
        return puts, deletes

    def _apply(self) -> None:
        registry, counts, journal_seq, journal_new, overflow = self._encoded
        for d, ids in registry.items():
            if ids.size:
                self._registry[d] = ids
            else:
                self._registry.pop(d, None)
        for d, by_region in counts.items():
            if by_region:
                self._counts[d] = by_region
            else:
                self._counts.pop(d, None)
        self._journal_seq = journal_seq
        self._journal_keys = self._journal_keys[overflow:] + journal_new


def _txn_bytes(puts: dict[str, bytes], deletes: set[str]) -> int:
    return (sum(len(k) + len(v) for k, v in puts.items()) + sum(len(k) for k in deletes)
            + _OP_OVERHEAD_BYTES * (len(puts) + len(deletes)))


def _chunks(
    puts: dict[str, bytes], deletes: set[str], max_ops: int | None, max_bytes: int | None
) -> list[tuple[dict[str, bytes], set[str]]]:
    """Puts and deletes cut into transactions within the limits (deletes first, in key order)."""
    chunks: list[tuple[dict[str, bytes], set[str]]] = [({}, set())]
    size = 0
    ops: list[tuple[str, bytes | None]] = [(k, None) for k in sorted(deletes)] + sorted(puts.items())
    for key, value in ops:
        op_size = len(key) + (len(value) if value is not None else 0) + _OP_OVERHEAD_BYTES
        chunk_puts, chunk_deletes = chunks[-1]
        n = len(chunk_puts) + len(chunk_deletes)
        if n and ((max_ops is not None and n >= max_ops) or (max_bytes is not None and size + op_size > max_bytes)):
            chunks.append(({}, set()))
            chunk_puts, chunk_deletes = chunks[-1]
            size = 0
        if value is None:
            chunk_deletes.add(key)
        else:
            chunk_puts[key] = value
        size += op_size
    return chunks


