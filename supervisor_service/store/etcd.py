"""etcd v3 as the state store of several replicas: the client connection and the backend (docs/design.md §6).

aetcd is an asyncio client; it runs here on a private event loop in its own
thread (`EtcdConnection`), so the store's writer thread and the election
(`cluster/etcd.py`, which shares the connection) never share the gRPC
server's loop. Several endpoints are tried in turn.

Every store write carries the term it was made under and is a transaction
that also checks that the leader key's create revision is still that term:
a deposed leader's write is refused (`FencedOut`), however late it arrives.
There is no unfenced write to etcd.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any

import aetcd

from supervisor_service.security.tls import ClientTLS
from supervisor_service.store.etcd_tls import TLSClient
from supervisor_service.store.kv import Fence, FencedOut, StoreError

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

    def __init__(self, endpoints: list[tuple[str, int]], timeout_s: float = 5.0, tls: ClientTLS | None = None) -> None:
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self.tls = tls
        self._current = 0
        self._client: aetcd.Client | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="etcd-client", daemon=True)
        self._thread.start()

    async def client(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.endpoints[self._current % len(self.endpoints)]
            client = (aetcd.Client(host=host, port=port, timeout=self.timeout_s) if self.tls is None
                      else TLSClient(host, port, self.tls, timeout=self.timeout_s))
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

    def __init__(self, endpoints: list[tuple[str, int]], timeout_s: float = 5.0, tls: ClientTLS | None = None) -> None:
        self.conn = EtcdConnection(endpoints, timeout_s, tls)

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


