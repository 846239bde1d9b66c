"""The three services failover needs: PeerLookup, Selector, RegionMigration.

Each has a gRPC client (the real cluster's services) and an embedded
implementation (so the supervisor runs with nothing else around):

- PeerLookup answers from the datanodes' own heartbeats (`peer_addr`).
- Selector picks round-robin among datanodes heard from recently.
- RegionMigration is a dry-run journal: it records each decision and moves nothing.

All are called from failover worker threads, never from the supervisor thread.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from supervisor_service.clock import Clock
from supervisor_service.events import MigrationResult, MigrationState, MigrationTask, Peer
from supervisor_service.proto import pb, pb_grpc


class RemoteError(Exception):
    """A remote call failed; `code` is the gRPC status code name (or a local reason)."""

    def __init__(self, service: str, method: str, code: str, detail: str) -> None:
        super().__init__(f"{service}.{method} failed: {code}: {detail}")
        self.service, self.method, self.code, self.detail = service, method, code, detail


class StaleLeaderTerm(RemoteError):
    """RegionMigration refused the call: a newer leader term has been seen."""


class PeerLookup(Protocol):
    def get_datanode(self, datanode_id: int) -> Peer | None: ...


class Selector(Protocol):
    def select(
        self, min_required_items: int, exclude_peer_ids: set[int], from_peer_id: int, region_ids: tuple[int, ...]
    ) -> list[Peer]: ...


class RegionMigration(Protocol):
    def submit(self, task: MigrationTask) -> MigrationResult: ...

    def status(self, procedure_id: str) -> tuple[MigrationState, str]: ...


# ---------------------------------------------------------------- embedded


@dataclass(slots=True)
class _Seen:
    addr: str
    last_seen_ms: int
    epoch: int
    epoch_heard_ms: int  # when a heartbeat of `epoch` was last accepted


class PeerDirectory:
    """What the heartbeats say about each datanode: address, last time heard, epoch.

    Written by the gRPC edge on every heartbeat message, read by the embedded
    PeerLookup and Selector; a lock guards it because both sides are threads.

    Epochs fence a datanode's earlier life: a heartbeat with an epoch below the
    newest seen is stale, unless the newest has been silent for longer than
    `new_life_after_ms`. Then the lower epoch is a new life (a datanode whose
    restart counter went back), so that no single epoch, not even 2**64-1, can
    fence a datanode for good.
    """

    def __init__(self, clock: Clock, new_life_after_ms: float = 10_000) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[int, _Seen] = {}
        self.new_life_after_ms = new_life_after_ms

    def observe(self, datanode_id: int, addr: str, epoch: int = 0) -> None:
        """An accepted heartbeat (`addr` empty: keep the address known; `epoch` 0: unknown)."""
        now = self._clock.now_ms()
        with self._lock:
            seen = self._seen.get(datanode_id)
            if seen is None:
                self._seen[datanode_id] = _Seen(addr, now, epoch, now)
                return
            seen.last_seen_ms = now
            if addr:
                seen.addr = addr
            if epoch and (epoch >= seen.epoch or now - seen.epoch_heard_ms > self.new_life_after_ms):
                seen.epoch, seen.epoch_heard_ms = epoch, now

    def epoch(self, datanode_id: int) -> int:
        with self._lock:
            seen = self._seen.get(datanode_id)
            return 0 if seen is None else seen.epoch

    def epoch_silence(self, datanode_id: int, epoch: int) -> int | None:
        """None when `epoch` is not below the newest seen (or unknown); otherwise for how long, in ms,
        the newest has been silent (the heartbeat is stale while that is at most `new_life_after_ms`)."""
        if epoch == 0:
            return None
        with self._lock:
            seen = self._seen.get(datanode_id)
            if seen is None or epoch >= seen.epoch:
                return None
            return self._clock.now_ms() - seen.epoch_heard_ms

    def peer(self, datanode_id: int) -> Peer | None:
        with self._lock:
            seen = self._seen.get(datanode_id)
            return None if seen is None else Peer(datanode_id, seen.addr)

    def alive(self, window_ms: int) -> list[Peer]:
        """Datanodes heard from within `window_ms`, by id."""
        now = self._clock.now_ms()
        with self._lock:
            return [
                Peer(d, s.addr)
                for d, s in sorted(self._seen.items())
                if now - s.last_seen_ms <= window_ms
            ]


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


@dataclass(frozen=True, slots=True)
class JournalEntry:
    at_millis: int
    region_ids: tuple[int, ...]
    from_peer: Peer
    to_peer: Peer
    timeout_ms: int
    trigger_reason: str
    procedure_id: str
    leader_term: int
    request_id: str = ""


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
        self.total_recorded = 0

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
                    trigger_reason="FAILOVER",
                    procedure_id=procedure_id,
                    leader_term=task.leader_term,
                    request_id=task.request_id,
                )
            )
            self.total_recorded += 1
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


# ---------------------------------------------------------------- gRPC clients


def _peer_from_pb(peer: pb.Peer) -> Peer:
    return Peer(peer.id, peer.addr)


def peer_to_pb(peer: Peer) -> pb.Peer:
    return pb.Peer(id=peer.id, addr=peer.addr)


class _GrpcClient:
    """A channel to one remote service; every call has a deadline and raises RemoteError."""

    service = ""

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        self.endpoint = endpoint
        self._timeout = timeout_s
        self._channel = grpc.insecure_channel(endpoint)

    def _call(self, method: str, stub_method, request):
        try:
            return stub_method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            raise RemoteError(self.service, method, code, exc.details() or "") from None

    def close(self) -> None:
        self._channel.close()


class GrpcPeerLookup(_GrpcClient):
    service = "PeerLookup"

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        super().__init__(endpoint, timeout_s)
        self._stub = pb_grpc.PeerLookupStub(self._channel)

    def get_datanode(self, datanode_id: int) -> Peer | None:
        resp = self._call("GetDatanode", self._stub.GetDatanode, pb.GetDatanodeRequest(datanode_id=datanode_id))
        return _peer_from_pb(resp.peer) if resp.found else None


class GrpcSelector(_GrpcClient):
    service = "Selector"

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        super().__init__(endpoint, timeout_s)
        self._stub = pb_grpc.SelectorStub(self._channel)

    def select(
        self, min_required_items: int, exclude_peer_ids: set[int], from_peer_id: int, region_ids: tuple[int, ...]
    ) -> list[Peer]:
        request = pb.SelectRequest(
            min_required_items=min_required_items,
            allow_duplication=True,
            exclude_peer_ids=sorted(exclude_peer_ids),
            from_peer_id=from_peer_id,
            region_ids=region_ids,
        )
        return [_peer_from_pb(p) for p in self._call("Select", self._stub.Select, request).peers]


class GrpcRegionMigration(_GrpcClient):
    service = "RegionMigration"

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        super().__init__(endpoint, timeout_s)
        self._stub = pb_grpc.RegionMigrationStub(self._channel)

    def submit(self, task: MigrationTask) -> MigrationResult:
        request = pb.SubmitRegionMigrationRequest(
            region_ids=task.region_ids,
            from_peer=peer_to_pb(task.from_peer),
            to_peer=peer_to_pb(task.to_peer),
            timeout_millis=task.timeout_ms,
            trigger_reason=pb.TRIGGER_REASON_FAILOVER,
            leader_term=task.leader_term,
            request_id=task.request_id,
        )
        try:
            resp = self._call("SubmitRegionMigration", self._stub.SubmitRegionMigration, request)
        except RemoteError as exc:
            if exc.code == "FAILED_PRECONDITION" and "term" in exc.detail.lower():
                raise StaleLeaderTerm(exc.service, exc.method, exc.code, exc.detail) from None
            raise
        return MigrationResult(
            migrated=tuple(resp.migrated),
            migrating=tuple(resp.migrating),
            region_not_found=tuple(resp.region_not_found),
            table_not_found=tuple(resp.table_not_found),
            leader_changed=tuple(resp.leader_changed),
            peer_conflict=tuple(resp.peer_conflict),
            submitted=tuple(resp.submitted),
            procedure_id=resp.procedure_id,
        )

    def status(self, procedure_id: str) -> tuple[MigrationState, str]:
        try:
            resp = self._call(
                "GetMigrationStatus",
                self._stub.GetMigrationStatus,
                pb.GetMigrationStatusRequest(procedure_id=procedure_id),
            )
        except RemoteError as exc:
            if exc.code == "NOT_FOUND":  # the status code rather than the state: the same answer
                return MigrationState.NOT_FOUND, exc.detail
            raise
        try:
            state = MigrationState(resp.state)
        except ValueError:
            state = MigrationState.UNSPECIFIED
        return state, resp.message


@dataclass(frozen=True, slots=True)
class Remotes:
    """The three services as the failover workers see them, and which ones are embedded."""

    peer_lookup: PeerLookup
    selector: Selector
    region_migration: RegionMigration
    journal: DryRunJournal | None = None

    def describe(self) -> dict[str, str]:
        def kind(obj: object) -> str:
            endpoint = getattr(obj, "endpoint", None)
            return f"remote {endpoint}" if endpoint else "embedded"

        return {
            "peer_lookup": kind(self.peer_lookup),
            "selector": kind(self.selector),
            "region_migration": kind(self.region_migration),
        }

    def close(self) -> None:
        for obj in (self.peer_lookup, self.selector, self.region_migration):
            close = getattr(obj, "close", None)
            if close is not None:
                close()


def build_remotes(
    *,
    clock: Clock,
    directory: PeerDirectory,
    selector_endpoint: str,
    peer_lookup_endpoint: str,
    region_migration_endpoint: str,
    timeout_s: float,
    alive_window_ms: int,
    journal_capacity: int,
) -> Remotes:
    journal = None if region_migration_endpoint else DryRunJournal(clock, journal_capacity)
    return Remotes(
        peer_lookup=GrpcPeerLookup(peer_lookup_endpoint, timeout_s)
        if peer_lookup_endpoint
        else EmbeddedPeerLookup(directory),
        selector=GrpcSelector(selector_endpoint, timeout_s)
        if selector_endpoint
        else EmbeddedSelector(directory, alive_window_ms, require_addr=bool(region_migration_endpoint)),
        region_migration=GrpcRegionMigration(region_migration_endpoint, timeout_s)
        if region_migration_endpoint
        else journal,
        journal=journal,
    )
