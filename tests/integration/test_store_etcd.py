"""The etcd backend against a real etcd: fenced commits and reads, and one transaction per submit() call."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from supervisor_service.core import RegistryAdd
from supervisor_service.store import EtcdKV, FencedOut, StateStore, parse_endpoints
from tests.support.servers import EtcdServer

pytestmark = pytest.mark.realtime


def _registry_call(first_datanode: int, n: int) -> list:
    return [RegistryAdd(first_datanode + i, np.array([first_datanode + i], dtype=np.uint64)) for i in range(n)]


def test_etcd_kv_commits_reads_and_fences_every_write(tmp_path):
    etcd = EtcdServer(str(tmp_path))
    kv = EtcdKV(parse_endpoints(f"etcd://{etcd.endpoint}"))
    try:
        term = kv.conn.run(_put_leader(kv, b"/p/leader"))
        fence = ("/p/leader", term)
        puts = {f"/p/k{i:04d}": str(i).encode() for i in range(kv.max_ops)}  # the most one transaction takes
        kv.commit(puts, set(), fence)
        assert {k: v for k, v in kv.read_prefix("/p/k").items()} == puts
        kv.commit({}, {"/p/k0000"}, fence)
        assert "/p/k0000" not in kv.read_prefix("/p/")
        # A write without a term, or under a term that is not the leader key's create revision, never lands.
        with pytest.raises(FencedOut):
            kv.commit({"/p/x": b"1"}, set())
        with pytest.raises(FencedOut):
            kv.commit({"/p/y": b"1"}, set(), ("/p/leader", term + 1000))
        assert "/p/x" not in kv.read_prefix("/p/") and "/p/y" not in kv.read_prefix("/p/")
    finally:
        kv.close()
        etcd.stop()


def test_each_submit_call_is_one_etcd_transaction(tmp_path):
    """Calls the size of a failover step, many at once: each lands in one revision (one transaction)."""
    etcd = EtcdServer(str(tmp_path))
    kv = EtcdKV(parse_endpoints(f"etcd://{etcd.endpoint}"))
    store = StateStore(kv, "/p", flush_interval_s=0.3)
    try:
        term = kv.conn.run(_put_leader(kv, b"/p/leader"))
        store.load()
        store.start()
        calls = [_registry_call(1000 * c, 50) for c in range(6)]  # 300 keys: more than two transactions
        done = []
        for changes in calls:
            e = threading.Event()
            store.submit(changes, lambda exc, e=e: e.set(), term=term)
            done.append(e)
        for e in done:
            assert e.wait(10)
        revisions = kv.conn.run(_mod_revisions(kv, "/p/registry/"))
        for c in range(6):
            of_call = {revisions[f"/p/registry/{1000 * c + i:020d}"] for i in range(50)}
            assert len(of_call) == 1, f"call {c} spans revisions {sorted(of_call)}"
        assert len(set(revisions.values())) == 3  # two calls (100 ops) per transaction of at most 128
    finally:
        store.stop(5)
        kv.close()
        etcd.stop()


async def _put_leader(kv, key: bytes) -> int:
    """Create `key` as an election would; its create revision is the term."""
    client = await kv.conn.client()
    await client.put(key, b"test")
    return (await client.get(key)).create_revision


async def _mod_revisions(kv, prefix: str) -> dict[str, int]:
    client = await kv.conn.client()
    return {item.key.decode(): item.mod_revision for item in await client.get_prefix(prefix.encode())}
