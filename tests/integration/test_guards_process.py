"""The guards on the real service: `supervisor-service serve` in child processes, real datanode streams.

Few and bounded: the services start with a fast detector (heartbeats every
0.3 s, 3 s acceptable pause, 200 ms ticks) and the embedded dry-run
RegionMigration, whose journal (`SupervisorClient.journal()`) lists every
failover the service decided. Where a test needs a control (the same
scenario with the guard off, which must fail over, so the test can fail),
the services run side by side and share the scenario's wall time.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from supervisor_service.proto import pb, pb_grpc
from tests.support.servers import ServiceProcess, free_port
from tests.support.waiting import wait_ticks

pytestmark = pytest.mark.realtime

DATANODES = tuple(range(1, 11))
HEARTBEAT_S = 0.3
STALL_S = 20.0  # a stall far past the 3 s pause: every detector crosses during it
FAST = {
    "SUPERVISOR_STORE": "memory",
    "SUPERVISOR_TICK_INTERVAL_MS": "200",
    "SUPERVISOR_ACCEPTABLE_HEARTBEAT_PAUSE_MS": "3000",
    "SUPERVISOR_FIRST_HEARTBEAT_ESTIMATE_MS": "500",
    "SUPERVISOR_WARMUP_GRACE_MS": "0",
    "SUPERVISOR_MAX_LOCAL_PAUSE_MS": "2000",
    "SUPERVISOR_LOG_LEVEL": "info",
}
DETECTION_S = 3.0 + 0.3 + 1.0  # acceptable pause + interval + margin for phi to reach 8


def regions_of(d: int) -> list[int]:
    return [(d << 32) | i for i in range(2)]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """Services and datanode heartbeat streams of one test; everything is stopped at teardown."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.services: list[ServiceProcess] = []
        self.streams: list[DatanodeHeartbeater] = []
        self.clients: list[SupervisorClient] = []

    def service(self, name: str, env: dict[str, str], *, metrics: bool = False) -> ServiceProcess:
        full = {**FAST, "SUPERVISOR_DATA_DIR": str(self.tmp_path / name), **env}
        port = free_port() if metrics else None
        if port:
            full["SUPERVISOR_METRICS_ADDR"] = f"127.0.0.1:{port}"
        svc = ServiceProcess(full, str(self.tmp_path / f"{name}.log"))
        svc.name, svc.metrics_port = name, port
        self.services.append(svc)
        return svc

    def ready(self) -> None:
        for svc in self.services:
            svc.wait_serving()
            client = self.client(svc)
            wait_until(lambda: client.holds().is_leader, 20, f"{svc.name} to lead")

    def client(self, svc: ServiceProcess) -> SupervisorClient:
        client = SupervisorClient(svc.addr, timeout=10)
        self.clients.append(client)
        return client

    def datanodes(self, svc: ServiceProcess, ids=DATANODES) -> dict[int, DatanodeHeartbeater]:
        """One heartbeat stream per datanode; `accepted[d]` holds the receipt times of accepted heartbeats."""
        svc.accepted = defaultdict(list)

        def record(_addr, response, store=svc.accepted):
            if not response.rejected:
                store[response.datanode_id].append(time.monotonic())

        out = {}
        for d in ids:
            hb = DatanodeHeartbeater(
                svc.addr, d, lambda d=d: regions_of(d), interval_s=HEARTBEAT_S,
                peer_addr=f"127.0.0.1:{20_000 + d}", on_response=record,
            )
            self.streams.append(hb.start())
            out[d] = hb
        wait_until(lambda: all(len(svc.accepted[d]) >= 5 for d in ids), 20, f"heartbeats accepted by {svc.name}")
        return out

    def close(self) -> None:
        for hb in self.streams:
            hb._stop.set()  # stop them all at once, then wait
        for hb in self.streams:
            hb.stop()
        for client in self.clients:
            client.close()
        for svc in self.services:
            svc.kill(signal.SIGCONT)  # a test that failed mid-stall leaves it stopped
            svc.stop()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def journal(client: SupervisorClient) -> list:
    embedded, entries = client.journal(limit=1000)
    assert embedded, "the tests rely on the embedded dry-run RegionMigration"
    return entries


