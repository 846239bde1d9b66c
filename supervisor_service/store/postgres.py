"""PostgreSQL as the state store of several replicas: the connections and the backend (docs/design.md §6).

Two tables (created at first use, shared by every prefix of the database):
`supervisor_kv` (key, value) holds the state under each store prefix;
`supervisor_lease` holds one lease row per prefix (`<prefix>/leader`): the
holder's advertised address, the leader term and the expiry, computed with
the database's own clock (`clock_timestamp()`), so the replicas' clocks never
matter. Terms come from the sequence `supervisor_term` and are never below
the row's last term plus one: they only grow, even after the lease row was
deleted (the sequence goes on) or the sequence dropped and made again (the
row goes on). The election itself is `cluster/postgres.py`.

Every commit is one statement (so one transaction, with no idle moment in
which a paused replica could hold a lock): it locks the lease row
(`FOR SHARE`) and writes only if that row still carries the commit's term
and has not expired by the database's clock; else `FencedOut`. A takeover
updates that row, so it waits for a commit that checked it, and a commit
that comes after it sees the new term. There is no unfenced write.

Nothing may hang past a lease: every statement runs under a deadline kept
on this side (a watchdog shuts the socket down, which a paused or
partitioned server cannot do for us), the server's `statement_timeout` and
`lock_timeout`, libpq's `connect_timeout`, and TCP keepalives. A password
in the URL is never logged nor put in an error: `redact` shows the URL.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from supervisor_service.store.kv import Fence, FencedOut, StoreError

log = logging.getLogger("supervisor_service.postgres")

T = TypeVar("T")

# One statement's worth of writes at most (a call above it is split, logged): far above a failover
# step (27 bytes a region), and small enough to be sent and applied well within a statement's deadline.
_MAX_TXN_BYTES = 32 * 1024 * 1024

# What the service creates when it is missing (a user without CREATE on the schema can use the objects an
# administrator made with these statements, given SELECT, INSERT, UPDATE, DELETE and USAGE on the sequence).
SCHEMA = {
    "supervisor_kv": 'CREATE TABLE IF NOT EXISTS supervisor_kv (key text COLLATE "C" PRIMARY KEY, '
                     "value bytea NOT NULL)",
    "supervisor_lease": "CREATE TABLE IF NOT EXISTS supervisor_lease (name text PRIMARY KEY, holder text NOT NULL, "
                        "term bigint NOT NULL, expires_at timestamptz NOT NULL)",
    "supervisor_term": "CREATE SEQUENCE IF NOT EXISTS supervisor_term",
}

_COMMIT = """
WITH fence AS (
    SELECT term FROM supervisor_lease
    WHERE name = %(fence)s AND term = %(term)s AND expires_at > clock_timestamp()
    FOR SHARE
), removed AS (
    DELETE FROM supervisor_kv WHERE key = ANY(%(deletes)s::text[]) AND EXISTS (SELECT FROM fence)
), written AS (
    INSERT INTO supervisor_kv (key, value)
    SELECT k, v FROM unnest(%(keys)s::text[], %(values)s::bytea[]) AS t(k, v) WHERE EXISTS (SELECT FROM fence)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
)
SELECT (SELECT count(*) FROM fence),
       (SELECT term FROM supervisor_lease WHERE name = %(fence)s),
       (SELECT expires_at > clock_timestamp() FROM supervisor_lease WHERE name = %(fence)s)
"""


def redact(url: str) -> str:
    """The URL with its password replaced by `***` (for logs and errors).

    Errs on the side of hiding: everything between the first ':' after the scheme and the last '@'
    before the query goes (a password with an unescaped '/' or '@' in it too)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, q, query = rest.partition("?")
    userinfo, at, after = head.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    parts = []
    for param in query.split("&") if q else ():
        key, eq, _ = param.partition("=")
        parts.append(f"{key}=***" if eq and key.strip().lower() == "password" else param)
    return f"{scheme}://{userinfo}{at}{after}{q}{'&'.join(parts)}"


def parse_url(url: str) -> dict[str, Any]:
    """The connection parameters of a `postgresql://` URL; ValueError naming what is wrong (never the password)."""
    if not (url.startswith("postgresql://") or url.startswith("postgres://")):
        raise ValueError(f"expected postgresql://user[:password]@host[:port]/dbname, got {redact(url)!r}")
    if url.partition("://")[2].partition("?")[0].count("@") > 1:
        raise ValueError(f"{redact(url)!r} has more than one '@' before its query: write an '@' of the user "
                         "name or password as %40 (and '/' as %2F, ':' as %3A)")
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ValueError(f"{redact(url)!r} is not a PostgreSQL URL libpq can read: {_message(exc, url)}") from None
    port = str(params.get("port", "5432"))
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
        raise ValueError(f"port {port!r} of {redact(url)!r} is not a number from 1 to 65535")
    if not params.get("dbname"):
        raise ValueError(f"no database name in {redact(url)!r}: postgresql://user@host:port/dbname")
    return params


