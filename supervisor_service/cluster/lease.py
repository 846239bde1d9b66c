"""What every lease election shares: until when this replica may act, under which term, who else leads.

A backend (`cluster/etcd.py`, `cluster/postgres.py`) campaigns and renews in
its own way; it reports here when it won (`_won`), renewed (`_renewed`), saw
another holder (`_saw_holder`) or failed (`_failed`). The reads are safe from
any thread. The replica acts only until `renewal sent + ttl - margin`: the
server computes the expiry after the request was sent, so the replica stops
before the lease can expire there, and two leaders never act at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from supervisor_service.core import describe, log_event


class LeaseElection:
    def __init__(
        self,
        advertise_addr: str,
        ttl_s: float,
        *,
        log: logging.Logger,
        on_elected: Callable[[int], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.advertise_addr = advertise_addr
        self._ttl_s = ttl_s
        # Step down this long before the lease could expire at the server.
        self._margin_s = max(0.5, ttl_s / 4)
        self._log = log
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._deadline = 0.0  # monotonic time until which this replica may act as leader
        self._term = 0
        self._leader_addr = ""  # another replica seen holding the lease; never this one's own address
        self._stopping = False

    # ------------------------------------------------------------ thread-safe reads

    def is_leader(self) -> bool:
        with self._lock:
            return time.monotonic() < self._deadline

    @property
    def term(self) -> int:
        return self._term

    def holds(self, term: int) -> bool:
        """True while this replica may still act (and write) under `term`."""
        with self._lock:
            return term == self._term and time.monotonic() < self._deadline

    def leader_addr(self) -> str:
        """This replica's address while it leads; the other leader's when one was seen; '' when unknown."""
        with self._lock:
            if time.monotonic() < self._deadline:
                return self.advertise_addr
            return self._leader_addr

    # ------------------------------------------------------------ stepping down

    def step_down(self, reason: str) -> None:
        """Stop acting now and give the lease up; campaigning goes on, so this replica may lead again later."""
        if self._drop_leadership():
            log_event(self._log, logging.ERROR, "leadership_lost", reason=reason)
            self._on_lost()
            self._give_up()

    def _give_up(self) -> None:
        """Release the lease at the server after a step-down (on the backend's own thread or loop)."""
        raise NotImplementedError

    def _drop_leadership(self) -> bool:
        with self._lock:
            was = self._deadline > 0
            self._deadline = 0.0
            return was

    # ------------------------------------------------------------ what the campaign reports

    def _won(self, term: int, sent: float, **fields: object) -> None:
        with self._lock:
            self._term = term
            self._deadline = sent + self._ttl_s - self._margin_s
            self._leader_addr = ""
        log_event(self._log, logging.WARNING, "leadership_acquired", term=term, addr=self.advertise_addr, **fields)
        self._on_elected(term)

    def _renewed(self, sent: float) -> None:
        with self._lock:
            if self._deadline != 0.0:  # not if it stepped down meanwhile
                self._deadline = sent + self._ttl_s - self._margin_s

    def _renewal_left(self, sent: float) -> float | None:
        """Seconds left to renew before the replica must stop acting; None once it stepped down."""
        with self._lock:
            return None if self._deadline == 0.0 else self._deadline - sent

    def _saw_holder(self, holder: str) -> None:
        with self._lock:
            # Our own address there is a lease of an earlier leadership not yet expired: not a leader.
            self._leader_addr = "" if holder == self.advertise_addr else holder

    def _failed(self, exc: BaseException) -> None:
        """The server unreachable or erroring: not leader any more (if it was), and who leads is not known."""
        with self._lock:
            self._leader_addr = ""
        if self._drop_leadership():
            log_event(self._log, logging.ERROR, "leadership_lost", reason=describe(exc))
            self._on_lost()
        else:
            log_event(self._log, logging.WARNING, "election_error", error=describe(exc))
