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
import time
from collections.abc import Callable

from supervisor_service.cluster.lease import LeaseElection
from supervisor_service.store import EtcdKV, StoreError

log = logging.getLogger("supervisor_service.etcd")


class EtcdElection(LeaseElection):
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
        super().__init__(advertise_addr, max(1, round(ttl_ms / 1000)), log=log,
                         on_elected=on_elected, on_lost=on_lost)
        self.conn = kv.conn
        self._kv = kv
        self.key = (prefix.rstrip("/") + "/leader").encode()
        self._resign = asyncio.Event()
        self._task: asyncio.Future | None = None
        self._lease = None

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

    def _give_up(self) -> None:
        asyncio.run_coroutine_threadsafe(self._revoke(), self.conn.loop)

    # ------------------------------------------------------------ campaign

    async def _campaign_forever(self) -> None:
        backoff = 0.2
        while not self._stopping:
            try:
                await self._campaign_once()
                backoff = 0.2
            except Exception as exc:  # etcd unreachable or erroring: not leader, try again
                self._failed(exc)
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
            self._saw_holder(current.value.decode() if current is not None else "")
            await self._sleep(self._ttl_s / 3)
            return
        current = await client.get(self.key)
        term = current.create_revision if current is not None else 0
        self._lease = lease
        self._won(term, sent, ttl_s=self._ttl_s)
        await self._keep_alive(lease)

    async def _keep_alive(self, lease) -> None:
        while not self._stopping:
            await self._sleep(self._ttl_s / 3)
            if self._stopping:
                return
            sent = time.monotonic()
            remaining = self._renewal_left(sent)
            if remaining is None:
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
            self._renewed(sent)

    async def _revoke(self) -> None:
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2)
            except Exception:  # noqa: BLE001 - the lease expires on its own anyway
                pass
            self._lease = None