def params_password(url: str) -> str:
    """The password written in the URL's userinfo, '' when none (to strip it from messages)."""
    userinfo, at, _ = url.partition("://")[2].partition("?")[0].rpartition("@")
    return userinfo.split(":", 1)[1] if at and ":" in userinfo else ""


def _cut(conn: psycopg.Connection) -> None:
    """Wake a thread blocked on this connection's socket: its statement fails at once."""
    with contextlib.suppress(OSError, psycopg.Error, ValueError):
        sock = socket.socket(fileno=conn.fileno())
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()  # the connection still owns the descriptor


class PostgresSession:
    """One connection, opened on demand and dropped after an error; each call runs under a deadline.

    Calls are serialised (a lock); the connection is in autocommit mode, so
    every statement is its own transaction.
    """

    def __init__(self, url: str, *, name: str, timeout_s: float) -> None:
        self.url = url
        self.shown = redact(url)
        self.timeout_s = timeout_s
        params = parse_url(url)
        timeout_ms = max(100, int(timeout_s * 1000))
        options = " ".join(filter(None, (
            str(params.pop("options", "")),
            f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}",
            f"-c idle_in_transaction_session_timeout={max(1000, 2 * timeout_ms)}",
        )))
        params.update(
            options=options,
            # libpq counts a connect timeout in whole seconds, 2 at least.
            connect_timeout=str(max(2, round(timeout_s))),
            keepalives="1", keepalives_idle="5", keepalives_interval="2", keepalives_count="2",
            tcp_user_timeout=str(timeout_ms),
        )
        params.setdefault("application_name", f"region-supervisor-{name}")
        self._conninfo = make_conninfo(**params)
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def run(self, op: Callable[[psycopg.Connection], T], *, what: str, timeout_s: float | None = None) -> T:
        """`op(connection)` within `timeout_s` (default: the session's); StoreError when it fails or is late."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._closed:
                raise StoreError(f"PostgreSQL store {self.shown}: closed", reason="postgres")
            started = time.monotonic()
            timer: threading.Timer | None = None
            fired = threading.Event()

            def expire(conn: psycopg.Connection) -> None:
                fired.set()
                _cut(conn)

            try:
                conn = self._connect(timeout)
                timer = threading.Timer(max(0.01, timeout - (time.monotonic() - started)), expire, (conn,))
                timer.daemon = True
                timer.start()
                return op(conn)
            except FencedOut:
                raise
            except (psycopg.Error, OSError) as exc:
                self._drop()
                late = time.monotonic() - started >= timeout
                detail = f"no answer within {timeout:.1f} s" if late else _message(exc, self.url)
                raise StoreError(f"PostgreSQL store {self.shown}: {what} failed: {detail}",
                                 reason="postgres") from None
            finally:
                if timer is not None:
                    timer.cancel()
                    timer.join()  # a cut under way ends before the descriptor can be closed and reused
                    if fired.is_set():
                        self._drop()  # cut just as the answer came: its socket is of no more use

    def _connect(self, timeout_s: float) -> psycopg.Connection:
        """The open connection, or a new one within `timeout_s`: libpq's connect_timeout is whole seconds,
        2 at least, so the connection is made on a thread of its own that is given up (it closes what
        it gets) when the caller's deadline is shorter."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        outcome: dict[str, Any] = {}
        lock = threading.Lock()

        def connect() -> None:
            try:
                # Never prepared: statements stay valid through a transaction-pooling proxy (PgBouncer).
                conn = psycopg.connect(self._conninfo, autocommit=True, prepare_threshold=None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome["error"] = exc
                return
            with lock:
                if outcome.get("abandoned"):
                    conn.close()
                else:
                    outcome["conn"] = conn

        thread = threading.Thread(target=connect, name="postgres-connect", daemon=True)
        thread.start()
        thread.join(timeout_s)
        with lock:
            if "conn" in outcome:
                self._conn = outcome["conn"]
                return self._conn
            if "error" in outcome:
                raise outcome["error"]
            outcome["abandoned"] = True
        raise TimeoutError(f"no connection within {timeout_s:.1f} s")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()


def _message(exc: BaseException, url: str) -> str:
    """The first line of a driver error, with the URL's password (if it were quoted) removed."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    password = params_password(url)
    return text.replace(password, "***") if password else text


# The columns the statements rely on, as information_schema names their types.
_COLUMNS = {
    ("supervisor_kv", "key"): "text", ("supervisor_kv", "value"): "bytea",
    ("supervisor_lease", "name"): "text", ("supervisor_lease", "holder"): "text",
    ("supervisor_lease", "term"): "bigint", ("supervisor_lease", "expires_at"): "timestamp with time zone",
}


_SCHEMA_LOCK = 0x5245_4753_5550_5631  # the advisory lock key of the schema's creation ("REGSUPV1")


def _create_missing(conn: psycopg.Connection) -> None:
    # Only what is missing: CREATE ... IF NOT EXISTS needs the CREATE privilege even when it exists.
    row = conn.execute("SELECT " + ", ".join(f"to_regclass('{name}') IS NULL" for name in SCHEMA)).fetchone()
    assert row is not None
    for statement in (statement for (_, statement), missing in zip(SCHEMA.items(), row) if missing):
        try:
            conn.execute(statement)
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable, psycopg.errors.DuplicateObject):
            pass  # made at the same moment by a process that does not take the lock (an older version)


def ensure_schema(session: PostgresSession) -> None:
    """Create the tables and the sequence if missing; refuse, naming it, a table of that name made otherwise."""

    def create(conn: psycopg.Connection) -> list[str]:
        # Replicas starting together on a new database would race: CREATE ... IF NOT EXISTS is not
        # atomic (the loser gets "relation already exists"). A session advisory lock (no privilege
        # needed; released by the unlock, or by the connection's end) makes them take turns.
        conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
        try:
            _create_missing(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
        rows = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name IN ('supervisor_kv', 'supervisor_lease')"
        ).fetchall()
        found = {(t, c): d for t, c, d in rows}
        return [f"{t}.{c} is {found.get((t, c), 'missing')}, not {d}"
                for (t, c), d in _COLUMNS.items() if found.get((t, c)) != d]

    wrong = session.run(create, what="connecting (and creating the tables if missing)")
    if wrong:
        raise StoreError(f"PostgreSQL store {session.shown}: tables of these names exist but are not the "
                         f"supervisor's ({'; '.join(wrong)}): use another database or schema", reason="postgres")


class PostgresKV:
    """The store backend on PostgreSQL: one statement per commit, fenced by the prefix's lease row."""

    max_ops: int | None = None
    max_bytes: int | None = _MAX_TXN_BYTES
    fence_key = "leader"

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.session = PostgresSession(url, name="store", timeout_s=timeout_s)
        try:
            ensure_schema(self.session)
        except BaseException:
            self.session.close()
            raise

    def new_session(self, name: str, timeout_s: float) -> PostgresSession:
        """Another connection to the same database (the election's: it must not wait behind a commit)."""
        return PostgresSession(self.url, name=name, timeout_s=timeout_s)

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        def read(conn: psycopg.Connection) -> dict[str, bytes]:
            if prefix and ord(prefix[-1]) < 0x10FFFF:
                # Keys compare bytewise (COLLATE "C"): the keys with this prefix are those in [prefix, next).
                upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
                rows = conn.execute("SELECT key, value FROM supervisor_kv WHERE key >= %s AND key < %s",
                                    (prefix, upper)).fetchall()
            else:
                rows = conn.execute("SELECT key, value FROM supervisor_kv WHERE starts_with(key, %s)",
                                    (prefix,)).fetchall()
            return {k: bytes(v) for k, v in rows}

        return self.session.run(read, what=f"reading {prefix!r}")

    def commit(self, puts: dict[str, bytes], deletes: set[str], fence: Fence | None = None) -> None:
        if not puts and not deletes:
            return
        if fence is None:
            raise FencedOut("not committed: a write to PostgreSQL must carry the leader term it was made under")
        name, term = fence
        params = {
            "fence": name, "term": term,
            # A key both deleted and written ends written (SQLite's order: deletes, then puts).
            "deletes": sorted(deletes - puts.keys()),
            "keys": list(puts), "values": list(puts.values()),
        }

        def write(conn: psycopg.Connection) -> tuple[int, int | None, bool | None]:
            row = conn.execute(_COMMIT, params).fetchone()
            assert row is not None
            return row[0], row[1], row[2]

        matched, stored, live = self.session.run(write, what="a commit")
        if not matched:
            why = ("no replica has held the lease" if stored is None
                   else f"the lease's term is {stored}" + (", and it has expired" if not live else ""))
            raise FencedOut(f"PostgreSQL refused the write under term {term}: {why}")

    def check(self) -> None:
        pass

    def term_floor(self) -> int:
        return 0  # terms come from the lease row and its sequence: they only grow

    def note_term(self, term: int) -> None:
        pass

    def close(self) -> None:
        self.session.close()
