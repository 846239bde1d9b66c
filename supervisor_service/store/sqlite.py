"""The embedded backend: one SQLite file in WAL mode under data_dir, bound to the identity of its directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import uuid
from pathlib import Path

from supervisor_service.core import log_event
from supervisor_service.store.kv import Fence, FencedOut, StoreError, StoreGone, _stored_term

log = logging.getLogger("supervisor_service.store")


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
