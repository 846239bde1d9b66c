"""The state store failing under a running service: deleted, replaced, full, read-only.

Each failure must be loud (the real error in the answer and the log, health
NOT_SERVING, a metric), must never acknowledge a write that was not made
durable, and must never let a single replica's leader term go backwards.
The disk tests mount a real tmpfs or ext4 image (root only; they skip
without root and fail under CI=true).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from supervisor_service.client import SupervisorClient
from supervisor_service.core import RegistryAdd
from supervisor_service.store import MemoryKV, SqliteKV, StoreError, StoreGone
from tests.support.fakes import wait_for
from tests.support.servers import ServiceProcess, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _require_root(what: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        message = f"{what} needs root and mount(8)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)


# ---------------------------------------------------------------- the SQLite backend


def test_sqlite_error_is_not_hidden_by_the_rollback(tmp_path):
    kv = SqliteKV(tmp_path)
    try:
        # A database that may not grow: SQLite answers SQLITE_FULL and rolls the transaction back itself.
        pages = kv._db.execute("PRAGMA page_count").fetchone()[0]
        kv._db.execute(f"PRAGMA max_page_count = {pages + 1}")
        with pytest.raises(StoreError) as err:
            kv.commit({f"k{i}": b"x" * 4000 for i in range(50)}, set())
        assert "database or disk is full" in str(err.value) and "rollback" not in str(err.value)
        assert err.value.reason == "disk_full"
    finally:
        kv.close()


@pytest.mark.parametrize("name", ["supervisor.sqlite3", "supervisor.sqlite3-wal"])
def test_deleted_database_file_is_detected_before_the_next_commit(tmp_path, name):
    kv = SqliteKV(tmp_path)
    try:
        kv.commit({"a": b"1"}, set())
        (tmp_path / name).unlink()
        with pytest.raises(StoreGone, match="is gone"):
            kv.commit({"b": b"2"}, set())
        with pytest.raises(StoreGone):
            kv.check()
    finally:
        kv.close()


def _remove_database(data_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"supervisor.sqlite3{suffix}").unlink(missing_ok=True)


def test_a_data_dir_that_held_a_store_refuses_to_begin_empty(tmp_path):
    kv = SqliteKV(tmp_path)
    kv.note_term(7)
    kv.close()
    _remove_database(tmp_path)
    with pytest.raises(StoreError, match="was deleted.*--new-store") as err:
        SqliteKV(tmp_path)
    assert "allow_new_store" in str(err.value) and "above 7" in str(err.value)
    kv = SqliteKV(tmp_path, allow_new_store=True)
    assert kv.term_floor() == 7  # the term goes on from where the deleted store left it
    kv.close()
    SqliteKV(tmp_path).close()  # from now on, the new database is this data_dir's store


def test_a_replaced_database_is_refused(tmp_path):
    for name in ("a", "b"):
        SqliteKV(tmp_path / name).close()
    _remove_database(tmp_path / "a")
    shutil.copy(tmp_path / "b" / "supervisor.sqlite3", tmp_path / "a" / "supervisor.sqlite3")
    with pytest.raises(StoreError, match="replaced"):
        SqliteKV(tmp_path / "a")
    SqliteKV(tmp_path / "a", allow_new_store=True).close()


def test_a_fresh_data_dir_just_works(tmp_path):
    kv = SqliteKV(tmp_path / "new" / "dir")
    assert kv.term_floor() == 0
    kv.commit({"a": b"1"}, set())
    kv.close()
    assert json.loads((tmp_path / "new" / "dir" / "supervisor.identity").read_text())["highest_term"] == 0


# ---------------------------------------------------------------- in process: a failing backend


class _BreakableKV(MemoryKV):
    """Commits fail with `broken` (a real SQLite message) while it is set."""

    broken = ""

    def commit(self, puts, deletes, fence=None):
        if self.broken:
            raise StoreError(f"sqlite /data/supervisor.sqlite3: {self.broken}", reason="disk_full")
        super().commit(puts, deletes, fence)


def _health(addr: str) -> int:
    with grpc.insecure_channel(addr) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_failing_store_is_answered_promptly_with_the_real_error_and_health_follows(service):
    kv = _BreakableKV()
    svc = service(kv=kv)
    addr = svc.addresses.grpc
    value = svc.registry.get_sample_value
    kv.broken = "database or disk is full"
    started = time.monotonic()
    with SupervisorClient(addr, timeout=10, follow_leader=False) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.register([(1, 10)])
    took = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "state store unavailable" in err.value.details() and "database or disk is full" in err.value.details()
    assert took < 2.0, f"answered after {took:.1f} s"
    wait_for(lambda: _health(addr) == NOT_SERVING, 5, message="health stayed SERVING")
    assert value("supervisor_store_healthy") == 0
    assert value("supervisor_store_errors_total", {"reason": "disk_full"}) >= 1
    kv.broken = ""
    wait_for(lambda: _health(addr) == SERVING, 5, message="health did not come back")
    assert value("supervisor_store_healthy") == 1
    with SupervisorClient(addr, timeout=5) as client:
        _, rows = client.dump()  # the writer kept the change and committed it once it could
    assert (1, 10) in {(r.datanode_id, r.region_id) for r in rows}


def test_shutdown_that_cannot_commit_exits_non_zero(service):
    from supervisor_service.app.service import EXIT_STORE_UNCOMMITTED

    kv = _BreakableKV()
    svc = service(kv=kv, shutdown_timeout_ms=1000)
    kv.broken = "attempt to write a readonly database"
    with SupervisorClient(svc.addresses.grpc, timeout=10, follow_leader=False) as client:
        with pytest.raises(grpc.RpcError):
            client.register([(1, 10)])
    svc.request_stop()
    wait_for(lambda: svc._stopped is not None and svc._stopped.done(), 10)
    assert svc.exit_code == EXIT_STORE_UNCOMMITTED


def test_store_gone_fails_writes_at_once_and_stops_the_service(service):
    from supervisor_service.app.service import EXIT_STORE_GONE

    class _VanishingKV(MemoryKV):
        gone = False

        def check(self):
            if self.gone:
                raise StoreGone("state store /data/supervisor.sqlite3 is gone: it was deleted")

        def commit(self, puts, deletes, fence=None):
            self.check()
            super().commit(puts, deletes, fence)

    kv = _VanishingKV()
    svc = service(kv=kv)
    kv.gone = True
    with SupervisorClient(svc.addresses.grpc, timeout=10, follow_leader=False) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.register([(1, 10)])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "is gone" in err.value.details()
    wait_for(lambda: svc._stopped is not None and svc._stopped.done(), 10, message="the service kept running")
    assert svc.exit_code == EXIT_STORE_GONE
    svc.store.submit([RegistryAdd(1, np.array([11], dtype=np.uint64))], lambda exc: None)  # answered, not queued


# ---------------------------------------------------------------- real processes, real files


def _terms(log_path: str) -> list[int]:
    terms = []
    with open(log_path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "leadership_started":
                terms.append(int(record["term"]))
    return terms


def _logged(log_path: str, event: str) -> list[dict]:
    with open(log_path, "rb") as f:
        lines = [json.loads(line) for line in f if line.startswith(b"{")]
    return [r for r in lines if r.get("event") == event]


class _HealthWatch:
    """Every status a grpc.health.v1 Watch stream reports, collected in a thread."""

    def __init__(self, addr: str) -> None:
        self.statuses: list[int] = []
        self._channel = grpc.insecure_channel(addr)
        self._stream = health_pb2_grpc.HealthStub(self._channel).Watch(health_pb2.HealthCheckRequest())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for response in self._stream:
                self.statuses.append(response.status)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()


def _register_result(addr: str, pairs, timeout: float = 10) -> grpc.RpcError | None:
    """None if acknowledged, else the error (retried only while the replica is still loading its state)."""
    try:
        with SupervisorClient(addr, timeout=timeout) as client:
            client.register(pairs)
    except grpc.RpcError as exc:
        return exc
    return None


@pytest.mark.realtime
def test_deleted_sqlite_store_stops_the_service_and_refuses_a_fresh_start(tmp_path):
    data = tmp_path / "data"
    env = {"SUPERVISOR_STORE": "sqlite", "SUPERVISOR_DATA_DIR": str(data), "SUPERVISOR_SHUTDOWN_TIMEOUT_MS": "3000"}
    first = ServiceProcess(env, str(tmp_path / "first.log"))
    watch = None
    try:
        first.wait_serving()
        assert _register_result(first.addr, [(1, 10)]) is None
        watch = _HealthWatch(first.addr)
        wait_for(lambda: SERVING in watch.statuses, 5)
        (data / "supervisor.sqlite3").unlink()
        error = _register_result(first.addr, [(1, 11)])
        assert error is not None, "a write after the store was deleted was acknowledged"
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert first.proc.wait(15) == 74  # EXIT_STORE_GONE
        assert NOT_SERVING in watch.statuses
        gone = _logged(first.log_path, "store_gone")
        assert gone and gone[0]["level"] == "error" and "is gone" in gone[0]["error"]
    finally:
        if watch is not None:
            watch.close()
        first.stop()
    first_terms = _terms(first.log_path)
    assert first_terms == [1]

    refused = subprocess.run(
        [sys.executable, "-m", "supervisor_service.cli", "serve"],
        env={**os.environ, **env, "SUPERVISOR_GRPC_ADDR": f"127.0.0.1:{free_port()}", "SUPERVISOR_METRICS_ADDR": ""},
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0
    assert "was deleted" in refused.stderr and "--new-store" in refused.stderr, refused.stderr

    again = ServiceProcess({**env, "SUPERVISOR_ALLOW_NEW_STORE": "true"}, str(tmp_path / "again.log"))
    try:
        again.wait_serving()
        assert _register_result(again.addr, [(1, 12)]) is None
    finally:
        again.stop()
    assert min(_terms(again.log_path)) > max(first_terms), "the leader term went backwards"


def _metric(port: int, name: str, labels: str = "") -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def _fill(directory: Path) -> Path:
    """A file that takes every free byte of the filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def tmpfs(tmp_path):
    _require_root("a tmpfs test")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _disk_env(data_dir: Path, metrics_port: int) -> dict[str, str]:
    return {
        "SUPERVISOR_STORE": "sqlite", "SUPERVISOR_DATA_DIR": str(data_dir),
        "SUPERVISOR_METRICS_ADDR": f"127.0.0.1:{metrics_port}", "SUPERVISOR_SHUTDOWN_TIMEOUT_MS": "3000",
    }


