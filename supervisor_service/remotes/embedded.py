"""The embedded services of a single-process deployment: peers from heartbeats, a round-robin selector, a dry-run journal."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable

from supervisor_service.core import Clock, JournalEntry, MigrationResult, MigrationState, MigrationTask, Peer
from supervisor_service.remotes.base import PeerDirectory, StaleLeaderTerm


class EmbeddedPeerLookup:
    def __init__(self, directory: PeerDirectory) -> None:
        self._directory = directory

    def get_datanode(self, datanode_id: int) -> Peer | None:
        return self._directory.peer(datanode_id)


class EmbeddedSelector:
    """Round-robin over datanodes heard from within `alive_window_ms`, minus the excluded ones.

    With `require_addr`, only datanodes whose heartbeats gave an address (`peer_addr`) are candidates
    (a remote RegionMigration needs to know where the target is); datanode id 0 never is.
    """

    def __init__(self, directory: PeerDirectory, alive_window_ms: int, *, require_addr: bool = False) -> None:
        self._directory = directory
        self._window = alive_window_ms
        self._require_addr = require_addr
        self._cursor = 0
        self._lock = threading.Lock()

    def select(
        self, min_required_items: int, exclude_peer_ids: set[int], from_peer_id: int, region_ids: tuple[int, ...]
    ) -> list[Peer]:
        candidates = [
            p for p in self._directory.alive(self._window)
            if p.id not in exclude_peer_ids and p.id != 0 and (p.addr or not self._require_addr)
        ]
        if not candidates:
            return []
        with self._lock:
            start = self._cursor
            self._cursor += min_required_items
        # Duplication is allowed: more regions than candidates wrap around.
        ring = itertools.islice(itertools.cycle(candidates), start % len(candidates), None)
        return list(itertools.islice(ring, min_required_items))


class DryRunJournal:
    """RegionMigration that moves nothing: it records each decision and reports it submitted.

    Its procedures finish at once (status SUCCEEDED), as a real migration of a
    dead datanode's regions would eventually. A submission with a lower leader
    term than the highest seen is refused (fencing of a deposed leader). A
    request_id it has journaled is answered as the first time, with no second
    entry (a retry of a call that timed out). The journal keeps the newest
    `capacity` entries in memory.
    """

    def __init__(
        self,
        clock: Clock,
        capacity: int = 10_000,
        persist: Callable[[JournalEntry, int], None] | None = None,
    ) -> None:
        self._clock = clock
        self._persist = persist
        self._lock = threading.Lock()
        self._entries: deque[JournalEntry] = deque(maxlen=capacity)
        self._ids = itertools.count(1)
        self._highest_term = 0

    def _answer(self, entry: JournalEntry) -> MigrationResult:
        return MigrationResult(submitted=entry.region_ids, procedure_id=entry.procedure_id)

    def submit(self, task: MigrationTask) -> MigrationResult:
        with self._lock:
            if task.leader_term < self._highest_term:
                raise StaleLeaderTerm(
                    "RegionMigration",
                    "SubmitRegionMigration",
                    "FAILED_PRECONDITION",
                    f"leader term {task.leader_term} is older than {self._highest_term}",
                )
            self._highest_term = task.leader_term
            if task.request_id:
                # The journal is short (capacity entries): a scan of it, newest first, per call.
                for entry in reversed(self._entries):
                    if entry.request_id == task.request_id:
                        return self._answer(entry)
            procedure_id = f"dry-run-{next(self._ids)}"
            self._entries.append(
                JournalEntry(
                    at_millis=self._clock.now_ms(),
                    region_ids=task.region_ids,
                    from_peer=task.from_peer,
                    to_peer=task.to_peer,
                    timeout_ms=task.timeout_ms,
                    trigger_reason=task.trigger_reason,
                    procedure_id=procedure_id,
                    leader_term=task.leader_term,
                    request_id=task.request_id,
                )
            )
            if self._persist is not None:
                self._persist(self._entries[-1], self._highest_term)
            return self._answer(self._entries[-1])

    def restore(self, entries: list[JournalEntry], highest_term: int) -> None:
        """Load the durable journal (at leadership start); ids continue after the newest entry."""
        with self._lock:
            self._entries.clear()
            self._entries.extend(entries)
            self._highest_term = max(self._highest_term, highest_term)
            last = max((int(e.procedure_id.rsplit("-", 1)[1]) for e in entries
                        if e.procedure_id.rsplit("-", 1)[-1].isdigit()), default=0)
            self._ids = itertools.count(last + 1)

    def set_persist(self, persist: Callable[[JournalEntry, int], None] | None) -> None:
        self._persist = persist

    def status(self, procedure_id: str) -> tuple[MigrationState, str]:
        """Every journaled procedure has finished (SUCCEEDED), restored ones included."""
        with self._lock:
            known = any(e.procedure_id == procedure_id for e in reversed(self._entries))
        if known:
            return MigrationState.SUCCEEDED, "dry run: nothing was moved"
        return MigrationState.NOT_FOUND, ""

    def entries(self, limit: int) -> list[JournalEntry]:
        """The newest `limit` entries, newest first."""
        with self._lock:
            return list(itertools.islice(reversed(self._entries), limit))