def failed_over(client: SupervisorClient) -> list[int]:
    return sorted({e.from_peer.id for e in journal(client)})


def scrape(svc: ServiceProcess) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def cli(svc: ServiceProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "supervisor_service.cli", *args, "--addr", svc.addr],
        capture_output=True, text=True, timeout=30,
    )


# ---------------------------------------------------------------- local pause


def test_sigstop_of_the_supervisor_fails_nothing_over(cluster):
    """SIGSTOP the service for 20 s while ten datanodes keep streaming; SIGCONT: zero failovers.

    Other guards that could mask a broken local-pause guard are off in every
    service here: mass failure (all ten look failed after the stall) and the
    target hold-down (it would exclude every failed datanode as a target).
    The selector considers every datanode heard within a minute.

    - `server`: the default server clock (heartbeats stamped at receipt).
    - `client` and `control`: the datanodes' own timestamps, so the heartbeat
      each stream had in flight during the stall carries its pre-stall time;
      the convictions then do not depend on which of the tick and the first
      heartbeats is processed first. `control` has the guard off
      (max_local_pause_ms=0) and must fail over: it shows the stall is one
      that convicts without the guard.
    """
    common = {
        "SUPERVISOR_MAX_FAILED_DATANODE_FRACTION": "1",
        "SUPERVISOR_TARGET_HOLDDOWN_MS": "0",
        "SUPERVISOR_SELECTOR_ALIVE_WINDOW_MS": "60000",
    }
    server = cluster.service("server", common, metrics=True)
    # The client-clock services trust every stamp, so that what was in flight during the stall keeps
    # its pre-stall time (by default a stamp that far behind is applied at its receipt time).
    client = {**common, "SUPERVISOR_HEARTBEAT_CLOCK": "client", "SUPERVISOR_MAX_CLIENT_CLOCK_SKEW_MS": "0"}
    client_clock = cluster.service("client", client, metrics=True)
    control = cluster.service("control", {**client, "SUPERVISOR_MAX_LOCAL_PAUSE_MS": "0"})
    services = (server, client_clock, control)
    cluster.ready()
    clients = {svc.name: cluster.client(svc) for svc in services}
    for svc in services:
        cluster.datanodes(svc)
    wait_ticks(services, 10, 30)  # some history at the 0.3 s interval: ten ticks (2 s) of each service
    assert all(journal(c) == [] for c in clients.values()), "a steady cluster fails nothing over"

    for svc in services:
        svc.kill(signal.SIGSTOP)
    time.sleep(STALL_S)
    for svc in services:
        svc.kill(signal.SIGCONT)
    resumed = time.monotonic()
    # The local-pause hold (5 s by default) and more than one detection period after it, in ticks handled.
    wait_ticks(services, math.ceil((5 + DETECTION_S + 1) * 1000 / int(FAST["SUPERVISOR_TICK_INTERVAL_MS"])) + 1, 60)

    # The control proves the stall convicts without the guard.
    assert failed_over(clients["control"]), f"control: no failover after the stall\n{control.log_tail()}"
    for svc in (server, client_clock):
        entries = journal(clients[svc.name])
        assert entries == [], f"{svc.name}: failovers after a supervisor stall: {entries}\n{svc.log_tail()}"
        # The streams went on: every datanode was heard after the stall, and is alive now.
        assert all(svc.accepted[d] and svc.accepted[d][-1] > resumed for d in DATANODES), svc.name
        header, rows = clients[svc.name].dump()
        assert len(rows) == 20 and all(r.available for r in rows), svc.name
        assert header.holds == [], f"{svc.name}: still held {list(header.holds)}"
    # With the client clock, the first tick after the stall saw all ten failed: the guard is what held them.
    metrics = scrape(client_clock)
    assert metrics[("supervisor_failover_skipped_regions_total", (("reason", "local_pause"),))] >= 20
    assert metrics[("supervisor_failover_hold", (("reason", "local_pause"),))] == 0
    with open(client_clock.log_path) as f:
        assert '"failover_held_local_pause"' in f.read()


# ---------------------------------------------------------------- mass failure


