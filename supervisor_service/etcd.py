"""etcd v3 for several replicas: the state store backend and leader election with a lease.

aetcd is an asyncio client; it runs here on a private event loop in its own
thread (`EtcdConnection`), so the store's writer thread and the election
never share the gRPC server's loop. Several endpoints are tried in turn.

Election: a replica becomes leader by creating `<prefix>/leader` (value: its
advertised address) under a lease, in a transaction that succeeds only if the
key does not exist. The leader term is the revision of that write, so it
grows with every new leadership. The leader renews the lease every ttl/3 and
considers itself leader only until `last renewal sent + ttl - margin`: it
steps down before the lease can expire at the server, so two leaders never
act at once. Every store write carries the term it was made under and is a
transaction that also checks that the leader key's create revision is still
that term: a deposed leader's write is refused (`FencedOut`), however late
it arrives. There is no unfenced write to etcd.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aetcd

from supervisor_service._log import describe, log_event
from supervisor_service.store import Fence, FencedOut, StoreError

log = logging.getLogger("supervisor_service.etcd")

# etcd refuses transactions of more than 128 operations (--max-txn-ops) and requests above
# 1.5 MiB (--max-request-bytes, 1,572,864 bytes) by default; the byte budget leaves room for the
# request's framing (keys again, per-op headers, the fence compare). A failover step of a datanode
# with 50,000 regions (its in-flight record and its counts, about 27 bytes a region) stays one
# transaction.
_MAX_TXN_OPS = 128
_MAX_TXN_BYTES = 1_400_000


class EtcdConnection:
    """An aetcd client on a private event loop thread; `run` executes a coroutine there."""

    def __init__(self, endpoints: list[tuple[str, int]], timeout_s: float = 5.0) -> None:
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self._current = 0
        self._client: aetcd.Client | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="etcd-client", daemon=True)
        self._thread.start()

    async def client(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.endpoints[self._current % len(self.endpoints)]
            client = aetcd.Client(host=host, port=port, timeout=self.timeout_s)
            await client.connect()
            self._client = client
        return self._client

    async def reset(self) -> None:
        """Drop the client after an error; the next call tries the next endpoint."""
        client, self._client = self._client, None
        self._current += 1
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing a broken client
                pass

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout if timeout is not None else self.timeout_s * 2)
        except TimeoutError:
            future.cancel()
            raise StoreError(f"etcd did not answer within {timeout or self.timeout_s * 2} s", reason="etcd") from None

    def close(self) -> None:
        if self._client is not None:
            try:
                self.run(self._client.close(), timeout=2)
            except Exception:  # noqa: BLE001
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(2)


class EtcdKV:
    """The store backend on etcd: one transaction per commit, fenced by the leader key's create revision."""

    max_ops: int | None = _MAX_TXN_OPS
    max_bytes: int | None = _MAX_TXN_BYTES
    fence_key = "leader"

    def __init__(self, endpoints: list[tuple[str, int]], timeout_s: float = 5.0) -> None:
        self.conn = EtcdConnection(endpoints, timeout_s)

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        async def read() -> dict[str, bytes]:
            try:
                client = await self.conn.client()
                result = await client.get_prefix(prefix.encode())
            except Exception as exc:
                await self.conn.reset()
                raise StoreError(f"etcd read of {prefix!r} failed: {exc}", reason="etcd") from exc
            return {kv.key.decode(): kv.value for kv in result}

        return self.conn.run(read())

    def commit(self, puts: dict[str, bytes], deletes: set[str], fence: Fence | None = None) -> None:
        if not puts and not deletes:
            return
        if fence is None:
            raise FencedOut("not committed: a write to etcd must carry the leader term it was made under")
        key, term = fence[0].encode(), fence[1]

        async def write() -> None:
            try:
                client = await self.conn.client()
                txn = client.transactions
                success = [txn.delete(k.encode()) for k in deletes] + [txn.put(k.encode(), v) for k, v in puts.items()]
                ok, _ = await client.transaction(compare=[txn.create(key) == term], success=success, failure=[])
            except Exception as exc:
                await self.conn.reset()
                raise StoreError(f"etcd write failed: {exc}", reason="etcd") from exc
            if not ok:
                raise FencedOut(f"etcd refused the write: the leader key's create revision is no longer {term}")

        self.conn.run(write())

    def check(self) -> None:
        pass

    def term_floor(self) -> int:
        return 0  # terms are revisions of the leader key: etcd only ever raises them

    def note_term(self, term: int) -> None:
        pass

    def close(self) -> None:
        self.conn.close()


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
