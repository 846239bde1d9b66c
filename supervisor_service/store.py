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
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from supervisor_service._log import log_event
from supervisor_service.events import DetectingRegion, Peer
from supervisor_service.remotes import JournalEntry

log = logging.getLogger("supervisor_service.store")

_U64 = np.dtype("<u8")


class StoreError(Exception):
    """The backend failed; the write is retried."""


class FencedOut(StoreError):
    """The backend refused the write: this replica no longer holds the leadership it wrote under."""


class KV(Protocol):
    def read_prefix(self, prefix: str) -> dict[str, bytes]: ...

    def commit(self, puts: dict[str, bytes], deletes: set[str]) -> None:
        """Apply all puts and deletes atomically (or as atomically as the backend allows)."""

    def close(self) -> None: ...


class MemoryKV:
    """A dict; survives nothing, for tests and `store=memory`."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.commits = 0

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        with self._lock:
            return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    def commit(self, puts: dict[str, bytes], deletes: set[str]) -> None:
        with self._lock:
            for key in deletes:
                self.data.pop(key, None)
            self.data.update(puts)
            self.commits += 1

    def close(self) -> None:
        pass


class SqliteKV:
    """One SQLite file in WAL mode with `synchronous=FULL`: a commit is on disk when it returns.

    An exclusive lock file in the data directory keeps a second process from
    using the same state (two supervisors failing over the same cluster).
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "supervisor.sqlite3"
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(data_dir / "supervisor.lock", "a+")  # noqa: SIM115 - held for the process's life
        except OSError as exc:
            raise StoreError(f"cannot use data_dir {str(data_dir)!r} (setting data_dir): {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreError(
                f"another supervisor process uses {data_dir} (setting data_dir); "
                "run one replica per data directory, or use an etcd store for several replicas"
            ) from None
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        except sqlite3.Error as exc:
            self._lock_file.close()
            raise StoreError(f"cannot open {self.path} (setting data_dir): {exc}") from None
        self._mutex = threading.Lock()

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
            ).fetchall()
        return {k: bytes(v) for k, v in rows}

    def commit(self, puts: dict[str, bytes], deletes: set[str]) -> None:
        try:
            with self._mutex:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in deletes])
                    self._db.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", list(puts.items()))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


# ---------------------------------------------------------------- state and changes


@dataclass(frozen=True, slots=True)
class ClockMark:
    """Where a stored duration was last measured: the writer's boot, its CLOCK_MONOTONIC (ms) and its
    `now_ms()` then. A reader on the same boot measures the time since exactly (monotonic); any other
    reader (a restart after a reboot, another replica) cannot, and never trusts a wall-clock difference."""

    boot_id: str
    monotonic_ms: int
    wall_ms: int


# States of a submission (InFlightRecord.state).
INTENT = "intent"  # decided and durable; the call may be under way (nobody knows yet)
AMBIGUOUS = "ambiguous"  # a call failed in a way that leaves it unknown whether it was carried out
SUBMITTED = "submitted"  # accepted under `procedure_id` (polled)
MIGRATING = "migrating"  # reported already migrating (no procedure of ours): ends at its timeout


@dataclass(frozen=True, slots=True)
class InFlightRecord:
    """One SubmitRegionMigration decision: regions of one datanode going to one target, under one
    `request_id` that every retry of it carries, whoever the leader. Stored under one key whatever
    the number of regions, so each failover step is one write of a handful of keys."""

    request_id: str
    datanode_id: int
    from_peer: Peer
    to_peer: Peer
    region_ids: tuple[int, ...]
    timeout_ms: int
    state: str
    procedure_id: str = ""
    attempts: int = 0  # calls that failed ambiguously so far
    mark: ClockMark | None = None  # submitted / migrating: when it was accepted (its timeout runs from there)


@dataclass(frozen=True, slots=True)
class LegacyInFlight:
    """A record of the first format, one per region (`inflight/<region>`, an absolute deadline); read
    only so that a leader can replace it with an InFlightRecord."""

    region_id: int
    datanode_id: int
    procedure_id: str
    deadline_ms: int


