"""Failover against the outside: a RegionMigration that answers late, a real etcd, real processes
restarted with a kill or with their wall clock an hour ahead.

- a SubmitRegionMigration whose answer is late is retried to the same target under the same
  request_id: one migration, one target;
- a failover step of a thousand regions costs one etcd revision for the intent, one for the result;
- a restarted supervisor sends an unanswered decision again at once, with its request_id;
- a restart with the wall clock stepped an hour ahead neither times out the running migration
  (it is not submitted again) nor ends a maintenance window early.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.core import (
    FailoverPolicy,
    Heartbeat,
    JournalAppend,
    MigrationResult,
    Peer,
    PhiAccrualOptions,
    SelectionDone,
    SelectPeers,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    SystemClock,
    Tick,
)
from supervisor_service.remotes import DryRunJournal
from supervisor_service.store import MemoryKV, StateStore, parse_endpoints
from tests.support.fakes import FakePeerLookup, FakeRegionMigration, FakeSelector, peer, wait_for
from tests.support.servers import EtcdServer, ServiceProcess, free_port

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(90)]

FAST = dict(
    tick_interval_ms=100,
    acceptable_heartbeat_pause_ms=1000,
    first_heartbeat_estimate_ms=200,
)
FAST_ENV = {
    "SUPERVISOR_TICK_INTERVAL_MS": "100",
    "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "1000",
    "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "200",
    "SUPERVISOR_WARMUP_GRACE_MS": "0",
    "SUPERVISOR_MAX_FAILED_DATANODE_FRACTION": "1",  # three datanodes: one silent is a third
    "SUPERVISOR_MIGRATION_STATUS_POLL_INTERVAL_MS": "200",
    "SUPERVISOR_MIGRATION_BASE_TIMEOUT_MS": "60000",
}


def dn_addr(datanode_id: int) -> str:
    return f"127.0.0.1:{21_000 + datanode_id}"


def sample(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


class Beaters:
    """Datanodes 1..3 heartbeating `addr` every 100 ms, each with its own regions and address."""

    def __init__(self, addr: str, ids=(1, 2, 3)) -> None:
        self.accepted: dict[int, int] = dict.fromkeys(ids, 0)
        self._lock = threading.Lock()
        self.beaters = {
            d: DatanodeHeartbeater(addr, d, lambda d=d: [d * 100 + i for i in range(3)], interval_s=0.1,
                                   peer_addr=dn_addr(d), on_response=lambda addr, r, d=d: self._count(d, r)).start()
            for d in ids
        }

    def _count(self, d: int, response) -> None:
        if not response.rejected:
            with self._lock:
                self.accepted[d] += 1

    def wait(self, n: int, timeout: float = 15) -> None:
        start = dict(self.accepted)
        wait_for(lambda: all(self.accepted[d] - start[d] >= n for d in self.beaters if d in self.alive),
                 timeout, message=f"datanodes did not get {n} heartbeats accepted")

    @property
    def alive(self) -> set[int]:
        return set(self.beaters)

    def stop(self, d: int) -> None:
        self.beaters.pop(d).stop()

    def close(self) -> None:
        for b in self.beaters.values():
            b.stop()
        self.beaters = {}


# ================================================================ a late answer is not a failure


def test_submission_answered_late_goes_to_one_target_under_one_request_id(service):
    from tests.support.datanodes import Cluster, regions_of

    rm = FakeRegionMigration()
    # The first three calls are carried out, and their answers arrive after the client gave up.
    rm.hang(1.0, times=3, methods=["SubmitRegionMigration"], after=True)
    sel = FakeSelector([peer(d, f"10.0.0.{d}:4001") for d in (1, 2, 4, 5)], per_call=True)  # a new target per call
    lookup = FakePeerLookup({d: f"10.0.0.{d}:4001" for d in (1, 2, 3)})
    try:
        svc = service(**FAST, region_migration_endpoint=rm.endpoint, selector_endpoint=sel.endpoint,
                      peer_lookup_endpoint=lookup.endpoint, remote_timeout_ms=300, submit_retry_backoff_ms=200,
                      migration_status_poll_interval_ms=200, migration_base_timeout_ms=30_000)
        cluster = Cluster(svc.addresses.grpc)
        try:
            cluster.warm_up()
            cluster.nodes[3].stop()
            wait_for(lambda: rm.submissions, 20, message="no SubmitRegionMigration answered in time")
            # In flight under the one procedure: polled (a positive signal that ticks went by).
            procedure = rm.submissions[0].response.procedure_id
            wait_for(lambda: len([c for c in rm.status_polls if c.request.procedure_id == procedure]) >= 3, 10)
        finally:
            cluster.close()
        attempts = rm.attempts
        assert [c.outcome for c in attempts] == ["CLIENT_GONE"] * 3 + ["OK"]
        assert len({c.request.to_peer.id for c in attempts}) == 1, [c.request.to_peer.id for c in attempts]
        ids = {c.request.request_id for c in attempts}
        assert len(ids) == 1 and "" not in ids
        assert len(rm.migrations) == 1, "a second migration of the same regions was started"
        assert sorted(attempts[0].request.region_ids) == sorted(regions_of(3))
        assert len(sel.calls) == 1, "the regions were sent to the Selector again"
        with SupervisorClient(svc.addresses.grpc) as client:
            _, rows = client.dump(datanode_ids=[3])
        assert {r.failover_count for r in rows} == {1}
        assert sample(svc.registry, "supervisor_failover_submit_retries_total") == 3
        assert sample(svc.registry, "supervisor_remote_call_errors_total", service="RegionMigration",
                      method="SubmitRegionMigration", code="DEADLINE_EXCEEDED") == 3
    finally:
        for fake in (rm, sel, lookup):
            fake.stop()


def test_dry_run_journal_answers_a_request_id_once_across_a_restart():
    from supervisor_service.core import FakeClock, MigrationTask

    kv = MemoryKV()
    store = StateStore(kv, "/j", flush_interval_s=0)
    store.load()
    store.start()
    recorded: list = []  # every entry a journal records anew is persisted
    try:
        def persist(entry, term):
            recorded.append(entry)
            store.submit([JournalAppend(entry, term)])

        journal = DryRunJournal(FakeClock(), persist=persist)
        task = MigrationTask(1, 3, Peer(3), Peer(5, "dn5:1"), (30, 31), 120_000, 4, "4-abc")
        first = journal.submit(task)
        assert journal.submit(MigrationTask(2, 3, Peer(3), Peer(5, "dn5:1"), (30, 31), 120_000, 5, "4-abc")) == first
        assert len(recorded) == 1
        store.flush()
        recorded.clear()
        restarted = DryRunJournal(FakeClock(), persist=lambda entry, term: recorded.append(entry))
        state = StateStore(kv, "/j").load()
        restarted.restore(state.journal, state.journal_term)
        assert restarted.submit(MigrationTask(3, 3, Peer(3), Peer(5, "dn5:1"), (30, 31), 120_000, 6, "4-abc")) == first
        assert len(recorded) == 0
        assert restarted.status(first.procedure_id)[0].name == "SUCCEEDED"
        other = restarted.submit(MigrationTask(4, 3, Peer(3), Peer(5, "dn5:1"), (32,), 120_000, 6, "6-def"))
        assert other.procedure_id != first.procedure_id and len(recorded) == 1
    finally:
        store.stop(5)


# ================================================================ one step, one etcd revision


def _etcd_revision(endpoint: str) -> int:
    body = json.dumps({"key": base64.b64encode(b"/revision-probe").decode()}).encode()
    request = urllib.request.Request(f"http://{endpoint}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=5) as resp:
        return int(json.loads(resp.read())["header"]["revision"])


def _etcd_put(endpoint: str, key: str, value: bytes) -> int:
    """Put through etcd's HTTP gateway; the revision of the write."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                       "value": base64.b64encode(value).decode()}).encode()
    request = urllib.request.Request(f"http://{endpoint}/v3/kv/put", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=5) as resp:
        return int(json.loads(resp.read())["header"]["revision"])


