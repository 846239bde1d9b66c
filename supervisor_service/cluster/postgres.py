"""Leader election on PostgreSQL: a lease row per store prefix, a term that only grows (docs/design.md §6).

A replica becomes leader by taking `<prefix>/leader` in `supervisor_lease`
when nobody holds it or its holder's lease has expired by the database's
clock: one upsert sets the holder (its advertised address), a new term
(`nextval('supervisor_term')`, and above the row's last term) and the expiry
(`clock_timestamp() + ttl`). The leader renews it every ttl/3 with an update
that succeeds only while the row still has its term and has not expired. It
considers itself leader only until `renewal sent + ttl - margin`: the
database computes the expiry after the request was sent, so the replica
stops acting before the lease can expire there, and two leaders never act at
once. The store's writes check the same row (`store/postgres.py`).

The election has its own connection (`PostgresSession`): a renewal never
waits behind a commit. Every statement has a deadline no later than the end
of the leadership, so a paused or unreachable database makes the leader step
down in time instead of hanging. It runs on one daemon thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg

from supervisor_service.cluster.lease import LeaseElection
from supervisor_service.core import describe, log_event
from supervisor_service.store import PostgresKV, StoreError

log = logging.getLogger("supervisor_service.postgres")

_HOLDER = """
SELECT holder, term, expires_at > clock_timestamp() FROM supervisor_lease WHERE name = %s
"""

# Sent only once the row was seen absent or expired, so that a replica standing by does not draw a term
# from the sequence on every look. On a conflict the new term is also above the row's last one (which
# survives a sequence dropped and made again); the update happens only if the lease has expired.
_ACQUIRE = """
INSERT INTO supervisor_lease AS l (name, holder, term, expires_at)
VALUES (%(name)s, %(holder)s, nextval('supervisor_term'), clock_timestamp() + %(ttl_ms)s * interval '1 millisecond')
ON CONFLICT (name) DO UPDATE
    SET holder = EXCLUDED.holder,
        term = GREATEST(l.term + 1, EXCLUDED.term),
        expires_at = EXCLUDED.expires_at
    WHERE l.expires_at <= clock_timestamp()
RETURNING term
"""

_RENEW = """
UPDATE supervisor_lease SET expires_at = clock_timestamp() + %(ttl_ms)s * interval '1 millisecond'
WHERE name = %(name)s AND term = %(term)s AND expires_at > clock_timestamp()
RETURNING term
"""

_RELEASE = """
UPDATE supervisor_lease SET holder = '', expires_at = '-infinity' WHERE name = %(name)s AND term = %(term)s
"""


class PostgresElection(LeaseElection):
    """Campaigns for `<prefix>/leader` in the lease table; reports elected(term) and lost()."""

    def __init__(
        self,
        kv: PostgresKV,
        prefix: str,
        advertise_addr: str,
        ttl_ms: int,
        *,
        on_elected: Callable[[int], None],
        on_lost: Callable[[], None],
    ) -> None:
        super().__init__(advertise_addr, ttl_ms / 1000, log=log, on_elected=on_elected, on_lost=on_lost)
        self.name = prefix.rstrip("/") + "/" + kv.fence_key
        self._ttl_ms = ttl_ms
        self._db = kv.new_session("election", timeout_s=self._ttl_s / 3)
        self._held = 0  # the term of the lease row this replica holds at the database (0: none)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._campaign_forever, name="postgres-election", daemon=True)
        self._thread.start()

    def resign(self) -> None:
        """Step down (at SIGTERM): stop acting at once, then release the lease so another replica takes over."""
        self._stopping = True
        was_leader = self._drop_leadership()
        self._wake.set()
        if was_leader:
            self._on_lost()
        if self._thread is not None:
            self._thread.join(self._ttl_s + 2)
        self._db.close()

    def _give_up(self) -> None:
        self._wake.set()  # the campaign thread releases the lease

    # ------------------------------------------------------------ campaign (its own thread)

    def _campaign_forever(self) -> None:
        backoff = 0.2
        while not self._stopping:
            try:
                self._campaign_once()
                backoff = 0.2
            except (StoreError, psycopg.Error) as exc:  # the database unreachable or erroring: not leader
                self._failed(exc)
                self._sleep(backoff)
                backoff = min(backoff * 2, self._ttl_s / 2)
        self._release()

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _campaign_once(self) -> None:
        # A look first: while the lease is held, a replica standing by takes no term from the sequence.
        row = self._db.run(lambda c: c.execute(_HOLDER, (self.name,)).fetchone(), what="reading the lease")
        if row is not None and row[2]:
            self._stand_by(row[0])
            return
        sent = time.monotonic()
        params = {"name": self.name, "holder": self.advertise_addr, "ttl_ms": self._ttl_ms}
        won = self._db.run(lambda c: c.execute(_ACQUIRE, params).fetchone(), what="taking the lease",
                           timeout_s=self._ttl_s - self._margin_s)
        if won is None:  # another replica took it in between
            row = self._db.run(lambda c: c.execute(_HOLDER, (self.name,)).fetchone(), what="reading the lease")
            self._stand_by(row[0] if row is not None and row[2] else "")
            return
        term = int(won[0])
        self._held = term
        self._won(term, sent, ttl_ms=self._ttl_ms)
        self._keep_alive(term)

    def _stand_by(self, holder: str) -> None:
        self._saw_holder(holder)
        self._sleep(self._ttl_s / 3)

    def _keep_alive(self, term: int) -> None:
        while not self._stopping:
            self._sleep(self._ttl_s / 3)
            if self._stopping:
                return
            sent = time.monotonic()
            remaining = self._renewal_left(sent)
            if remaining is None:
                self._release()
                self._sleep(self._ttl_s / 2)  # stepped down: give another replica a chance first
                return
            if remaining <= 0:
                raise StoreError("lease renewal overdue")
            renewed = self._renew(term, sent, remaining)
            if renewed is None:
                self._held = 0
                raise StoreError(f"the leader lease of term {term} expired or was taken at the database")
            self._renewed(sent)  # not if it stepped down meanwhile: released on the next turn

    def _renew(self, term: int, sent: float, remaining: float) -> tuple | None:
        """The renewal's row (None: the lease is no longer this term's). A connection that broke (the
        server restarted, a proxy or an idle timeout closed it) is made again and the renewal sent once
        more while the deadline allows: the update is conditional, so sending it twice is harmless."""
        params = {"name": self.name, "term": term, "ttl_ms": self._ttl_ms}
        try:
            return self._db.run(lambda c: c.execute(_RENEW, params).fetchone(), what="renewing the lease",
                                timeout_s=remaining)
        except StoreError as exc:
            left = remaining - (time.monotonic() - sent)
            if left < 0.2 or "no answer within" in str(exc):
                raise
            log_event(log, logging.WARNING, "lease_renewal_retried", error=describe(exc))
            return self._db.run(lambda c: c.execute(_RENEW, params).fetchone(), what="renewing the lease",
                                timeout_s=left)

    def _release(self) -> None:
        """Give the lease row up (best effort: it expires by itself anyway)."""
        term, self._held = self._held, 0
        if not term:
            return
        try:
            self._db.run(lambda c: c.execute(_RELEASE, {"name": self.name, "term": term}),
                         what="releasing the lease", timeout_s=2.0)
        except StoreError:
            pass