@dataclass(slots=True)
class StoredState:
    registry: dict[int, np.ndarray] = field(default_factory=dict)
    maintenance: bool = False
    maintenance_until_ms: int = 0  # on the writer's clock; see maintenance_mark
    datanode_maintenance: dict[int, int] = field(default_factory=dict)
    maintenance_mark: ClockMark | None = None  # when the expiries above were written (None: first format)
    failover_counts: dict[DetectingRegion, int] = field(default_factory=dict)
    inflight: dict[str, InFlightRecord] = field(default_factory=dict)  # by submission id
    legacy_inflight: dict[str, LegacyInFlight] = field(default_factory=dict)  # by key id
    journal: list[JournalEntry] = field(default_factory=list)
    journal_term: int = 0
    term: int = 0

    @property
    def region_count(self) -> int:
        return sum(r.size for r in self.registry.values())


@dataclass(frozen=True, slots=True)
class RegistryAdd:
    datanode_id: int
    region_ids: np.ndarray


@dataclass(frozen=True, slots=True)
class RegistryRemove:
    datanode_id: int
    region_ids: np.ndarray


@dataclass(frozen=True, slots=True)
class CountsSet:
    counts: tuple[tuple[DetectingRegion, int], ...]


@dataclass(frozen=True, slots=True)
class CountsDrop:
    keys: tuple[DetectingRegion, ...]


@dataclass(frozen=True, slots=True)
class InFlightSet:
    submission_id: str
    record: InFlightRecord


@dataclass(frozen=True, slots=True)
class InFlightDrop:
    submission_id: str


@dataclass(frozen=True, slots=True)
class MaintenanceSet:
    """The whole maintenance state: the global switch and the per-datanode ones, with expiries (0: none)
    on the writer's clock, and the mark they were measured at (what a reader trusts: the time left)."""

    enabled: bool
    until_ms: int = 0
    datanodes: tuple[tuple[int, int], ...] = ()
    mark: ClockMark | None = None


@dataclass(frozen=True, slots=True)
class JournalAppend:
    entry: JournalEntry
    term: int


@dataclass(frozen=True, slots=True)
class TermSet:
    term: int


Change = (
    RegistryAdd | RegistryRemove | CountsSet | CountsDrop | InFlightSet | InFlightDrop | MaintenanceSet
    | JournalAppend | TermSet
)


def _key_id(n: int) -> str:
    return f"{n:020d}"


def _entry_to_json(entry: JournalEntry) -> bytes:
    return json.dumps({
        "at_millis": entry.at_millis,
        "region_ids": list(entry.region_ids),
        "from": [entry.from_peer.id, entry.from_peer.addr],
        "to": [entry.to_peer.id, entry.to_peer.addr],
        "timeout_ms": entry.timeout_ms,
        "trigger_reason": entry.trigger_reason,
        "procedure_id": entry.procedure_id,
        "leader_term": entry.leader_term,
        "request_id": entry.request_id,
    }).encode()


def _entry_from_json(raw: bytes) -> JournalEntry:
    d = json.loads(raw)
    return JournalEntry(
        at_millis=d["at_millis"],
        region_ids=tuple(d["region_ids"]),
        from_peer=Peer(*d["from"]),
        to_peer=Peer(*d["to"]),
        timeout_ms=d["timeout_ms"],
        trigger_reason=d["trigger_reason"],
        procedure_id=d["procedure_id"],
        leader_term=d["leader_term"],
        request_id=d.get("request_id", ""),
    )


def decode_maintenance(value: bytes | None) -> tuple[bool, int, dict[int, int]]:
    """(global on, global expiry, {datanode: expiry}) from the stored value, expiries on the writer's clock."""
    on, until, datanodes, _ = decode_maintenance_marked(value)
    return on, until, datanodes


def decode_maintenance_marked(value: bytes | None) -> tuple[bool, int, dict[int, int], ClockMark | None]:
    if not value:
        return False, 0, {}, None
    if value in (b"0", b"1"):  # the first format: the global switch alone
        return value == b"1", 0, {}, None
    d = json.loads(value)
    mark = d.get("mark")
    return (
        bool(d["enabled"]),
        int(d.get("until_ms", 0)),
        {int(k): int(v) for k, v in d.get("datanodes", [])},
        ClockMark(str(mark["boot_id"]), int(mark["monotonic_ms"]), int(mark["wall_ms"])) if mark else None,
    )