def test_failover_of_a_thousand_regions_costs_one_etcd_revision_per_step(tmp_path):
    from supervisor_service.store import EtcdKV

    etcd = EtcdServer(str(tmp_path))
    kv = EtcdKV(parse_endpoints(f"etcd://{etcd.endpoint}"))
    # Every etcd write is fenced by the leader key: stand in for an elected leader of that term.
    term = _etcd_put(etcd.endpoint, "/region-supervisor/revisions/leader", b"127.0.0.1:1")
    store = StateStore(kv, "/region-supervisor/revisions", flush_interval_s=0)
    store.load()
    store.start()
    try:
        clock = SystemClock()
        sup = Supervisor(PhiAccrualOptions(), Metrics(CollectorRegistry()), FailoverPolicy(), clock_base=clock.base())
        regions = np.arange(1000, 2000, dtype=np.uint64)

        def step(event, now: int) -> list:
            sup.handle(event, now)
            changes = sup.drain_changes()
            if changes:
                store.submit(changes, term=term)
            store.flush()
            return sup.drain_outbox()

        now = 1_700_000_000_000
        for i in range(5):
            step(Heartbeat(1, regions, now + i * 1000), now + i * 1000)
        t = now + 4000
        select = []
        while not select:
            t += 1000
            select = [e for e in step(Tick(), t) if isinstance(e, SelectPeers)]
        before = _etcd_revision(etcd.endpoint)
        peers = tuple(Peer(5 + i % 2, f"dn{5 + i % 2}:4001") for i in range(1000))
        tasks = [e.task for e in step(SelectionDone(select[0].job, Peer(1, "dn1:4001"), peers), t)
                 if isinstance(e, SubmitMigration)]
        assert len(tasks) == 2
        intent = _etcd_revision(etcd.endpoint)
        for task in tasks:
            # Both answers in one event each: one write each (the writer may group them).
            step(SubmissionDone(task, MigrationResult(submitted=task.region_ids, procedure_id=f"p-{task.to_peer.id}")),
                 t + 50)
        result = _etcd_revision(etcd.endpoint)
        assert intent - before == 1, "the intent of a thousand regions took several transactions"
        assert result - intent <= 2
        assert StateStore(kv, "/region-supervisor/revisions").load().inflight.keys() == {t.request_id for t in tasks}
    finally:
        store.stop(5)
        kv.close()
        etcd.stop()


