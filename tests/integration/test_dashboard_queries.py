"""Every PromQL expression of the Grafana dashboard and of the alert rules, run against a real
Prometheus that scrapes a running service under a little load (datanodes heartbeating, a hostile
heartbeat and request, a datanode that dies and is failed over through remote fakes).

Each must parse; each dashboard query returns data, except the few listed in `MAY_BE_EMPTY`
(error series that a healthy run never creates). Prometheus also loads alerts.yml and evaluates
it: every rule must evaluate without an error on the real series (a many-to-many match, say)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from supervisor_service.proto import pb, pb_grpc
from tests.support.datanodes import Cluster, dn_addr
from tests.support.fakes import FakePeerLookup, FakeRegionMigration, FakeSelector, peer
from tests.support.servers import free_port, require_binary, stop_process
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "region-supervisor.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
JOB = "region-supervisor"
# What the dashboard's variables become: Grafana's "All" (`allValue`) and a rate window that holds
# several scrapes at the test's 1 s interval.
VARIABLES = {"$job": ".+", "$instance": ".+", "$__rate_interval": "10s"}
# (panel title, refId) whose series exist only once something has gone wrong.
MAY_BE_EMPTY = {
    ("Failover errors by stage", "A"),
    ("Remote call errors", "A"),
    ("Store pending writes and errors", "B"),
    ("Events by type, and refused", "B"),
    ("Failed regions skipped by reason", "A"),
}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    return [(p["title"], t["refId"], t["expr"]) for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def _get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:  # a query that does not parse is a 400 with the reason
        return json.load(exc)


def _query(base: str, expr: str) -> dict:
    return _get(base, "/api/v1/query", query=expr)


def test_the_dashboard_is_importable_as_it_is():
    dashboard = _dashboard()
    assert dashboard["uid"] == "region-supervisor"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        # Every panel and query asks the chosen data source, none a data source of someone's Grafana.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("detectors", "streams", "heartbeats by outcome", "problems", "tick", "apply latency", "phi",
                  "failures detected", "failover regions by result", "holds", "in flight", "store", "leader"):
        assert topic in titles, topic


@pytest.fixture
def fakes():
    rm = FakeRegionMigration()
    sel = FakeSelector([peer(d, dn_addr(d)) for d in (1, 2, 3, 4)], per_call=True)
    lookup = FakePeerLookup({d: dn_addr(d) for d in (1, 2, 3, 4)})
    yield rm, sel, lookup
    for fake in (rm, sel, lookup):
        fake.stop()


def _load(svc, rm) -> Cluster:
    """Four datanodes, one hostile heartbeat, one request refused, a Dump; then datanode 4 dies and
    is failed over."""
    cluster = Cluster(svc.addresses.grpc, ids=(1, 2, 3, 4))
    cluster.warm_up()
    with grpc.insecure_channel(svc.addresses.grpc) as channel:
        stub = pb_grpc.RegionSupervisorStub(channel)
        bad = pb.HeartbeatRequest(datanode_id=9, region_ids=[9], peer_addr="not an address")
        assert "peer_addr" in next(stub.SendHeartbeat(iter([bad]))).reason
        with pytest.raises(grpc.RpcError):
            stub.RegisterDetectors(pb.RegisterDetectorsRequest(regions=[pb.DetectingRegion()] * 200_000))
        list(stub.Dump(pb.DumpRequest(page_size=2)))
    cluster.nodes[4].stop()
    wait_for(lambda: rm.attempts, timeout=20, message="the dead datanode was not failed over")
    return cluster


def test_every_dashboard_and_rule_expression_runs_against_a_real_prometheus(service, fakes, tmp_path):
    binary = require_binary("prometheus", "prometheus")
    rm, sel, lookup = fakes
    svc = service(
        metrics_addr="127.0.0.1:0", store="sqlite", data_dir=str(tmp_path / "data"),
        tick_interval_ms=100, acceptable_heartbeat_pause_ms=1000, min_std_deviation_ms=100,
        first_heartbeat_estimate_ms=200, region_migration_endpoint=rm.endpoint,
        selector_endpoint=sel.endpoint, peer_lookup_endpoint=lookup.endpoint,
        migration_status_poll_interval_ms=200,
    )
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [svc.addresses.metrics]}]}],
    }))
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    cluster = None
    try:
        def scraped() -> bool:
            assert proc.poll() is None, f"prometheus exited: {proc.stderr.read()[-2000:]}"
            try:
                return bool(_query(base, f'up{{job="{JOB}"}} == 1')["data"]["result"])
            except OSError:
                return False

        wait_for(scraped, timeout=60, interval=0.25, message="prometheus never scraped the service")
        cluster = _load(svc, rm)
        # Until the failover's counters are scraped and the rate windows (10 s) hold enough scrapes.
        def problems() -> tuple[list[str], list[str]]:
            empty, failed = [], []
            for title, ref, expr in _targets():
                answer = _query(base, _substitute(expr))
                if answer.get("status") != "success":
                    failed.append(f"{title} {ref}: {answer.get('error')}: {expr}")
                elif not answer["data"]["result"] and (title, ref) not in MAY_BE_EMPTY:
                    empty.append(f"{title} {ref}: {expr}")
            return empty, failed

        deadline = time.monotonic() + 40
        while True:
            empty, failed = problems()
            assert not failed, "dashboard queries that Prometheus refuses:\n" + "\n".join(failed)
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert not empty, "dashboard queries without data under load:\n" + "\n".join(empty)

        # The variables' queries (Grafana's label_values) as the series API answers them.
        for variable in _dashboard()["templating"]["list"]:
            found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable.get("definition", ""))
            if found:
                selector, label = _substitute(found.group(1)), found.group(2)
                values = _get(base, f"/api/v1/label/{label}/values", **{"match[]": selector})
                assert values["status"] == "success" and values["data"], variable["name"]

        # Every rule's expression parses and runs, and Prometheus evaluates every rule without error.
        rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        for rule in rules:
            answer = _query(base, rule["expr"])
            assert answer.get("status") == "success", (rule["alert"], answer.get("error"))

        def evaluated() -> list[dict]:
            groups = _get(base, "/api/v1/rules")["data"]["groups"]
            loaded = [r for g in groups for r in g["rules"]]
            never = "0001-01-01"  # the lastEvaluation of a rule not evaluated yet
            done = len(loaded) == len(rules) and all(not r["lastEvaluation"].startswith(never) for r in loaded)
            return loaded if done else []

        loaded = wait_for(evaluated, timeout=20, interval=0.5, message="prometheus did not evaluate every rule")
        errors = [f"{r['name']}: {r.get('lastError')}" for r in loaded if r["health"] != "ok"]
        assert not errors, "rules that fail to evaluate:\n" + "\n".join(errors)
        # A healthy cluster under this load raises no critical alert (a dead datanode is failed over).
        firing = [r["name"] for r in loaded if r["state"] == "firing" and r["labels"].get("severity") == "critical"]
        assert not firing, firing
    finally:
        if cluster is not None:
            cluster.close()
        stop_process(proc)
