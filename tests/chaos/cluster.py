"""The chaos cluster: a three-member etcd cluster, three replicas, the fake remotes, the datanodes,
and a fault-injecting proxy on every link a fault may cut.

    etcd m0 m1 m2  <-- proxy per (replica, member) --  replica r0 r1 r2  -- proxy per (replica, remote) -->
                                                            ^               RegionMigration, Selector, PeerLookup
                                        proxy per replica --+
                                                            ^
                                       datanodes, the harness's metasrv client

Replica rN's proxies connect from 127.0.1.(N+1), so a remote call names its
replica by its peer address. Each replica advertises its datanode-side
proxy, so leader hints lead through it too. Replica r0 runs with the clock
Every replica runs with the clock shim (`clockshift.c`) preloaded: its wall clock
follows its own offset file (`set_clock_offset`), 0 unless a clock fault is on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.proto import pb
from tests.chaos.netproxy import FaultProxy
from tests.chaos.remotes import ChaosPeerLookup, ChaosRegionMigration, ChaosSelector
from tests.support.readiness import free_port, says_it_leads
from tests.support.servers import ServiceProcess

TTL_MS = 2000
TICK_MS = 200
HEARTBEAT_S = 0.5
REMOTE_TIMEOUT_MS = 2000
# A region's first failover gets this timeout (base x (count + 1), count 0): short enough that a slow
# migration outlives it within a run, longer than any cut of a replica's remotes the nemesis makes
# (overlapping cuts stay under 8 s). A migration whose status cannot be learnt for a whole timeout
# ends then, by the contract, and its regions are failed over again.
MIGRATION_BASE_TIMEOUT_MS = 12_000
MIGRATION_TIMEOUT_MS = MIGRATION_BASE_TIMEOUT_MS
TABLE = 1024

REPLICA_ENV = {
    "SUPERVISOR_LEADER_LEASE_TTL_MS": str(TTL_MS),
    "SUPERVISOR_TICK_INTERVAL_MS": str(TICK_MS),
    "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "3000",
    "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": str(int(HEARTBEAT_S * 1000)),
    "SUPERVISOR_WARMUP_GRACE_MS": "3000",
    "SUPERVISOR_WARMUP_FRACTION": "0.8",
    "SUPERVISOR_REMOTE_TIMEOUT_MS": str(REMOTE_TIMEOUT_MS),
    "SUPERVISOR_MIGRATION_BASE_TIMEOUT_MS": str(MIGRATION_BASE_TIMEOUT_MS),
    "SUPERVISOR_MIGRATION_STATUS_POLL_INTERVAL_MS": "500",
    "SUPERVISOR_SUBMIT_RETRY_BACKOFF_MS": "500",
    "SUPERVISOR_SUBMIT_RETRY_BACKOFF_MAX_MS": "4000",
    "SUPERVISOR_RESUBMIT_BACKOFF_MS": "1000",
    "SUPERVISOR_RESUBMIT_BACKOFF_MAX_MS": "8000",
    "SUPERVISOR_MAX_RESUBMISSIONS_PER_WINDOW": "50",
    "SUPERVISOR_RESUBMIT_WINDOW_MS": "60000",
    "SUPERVISOR_MAX_LOCAL_PAUSE_MS": "2000",
    "SUPERVISOR_LOCAL_PAUSE_HOLD_MS": "3000",
    "SUPERVISOR_MASS_FAILURE_SILENCE_MS": "1500",
    "SUPERVISOR_MASS_FAILURE_RECOVERY_MS": "3000",
    "SUPERVISOR_TARGET_HOLDDOWN_MS": "5000",
    "SUPERVISOR_FLAP_BACKOFF_BASE_MS": "1000",
    "SUPERVISOR_FLAP_BACKOFF_MAX_MS": "8000",
    "SUPERVISOR_SHUTDOWN_TIMEOUT_MS": "3000",
}


def region_ids(datanode_id: int, n: int) -> list[int]:
    return [(TABLE << 32) | (datanode_id * 1000 + i) for i in range(n)]


# ---------------------------------------------------------------- etcd


class EtcdMember:
    def __init__(self, name: str, data_dir: str, client_port: int, peer_port: int, initial_cluster: str,
                 token: str) -> None:
        self.name = name
        self.endpoint = f"127.0.0.1:{client_port}"
        self._args = [
            shutil.which("etcd") or "etcd", "--name", name, "--data-dir", os.path.join(data_dir, name),
            "--listen-client-urls", f"http://{self.endpoint}", "--advertise-client-urls", f"http://{self.endpoint}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", initial_cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", token,
            "--heartbeat-interval", "100", "--election-timeout", "1000",
        ]
        self._log_path = os.path.join(data_dir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self.paused = False

    def start(self) -> None:
        with open(self._log_path, "ab") as log:
            self.proc = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)
        self.paused = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.running and self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False


class EtcdCluster:
    def __init__(self, data_dir: str, size: int = 3) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        token = f"chaos-{ports[0][0]}"
        self.members = [EtcdMember(f"m{i}", data_dir, c, p, initial, token) for i, (c, p) in enumerate(ports)]
        for m in self.members:
            m.start()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(m.healthy() for m in self.members):
                return
            time.sleep(0.2)
        raise AssertionError("the etcd cluster did not become healthy")

    def heal(self) -> None:
        for m in self.members:
            m.resume()
            if not m.running:
                m.start()

    def stop(self) -> None:
        for m in self.members:
            m.resume()
            m.kill()


# ---------------------------------------------------------------- replicas


@dataclass
class Replica:
    index: int
    port: int
    source_ip: str
    etcd_proxies: list[FaultProxy]
    remote_proxies: dict[str, FaultProxy]
    front: FaultProxy  # datanodes and clients -> this replica
    env: dict[str, str]
    log_path: str
    process: ServiceProcess | None = None
    paused: bool = False

    @property
    def name(self) -> str:
        return f"r{self.index}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def links(self, group: str) -> list[FaultProxy]:
        if group == "etcd":
            return list(self.etcd_proxies)
        if group == "remotes":
            return list(self.remote_proxies.values())
        if group == "datanodes":
            return [self.front]
        raise ValueError(group)

    def start(self) -> None:
        if self.running:
            return
        self.process = ServiceProcess(self.env, self.log_path, grpc_port=self.port)
        self.paused = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            self.process.proc.kill()
            self.process.proc.wait(10)
            self.process.stop()

    def pause(self) -> None:
        if self.running:
            self.process.kill(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.running and self.paused:
            self.process.kill(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.stop()


# ---------------------------------------------------------------- datanodes


def open_on_target(datanodes: dict[int, SimDatanode], datanode_id: int, regions: list[int]) -> None:
    """A migration to `datanode_id` succeeded (ChaosRegionMigration.on_success): a live target serves,
    and heartbeats, its regions from now on."""
    dn = datanodes.get(datanode_id)
    if dn is None or dn.died_at is not None:
        return
    held = set(dn.current_regions())
    for r in regions:
        if r not in held:
            dn.add_region(r)


@dataclass
class SimDatanode:
    datanode_id: int
    regions: list[int]
    beater: DatanodeHeartbeater | None = None
    accepted: list[float] = field(default_factory=list)  # time.monotonic() of accepted answers
    died_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def current_regions(self) -> list[int]:
        with self.lock:
            return list(self.regions)

    def add_region(self, region: int) -> None:
        with self.lock:
            self.regions.append(region)

    def on_response(self, addr: str, response: pb.HeartbeatResponse) -> None:
        if not response.rejected:
            with self.lock:
                self.accepted.append(time.monotonic())

    def first_accepted_after(self, t: float) -> float | None:
        with self.lock:
            return next((a for a in self.accepted if a >= t), None)


def compile_clock_shim(out_dir: str) -> str:
    """clockshift.c built into `out_dir`; the path of the shared object."""
    src = os.path.join(os.path.dirname(__file__), "clockshift.c")
    out = os.path.join(out_dir, "clockshift.so")
    subprocess.run([shutil.which("gcc") or "gcc", "-shared", "-fPIC", "-O2", "-o", out, src, "-ldl"], check=True,
                   capture_output=True)
    return out


class ChaosCluster:
    """Everything of one run; `start()` brings it up, `close()` takes it all down."""

    def __init__(self, *, seed: int, datanodes: int, regions_per_datanode: int = 4, work_dir: str | None = None,
                 clock_shim: bool = True, extra_env: dict[str, str] | None = None) -> None:
        self.seed = seed
        self.extra_env = dict(extra_env or {})
        self.work_dir = work_dir or tempfile.mkdtemp(prefix=f"chaos-{seed}-")
        os.makedirs(self.work_dir, exist_ok=True)
        self.n_datanodes = datanodes
        self.regions_per_datanode = regions_per_datanode
        self.clock_shim = clock_shim
        self.etcd: EtcdCluster | None = None
        self.migration: ChaosRegionMigration | None = None
        self.selector: ChaosSelector | None = None
        self.lookup: ChaosPeerLookup | None = None
        self.replicas: list[Replica] = []
        self.datanodes: dict[int, SimDatanode] = {}
        self.proxies: list[FaultProxy] = []

    # ------------------------------------------------------------ bring-up

    def start(self) -> None:
        self.etcd = EtcdCluster(self.work_dir)
        self.migration = ChaosRegionMigration(seed=self.seed)
        self.migration.on_success = self._opened
        addrs = {d: f"127.0.0.1:{41000 + d}" for d in range(1, self.n_datanodes + 1)}
        self.selector = ChaosSelector([pb.Peer(id=d, addr=a) for d, a in addrs.items()])
        self.lookup = ChaosPeerLookup(addrs)
        shim = compile_clock_shim(self.work_dir) if self.clock_shim else ""
        self.etcd.wait_healthy()
        for i in range(3):
            self.set_clock_offset(i, 0)
            self.replicas.append(self._replica(i, shim))
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.process.wait_serving(60)
        for d, addr in addrs.items():
            dn = SimDatanode(d, region_ids(d, self.regions_per_datanode))
            dn.beater = DatanodeHeartbeater(
                [r.front.endpoint for r in self.replicas], d, dn.current_regions, interval_s=HEARTBEAT_S,
                answer_timeout_s=1.5, peer_addr=addr, on_response=dn.on_response,
            )
            self.datanodes[d] = dn
            dn.beater.start()

    def _opened(self, datanode_id: int, regions: list[int]) -> None:
        open_on_target(self.datanodes, datanode_id, regions)

    def _replica(self, i: int, shim: str) -> Replica:
        source_ip = f"127.0.1.{i + 1}"
        seed = self.seed * 100 + i * 10
        etcd_proxies = [FaultProxy(m.endpoint, name=f"r{i}-etcd-{m.name}", source_ip=source_ip, seed=seed + k)
                        for k, m in enumerate(self.etcd.members)]
        remote_proxies = {
            "migration": FaultProxy(self.migration.endpoint, name=f"r{i}-migration", source_ip=source_ip, seed=seed + 5),
            "selector": FaultProxy(self.selector.endpoint, name=f"r{i}-selector", source_ip=source_ip, seed=seed + 6),
            "lookup": FaultProxy(self.lookup.endpoint, name=f"r{i}-lookup", source_ip=source_ip, seed=seed + 7),
        }
        port = free_port()
        front = FaultProxy(f"127.0.0.1:{port}", name=f"r{i}-front", seed=seed + 8)
        self.proxies.extend(etcd_proxies + list(remote_proxies.values()) + [front])
        env = dict(REPLICA_ENV)
        env.update({
            "SUPERVISOR_STORE": "etcd://" + ",".join(p.endpoint for p in etcd_proxies),
            "SUPERVISOR_STORE_PREFIX": f"/region-supervisor/chaos-{self.seed}",
            "SUPERVISOR_ADVERTISE_ADDR": front.endpoint,
            "SUPERVISOR_REGION_MIGRATION_ENDPOINT": remote_proxies["migration"].endpoint,
            "SUPERVISOR_SELECTOR_ENDPOINT": remote_proxies["selector"].endpoint,
            "SUPERVISOR_PEER_LOOKUP_ENDPOINT": remote_proxies["lookup"].endpoint,
        })
        env.update(self.extra_env)
        if shim:
            env.update({"LD_PRELOAD": shim, "CLOCKSHIFT_FILE": self.clock_file(i)})
        return Replica(i, port, source_ip, etcd_proxies, remote_proxies, front, env,
                       os.path.join(self.work_dir, f"replica-{i}.log"))

    # ------------------------------------------------------------ observation

    def replica_of_peer(self, peer: str) -> str:
        for r in self.replicas:
            if f":{r.source_ip}:" in f":{peer}":
                return r.name
        return peer or "?"

    def client(self, timeout: float = 2.0) -> SupervisorClient:
        return SupervisorClient([r.front.endpoint for r in self.replicas], timeout=timeout)

    def leader(self) -> Replica | None:
        """The replica that says it leads (asked directly, not through the proxies)."""
        for r in self.replicas:
            if not r.running or r.paused:
                continue
            if says_it_leads(r.addr):
                return r
        return None

    def clock_file(self, replica: int) -> str:
        return os.path.join(self.work_dir, f"clock-offset-ms.r{replica}")

    def set_clock_offset(self, replica: int, ms: int) -> None:
        """Replica `replica`'s wall clock runs `ms` ahead (behind, when negative) from now on."""
        path = self.clock_file(replica)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{int(ms)}\n")
        os.replace(tmp, path)

    def live_peers(self) -> None:
        """Tell the Selector which datanodes are alive (a dead one is no target)."""
        self.selector.candidates = [pb.Peer(id=d, addr=f"127.0.0.1:{41000 + d}")
                                    for d, dn in self.datanodes.items() if dn.died_at is None]

    def kill_datanode(self, d: int) -> None:
        dn = self.datanodes[d]
        dn.beater.stop()
        dn.died_at = time.monotonic()
        self.live_peers()

    # ------------------------------------------------------------ heal and teardown

    def heal(self) -> None:
        for p in self.proxies:
            p.heal()
        self.migration.clear_faults()
        self.migration.slow_s = 0.0
        self.selector.lie = ""
        for i in range(len(self.replicas)):
            self.set_clock_offset(i, 0)
        self.etcd.heal()
        for r in self.replicas:
            r.resume()
            if not r.running:
                r.start()

    def close(self) -> None:
        for dn in self.datanodes.values():
            if dn.beater is not None and dn.died_at is None:
                dn.beater.stop(2)
        for r in self.replicas:
            try:
                r.stop()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        for fake in (self.migration, self.selector, self.lookup):
            if fake is not None:
                fake.stop()
        for p in self.proxies:
            p.stop()
        if self.etcd is not None:
            self.etcd.stop()
