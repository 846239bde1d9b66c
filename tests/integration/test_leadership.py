"""Leadership in one process: fencing by a refused term, single-replica terms, recovery on start."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from supervisor_service.client import SupervisorClient
from supervisor_service.core import Peer, RegistryAdd, SystemClock, TermSet
from supervisor_service.remotes import DryRunJournal, EmbeddedPeerLookup, PeerDirectory, Remotes, StaleLeaderTerm
from supervisor_service.store import MemoryKV, StateStore

FAST = dict(
    tick_interval_ms=50,
    acceptable_heartbeat_pause_ms=200, first_heartbeat_estimate_ms=100, warmup_grace_ms=0,
    guards_enabled=False,
)


class _Selector:
    def select(self, n, exclude, from_peer_id, region_ids):
        return [Peer(2, "127.0.0.1:2")] * n


class _RefusingMigration:
    def __init__(self) -> None:
        self.calls = 0

    def submit(self, task):
        self.calls += 1
        raise StaleLeaderTerm("RegionMigration", "SubmitRegionMigration", "FAILED_PRECONDITION",
                              f"leader term {task.leader_term} is older than 99")

    def status(self, procedure_id):
        raise AssertionError("not reached")


def _wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _stop(svc) -> None:
    """Stop a service started by the `service` fixture before starting its successor on the same store."""
    svc.request_stop()
    _wait_for(lambda: svc._stopped is not None and svc._stopped.done())


def test_a_refused_term_makes_the_replica_step_down(service):
    migration = _RefusingMigration()
    svc = service(remotes=Remotes(EmbeddedPeerLookup(PeerDirectory(SystemClock())), _Selector(), migration), **FAST)
    with SupervisorClient(svc.addresses.grpc, follow_leader=False) as client:
        client.register([(1, 10)])
        _wait_for(lambda: migration.calls >= 1)
        _wait_for(lambda: not svc.supervisor.status.is_leader)
        assert not svc.leadership.is_leader()
        with pytest.raises(grpc.RpcError) as err:
            client.register([(1, 11)])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    time.sleep(0.5)
    assert migration.calls == 1, "a fenced replica kept submitting"


def test_single_replica_term_grows_across_restarts_and_state_is_recovered(service):
    kv = MemoryKV()
    seed = StateStore(kv, "/region-supervisor/default", flush_interval_s=0)
    seed.load()
    seed.start()
    seed.submit([RegistryAdd(7, np.array([70, 71], dtype=np.uint64)), TermSet(41)])
    seed.flush()
    seed.stop(5)
    terms = []
    for _ in range(2):
        svc = service(kv=kv, **FAST)
        terms.append(svc.supervisor.leader_term)
        # Recovery gave the registered regions a heartbeat at start.
        with SupervisorClient(svc.addresses.grpc) as client:
            _, rows = client.dump()
        assert {(r.datanode_id, r.region_id) for r in rows} >= {(7, 70), (7, 71)}
        _stop(svc)
    assert terms == [42, 43]


def test_embedded_journal_survives_a_restart(service):
    kv = MemoryKV()
    settings = {**FAST, "acceptable_heartbeat_pause_ms": 100}
    first = service(kv=kv, **settings)
    with SupervisorClient(first.addresses.grpc) as client:
        client.register([(1, 10)])

        def journaled() -> bool:
            first.directory.observe(2, "127.0.0.1:2")  # a live target for the embedded selector
            return bool(client.journal()[1])

        _wait_for(journaled)
    _stop(first)
    second = service(kv=kv, **settings)
    with SupervisorClient(second.addresses.grpc) as client:
        embedded, entries = client.journal()
    assert embedded and entries and entries[-1].from_peer.id == 1 and list(entries[-1].region_ids) == [10]
    assert isinstance(second.remotes.journal, DryRunJournal)
