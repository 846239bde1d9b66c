"""The disk scenario: one replica on SQLite whose data directory is a tiny filesystem that fills up,
then goes read-only, then is healed; datanodes heartbeat it and one of them dies while the disk is full.

The filesystem is a 16 MiB ext4 image on a loop device mounted with
errors=remount-ro (root only): a tmpfs can fill up, but refuses
`remount,ro` while the database is open, and ext4's `trigger_fs_error` makes
it go read-only the way a failing disk does. Healing the read-only disk is
what an operator does: stop the service, unmount, e2fsck, mount, start.

Checked: every Register / SetMaintenanceMode acknowledged is in the state
after the restart; every refused one was refused UNAVAILABLE saying the
state store is unavailable (never INTERNAL, never a silent OK); the dead
datanode is failed over after the heal (once) and no live one is; writes
are acknowledged again after each heal.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import grpc

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.proto import pb
from tests.chaos.cluster import REPLICA_ENV, SimDatanode, open_on_target, region_ids
from tests.chaos.history import Ack, Death, History, Poll, Submit, Violation, check
from tests.chaos.remotes import ChaosPeerLookup, ChaosRegionMigration, ChaosSelector
from tests.support.readiness import free_port
from tests.support.servers import ServiceProcess

REFUSALS_CLEAR = "refusals_clear"
WRITES_RESUME = "writes_resume"


class DiskUnavailable(Exception):
    """No root, no mount(8) or no ext4 fault trigger here."""


def disk_available() -> str:
    """'' when the disk scenario can run here, else why not."""
    if os.geteuid() != 0:
        return "the disk scenario needs root (mount)"
    for tool in ("mount", "umount", "mkfs.ext4", "e2fsck", "findmnt", "losetup"):
        if shutil.which(tool) is None:
            return f"the disk scenario needs {tool} (Debian packages mount, e2fsprogs)"
    return ""


class Ext4Image:
    def __init__(self, work_dir: str, size_mb: int = 16) -> None:
        self.image = os.path.join(work_dir, "disk.img")
        self.mnt = os.path.join(work_dir, "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", self.image], check=True)
        self.mount()

    def mount(self) -> None:
        subprocess.run(["mount", "-o", "loop,errors=remount-ro", self.image, self.mnt], check=True)
        device = subprocess.run(["findmnt", "-no", "SOURCE", self.mnt], capture_output=True, text=True,
                                check=True).stdout.strip()
        self.trigger = f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error"
        if not os.path.exists(self.trigger):
            raise DiskUnavailable(f"{self.trigger} is missing: cannot make the filesystem fail")

    def fill(self) -> str:
        """A file that takes every free block; returns its path."""
        path = os.path.join(self.mnt, "filler")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            chunk = b"\0" * (1 << 20)
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) <= 4096:
                        break
                    chunk = chunk[: len(chunk) // 4]
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def go_read_only(self) -> None:
        with open(self.trigger, "w") as f:
            f.write("chaos: the disk went read-only\n")

    def repair(self) -> None:
        """What an operator does once the service is stopped: unmount, fsck, mount again."""
        subprocess.run(["umount", self.mnt], check=True)
        # The loop device is let go asynchronously: mounting the image again before it is would
        # get the old, read-only superblock back.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and subprocess.run(
                ["losetup", "-j", self.image], capture_output=True, text=True).stdout.strip():
            time.sleep(0.1)
        subprocess.run(["e2fsck", "-fy", self.image], capture_output=True)  # exit 1: errors corrected
        self.mount()
        probe = os.path.join(self.mnt, ".writable")
        try:
            with open(probe, "w") as f:
                f.write("x")
            os.unlink(probe)
        except OSError:
            subprocess.run(["mount", "-o", "remount,rw", self.mnt], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", self.mnt], check=False, capture_output=True)


@dataclass
class DiskResult:
    seed: int
    history: History
    violations: list[Violation]
    phases: list[tuple[float, str]]
    refusals: dict[str, int] = field(default_factory=dict)
    numbers: dict[str, object] = field(default_factory=dict)
    skipped: str = ""
    work_dir: str = ""

    def report(self) -> str:
        if self.skipped:
            return f"disk scenario skipped: {self.skipped}"
        lines = [f"disk scenario, seed {self.seed} (SQLite on a 16 MiB ext4 image):"]
        lines += [f"  {at:6.1f} s  {what}" for at, what in self.phases]
        lines += ["  refused writes by answer: " + (", ".join(f"{k} x{v}" for k, v in sorted(self.refusals.items()))
                                                     or "none")]
        lines += [f"  {k}: {v}" for k, v in self.numbers.items()]
        invariants = ("acked_writes_kept", "dead_failed_over", "live_not_failed_over", "no_double_submit",
                      REFUSALS_CLEAR, WRITES_RESUME)
        bad = {v.invariant for v in self.violations}
        lines.append("  | " + " | ".join(invariants) + " |")
        lines.append("  | " + " | ".join(("VIOLATED" if i in bad else "held").ljust(len(i)) for i in invariants) + " |")
        if self.violations:
            lines.append(f"  {len(self.violations)} VIOLATIONS (reproduce with CHAOS_SEED={self.seed} --scenario disk):")
            lines += [f"    [{v.invariant}] at {v.at:.2f} s: {v.detail}" for v in self.violations]
        else:
            lines.append(f"  every invariant held (seed {self.seed}); logs: {self.work_dir}")
        return "\n".join(lines)


class _Writer:
    """Register (one new heartbeated region at a time) and per-datanode maintenance of phantom ids,
    as fast as answers come; records what was acknowledged and how the rest was refused."""

    def __init__(self, addr: str, started: float, rng: random.Random, live: list[SimDatanode]) -> None:
        self.addr, self.started, self.rng, self.live = addr, started, rng, live
        self.acks: list[Ack] = []
        self.refusals: dict[str, int] = {}
        self.unclear: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._next = 500
        self._phantom = 9500
        self._thread = threading.Thread(target=self._run, name="disk-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                with SupervisorClient(self.addr, timeout=3, follow_leader=False) as client:
                    while not self._stop.wait(0.15):
                        self._one(client)
            except Exception:  # noqa: BLE001 - the process is being restarted: connect again
                self._stop.wait(0.3)

    def _one(self, client: SupervisorClient) -> None:
        at = time.monotonic() - self.started
        try:
            if self.rng.random() < 0.8:
                dn = self.rng.choice(self.live)
                region = dn.regions[0] - (dn.regions[0] % 1000) + self._next
                self._next += 1
                dn.add_region(region)
                client.register([(dn.datanode_id, region)])
                self.acks.append(Ack(at, "register", pairs=[[dn.datanode_id, region]]))
            else:
                phantom = self._phantom
                self._phantom += 1
                client.set_maintenance_scope(True, [phantom])
                self.acks.append(Ack(at, "maintenance", datanode_ids=[phantom]))
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            details = exc.details() or ""
            self.refusals[code] = self.refusals.get(code, 0) + 1
            clear = code == "UNAVAILABLE" and ("state store unavailable" in details or "becoming leader" in details
                                               or "shutting down" in details)
            # A connection refused while the process is stopped for the repair is not an answer.
            if not clear and not (code == "UNAVAILABLE" and ("connect" in details.lower()
                                                               or "Socket closed" in details)):
                self.unclear.append((at, f"{code}: {details[:200]}"))


def run_disk(*, seed: int, work_dir: str | None = None, datanodes: int = 6, log=print) -> DiskResult:
    why = disk_available()
    if why:
        return DiskResult(seed, History(seed=seed), [], [], skipped=why)
    work_dir = work_dir or tempfile.mkdtemp(prefix=f"chaos-disk-{seed}-")
    os.makedirs(work_dir, exist_ok=True)
    from tests.chaos.run import close_harness_log, harness_log

    handler = harness_log(work_dir)
    rng = random.Random(seed ^ 0xD15C)
    disk = Ext4Image(work_dir)
    migration = ChaosRegionMigration(seed=seed)
    addrs = {d: f"127.0.0.1:{42000 + d}" for d in range(1, datanodes + 1)}
    selector = ChaosSelector([pb.Peer(id=d, addr=a) for d, a in addrs.items()])
    lookup = ChaosPeerLookup(addrs)
    port = free_port()
    env = dict(REPLICA_ENV)
    env.update({"SUPERVISOR_STORE": "sqlite", "SUPERVISOR_DATA_DIR": os.path.join(disk.mnt, "data"),
                "SUPERVISOR_REGION_MIGRATION_ENDPOINT": migration.endpoint,
                "SUPERVISOR_SELECTOR_ENDPOINT": selector.endpoint, "SUPERVISOR_PEER_LOOKUP_ENDPOINT": lookup.endpoint,
                "SUPERVISOR_WARMUP_GRACE_MS": "2000"})
    log_path = os.path.join(work_dir, "replica.log")
    proc = ServiceProcess(env, log_path, grpc_port=port)
    phases: list[tuple[float, str]] = []
    history = History(seed=seed, failover_bound_s=30.0, recovery_bound_s=20.0)
    nodes: dict[int, SimDatanode] = {}
    migration.on_success = lambda d, regions: open_on_target(nodes, d, regions)
    started = time.monotonic()
    writer: _Writer | None = None
    resumed: list[float | None] = []

    def phase(what: str) -> float:
        at = time.monotonic() - started
        phases.append((at, what))
        log(f"disk: {at:5.1f} s {what}")
        return at

    def acked_since(t: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [a.at for a in writer.acks if a.at > t]
            if later:
                return min(later)
            time.sleep(0.1)
        return None

    try:
        proc.wait_serving(60, leader=True)
        for d in addrs:
            dn = SimDatanode(d, region_ids(d, 4))
            dn.beater = DatanodeHeartbeater(proc.addr, d, dn.current_regions, interval_s=0.5, answer_timeout_s=2.0,
                                            peer_addr=addrs[d], on_response=dn.on_response)
            nodes[d] = dn
            dn.beater.start()
        victim = rng.choice(sorted(nodes))
        live = [dn for d, dn in nodes.items() if d != victim]
        time.sleep(3)
        writer = _Writer(proc.addr, started, rng, live)
        writer.start()
        time.sleep(2)
        phase("disk fills up")
        filler = disk.fill()
        time.sleep(1.0)
        nodes[victim].beater.stop()
        nodes[victim].died_at = time.monotonic()
        selector.candidates = [p for p in selector.candidates if p.id != victim]
        phase(f"datanode {victim} dies")
        time.sleep(rng.uniform(4.0, 7.0))
        os.unlink(filler)
        healed = phase("room again (filler deleted)")
        resumed.append(acked_since(healed, 20))
        time.sleep(rng.uniform(3.0, 6.0))
        phase("disk goes read-only (ext4 error, remounted ro)")
        disk.go_read_only()
        time.sleep(rng.uniform(3.0, 5.0))
        phase("operator stops the service (SIGTERM)")
        proc.kill(signal.SIGTERM)
        try:
            code = proc.proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.proc.kill()
            code = proc.proc.wait(10)
        phase(f"service exited with {code}; unmount, e2fsck, mount")
        proc.stop()
        disk.repair()
        proc = ServiceProcess(env, log_path, grpc_port=port)
        proc.wait_serving(60, leader=True)
        healed = phase("service started again")
        history.healed_at = healed
        resumed.append(acked_since(healed, 20))
        # The dead datanode's regions are failed over now, and nothing else is.
        deadline = time.monotonic() + history.failover_bound_s

        def victim_done() -> bool:
            done = {r for c in migration.attempts if c.outcome in ("OK", "CLIENT_GONE") and
                    c.request.from_peer.id == victim for r in c.request.region_ids}
            return set(nodes[victim].current_regions()) <= done

        while time.monotonic() < deadline and not victim_done():
            time.sleep(0.2)
        time.sleep(4)
        writer.stop()
        with SupervisorClient(proc.addr, timeout=10, follow_leader=False) as client:
            header, rows = client.dump()
            status = client.maintenance_status()
            history.final_pairs = [[r.datanode_id, r.region_id] for r in rows]
            history.final_maintenance = [m.datanode_id for m in status.datanodes]
            history.final_read = header.is_leader and status.is_leader
        history.leader_at = healed
        history.ended_at = phase("final state read")
    finally:
        if writer is not None:
            writer.stop()
        for dn in nodes.values():
            if dn.died_at is None and dn.beater is not None:
                dn.beater.stop(2)
        proc.stop()
        for fake in (migration, selector, lookup):
            fake.stop()
        disk.close()
        close_harness_log(handler)

    for call in migration.attempts:
        req, resp = call.request, call.response
        cats = {c: list(getattr(resp, c)) for c in ("migrated", "migrating", "peer_conflict", "submitted")
                if resp is not None and getattr(resp, c)}
        history.submits.append(Submit(call.at - started, "r0", req.leader_term, req.request_id, req.from_peer.id,
                                      req.to_peer.id, list(req.region_ids), call.outcome, cats,
                                      resp.procedure_id if resp is not None else ""))
    for call in migration.status_polls:
        history.polls.append(Poll(call.at - started, "r0", call.request.procedure_id,
                                  pb.MigrationState.Name(call.response.state) if call.response is not None else ""))
    history.acks = list(writer.acks) if writer is not None else []
    for d, dn in nodes.items():
        if dn.died_at is not None:
            history.deaths.append(Death(dn.died_at - started, d, dn.current_regions()))
        else:
            history.live_datanodes.append(d)
            first = dn.first_accepted_after(started + history.healed_at)
            history.heartbeats_accepted_at[d] = None if first is None else first - started
    violations = check(history)
    for at, what in (writer.unclear if writer is not None else []):
        violations.append(Violation(REFUSALS_CLEAR, at, f"a write was refused unclearly: {what}"))
    for i, t in enumerate(resumed):
        if t is None:
            violations.append(Violation(WRITES_RESUME, history.ended_at,
                                        f"no write acknowledged within 20 s of heal {i + 1}"))
    numbers = {
        "acked_writes": len(history.acks),
        "refused_writes": sum(writer.refusals.values()) if writer else 0,
        "first_ack_after_heals_s": [None if t is None else round(t - at, 2)
                                    for t, (at, _) in zip(resumed, [p for p in phases if "again" in p[1]])],
        "submits_carried_out": sum(1 for s in history.submits if s.executed),
        "total_s": round(time.monotonic() - started, 1),
    }
    return DiskResult(seed, history, violations, phases, dict(writer.refusals) if writer else {}, numbers,
                      work_dir=work_dir)
