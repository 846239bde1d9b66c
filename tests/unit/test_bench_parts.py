"""The benchmark's parts at a tiny size: the curve's histories and rows, the changing heartbeat stream,
the profile's summary, the verdict on the in-process rows. No timing is asserted."""

from __future__ import annotations

import numpy as np

import supervisor_service.bench.curve as curve
from supervisor_service.bench.curve import (
    CURVE_COLUMNS,
    CurveRow,
    Point,
    build,
    in_process_row,
    linearity_notes,
    measure,
    points_of,
)
from supervisor_service.bench.loadgen import ChangingHeartbeats, heartbeats_of, peer_addr_of, region_ids_of
from supervisor_service.bench.profile import parse_raw, summarize
from supervisor_service.bench.rows import Config, render
from supervisor_service.bench.verdict import targets
from supervisor_service.core import DetectorTable, PhiAccrualOptions
from supervisor_service.proto import pb


def _histories(point: Point) -> tuple[DetectorTable, int, set[tuple[float, ...]]]:
    """The table built for `point`, the time its datanodes last heartbeat, and the distinct phi curves
    (phi at each second of silence up to a minute) of datanode 1's regions."""
    table = DetectorTable(PhiAccrualOptions())
    built, end_ms = build(table, point)
    assert built == point.datanodes
    regions = table.regions_of(1)
    curves = [table.phis(1, regions, end_ms + s * 1000) for s in range(1, 61)]
    return table, end_ms, {tuple(c[int(r)] for c in curves) for r in regions}


def test_the_worst_case_gives_every_region_of_a_datanode_its_own_history():
    table, end_ms, curves = _histories(Point(3, 20, worst=True))
    assert len(table) == 60
    # Joined at different heartbeats: as many sample windows, so as many phi curves, as regions.
    assert len(curves) == 20
    assert not dict(table.failed(end_ms + 1000))


def test_the_best_case_gives_a_datanode_one_history():
    table, _, curves = _histories(Point(3, 20, worst=False))
    assert len(table) == 60
    assert len(curves) == 1


def test_a_budget_of_nothing_builds_one_datanode_and_says_so():
    result = measure(Point(4, 10, worst=True, budget_s=0.0, min_samples=5, min_rounds=1, min_ticks=2))
    summary = result.summary()
    assert summary["datanodes"] == 1 and summary["detectors"] == 10 and not summary["complete"]
    assert "budget out, 1 of 4 datanodes" in CurveRow(summary).cells()["note"]


def test_a_point_measures_every_steady_heartbeat_and_tick():
    point = Point(2, 30, worst=True, min_samples=10, min_rounds=2, min_ticks=7)
    summary = measure(point).summary()
    assert summary["complete"] and summary["detectors"] == 60
    assert summary["steady_rounds"] == 5  # ceil(10 samples / 2 datanodes)
    assert summary["apply_samples"] == 10
    assert summary["ticks"] >= 7
    assert summary["apply_p50_us"] > 0 and summary["tick_p50_ms"] > 0 and summary["rss_mib"] > 0
    table = render([CurveRow(summary)], CURVE_COLUMNS)
    assert table.splitlines()[0].startswith("| case")
    assert all(title in table for _, title in CURVE_COLUMNS)
    row = in_process_row(summary)
    assert row.scenario.startswith("worst case, in-process") and row.detectors == 60
    assert "per 30-region heartbeat" in row.result


def test_the_curve_has_a_best_and_a_worst_point_per_size_and_notes_their_growth():
    points = points_of((10_000, 3_000_000), regions=1000)
    assert [(p.datanodes, p.worst) for p in points] == [(10, False), (10, True), (3000, False), (3000, True)]
    assert [p.budget_s for p in points] == [60.0, 60.0, 600.0, 600.0]
    small = {"point": {"worst": False}, "complete": True, "detectors": 100, "tick_p50_ms": 1.0, "apply_p50_us": 2.0, "bytes_per_detector": 50.0}
    big = {"point": {"worst": False}, "complete": True, "detectors": 1000, "tick_p50_ms": 20.0, "apply_p50_us": 2.0, "bytes_per_detector": 40.0}
    (note,) = linearity_notes([small, big])
    assert "x10.0" in note and "tick x20.00" in note and "apply x1.00" in note
    assert "RSS over the empty service's x8.00" in note


