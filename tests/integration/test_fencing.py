"""Fencing by term on a real shared store, etcd and PostgreSQL (the `backend` fixture): a deposed
leader's writes never land, and it says so.

Replica A reaches the store through a pausable TCP proxy (a partition on
demand, bytes held and delivered late when it heals); replica B connects
directly. Both are real `supervisor-service serve` processes.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from tests.support.fakes import wait_for
from tests.support.proxy import PausableProxy
from tests.support.servers import ServiceProcess, free_port

pytestmark = pytest.mark.realtime

TTL_MS = 2000
PREFIX = "/region-supervisor/test-fencing"
# The slowest an answer may take once the link is cut: the leader stops acting ttl - margin
# after its last renewal (at most a renewal interval, ttl/3, before the cut), then answers.
ANSWER_BOUND_S = TTL_MS / 1000 + 2.0




@pytest.fixture
def proxy(backend):
    p = PausableProxy(backend.endpoint)
    yield p
    p.stop()


def _replica(tmp_path, name: str, store: str, **extra: str) -> ServiceProcess:
    env = {
        "SUPERVISOR_STORE": store,
        "SUPERVISOR_STORE_PREFIX": PREFIX,
        "SUPERVISOR_LEADER_LEASE_TTL_MS": str(TTL_MS),
        "SUPERVISOR_TICK_INTERVAL_MS": "100",
        "SUPERVISOR_WARMUP_GRACE_MS": "0",
        # Datanode 9 is registered, never heartbeats: keep the dry-run failover out of the way.
        "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "600000",
        **extra,
    }
    return ServiceProcess(env, str(tmp_path / f"{name}.log"))


def _is_leader(replica: ServiceProcess) -> bool:
    """Leads and has loaded its state (Dump is answered by the supervisor thread)."""
    try:
        with SupervisorClient(replica.addr, timeout=1, follow_leader=False) as client:
            return client.dump(datanode_ids=[0])[0].is_leader
    except grpc.RpcError:
        return False


def _stored_registry(backend, datanode_id: int) -> list[int]:
    raw = backend.read_prefix(f"{PREFIX}/registry/{datanode_id:020d}")
    return sorted(np.frombuffer(b"".join(raw.values()), dtype="<u8").tolist())


def _dump_pairs(replica: ServiceProcess) -> set[tuple[int, int]]:
    with SupervisorClient(replica.addr, timeout=5, follow_leader=False) as client:
        _, rows = client.dump()
    return {(r.datanode_id, r.region_id) for r in rows}


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def _b_standing_by_while_a_leads(tmp_path, a: ServiceProcess, store: str) -> ServiceProcess:
    """A leads and has acknowledged registration (9, 9001); B runs beside it, directly on the store."""
    a.wait_serving()
    wait_for(lambda: _is_leader(a), 10, message="A did not become leader")
    b = _replica(tmp_path, "b", store)
    try:
        b.wait_serving()
        with SupervisorClient(a.addr, timeout=5) as client:
            assert client.register([(9, 9001)]) == 1
            assert client.addr == a.addr
    except BaseException:
        b.stop()
        raise
    return b


def _register_error(addr: str, pairs, timeout: float) -> tuple[grpc.RpcError | None, float]:
    """(the error a RegisterDetectors got, or None if it was acknowledged; seconds it took)."""
    started = time.monotonic()
    with SupervisorClient(addr, timeout=timeout, follow_leader=False) as client:
        try:
            client.register(pairs)
        except grpc.RpcError as exc:
            return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_deposed_leader_cannot_overwrite_new_leaders_registry(tmp_path, backend, proxy):
    metrics_port = free_port()
    a = _replica(tmp_path, "a", backend.store(proxy.endpoint), SUPERVISOR_METRICS_ADDR=f"127.0.0.1:{metrics_port}")
    b = None
    try:
        b = _b_standing_by_while_a_leads(tmp_path, a, backend.store())

        proxy.pause()  # A's link to the store is cut; A still believes it leads for a moment
        error, took = _register_error(a.addr, [(9, 9003)], timeout=3 * ANSWER_BOUND_S)
        assert error is not None, "a replica cut off from the store acknowledged a write"
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), error
        assert took <= ANSWER_BOUND_S, f"the cut-off leader answered after {took:.1f} s"

        wait_for(lambda: _is_leader(b), TTL_MS / 1000 + 5, message="B did not take over")
        with SupervisorClient(b.addr, timeout=5) as client:  # retries while B loads its state
            assert client.register([(9, 9002)]) == 1  # acknowledged by the new leader
            assert client.addr == b.addr

        proxy.resume()  # whatever A sent or retries now reaches the store, late
        with SupervisorClient(a.addr, timeout=2, follow_leader=False) as client:
            wait_for(lambda: client.maintenance_status().leader_addr == b.addr, 15,
                     message="A never learned that B leads")
        # A's writer has given up on everything of its term (nothing pending), and A does not lead.
        wait_for(lambda: _metric(metrics_port, "supervisor_store_pending_writes") == 0, 15,
                 message="A still holds writes of its ended term")
        assert not _is_leader(a)
        registry = _stored_registry(backend, 9)
        assert 9002 in registry, f"the new leader's acknowledged registration was overwritten: {registry}"
        assert 9001 in registry and 9003 not in registry, registry
        assert {(9, 9001), (9, 9002)} <= _dump_pairs(b)
    finally:
        proxy.resume()
        for replica in (a, b):
            if replica is not None:
                replica.stop()


def test_cut_off_replica_never_names_itself_leader(tmp_path, backend, proxy):
    a = _replica(tmp_path, "a", backend.store(proxy.endpoint))
    answers: list = []
    beater = None
    try:
        a.wait_serving()
        wait_for(lambda: _is_leader(a), 10, message="A did not become leader")
        beater = DatanodeHeartbeater(a.addr, 5, lambda: [50], interval_s=0.1,
                                     on_response=lambda _addr, r: answers.append(r)).start()
        wait_for(lambda: any(r.is_leader for r in answers), 5, message="no heartbeat answer from the leader")
        proxy.pause()
        # Positive signal: A's heartbeat answers say it no longer leads.
        wait_for(lambda: sum(not r.is_leader for r in answers) >= 5, ANSWER_BOUND_S + 3,
                 message="A kept answering as leader without its store")
        followers = [r for r in answers if not r.is_leader]
        assert all(r.leader_addr != a.addr for r in followers), {r.leader_addr for r in followers}
        assert all(r.leader_addr == "" for r in followers), {r.leader_addr for r in followers}
        error, _ = _register_error(a.addr, [(5, 51)], timeout=5)
        assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        metadata = dict(error.trailing_metadata() or ())
        assert "x-supervisor-leader" not in metadata, metadata
        assert a.addr not in (error.details() or "")
    finally:
        if beater is not None:
            beater.stop()
        proxy.resume()
        a.stop()


def test_sigstopped_leader_past_its_lease_cannot_overwrite_new_leaders_registry(tmp_path, backend):
    # A's writer waits 800 ms before each commit, so the registration is held there when A is stopped.
    a = _replica(tmp_path, "a", backend.store(), SUPERVISOR_STORE_FLUSH_INTERVAL_MS="800")
    b = None
    try:
        b = _b_standing_by_while_a_leads(tmp_path, a, backend.store())

        result: list = []
        caller = threading.Thread(target=lambda: result.append(_register_error(a.addr, [(9, 9003)], timeout=30)))
        caller.start()
        time.sleep(0.3)  # the call is handled and its change waits in A's writer
        a.kill(signal.SIGSTOP)
        try:
            wait_for(lambda: _is_leader(b), TTL_MS / 1000 + 5, message="B did not take over")
            with SupervisorClient(b.addr, timeout=5) as client:  # retries while B loads its state
                assert client.register([(9, 9002)]) == 1
                assert client.addr == b.addr
        finally:
            a.kill(signal.SIGCONT)
        continued = time.monotonic()
        caller.join(30)
        error, _ = result[0]
        assert error is not None, "a leader stopped past its lease acknowledged a write"
        assert time.monotonic() - continued <= ANSWER_BOUND_S
        with SupervisorClient(a.addr, timeout=2, follow_leader=False) as client:
            wait_for(lambda: client.maintenance_status().leader_addr == b.addr, 15,
                     message="A never learned that B leads")
        registry = _stored_registry(backend, 9)
        assert 9002 in registry and 9003 not in registry, registry
        assert {(9, 9001), (9, 9002)} <= _dump_pairs(b)
    finally:
        a.kill(signal.SIGCONT)
        for replica in (a, b):
            if replica is not None:
                replica.stop()