def _mark_json(mark: ClockMark | None) -> dict | None:
    return None if mark is None else {"boot_id": mark.boot_id, "monotonic_ms": mark.monotonic_ms, "wall_ms": mark.wall_ms}


def _inflight_to_json(rec: InFlightRecord) -> bytes:
    return json.dumps({
        "request_id": rec.request_id,
        "datanode_id": rec.datanode_id,
        "from": [rec.from_peer.id, rec.from_peer.addr],
        "to": [rec.to_peer.id, rec.to_peer.addr],
        # 8 bytes per region (base64): a 100,000-region submission is about 1 MB, within etcd's request limit.
        "regions": base64.b64encode(np.asarray(rec.region_ids, dtype=_U64).tobytes()).decode(),
        "timeout_ms": rec.timeout_ms,
        "state": rec.state,
        "procedure_id": rec.procedure_id,
        "attempts": rec.attempts,
        "mark": _mark_json(rec.mark),
    }).encode()


def _decode_inflight(ident: str, value: bytes, state: StoredState) -> None:
    d = json.loads(value)
    if "request_id" not in d:  # the first format: one key per region
        state.legacy_inflight[ident] = LegacyInFlight(int(ident), int(d["datanode_id"]), str(d["procedure_id"]),
                                                      int(d["deadline_ms"]))
        return
    mark = d.get("mark")
    state.inflight[ident] = InFlightRecord(
        request_id=str(d["request_id"]),
        datanode_id=int(d["datanode_id"]),
        from_peer=Peer(int(d["from"][0]), str(d["from"][1])),
        to_peer=Peer(int(d["to"][0]), str(d["to"][1])),
        region_ids=tuple(np.frombuffer(base64.b64decode(d["regions"]), dtype=_U64).tolist()),
        timeout_ms=int(d["timeout_ms"]),
        state=str(d["state"]),
        procedure_id=str(d.get("procedure_id", "")),
        attempts=int(d.get("attempts", 0)),
        mark=ClockMark(str(mark["boot_id"]), int(mark["monotonic_ms"]), int(mark["wall_ms"])) if mark else None,
    )


def decode_state(raw: dict[str, bytes], prefix: str) -> StoredState:
    state = StoredState()
    for key, value in raw.items():
        name = key[len(prefix):].lstrip("/")
        kind, _, ident = name.partition("/")
        if kind == "registry":
            state.registry[int(ident)] = np.frombuffer(value, dtype=_U64).astype(np.uint64)
        elif kind == "counts":
            pairs = np.frombuffer(value, dtype=_U64).reshape(-1, 2)
            for region_id, count in pairs.tolist():
                state.failover_counts[(int(ident), region_id)] = count
        elif kind == "inflight":
            _decode_inflight(ident, value, state)
        elif kind == "journal":
            state.journal.append(_entry_from_json(value))
        elif kind == "maintenance":
            on, until, datanodes, mark = decode_maintenance_marked(value)
            state.maintenance, state.maintenance_until_ms, state.datanode_maintenance = on, until, datanodes
            state.maintenance_mark = mark
        elif kind == "journal_term":
            state.journal_term = int(value)
        elif kind == "term":
            state.term = int(value)
    return state


@dataclass(slots=True)
class _Pending:
    changes: list[Change]
    on_durable: Callable[[BaseException | None], None] | None


