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

import base64
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from supervisor_service._log import describe, log_event
from supervisor_service.events import DetectingRegion, Peer
from supervisor_service.remotes import JournalEntry

if TYPE_CHECKING:
    from supervisor_service.metrics import Metrics

log = logging.getLogger("supervisor_service.store")

_U64 = np.dtype("<u8")


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


def _sqlite_reason(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "full" in text:
        return "disk_full"
    if "readonly" in text or "read-only" in text:
        return "read_only"
    if "i/o" in text:
        return "io_error"
    if "locked" in text or "busy" in text:
        return "busy"
    return "sqlite"


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


DB_FILE = "supervisor.sqlite3"
IDENTITY_FILE = "supervisor.identity"


class SqliteKV:
    """One SQLite file in WAL mode with `synchronous=FULL`: a commit is on disk when it returns.

    An exclusive lock file in the data directory keeps a second process from
    using the same state (two supervisors failing over the same cluster).

    An identity file next to the database (`supervisor.identity`: the
    store's id and the highest leader term used with it) tells a data
    directory that held a store from a fresh one: if the database is then
    missing or another one, opening fails unless `allow_new_store` says to
    begin anyway, and terms still continue above the highest one used. The
    database and its WAL are checked before each commit (and by the writer
    when idle): a file deleted or replaced under the service raises
    `StoreGone`.
    """

    max_ops: int | None = None
    max_bytes: int | None = None
    fence_key = "term"

    def __init__(self, data_dir: Path, *, allow_new_store: bool = False) -> None:
        self.path = data_dir / DB_FILE
        self.data_dir = data_dir
        self._identity_path = data_dir / IDENTITY_FILE
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
            self._open(allow_new_store)
        except BaseException:
            self._lock_file.close()
            raise
        self._mutex = threading.Lock()

    # ------------------------------------------------------------ identity

    def _open(self, allow_new_store: bool) -> None:
        identity = self._read_identity(allow_new_store)
        existed = self.path.exists()
        if identity is not None and not existed and not allow_new_store:
            raise StoreError(
                f"{self.path} is missing, but data_dir {str(self.data_dir)!r} held state store "
                f"{identity['store_id']} (leader terms up to {identity['highest_term']}): it was deleted. "
                "Restore it, or start with --new-store (setting allow_new_store) to begin from an empty state "
                f"(leader terms then continue above {identity['highest_term']})"
            )
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            store_id = row[0] if row is not None else None
            if store_id is None:
                store_id = uuid.uuid4().hex
            # Written at every open: a database that cannot be written fails here, at start.
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('store_id', ?)", (store_id,))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path} (setting data_dir): {exc}", reason=_sqlite_reason(exc)) from None
        if identity is not None and identity["store_id"] != store_id:
            if not allow_new_store:
                self._db.close()
                raise StoreError(
                    f"{self.path} is not the state store data_dir {str(self.data_dir)!r} held (store "
                    f"{identity['store_id']}, leader terms up to {identity['highest_term']}): it was replaced. "
                    "Put the original back, or start with --new-store (setting allow_new_store) to use this one "
                    f"(leader terms then continue above {identity['highest_term']})"
                )
            log_event(log, logging.WARNING, "new_store_started", path=str(self.path), store_id=store_id,
                      previous_store_id=identity["store_id"], highest_term=identity["highest_term"])
        self._highest_term = identity["highest_term"] if identity is not None else 0
        self._store_id = store_id
        if identity is None or identity["store_id"] != store_id:
            self._write_identity()
        self._db_id = _file_id(self.path)
        self._wal_path = Path(f"{self.path}-wal")
        self._wal_id = _file_id(self._wal_path)

    def _read_identity(self, allow_new_store: bool) -> dict | None:
        try:
            raw = self._identity_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self._identity_path}: {exc.strerror or exc}") from None
        try:
            d = json.loads(raw)
            return {"store_id": str(d["store_id"]), "highest_term": int(d["highest_term"])}
        except (ValueError, KeyError, TypeError):
            if allow_new_store:
                return None
            raise StoreError(
                f"{self._identity_path} is unreadable ({raw[:40]!r}); remove it if this data_dir's store is the "
                "one to use, or start with --new-store (setting allow_new_store)"
            ) from None

    def _write_identity(self) -> None:
        """Atomically: write a temporary file, fsync it, rename it over the identity, fsync the directory."""
        body = json.dumps({"store_id": self._store_id, "highest_term": self._highest_term,
                           "database": DB_FILE}).encode()
        tmp = self._identity_path.with_name(IDENTITY_FILE + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._identity_path)
            fd = os.open(self.data_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot write {self._identity_path}: {exc.strerror or exc}",
                             reason="disk_full" if exc.errno == 28 else "io_error") from None

    def term_floor(self) -> int:
        return self._highest_term

    def note_term(self, term: int) -> None:
        if term > self._highest_term:
            self._highest_term = term
            self._write_identity()

    # ------------------------------------------------------------ reads and writes

    def check(self) -> None:
        for path, known in ((self.path, self._db_id), (self._wal_path, self._wal_id)):
            if known is None:
                continue
            now = _file_id(path)
            if now is None:
                raise StoreGone(
                    f"state store {path} is gone: it was deleted while the service ran, so nothing more can "
                    "be committed (restart to find out what survived; a restart refuses to begin from an "
                    "empty store unless started with --new-store)"
                )
            if now != known:
                raise StoreGone(f"state store {path} was replaced while the service ran (another file is there now)")
        if self._wal_id is None:
            self._wal_id = _file_id(self._wal_path)

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        try:
            with self._mutex:
                rows = self._db.execute(
                    "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
                ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}", reason=_sqlite_reason(exc)) from exc
        return {k: bytes(v) for k, v in rows}

    def commit(self, puts: dict[str, bytes], deletes: set[str], fence: Fence | None = None) -> None:
        with self._mutex:
            self.check()
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                if fence is not None:
                    row = db.execute("SELECT value FROM kv WHERE key = ?", (fence[0],)).fetchone()
                    stored = _stored_term(bytes(row[0])) if row is not None else None
                    if stored != fence[1]:
                        raise FencedOut(
                            f"not committed: the stored term is {stored}, not {fence[1]} "
                            "(another process has used this data_dir since)"
                        )
                db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in deletes])
                db.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", list(puts.items()))
                db.execute("COMMIT")
            except BaseException as exc:
                # SQLite may have rolled the transaction back itself (a full disk at COMMIT): a ROLLBACK
                # then fails with "no transaction is active" and would hide the error that matters.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"sqlite {self.path}: {exc}", reason=_sqlite_reason(exc)) from exc
                raise

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
        # 8 bytes per region, base64 (10.7): a 100,000-region submission is about 1.07 MB (etcd's writes: see etcd.py).
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


def open_kv(store: str, data_dir: Path, *, allow_new_store: bool = False) -> KV:
    """The backend a `store` setting names: `sqlite`, `memory` or `etcd://host:port[,host:port]`."""
    if store == "sqlite":
        return SqliteKV(data_dir, allow_new_store=allow_new_store)
    if store == "memory":
        return MemoryKV()
    if store.startswith("etcd://"):
        from supervisor_service.etcd import EtcdKV

        return EtcdKV(parse_endpoints(store))
    raise StoreError(f"unknown store {store!r}: use sqlite, memory or etcd://host:port[,host:port]")

