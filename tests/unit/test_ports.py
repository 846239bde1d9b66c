"""core.ports: the core is typed against CoreMetrics, which app.metrics.Metrics satisfies structurally."""

from __future__ import annotations

import ast
import pathlib

from prometheus_client import CollectorRegistry

from supervisor_service import core
from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    BecomeLeader,
    FailoverPolicy,
    Guards,
    GuardSettings,
    Heartbeat,
    PhiAccrualOptions,
    SetMaintenance,
    StoredState,
    Supervisor,
    Tick,
    as_region_array,
)
from tests.support.core_fakes import FakeMetrics, core_metric_names

# What the core calls on each kind of member.
_KINDS = {"Gauge": ("set",), "Counter": ("inc",), "Distribution": ("set",), "AgeSummary": ("set",)}


def _member_kinds() -> dict[str, str]:
    """CoreMetrics member -> its declared return type, as written in ports.py."""
    tree = ast.parse(pathlib.Path(core.ports.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CoreMetrics")
    return {f.name: ast.unparse(f.returns) for f in cls.body if isinstance(f, ast.FunctionDef)}


def test_metrics_has_every_member_the_core_uses():
    metrics = Metrics(CollectorRegistry())
    kinds = _member_kinds()
    assert sorted(kinds) == core_metric_names()
    for name, kind in kinds.items():
        member = getattr(metrics, name)
        if kind.startswith("Labelled["):
            assert callable(member.labels), name
            kind = kind.removeprefix("Labelled[").removesuffix("]")
            labelnames = member._labelnames
            member = member.labels(**dict.fromkeys(labelnames, "x"))
        for method in _KINDS[kind]:
            assert callable(getattr(member, method)), (name, method)


def test_the_core_imports_no_metrics_library_and_nothing_outside_core():
    for path in pathlib.Path(core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("prometheus_client"), path.name
                if name.startswith("supervisor_service"):
                    assert name.startswith("supervisor_service.core"), (path.name, name)


def test_the_supervisor_runs_on_any_object_with_the_members_of_core_metrics():
    metrics = FakeMetrics()
    sup = Supervisor(PhiAccrualOptions(), metrics, FailoverPolicy(warmup_grace_ms=0), is_leader=False,
                     guards=Guards(GuardSettings()))
    sup.handle(BecomeLeader(2, StoredState(registry={1: as_region_array([10, 11])})), 0)
    sup.handle(SetMaintenance(True), 0)
    sup.handle(Heartbeat(1, as_region_array([10, 11]), 1000), 1000)
    sup.handle(Tick(), 60_000)
    assert metrics.leader.value == 1
    assert metrics.maintenance.value == 1
    assert metrics.detectors.value == 2
    assert metrics.failover_hold.child(reason="maintenance") == 1
    assert metrics.failover_skipped.child(reason="maintenance") == 2