def _big(datanode_id: int) -> list[tuple[int, int]]:
    return [(datanode_id, r) for r in range(20_000)]  # a 160 KB registry value: more than the WAL has room for


@pytest.mark.realtime
def test_full_disk_is_answered_loudly_and_the_service_recovers(tmp_path, tmpfs):
    port = free_port()
    proc = ServiceProcess(_disk_env(tmpfs / "data", port), str(tmp_path / "full.log"))
    try:
        proc.wait_serving()
        assert _register_result(proc.addr, [(1, 10)]) is None
        filler = _fill(tmpfs)
        started = time.monotonic()
        error = _register_result(proc.addr, _big(2))
        took = time.monotonic() - started
        assert error is not None, "a write to a full disk was acknowledged"
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "state store unavailable" in error.details() and "database or disk is full" in error.details(), error
        assert took < 3.0, f"answered after {took:.1f} s"
        wait_for(lambda: _health(proc.addr) == NOT_SERVING, 5, message="health stayed SERVING on a full disk")
        assert _metric(port, "supervisor_store_healthy") == 0
        assert _metric(port, "supervisor_store_errors_total", '{reason="disk_full"}') >= 1
        assert not [r for r in _logged(proc.log_path, "store_write_failed") if "rollback" in r["error"]]

        filler.unlink()  # room again: the kept write commits, health comes back
        wait_for(lambda: _health(proc.addr) == SERVING, 10, message="health did not come back")
        with SupervisorClient(proc.addr, timeout=10) as client:
            _, rows = client.dump(datanode_ids=[2])
        assert len(rows) == 20_000

        _fill(tmpfs)
        assert _register_result(proc.addr, _big(3)) is not None
        proc.kill(signal.SIGTERM)
        assert proc.proc.wait(15) == 75  # EXIT_STORE_UNCOMMITTED
        assert _logged(proc.log_path, "store_uncommitted_at_shutdown")
    finally:
        proc.stop()


