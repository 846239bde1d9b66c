"""The PostgreSQL backend and election against a real PostgreSQL: fenced commits, the golden bytes, group
commit, recovery by another connection, terms that only grow, and a paused database."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import psycopg
import pytest

from supervisor_service.cluster import PostgresElection
from supervisor_service.core import CountsSet, MaintenanceSet, RegistryAdd
from supervisor_service.store import FencedOut, PostgresKV, StateStore, StoreError
from supervisor_service.store.postgres import SCHEMA, PostgresSession
from tests.support import store_golden as golden
from tests.support.proxy import PausableProxy
from tests.support.servers import ServiceProcess, free_port

pytestmark = pytest.mark.realtime

TTL_MS = 2000
PASSWORD = "pw-that-must-not-leak-7f3a"


def _take_lease(url: str, name: str, holder: str = "test:1", ttl_ms: int = 60_000) -> int:
    """Take `name` as an election would (whoever held it); the new term."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE supervisor_lease SET expires_at = '-infinity' WHERE name = %s", (name,))
        row = conn.execute(
            "INSERT INTO supervisor_lease AS l (name, holder, term, expires_at) VALUES "
            "(%s, %s, nextval('supervisor_term'), clock_timestamp() + %s * interval '1 millisecond') "
            "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, term = GREATEST(l.term + 1, EXCLUDED.term), "
            "expires_at = EXCLUDED.expires_at RETURNING term", (name, holder, ttl_ms)).fetchone()
    return int(row[0])


def _sql(url: str, statement: str, *args) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, args)