def test_mass_failure_holds_and_one_failure_fails_over(cluster):
    """Cut 6 of 10 datanodes at once: no failover, `hold status` says mass_failure, `hold release` lets it go.
    On a fresh service, cut 1 of 10: it is failed over."""
    # Silence counts towards the hold before conviction: it must be shorter than this fast detector's
    # detection period (~3.8 s); the default (5 s) suits the default 10 s acceptable pause.
    quick = {"SUPERVISOR_MASS_FAILURE_SILENCE_MS": "1500"}
    mass = cluster.service("mass", quick, metrics=True)
    single = cluster.service("single", quick)
    cluster.ready()
    mass_client, single_client = cluster.client(mass), cluster.client(single)
    mass_streams = cluster.datanodes(mass)
    single_streams = cluster.datanodes(single)
    wait_ticks((mass, single), 10, 30)
    assert journal(mass_client) == [] and journal(single_client) == []

    cut = (1, 2, 3, 4, 5, 6)
    for d in cut:
        mass_streams[d]._stop.set()  # all six at once
    single_streams[7].stop()
    for d in cut:
        mass_streams[d].stop()

    # One of ten: failed over within a detection period or so.
    wait_until(lambda: failed_over(single_client) == [7], 3 * DETECTION_S, "datanode 7 failed over")
    assert "mass_failure" not in single_client.holds().holds

    # Six of ten: held.
    wait_until(lambda: "mass_failure" in mass_client.holds().holds, 3 * DETECTION_S, "a mass-failure hold")
    wait_ticks(mass, 10, 30)
    before_release = journal(mass_client)
    status = cli(mass, "hold", "status")
    assert status.returncode == 0, status.stderr
    assert "failover held: mass_failure" in status.stdout
    assert "failed datanode fraction 0.60" in status.stdout
    metrics = scrape(mass)
    assert metrics[("supervisor_failover_hold", (("reason", "mass_failure"),))] == 1
    assert metrics[("supervisor_failed_datanode_fraction", ())] == pytest.approx(0.6)

    # An operator releases it: the six are failed over.
    release = cli(mass, "hold", "release")
    assert release.returncode == 0, release.stderr
    assert "mass-failure hold released" in release.stdout
    wait_until(lambda: set(failed_over(mass_client)) >= set(cut), 10, "the six failed over after the release")
    assert set(failed_over(mass_client)) <= set(cut)

    # Checked last, so the rest of the behaviour above is reported even when this fails.
    assert before_release == [], (
        "cut 6 of 10 at once: failovers before the operator released the hold: "
        f"{sorted({e.from_peer.id for e in before_release})}"
    )


# ---------------------------------------------------------------- stale epochs


@pytest.mark.parametrize("reject", [True, False], ids=["reject_stale_epochs", "off"])
def test_heartbeat_from_an_older_epoch_is_rejected_and_counted(cluster, reject):
    svc = cluster.service("epochs", {"SUPERVISOR_REJECT_STALE_EPOCHS": str(reject).lower()}, metrics=True)
    cluster.ready()
    sent = [5, 3, 6, 5, 0, 6]  # node_epoch of successive heartbeats of datanode 7 on one stream
    requests = [
        pb.HeartbeatRequest(datanode_id=7, region_ids=regions_of(7), node_epoch=e, peer_addr="127.0.0.1:20007")
        for e in sent
    ]
    with grpc.insecure_channel(svc.addr) as channel:
        responses = list(pb_grpc.RegionSupervisorStub(channel).SendHeartbeat(iter(requests), timeout=20))
    assert len(responses) == len(sent)
    rejected = [r.rejected for r in responses]
    metrics = scrape(svc)
    stale = metrics.get(("supervisor_heartbeats_total", (("outcome", "rejected_stale_epoch"),)), 0.0)
    if not reject:
        assert rejected == [False] * len(sent)
        assert stale == 0
        return
    # 3 after 5, and 5 after 6, are from an earlier life of the datanode; 0 means "unknown" and passes.
    assert rejected == [False, True, False, True, False, False]
    assert "node_epoch 3 is older than 5" in responses[1].reason
    assert "node_epoch 5 is older than 6" in responses[3].reason
    assert stale == 2
    assert metrics[("supervisor_heartbeats_total", (("outcome", "accepted"),))] == 4