class StateStore:
    """Encodes state changes into keys and commits them from a writer thread, in batches.

    The writer keeps a mirror of the registry and counts (a datanode's keys are
    rewritten whole), loaded by `load`. A failed commit is retried with backoff
    and the batch is kept: nothing acknowledged is dropped. `FencedOut` ends
    the retries and is reported through `on_fenced` and to the waiting callbacks.
    """

    def __init__(
        self,
        kv: KV,
        prefix: str,
        *,
        flush_interval_s: float = 0.01,
        journal_capacity: int = 10_000,
        on_fenced: Callable[[], None] | None = None,
    ) -> None:
        self.kv = kv
        self.prefix = prefix.rstrip("/") + "/"
        self._flush_interval = flush_interval_s
        self._journal_capacity = journal_capacity
        self._on_fenced = on_fenced
        self._registry: dict[int, np.ndarray] = {}
        self._counts: dict[int, dict[int, int]] = {}
        self._journal_keys: list[str] = []
        self._journal_seq = 0
        self._pending: list[_Pending] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.failures = 0

    # ------------------------------------------------------------ lifecycle

    def load(self) -> StoredState:
        """Read everything under the prefix; the writer's mirror starts from it."""
        raw = self.kv.read_prefix(self.prefix)
        state = decode_state(raw, self.prefix)
        with self._cond:
            self._registry = dict(state.registry)
            self._counts = {}
            for (d, r), c in state.failover_counts.items():
                self._counts.setdefault(d, {})[r] = c
            self._journal_keys = sorted(k for k in raw if k.startswith(self.prefix + "journal/"))
            self._journal_seq = int(self._journal_keys[-1].rsplit("/", 1)[1]) + 1 if self._journal_keys else 0
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
        """Commit what is pending (within `timeout` seconds), then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def close(self) -> None:
        self.kv.close()

    # ------------------------------------------------------------ writes

    def submit(self, changes: list[Change], on_durable: Callable[[BaseException | None], None] | None = None) -> None:
        """Queue changes (thread-safe, never blocks on I/O)."""
        with self._cond:
            self._pending.append(_Pending(changes, on_durable))
            self._cond.notify()

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything submitted so far is committed (for tests and shutdown)."""
        done = threading.Event()
        error: list[BaseException] = []

        def on_durable(exc: BaseException | None) -> None:
            if exc is not None:
                error.append(exc)
            done.set()

        self.submit([], on_durable)
        if not done.wait(timeout):
            raise StoreError(f"store did not commit within {timeout} s")
        if error:
            raise error[0]

    def _run(self) -> None:
        backoff = 0.05
        batch: list[_Pending] = []
        while True:
            with self._cond:
                while not self._pending and not batch and not self._stopping:
                    self._cond.wait(0.5)
                if not self._pending and not batch and self._stopping:
                    return
            if not batch:
                # Group commit: give concurrent writers a moment to join this batch.
                time.sleep(self._flush_interval)
            with self._cond:
                batch.extend(self._pending)
                self._pending = []
            try:
                puts, deletes = self._encode(batch)
                self.kv.commit(puts, deletes)
            except FencedOut as exc:
                log_event(log, logging.ERROR, "store_write_fenced", error=str(exc))
                self._finish(batch, exc)
                batch = []
                if self._on_fenced is not None:
                    self._on_fenced()
                continue
            except Exception as exc:  # a backend fault: keep the batch and retry
                self.failures += 1
                log_event(log, logging.ERROR, "store_write_failed", error=str(exc), retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            self.commits += 1
            self._apply()
            self._finish(batch, None)
            batch = []

    @staticmethod
    def _finish(batch: list[_Pending], exc: BaseException | None) -> None:
        for item in batch:
            if item.on_durable is not None:
                item.on_durable(exc)

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


def parse_endpoints(store: str) -> list[tuple[str, int]]:
    """`etcd://h1:p1,h2:p2` -> [(h1, p1), (h2, p2)]; ValueError naming what is wrong."""
    body = store.removeprefix("etcd://").strip("/")
    endpoints = []
    for part in body.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {part!r} is not host:port (store={store!r})")
        endpoints.append((host, int(port)))
    if not endpoints:
        raise ValueError(f"no etcd endpoint in store={store!r}")
    return endpoints


def open_kv(store: str, data_dir: Path) -> KV:
    """The backend a `store` setting names: `sqlite`, `memory` or `etcd://host:port[,host:port]`."""
    if store == "sqlite":
        return SqliteKV(data_dir)
    if store == "memory":
        return MemoryKV()
    if store.startswith("etcd://"):
        from supervisor_service.etcd import EtcdKV

        return EtcdKV(parse_endpoints(store))
    raise StoreError(f"unknown store {store!r}: use sqlite, memory or etcd://host:port[,host:port]")

