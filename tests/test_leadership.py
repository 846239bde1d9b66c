"""Leadership in one process: fencing by a refused term, single-replica terms, recovery on start."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from supervisor_service.app import Service
from supervisor_service.client import SupervisorClient
from supervisor_service.events import Peer
from supervisor_service.clock import SystemClock
from supervisor_service.remotes import DryRunJournal, EmbeddedPeerLookup, PeerDirectory, Remotes, StaleLeaderTerm
from supervisor_service.settings import load_settings
from supervisor_service.store import MemoryKV, RegistryAdd, StateStore, TermSet

FAST = dict(
    grpc_addr="127.0.0.1:0", metrics_addr="", store="memory", tick_interval_ms=50,
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


class _Running:
    def __init__(self, service: Service) -> None:
        self.service = service
        started = threading.Event()

        async def main() -> None:
            await service.start()
            started.set()
            await service.wait()

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def wait_for(self, predicate, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.01)

    def close(self) -> None:
        self.service.request_stop()
        self.thread.join(10)


def test_a_refused_term_makes_the_replica_step_down():
    migration = _RefusingMigration()
    service = Service(
        load_settings(**FAST),
        registry=CollectorRegistry(),
        remotes=Remotes(EmbeddedPeerLookup(PeerDirectory(SystemClock())), _Selector(), migration),
    )
    running = _Running(service)
    try:
        running.wait_for(lambda: service.supervisor.is_leader)
        with SupervisorClient(service.addresses.grpc, follow_leader=False) as client:
            client.register([(1, 10)])
            running.wait_for(lambda: migration.calls >= 1)
            running.wait_for(lambda: not service.supervisor.is_leader)
            assert not service.leadership.is_leader()
            with pytest.raises(grpc.RpcError) as err:
                client.register([(1, 11)])
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        time.sleep(0.5)
        assert migration.calls == 1, "a fenced replica kept submitting"
    finally:
        running.close()


def test_single_replica_term_grows_across_restarts_and_state_is_recovered():
    kv = MemoryKV()
    seed = StateStore(kv, "/region-supervisor/default", flush_interval_s=0)
    seed.load()
    seed.start()
    seed.submit([RegistryAdd(7, __import__("numpy").array([70, 71], dtype="uint64")), TermSet(41)])
    seed.flush()
    seed.stop(5)
    journal_terms = []
    for _ in range(2):
        service = Service(load_settings(**FAST), registry=CollectorRegistry(), kv=kv)
        running = _Running(service)
        try:
            running.wait_for(lambda: service.supervisor.is_leader)
            journal_terms.append(service.supervisor.leader_term)
            # Recovery gave the registered regions a heartbeat at start.
            with SupervisorClient(service.addresses.grpc) as client:
                _, rows = client.dump()
            assert {(r.datanode_id, r.region_id) for r in rows} >= {(7, 70), (7, 71)}
        finally:
            running.close()
    assert journal_terms == [42, 43]


def test_embedded_journal_survives_a_restart():
    kv = MemoryKV()
    settings = load_settings(**{**FAST, "acceptable_heartbeat_pause_ms": 100})
    first = Service(settings, registry=CollectorRegistry(), kv=kv)
    running = _Running(first)
    try:
        running.wait_for(lambda: first.supervisor.is_leader)
        first.directory.observe(2, "127.0.0.1:2")  # a live target for the embedded selector
        with SupervisorClient(first.addresses.grpc) as client:
            client.register([(1, 10)])

            def journaled() -> bool:
                first.directory.observe(2, "127.0.0.1:2")
                return bool(client.journal()[1])

            running.wait_for(journaled)
    finally:
        running.close()
    second = Service(settings, registry=CollectorRegistry(), kv=kv)
    running = _Running(second)
    try:
        running.wait_for(lambda: second.supervisor.is_leader)
        with SupervisorClient(second.addresses.grpc) as client:
            embedded, entries = client.journal()
        assert embedded and entries and entries[-1].from_peer.id == 1 and list(entries[-1].region_ids) == [10]
        assert isinstance(second.remotes.journal, DryRunJournal)
    finally:
        running.close()