def test_once_a_case_runs_out_of_budget_its_larger_points_are_skipped(monkeypatch):
    def fake(point):
        complete = not point.worst or point.datanodes == 1
        return {"point": vars(point), "datanodes": point.datanodes if complete else 1, "detectors": 1,
                "complete": complete}

    monkeypatch.setattr(curve, "run_point", fake)
    out = curve.run_curve(points_of((1000, 10_000, 100_000), regions=1000))
    assert [("skipped" in s, s["point"]["worst"]) for s in out] == [
        (False, False), (False, True), (False, False), (False, True), (False, False), (True, True)]
    assert out[-1]["error"] == "skipped: the 10,000-detector point built 1 datanodes in its 60 s"
    assert CurveRow(out[-1]).cells()["note"] == out[-1]["error"]


def test_the_worst_case_targets_read_the_in_process_rows():
    point = Point(1000, 1000, worst=True)
    summary = {"point": vars(point), "datanodes": 1000, "detectors": 1_000_000, "group_count": 0, "build_s": 1.0,
               "steady_rounds": 3, "apply_samples": 3000, "ticks": 10, "apply_p50_us": 40.0, "apply_p99_us": 90.0,
               "tick_p50_ms": 60.0, "tick_p99_ms": 70.0, "table_p50_ms": 30.0, "table_p99_ms": 35.0,
               "rss_mib": 400.0, "rss_peak_mib": 450.0, "bytes_per_detector": 300.0, "complete": True, "error": ""}
    found = {name: met for name, met, _ in targets([in_process_row(summary)], Config())}
    assert found["worst case 1,000 x 1,000: steady apply <= 50 us per 1,000-region heartbeat"] is True
    assert found["worst case 1,000 x 1,000: tick <= 50 ms"] is False
    assert found["worst case 1,000 x 1,000: RSS <= 512 MiB (the in-process table and supervisor)"] is True


def test_a_changing_stream_leaves_out_one_region_in_turn_and_puts_it_back():
    full = heartbeats_of(7, 5)
    stream = ChangingHeartbeats(full, 7, 5, every=3)
    sets, stamps = [], []
    for _ in range(14):
        message = pb.HeartbeatRequest.FromString(stream.next())
        sets.append(tuple(r & 0xFFFFFFFF for r in message.region_ids))
        stamps.append(message.timestamp_millis)
        assert message.datanode_id == 7 and message.node_epoch == full.node_epoch
        assert message.peer_addr == peer_addr_of(7)
    every = (0, 1, 2, 3, 4)
    assert sets[:2] == [every] * 2
    assert sets[2:5] == [(1, 2, 3, 4)] * 3  # the 3rd message changes the set: region 0 left out
    assert sets[5:8] == [every] * 3  # the 6th puts it back
    assert sets[8:11] == [(0, 2, 3, 4)] * 3  # the 9th leaves out the next one
    assert sets[11:] == [every] * 3
    assert all(s > 0 for s in stamps) and stamps == sorted(stamps)


def test_a_stamped_heartbeat_is_what_protobuf_itself_serializes():
    full = heartbeats_of(9, 4)
    raw = full.next()
    message = pb.HeartbeatRequest.FromString(raw)
    assert raw == pb.HeartbeatRequest(datanode_id=9, timestamp_millis=message.timestamp_millis,
                                       region_ids=region_ids_of(9, 4), peer_addr=peer_addr_of(9),
                                       node_epoch=full.node_epoch).SerializeToString()
    assert np.array_equal(np.asarray(message.region_ids, dtype=np.uint64) >> np.uint64(32), np.full(4, 9))


def test_the_profile_summary_folds_lines_into_functions_and_counts_by_thread():
    raw = "\n".join([
        "thread (11): bench-service;run (asyncio/events.py:80);apply (edge/server.py:10) 30",
        "thread (11): bench-service;run (asyncio/events.py:80);apply (edge/server.py:12) 10",
        "thread (12): supervisor;loop (runtime/loop.py:5);heartbeat (core/table.py:250) 60",
        "not a sample line",
    ])
    samples = parse_raw(raw)
    assert [(t, n) for t, _, n in samples] == [("bench-service", 30), ("bench-service", 10), ("supervisor", 60)]
    assert samples[0][1][-1] == "apply (edge/server.py)"
    text = summarize(samples, top=5)
    assert "100 samples (the thread holding the GIL)" in text
    assert " 60.0%  supervisor" in text and " 40.0%  bench-service" in text
    assert " 40.0%  apply (edge/server.py)  [bench-service]" in text
    assert " 40.0%  run (asyncio/events.py)" in text