class _RecordingPostgresKV(PostgresKV):
    """The real backend, each commit's puts and deletes also logged (what the golden run compares)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.log: list[tuple[dict[str, bytes], set[str]]] = []

    def commit(self, puts, deletes, fence=None):
        super().commit(puts, deletes, fence)
        self.log.append((dict(puts), set(deletes)))


def _election(kv: PostgresKV, addr: str, events: list, prefix: str = "/p") -> PostgresElection:
    return PostgresElection(kv, prefix, addr, TTL_MS, on_elected=lambda term: events.append(("elected", term)),
                            on_lost=lambda: events.append("lost"))


def _wait(predicate, timeout: float, message: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, message
        time.sleep(0.01)
    return time.monotonic() - started


def test_postgres_kv_commits_reads_and_fences_every_write(postgres):
    url = postgres.store()
    kv = PostgresKV(url)
    try:
        term = _take_lease(url, "/p/leader")
        fence = ("/p/leader", term)
        puts = {f"/p/k{i:04d}": bytes([i % 256]) * i for i in range(500)}
        puts["/p/odd key 'quoted' \\ ü"] = b"\x00\xff"
        kv.commit(puts, set(), fence)
        assert kv.read_prefix("/p/") == puts
        assert kv.read_prefix("/p/k000") == {k: v for k, v in puts.items() if k.startswith("/p/k000")}
        assert kv.read_prefix("/q/") == {}
        kv.commit({"/p/k0001": b"again"}, {"/p/k0000", "/p/k0001"}, fence)  # both: the put wins
        stored = kv.read_prefix("/p/k000")
        assert "/p/k0000" not in stored and stored["/p/k0001"] == b"again"
        # Without a term, under another term, or once the lease expired: never lands.
        with pytest.raises(FencedOut):
            kv.commit({"/p/x": b"1"}, set())
        with pytest.raises(FencedOut, match=f"term is {term}"):
            kv.commit({"/p/y": b"1"}, set(), ("/p/leader", term + 1000))
        with pytest.raises(FencedOut, match="no replica has held"):
            kv.commit({"/p/y": b"1"}, set(), ("/other/leader", term))
        _sql(url, "UPDATE supervisor_lease SET expires_at = clock_timestamp() - interval '1 ms' WHERE name = %s",
             "/p/leader")
        with pytest.raises(FencedOut, match="expired"):
            kv.commit({"/p/z": b"1"}, {"/p/k0002"}, fence)
        newer = _take_lease(url, "/p/leader")
        assert newer > term
        with pytest.raises(FencedOut):
            kv.commit({"/p/z": b"1"}, set(), fence)
        stored = kv.read_prefix("/p/")
        assert not {"/p/x", "/p/y", "/p/z"} & stored.keys() and "/p/k0002" in stored
    finally:
        kv.close()


def test_the_writer_stores_the_golden_bytes_on_postgres(postgres):
    """The golden run (tests/support/store_golden.py) through the writer on PostgreSQL, fenced: the same
    transactions, and what a second writer loads from the database gives the same reloaded ones."""
    url = postgres.store()
    kv = _RecordingPostgresKV(url)
    term = _take_lease(url, golden.PREFIX + "leader")
    expected: dict[str, bytes] = {}
    try:
        for prefix, calls in ((golden.PREFIX, golden.CALLS), (golden.PREFIX.rstrip("/"), golden.RELOADED_CALLS)):
            store = StateStore(kv, prefix, flush_interval_s=0, journal_capacity=golden.JOURNAL_CAPACITY)
            store.load()
            store.start()
            try:
                for changes in calls:
                    done = threading.Event()
                    errors: list = []
                    store.submit(changes, lambda exc: (errors.append(exc), done.set()), term=term)
                    assert done.wait(10) and errors == [None], errors
            finally:
                store.stop(5)
        assert kv.log == golden.TRANSACTIONS
        for puts, deletes in golden.TRANSACTIONS:
            for key in deletes:
                expected.pop(key, None)
            expected.update(puts)
        assert kv.read_prefix(golden.PREFIX) == expected  # byte for byte, as stored
    finally:
        kv.close()


def test_group_commit_and_recovery_by_another_connection(postgres):
    """Calls submitted together are one commit each group, every call whole; a new backend (a restarted
    replica) loads exactly what was acknowledged."""
    url = postgres.store()
    kv = _RecordingPostgresKV(url)
    term = _take_lease(url, "/g/leader")
    store = StateStore(kv, "/g", flush_interval_s=0.3)
    try:
        store.load()
        store.start()
        done = []
        for c in range(20):
            e = threading.Event()
            store.submit([RegistryAdd(1000 + c, np.arange(c * 10, c * 10 + 10, dtype=np.uint64)),
                          CountsSet((((1000 + c, c * 10), c + 1),))], lambda exc, e=e: e.set(), term=term)
            done.append(e)
        e = threading.Event()
        store.submit([MaintenanceSet(True, 0, ((7, 0),), None)], lambda exc, e=e: e.set(), term=term)
        done.append(e)
        for e in done:
            assert e.wait(10)
        assert 1 <= len(kv.log) <= 3, f"{len(kv.log)} commits for 21 calls submitted together"
    finally:
        store.stop(5)
        kv.close()
    again = PostgresKV(url)
    try:
        state = StateStore(again, "/g").load()
        assert sorted(state.registry) == [1000 + c for c in range(20)]
        assert all(state.registry[1000 + c].tolist() == list(range(c * 10, c * 10 + 10)) for c in range(20))
        assert state.failover_counts == {
            (1000 + c, c * 10): c + 1 for c in range(20)}
        assert state.maintenance and state.datanode_maintenance == {7: 0}
    finally:
        again.close()


def test_a_deposed_writer_is_fenced_and_writes_nothing(postgres):
    url = postgres.store()
    kv = PostgresKV(url)
    fenced = threading.Event()
    term = _take_lease(url, "/d/leader")
    store = StateStore(kv, "/d", flush_interval_s=0, on_fenced=fenced.set)
    try:
        store.load()
        store.start()
        store.submit([RegistryAdd(1, np.array([10], dtype=np.uint64))], term=term)
        store.flush()
        assert _take_lease(url, "/d/leader", holder="other:2") > term  # another replica takes over
        answers: list = []
        done = threading.Event()
        store.submit([RegistryAdd(1, np.array([10, 11], dtype=np.uint64))],
                     lambda exc: (answers.append(exc), done.set()), term=term)
        assert done.wait(10)
        assert isinstance(answers[0], FencedOut), answers
        assert fenced.is_set()
        assert StateStore(kv, "/d").load().registry[1].tolist() == [10]
    finally:
        store.stop(5)
        kv.close()


def test_terms_only_grow_one_leader_at_a_time_and_a_follower_names_it(postgres):
    url = postgres.store()
    kvs = [PostgresKV(url) for _ in range(4)]
    events: list[list] = [[] for _ in kvs]
    elections = [_election(kv, f"10.0.0.{i}:50051", events[i]) for i, kv in enumerate(kvs)]
    try:
        for e in elections:
            e.start()
        _wait(lambda: any(e.is_leader() for e in elections), 5, "no leader")
        time.sleep(0.8)  # every replica has looked at the lease
        leaders = [e for e in elections if e.is_leader()]
        assert len(leaders) == 1
        first = leaders[0]
        assert all(e.leader_addr() == first.advertise_addr for e in elections)
        seen = [first.term]
        # The lease row deleted, then the sequence dropped and made again: the next terms are still higher.
        for damage in ("DELETE FROM supervisor_lease", "DROP SEQUENCE supervisor_term"):
            leader = next(e for e in elections if e.is_leader())
            leader.resign()
            elections.remove(leader)
            _sql(url, damage)
            if damage.startswith("DROP"):
                _sql(url, "CREATE SEQUENCE supervisor_term")
            _wait(lambda: any(e.is_leader() for e in elections), TTL_MS / 1000 + 3, "no takeover")
            seen.append(next(e for e in elections if e.is_leader()).term)
        assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
        # Terms a leader saw elected are the ones it was told of, in order.
        for i, e in enumerate(events):
            terms = [ev[1] for ev in e if isinstance(ev, tuple)]
            assert terms == sorted(terms)
    finally:
        for e in elections:
            e.resign()
        for kv in kvs:
            kv.close()


def test_a_paused_database_makes_the_leader_step_down_in_time(postgres):
    """SIGSTOP on PostgreSQL: the leader stops acting before the lease could expire there, and says so."""
    url = postgres.store()
    kv = PostgresKV(url, timeout_s=2.0)
    events: list = []
    election = _election(kv, "10.0.0.1:50051", events)
    try:
        election.start()
        _wait(election.is_leader, 5, "no leader")
        time.sleep(TTL_MS / 3000 + 0.1)  # at least one renewal
        postgres.pause()
        paused = time.monotonic()
        try:
            _wait(lambda: "lost" in events, TTL_MS / 1000, "the leader did not step down within the lease")
            assert not election.is_leader() and not election.holds(election.term)
            assert time.monotonic() - paused <= TTL_MS / 1000 - 0.4  # ttl - margin, with room
            started = time.monotonic()
            with pytest.raises(StoreError, match="no answer within"):
                kv.commit({"/p/x": b"1"}, set(), ("/p/leader", election.term))
            assert time.monotonic() - started <= kv.timeout_s + 1
        finally:
            postgres.resume()
        _wait(election.is_leader, TTL_MS / 1000 + 5, "not leader again once the database answers")
        assert events[0][0] == "elected" and events[-1][0] == "elected" and events[-1][1] > events[0][1]
    finally:
        election.resign()
        kv.close()


def test_a_broken_connection_does_not_end_the_leadership_nor_lose_a_write(postgres):
    """The server ends every connection of the service (a restart, a proxy's idle timeout): the leader
    renews on a new one and keeps its term; the writer's commit is retried and lands."""
    url = postgres.store()
    kv = PostgresKV(url)
    events: list = []
    election = _election(kv, "10.0.0.1:50051", events, prefix="/b")
    store = StateStore(kv, "/b", flush_interval_s=0, holds_term=election.holds)
    try:
        election.start()
        _wait(election.is_leader, 5, "no leader")
        store.load()
        store.start()
        term = election.term
        store.submit([RegistryAdd(1, np.array([10], dtype=np.uint64))], term=term)
        store.flush()
        for _ in range(3):
            _sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name LIKE 'region-supervisor-%%' AND pid <> pg_backend_pid()")
            time.sleep(TTL_MS / 3000 + 0.2)  # a renewal falls on the broken connection
        store.submit([RegistryAdd(1, np.array([10, 11], dtype=np.uint64))], term=term)
        store.flush()
        assert election.is_leader() and election.term == term and events == [("elected", term)], events
        assert StateStore(kv, "/b").load().registry[1].tolist() == [10, 11]
    finally:
        store.stop(5)
        election.resign()
        kv.close()


def test_tables_made_otherwise_are_refused_and_a_user_without_create_uses_an_administrators(postgres):
    url = postgres.store()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE supervisor_kv (key text PRIMARY KEY, value text)")
    with pytest.raises(StoreError, match=r"not the supervisor's \(supervisor_kv.value is text, not bytea\)"):
        PostgresKV(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE supervisor_kv")
        conn.execute("DO $$ BEGIN CREATE ROLE supervisor_least LOGIN; EXCEPTION WHEN duplicate_object THEN END $$")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    least = url.replace("postgresql://postgres@", "postgresql://supervisor_least@")
    with pytest.raises(StoreError, match="permission denied"):
        PostgresKV(least)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SCHEMA.values():
            conn.execute(statement)
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON supervisor_kv, supervisor_lease TO supervisor_least")
        conn.execute("GRANT USAGE ON SEQUENCE supervisor_term TO supervisor_least")
    kv = PostgresKV(least)
    events: list = []
    election = _election(kv, "10.0.0.1:50051", events, prefix="/l")
    try:
        election.start()
        _wait(election.is_leader, 5, "no leader")
        kv.commit({"/l/x": b"1"}, set(), ("/l/leader", election.term))
        assert kv.read_prefix("/l/") == {"/l/x": b"1"}
    finally:
        election.resign()
        kv.close()


def test_no_statement_nor_connection_outlives_its_deadline_behind_a_dead_link(postgres):
    """Behind a link that delivers nothing (a paused proxy: the handshake completes in the kernel, then
    silence), a connection and a statement both fail at the caller's deadline, not libpq's 2 s or more."""
    proxy = PausableProxy(postgres.endpoint)
    session = PostgresSession(postgres.store(proxy.endpoint), name="test", timeout_s=5.0)
    try:
        assert session.run(lambda c: c.execute("SELECT 1").fetchone(), what="a check") == (1,)
        for reconnect in (False, True):
            if reconnect:
                session._drop()
            proxy.pause()
            started = time.monotonic()
            with pytest.raises(StoreError, match="no answer within 0.5 s"):
                session.run(lambda c: c.execute("SELECT 1").fetchone(), what="a check", timeout_s=0.5)
            assert time.monotonic() - started < 1.0
            proxy.resume()
        assert session.run(lambda c: c.execute("SELECT 2").fetchone(), what="a check") == (2,)
    finally:
        proxy.resume()
        session.close()
        proxy.stop()


def test_serve_on_an_unreachable_database_is_one_line_without_the_password(tmp_path):
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor_service.cli", "serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", ""],
        env={**_clean_env(), "SUPERVISOR_STORE": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/db"},
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert proc.returncode == 69, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("supervisor-service: error:"), lines
    assert f"127.0.0.1:{port}" in lines[0] and "postgres:***@" in lines[0]
    assert PASSWORD not in proc.stderr + proc.stdout


def test_a_password_in_the_url_never_reaches_the_log(tmp_path, postgres):
    """Through a start, a pause of the database (errors, a lost leadership) and a stop."""
    store = postgres.store().replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    env = {"SUPERVISOR_STORE": store, "SUPERVISOR_LEADER_LEASE_TTL_MS": str(TTL_MS),
           "SUPERVISOR_LOG_LEVEL": "debug"}
    replica = ServiceProcess(env, str(tmp_path / "replica.log"))
    try:
        replica.wait_serving(leader=True)
        postgres.pause()
        try:
            time.sleep(TTL_MS / 1000 + 1)
        finally:
            postgres.resume()
        replica.wait_serving(leader=True)
    finally:
        replica.stop()
    text = (tmp_path / "replica.log").read_text()
    assert "leadership_lost" in text and "postgres:***@" in text, text[-3000:]
    assert PASSWORD not in text


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")} | {
        "SUPERVISOR_LOG_FORMAT": "json", "GRPC_VERBOSITY": "NONE", "SUPERVISOR_SHUTDOWN_TIMEOUT_MS": "2000"}


def test_replicas_starting_together_on_a_new_database_all_open_it(postgres):
    """Several replicas creating the missing tables at the same moment: CREATE ... IF NOT EXISTS is not
    atomic in PostgreSQL (the loser gets 'relation already exists'), so creation is serialised."""
    for _ in range(5):
        url = postgres.store()
        errors: list[BaseException] = []
        opened: list[PostgresKV] = []
        barrier = threading.Barrier(6)

        def open_it() -> None:
            barrier.wait()
            try:
                opened.append(PostgresKV(url))
            except BaseException as exc:  # reported below, with the others
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for kv in opened:
            kv.close()
        assert not errors, errors
        assert len(opened) == 6