@pytest.fixture
def ext4(tmp_path):
    """An ext4 image mounted with errors=remount-ro, and a function that makes it go read-only the way a
    failing disk does (tmpfs cannot: `mount -o remount,ro` is refused while the database is open)."""
    _require_root("an ext4 image test")
    image, mnt = tmp_path / "disk.img", tmp_path / "ext4"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mnt)], check=True)
    device = os.path.basename(subprocess.run(["findmnt", "-no", "SOURCE", str(mnt)], capture_output=True,
                                             text=True, check=True).stdout.strip())
    trigger = Path(f"/sys/fs/ext4/{device}/trigger_fs_error")

    def go_read_only() -> None:
        trigger.write_text("test: the disk went read-only\n")

    try:
        if not trigger.exists():
            if _in_ci():
                pytest.fail(f"{trigger} is missing: cannot make the filesystem fail")
            pytest.skip(f"{trigger} is missing: cannot make the filesystem fail")
        yield mnt, go_read_only
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.realtime
def test_read_only_disk_is_answered_loudly_and_shutdown_exits_non_zero(tmp_path, ext4):
    mnt, go_read_only = ext4
    port = free_port()
    proc = ServiceProcess(_disk_env(mnt / "data", port), str(tmp_path / "ro.log"))
    try:
        proc.wait_serving()
        assert _register_result(proc.addr, [(1, 10)]) is None
        go_read_only()
        error = _register_result(proc.addr, [(1, 11)])
        assert error is not None, "a write to a read-only disk was acknowledged"
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "state store unavailable" in error.details()
        assert "rollback" not in error.details(), error.details()
        wait_for(lambda: _health(proc.addr) == NOT_SERVING, 5, message="health stayed SERVING on a read-only disk")
        assert _metric(port, "supervisor_store_healthy") == 0
        proc.kill(signal.SIGTERM)
        assert proc.proc.wait(15) == 75  # EXIT_STORE_UNCOMMITTED
    finally:
        proc.stop()