# ================================================================ real processes restarted


def _service_env(tmp_path, rm: FakeRegionMigration) -> dict[str, str]:
    return {**FAST_ENV, "SUPERVISOR_STORE": "sqlite", "SUPERVISOR_DATA_DIR": str(tmp_path / "data"),
            "SUPERVISOR_REGION_MIGRATION_ENDPOINT": rm.endpoint}


def test_restart_sends_an_unanswered_submission_again_at_once_with_its_request_id(tmp_path):
    rm = FakeRegionMigration()
    rm.hang(30.0, methods=["SubmitRegionMigration"], after=True)  # carried out; the answer never comes back
    port = free_port()
    env = {**_service_env(tmp_path, rm), "SUPERVISOR_REMOTE_TIMEOUT_MS": "300"}
    first = ServiceProcess(env, str(tmp_path / "first.log"), grpc_port=port)
    beaters = None
    try:
        first.wait_serving()
        beaters = Beaters(first.addr)
        beaters.wait(5)
        beaters.stop(3)
        # The embedded selector spreads the three regions over datanodes 1 and 2: two decisions.
        wait_for(lambda: len({c.request.to_peer.id for c in rm.attempts}) == 2, 15,
                 message="no SubmitRegionMigration to each target")
        first.kill(signal.SIGKILL)
        first.proc.wait(10)
        rm.clear_faults()
        decisions = {c.request.request_id: c.request.to_peer.id for c in rm.attempts}
        assert len(decisions) == 2
        before = len(rm.attempts)
        second = ServiceProcess(env, str(tmp_path / "second.log"), grpc_port=port)
        try:
            second.wait_serving()
            serving = time.monotonic()
            wait_for(lambda: len(rm.submissions) >= 2, 10, message="the unanswered decisions were not sent again")
            took = max(c.at for c in rm.submissions[:2]) - serving
            # At once: not after their 60 s timeout, not even after a detection period.
            assert took < 1.5, took
            again = rm.attempts[before:]
            assert {c.request.request_id: c.request.to_peer.id for c in again} == decisions
            assert len(rm.migrations) == 2, "a decision was carried out twice"
        finally:
            second.stop()
    finally:
        if beaters is not None:
            beaters.close()
        first.stop()
        rm.stop()


_SHIFT_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

