"""The per-message heartbeat counters (`supervisor_heartbeats`, `supervisor_heartbeat_regions`)
export exactly what a prometheus_client `Counter` exports, and a scrape from another thread while
they are counted sees every series whole and never going back."""

from __future__ import annotations

import re
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from supervisor_service.app.metrics import Metrics

NAMES = {
    "heartbeats": ("supervisor_heartbeats", "Heartbeat messages received, by outcome."),
    "heartbeat_regions": ("supervisor_heartbeat_regions", "Region entries in heartbeat messages, by outcome."),
}


def _without_created_times(text: bytes) -> bytes:
    return re.sub(rb"(_created(?:\{[^}]*\})?) [0-9.e+]+", rb"\1 T", text)


@pytest.mark.parametrize("attr", sorted(NAMES))
def test_exported_as_a_prometheus_counter(attr):
    name, doc = NAMES[attr]
    ours_registry = CollectorRegistry()
    ours = getattr(Metrics(ours_registry), attr)
    theirs_registry = CollectorRegistry()
    theirs = Counter(name, doc, ["outcome"], registry=theirs_registry)
    for counter in (ours, theirs):
        counter.labels(outcome="accepted").inc()
        counter.labels(outcome="accepted").inc(1000)
        counter.labels("rejected_invalid").inc(3)
        counter.labels(outcome="rejected_not_leader")  # named: exported at 0
    alone = CollectorRegistry()  # the exposition of ours alone, to compare whole
    alone.register(ours)
    assert _without_created_times(generate_latest(alone)) == _without_created_times(generate_latest(theirs_registry))
    assert _without_created_times(generate_openmetrics(alone)) == _without_created_times(
        generate_openmetrics(theirs_registry))
    ours_family = [m for m in ours_registry.collect() if m.name == name]
    theirs_family = [m for m in theirs_registry.collect() if m.name == name]
    assert [(m.name, m.type, m.documentation) for m in ours_family] == [
        (m.name, m.type, m.documentation) for m in theirs_family]
    assert [(s.name, s.labels, s.value) for s in ours_family[0].samples if not s.name.endswith("_created")] == [
        (s.name, s.labels, s.value) for s in theirs_family[0].samples if not s.name.endswith("_created")]
    assert {s.name for s in ours_family[0].samples} == {f"{name}_total", f"{name}_created"}
    assert ours_registry.get_sample_value(f"{name}_total", {"outcome": "accepted"}) == 1001.0
    assert ours_registry.get_sample_value(f"{name}_total", {"outcome": "rejected_not_leader"}) == 0.0
    assert ours_registry.get_sample_value(f"{name}_total", {"outcome": "never_named"}) is None
    assert f'{name}_total{{outcome="accepted"}} 1001.0' in generate_latest(ours_registry).decode()


def test_same_errors_as_a_counter():
    counter = Metrics(CollectorRegistry()).heartbeats
    with pytest.raises(ValueError):
        counter.labels(outcome="accepted").inc(-1)
    with pytest.raises(ValueError):
        counter.labels(reason="accepted")
    with pytest.raises(ValueError):
        counter.labels("a", "b")
    with pytest.raises(ValueError):
        counter.labels("a", outcome="a")
    with pytest.raises(ValueError):  # the name is taken: a second registration is refused
        Metrics(counter_registry := CollectorRegistry())
        Counter("supervisor_heartbeats", "again", ["outcome"], registry=counter_registry)


def test_a_scrape_while_counting_sees_each_series_whole_and_rising():
    """One writer thread adds to new and old label sets while another scrapes: no scrape fails (a
    label set added during a scrape), no value goes back, and the last scrape has every increment."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    outcomes = [f"outcome_{i}" for i in range(50)]
    rounds = 2000
    done = threading.Event()
    errors: list[BaseException] = []
    seen: dict[str, float] = {}

    def scrape() -> None:
        try:
            while not done.is_set():
                for family in registry.collect():
                    if family.name != "supervisor_heartbeat_regions":
                        continue
                    for s in family.samples:
                        if s.name.endswith("_total"):
                            key = s.labels["outcome"]
                            assert s.value >= seen.get(key, 0.0), (key, s.value, seen.get(key))
                            seen[key] = s.value
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        for i in range(rounds):
            # A new label set every 40 rounds (dict growth during a scrape), then all of them again.
            for outcome in outcomes[: 1 + i // 40]:
                metrics.heartbeat_regions.labels(outcome=outcome).inc(7)
    finally:
        done.set()
        scraper.join(10)
    assert not errors, errors[0]
    for k, outcome in enumerate(outcomes):
        first_round = k * 40
        expected = 7 * (rounds - first_round)
        assert registry.get_sample_value("supervisor_heartbeat_regions_total", {"outcome": outcome}) == expected