def test_single_replica_refused_for_a_stale_term_is_not_serving(service):
    """A single replica whose term RegionMigration refuses steps down for good: it must not say SERVING."""
    from supervisor_service.core import Peer, SystemClock
    from supervisor_service.remotes import EmbeddedPeerLookup, PeerDirectory, Remotes, StaleLeaderTerm

    class _Selector:
        def select(self, n, exclude, from_peer_id, region_ids):
            return [Peer(2, "127.0.0.1:2")] * n

    class _Refusing:
        def submit(self, task):
            raise StaleLeaderTerm("RegionMigration", "SubmitRegionMigration", "FAILED_PRECONDITION",
                                  f"leader term {task.leader_term} is older than 99")

        def status(self, procedure_id):
            raise AssertionError("not reached")

    svc = service(remotes=Remotes(EmbeddedPeerLookup(PeerDirectory(SystemClock())), _Selector(), _Refusing()),
                  tick_interval_ms=50, acceptable_heartbeat_pause_ms=200, first_heartbeat_estimate_ms=100,
                  warmup_grace_ms=0, guards_enabled=False)
    assert _health(svc.addresses.grpc) == SERVING
    with SupervisorClient(svc.addresses.grpc, follow_leader=False) as client:
        client.register([(1, 10)])
    wait_for(lambda: _health(svc.addresses.grpc) == NOT_SERVING, 10, message="a replica that will not lead again says SERVING")