/* Shifts this process's wall clock by CLOCK_SHIFT_S seconds; monotonic clocks are untouched. */
static long long shift(void) {
    static int done;
    static long long s;
    if (!done) {
        const char *v = getenv("CLOCK_SHIFT_S");
        s = v ? atoll(v) : 0;
        done = 1;
    }
    return s;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += shift();
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    static int (*real)(struct timeval *, void *);
    if (!real) real = (int (*)(struct timeval *, void *))dlsym(RTLD_NEXT, "gettimeofday");
    int rc = real(tv, tz);
    if (rc == 0 && tv) tv->tv_sec += shift();
    return rc;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
"""


def _clock_shift_shim(tmp_path) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        message = "gcc not found: the wall-clock shim cannot be built (apt-get install gcc)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    source, library = tmp_path / "shift.c", tmp_path / "shift.so"
    source.write_text(_SHIFT_SHIM)
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
    return str(library)


def test_restart_with_the_wall_clock_an_hour_ahead_keeps_the_migration_and_the_maintenance(tmp_path):
    shim = _clock_shift_shim(tmp_path)
    rm = FakeRegionMigration()  # every procedure keeps RUNNING
    port = free_port()
    env = _service_env(tmp_path, rm)
    first = ServiceProcess(env, str(tmp_path / "first.log"), grpc_port=port)
    beaters = None
    try:
        first.wait_serving()
        beaters = Beaters(first.addr)
        beaters.wait(5)
        with SupervisorClient(first.addr) as client:
            client.set_maintenance_scope(True, [2], ttl_millis=120_000)
        beaters.stop(3)
        wait_for(lambda: sorted(r for c in rm.submissions for r in c.request.region_ids) == [300, 301, 302], 15,
                 message="datanode 3 was not failed over")
        procedures = {c.response.procedure_id for c in rm.submissions}
        wait_for(lambda: procedures <= {c.request.procedure_id for c in rm.status_polls}, 5)
        submitted = len(rm.attempts)
        beaters.stop(2)  # from now on only its maintenance keeps datanode 2 from being failed over
        first.kill(signal.SIGKILL)
        first.proc.wait(10)
        restarted_at = time.monotonic()

        second = ServiceProcess({**env, "LD_PRELOAD": shim, "CLOCK_SHIFT_S": "3600"}, str(tmp_path / "second.log"),
                                grpc_port=port)
        try:
            second.wait_serving()
            with SupervisorClient(second.addr) as client:
                header, _ = client.dump(datanode_ids=[1])
                ahead = header.at_millis - time.time() * 1000
                assert 3_500_000 < ahead < 3_700_000, f"the shim did not shift the clock ({ahead:.0f} ms)"

                def settled():
                    polls = [c for c in rm.status_polls if c.request.procedure_id in procedures and c.at > restarted_at]
                    _, failed = client.dump(only_failed=True)
                    convicted = {2, 3} <= {r.datanode_id for r in failed}
                    return convicted and (len(polls) >= 10 or len(rm.attempts) > submitted)

                # Datanodes 2 and 3 are convicted again in the new life, and the migrations are polled
                # (or, wrongly, submitted again): several detection periods of the new process went by.
                wait_for(settled, 15, interval=0.1, message="the restarted supervisor did not settle")
                status = client.maintenance_status()
            assert len(rm.attempts) == submitted, [(c.request.from_peer.id, c.request.request_id) for c in rm.attempts]
            assert [d.datanode_id for d in status.datanodes] == [2], "maintenance of datanode 2 ended early"
            [window] = status.datanodes
            left = window.expires_at_millis - header.at_millis
            assert 0 < left <= 120_000, left
        finally:
            second.stop()
    finally:
        if beaters is not None:
            beaters.close()
        first.stop()
        rm.stop()


def test_decision_caught_in_a_store_stall_is_sent_as_soon_as_leadership_returns(tmp_path, backend):
    """The shared store (etcd, PostgreSQL) stops at the moment of a decision: the lease is lost with the
    intent's write under way. When the store is back and the replica leads again, the decision is
    carried out within seconds (it used to wait for the 60 s timeout of its own orphaned intent),
    exactly once."""
    from supervisor_service.proto import pb

    stalled: list[float] = []

    def select(request):
        if not stalled:  # the decision is being made: stop the store before its intent can be written
            backend.pause()
            stalled.append(time.monotonic())
        return pb.SelectResponse(peers=[peer(1, dn_addr(1))] * request.min_required_items)

    sel = FakeSelector(respond=select)
    rm = FakeRegionMigration()
    env = {**FAST_ENV, "SUPERVISOR_STORE": backend.store(), "SUPERVISOR_STORE_PREFIX": "/rs/stall",
           "SUPERVISOR_LEADER_LEASE_TTL_MS": "2000", "SUPERVISOR_WARMUP_GRACE_MS": "1500",
           "SUPERVISOR_WARMUP_FRACTION": "0.6", "SUPERVISOR_REGION_MIGRATION_ENDPOINT": rm.endpoint,
           "SUPERVISOR_SELECTOR_ENDPOINT": sel.endpoint}
    replica = ServiceProcess(env, str(tmp_path / "replica.log"))
    beaters = None
    try:
        replica.wait_serving()
        with SupervisorClient(replica.addr, timeout=5) as client:
            wait_for(lambda: client.maintenance_status().is_leader, 10, interval=0.05)
        beaters = Beaters(replica.addr)
        beaters.wait(5)
        beaters.stop(3)
        wait_for(lambda: stalled, 15, message="datanode 3 was never sent to the Selector")
        time.sleep(4)  # twice the lease: the replica has stepped down
        backend.resume()
        resumed = time.monotonic()
        wait_for(lambda: rm.submissions, 30, interval=0.05, message="datanode 3 was not failed over")
        took = rm.submissions[0].at - resumed
        # The new leadership: a campaign (lease ttl / 3), the state load, a tick; or, if the intent
        # never became durable, the detection period and warm-up of the new leadership.
        assert took < 6.0, took
        assert len({c.request.request_id for c in rm.attempts}) == 1
        assert len(rm.migrations) == 1
        assert {r for c in rm.submissions for r in c.request.region_ids} == {300, 301, 302}
    finally:
        if beaters is not None:
            beaters.close()
        backend.resume()
        replica.stop()
        rm.stop()
        sel.stop()
