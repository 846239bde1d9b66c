"""deploy/prometheus/alerts.yml: promtool checks the rules and runs alerts_test.yml; every alert has a
`for:`, a severity, a summary and a runbook paragraph in the README, and a unit test where it fires
and one where it stays silent; every metric a rule names is one the service exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from tests.support.servers import require_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
SEVERITIES = {"critical", "warning", "info"}


def _alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = require_binary("promtool", "prometheus")
    return subprocess.run([promtool, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules():
    done = _promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    done = _promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_test_fails_when_a_rule_breaks(tmp_path):
    """The unit tests can fail: the same tests against rules whose thresholds are off do."""
    broken = RULES.read_text().replace("> 0.8", "> 0.95").replace("> 300", "> 3000")
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text(RULE_TESTS.read_text())
    promtool = require_binary("promtool", "prometheus")
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "RegionSupervisorEventQueueSaturated" in done.stdout + done.stderr
    assert "RegionSupervisorDatanodeSilentNotFailedOver" in done.stdout + done.stderr


def test_every_alert_has_for_severity_summary_and_a_runbook_paragraph():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Alerts and runbooks", 1)[1].split("\n## ", 1)[0]
    for rule in _alerts():
        name = rule["alert"]
        assert name.startswith("RegionSupervisor"), name
        assert "for" in rule, name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["runbook"] == f"README.md, Alerts and runbooks: {name}", name
        assert f"**{name}**" in section, f"README.md's 'Alerts and runbooks' has no paragraph for {name}"


def test_every_alert_is_tested_firing_and_silent():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired, silent = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names <= fired, f"never seen firing: {sorted(names - fired)}"
    assert names <= silent, f"never seen silent: {sorted(names - silent)}"


def test_every_metric_the_rules_name_is_exported():
    registry = CollectorRegistry()
    Metrics(registry)
    exported = set()
    for family in registry.collect():
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
    families = {f.name for f in registry.collect()}
    for rule in _alerts():
        for name in re.findall(r"\b((?:supervisor|grpc_server)_[a-z_]+)", rule["expr"]):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert name in exported or base in families, f"{rule['alert']} names {name}, which nothing exports"
