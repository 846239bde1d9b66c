"""Leader election on etcd: a lease, a campaign key whose create revision is the leader term (docs/design.md §6).

A replica becomes leader by creating `<prefix>/leader` (value: its advertised
address) under a lease, in a transaction that succeeds only if the key does
not exist. The leader term is the revision of that write, so it grows with
every new leadership. The leader renews the lease every ttl/3 and considers
itself leader only until `last renewal sent + ttl - margin`: it steps down
before the lease can expire at the server, so two leaders never act at once.
The store's writes are fenced by the same key (`store/etcd.py`). The election
runs on the store's etcd connection (`EtcdConnection`), on its event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from supervisor_service.core import describe, log_event
from supervisor_service.store import EtcdKV, StoreError

log = logging.getLogger("supervisor_service.etcd")


class EtcdElection:
    """Campaigns for `<prefix>/leader` under a lease; reports elected(term) and lost()."""

    def __init__(
        self,
        kv: EtcdKV,
        prefix: str,
        advertise_addr: str,
        ttl_ms: int,
        *,
        on_elected: Callable[[int], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.conn = kv.conn
        self._kv = kv
        self.key = (prefix.rstrip("/") + "/leader").encode()
        self.advertise_addr = advertise_addr
        self._ttl_s = max(1, round(ttl_ms / 1000))
        # Step down this long before the lease could expire at the server.
        self._margin_s = max(0.5, self._ttl_s / 4)
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._deadline = 0.0  # monotonic time until which this replica may act as leader
        self._term = 0
        self._leader_addr = ""  # another replica seen holding the leader key; never this one's own address
        self._stopping = False
        self._resign = asyncio.Event()
        self._task: asyncio.Future | None = None
        self._lease = None

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

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.run_coroutine_threadsafe(self._campaign_forever(), self.conn.loop)

    def resign(self) -> None:
        """Step down (at SIGTERM): stop acting at once, then revoke the lease so another replica takes over."""
        self._stopping = True
        was_leader = self._drop_leadership()
        self.conn.loop.call_soon_threadsafe(self._resign.set)
        if was_leader:
            self._on_lost()
        if self._task is not None:
            try:
                self._task.result(timeout=self._ttl_s + 2)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

    def step_down(self, reason: str) -> None:
        """Stop acting now and give the lease up; campaigning goes on, so this replica may lead again later."""
        if self._drop_leadership():
            log_event(log, logging.ERROR, "leadership_lost", reason=reason)
            self._on_lost()
            asyncio.run_coroutine_threadsafe(self._revoke(), self.conn.loop)

    def _drop_leadership(self) -> bool:
        with self._lock:
            was = self._deadline > 0
            self._deadline = 0.0
            return was

    # ------------------------------------------------------------ campaign

    async def _campaign_forever(self) -> None:
        backoff = 0.2
        while not self._stopping:
            try:
                await self._campaign_once()
                backoff = 0.2
            except Exception as exc:  # etcd unreachable or erroring: not leader, try again
                with self._lock:
                    self._leader_addr = ""  # cut off: who leads now is not known here
                if self._drop_leadership():
                    log_event(log, logging.ERROR, "leadership_lost", reason=describe(exc))
                    self._on_lost()
                else:
                    log_event(log, logging.WARNING, "election_error", error=describe(exc))
                await self.conn.reset()
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._ttl_s / 2)
        await self._revoke()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._resign.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _campaign_once(self) -> None:
        client = await self.conn.client()
        txn = client.transactions
        sent = time.monotonic()
        lease = await asyncio.wait_for(client.lease(self._ttl_s), self._ttl_s)
        ok, _ = await asyncio.wait_for(
            client.transaction(
                compare=[txn.create(self.key) == 0],
                success=[txn.put(self.key, self.advertise_addr.encode(), lease=lease)],
                failure=[txn.get(self.key)],
            ),
            self._ttl_s,
        )
        if not ok:
            await lease.revoke()
            current = await client.get(self.key)
            holder = current.value.decode() if current is not None else ""
            with self._lock:
                # Our own address there is a lease of an earlier leadership not yet expired: not a leader.
                self._leader_addr = "" if holder == self.advertise_addr else holder
            await self._sleep(self._ttl_s / 3)
            return
        current = await client.get(self.key)
        term = current.create_revision if current is not None else 0
        self._lease = lease
        with self._lock:
            self._term = term
            self._deadline = sent + self._ttl_s - self._margin_s
            self._leader_addr = ""
        log_event(log, logging.WARNING, "leadership_acquired", term=term, addr=self.advertise_addr, ttl_s=self._ttl_s)
        self._on_elected(term)
        await self._keep_alive(lease)

    async def _keep_alive(self, lease) -> None:
        while not self._stopping:
            await self._sleep(self._ttl_s / 3)
            if self._stopping:
                return
            sent = time.monotonic()
            with self._lock:
                remaining = self._deadline - sent
                dropped = self._deadline == 0.0
            if dropped:
                await self._sleep(self._ttl_s / 2)  # stepped down: give another replica a chance first
                return
            if remaining <= 0:
                raise StoreError("lease renewal overdue")
            try:
                response = await asyncio.wait_for(lease.refresh(), timeout=remaining)
            except TimeoutError:
                raise StoreError("etcd did not renew the lease in time") from None
            if response is None or response.TTL <= 0:
                raise StoreError("the leader lease expired at the server")
            with self._lock:
                self._deadline = sent + self._ttl_s - self._margin_s

    async def _revoke(self) -> None:
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2)
            except Exception:  # noqa: BLE001 - the lease expires on its own anyway
                pass
            self._lease = None
