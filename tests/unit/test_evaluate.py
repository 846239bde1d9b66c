"""`supervisor-service evaluate`: traces, the simulation's scoring, the report and the command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from supervisor_service import cli
from supervisor_service import evaluate as ev
from supervisor_service.app.settings import Settings

CFG = ev.TraceConfig(datanodes=6, regions=4, hours=1.0, seed=7)


def run(kind: str, *, guards: bool = True, cfg: ev.TraceConfig = CFG, **overrides) -> ev.RunResult:
    settings = Settings(**overrides)
    return ev.Simulation(ev.generate(kind, cfg), ev.variant_of(settings, guards=guards)).run()


class TestTraces:
    def test_the_same_seed_gives_the_same_trace_and_another_seed_another(self):
        a, b = ev.generate("mixed", CFG), ev.generate("mixed", CFG)
        assert a.arrivals == b.arrivals and a.down == b.down
        c = ev.generate("mixed", ev.TraceConfig(datanodes=6, regions=4, seed=8))
        assert c.arrivals != a.arrivals

    def test_steady_heartbeats_arrive_every_interval_with_jitter(self):
        trace = ev.generate("steady", CFG)
        times = [t for t, d in trace.arrivals if d == 1]
        gaps = np.diff(times)
        assert abs(gaps.mean() - CFG.interval_ms) < 50
        assert 0 < gaps.std() < 0.1 * CFG.interval_ms
        assert trace.no_failover_expected and not trace.down

    def test_a_crashed_datanode_sends_nothing_after_its_crash(self):
        trace = ev.generate("crashes", CFG)
        assert trace.down
        for d, windows in trace.down.items():
            (start, end), = windows
            assert end == ev.NEVER
            assert max(t for t, n in trace.arrivals if n == d) < start + 100  # in flight at most

    def test_arrivals_during_a_supervisor_stall_are_stamped_after_it(self):
        trace = ev.generate("supervisor_stalls", CFG)
        assert trace.stalls
        for t, _ in trace.arrivals:
            assert ev.inside(trace.stalls, t) is None

    def test_every_kind_has_a_description(self):
        for kind, (_, _, description) in ev.TRACE_KINDS.items():
            assert description and ev.generate(kind, CFG).description == description


class TestScoring:
    def test_steady_heartbeats_fail_nothing_over(self):
        r = run("steady")
        assert (r.failovers, r.mistakes, r.crashes) == (0, 0, 0)
        assert r.query_accuracy == 1.0 and r.live_ticks > 0

    def test_every_crash_is_failed_over_when_the_phi_math_says(self):
        r = run("crashes")
        assert r.crashes >= 1 and r.missed == 0 and r.mistakes == 0
        assert len(r.detection_ms) == r.crashes
        # phi crosses 8 about 3.6 std past mean + pause (3 s + 10 s) after the last heartbeat, which
        # was up to one interval before the crash; then the next tick and two 10 ms calls.
        for t in r.detection_ms:
            assert 10_000 < t < 15_500

    def test_a_smaller_acceptable_pause_detects_sooner(self):
        slow, fast = run("crashes"), run("crashes", acceptable_heartbeat_pause_ms=3000)
        assert max(fast.detection_ms) < min(slow.detection_ms) - 5000

    @pytest.mark.parametrize("kind", ["partition", "supervisor_stalls"])
    def test_the_guards_stop_failovers_of_datanodes_that_are_not_gone(self, kind):
        off = run(kind, guards=False)
        assert off.mistakes > 0 and off.mistakes == off.failovers, "the trace must provoke the detector"
        assert off.wrong_regions > 0
        on = run(kind)
        assert (on.failovers, on.mistakes, on.wrong_regions) == (0, 0, 0)

    def test_long_datanode_pauses_are_convicted_and_counted_as_mistakes(self):
        r = run("long_pauses")
        assert r.mistakes > 0 and r.mistake_rate == r.mistakes / (CFG.datanodes * CFG.hours)
        assert r.query_accuracy < 1.0

    def test_flap_damping_fails_over_a_flapping_datanode_less_often(self):
        cfg = ev.TraceConfig(datanodes=6, regions=4, hours=2.0, seed=3)
        on, off = run("flapping", cfg=cfg), run("flapping", guards=False, cfg=cfg)
        assert off.failovers == off.crashes > 2
        assert on.failovers < off.failovers
        assert on.mistakes == off.mistakes == 0

    def test_failover_moves_regions_to_the_target(self):
        sim = ev.Simulation(ev.generate("crashes", CFG), ev.variant_of(Settings()))
        sim.run()
        (victim, _), = [(d, w) for d, w in sim.trace.down.items()]
        assert sim.holding[victim].size == 0
        held = np.concatenate(list(sim.holding.values()))
        assert np.array_equal(np.sort(held), np.sort(np.concatenate(list(sim.trace.regions.values()))))

    def test_the_replay_runs_the_runtimes_consumer_and_effect_runner(self):
        """What is evaluated is what runs: every event passes the consumer, every call the effect runner."""
        sim = ev.Simulation(ev.generate("crashes", CFG), ev.variant_of(Settings()))
        r = sim.run()
        sample = sim.metrics.registry.get_sample_value
        assert sample("supervisor_events_total", {"type": "Tick"}) == CFG.duration_ms // 1000 - 1
        assert sample("supervisor_events_total", {"type": "Heartbeat"}) > 0
        submitted = sample("supervisor_remote_call_duration_seconds_count",
                           {"service": "RegionMigration", "method": "SubmitRegionMigration"})
        assert submitted == sample("supervisor_events_total", {"type": "SubmissionDone"}) >= r.failovers > 0


class TestRecordedTraces:
    def write(self, path: Path, rows: list[str]) -> Path:
        path.write_text("\n".join(rows) + "\n")
        return path

    def test_a_datanode_that_stops_is_failed_over_and_the_others_are_not(self, tmp_path):
        rows = ["datanode_id,region_id,timestamp_ms"]
        for t in range(0, 600_000, 3000):
            for d in (1, 2, 3, 4):
                if d == 4 and t > 300_000:
                    continue  # datanode 4 stops after five minutes
                rows += [f"{d},{d * 100 + r},{1_700_000_000_000 + t + d}" for r in range(3)]
        trace = ev.load_csv(self.write(tmp_path / "recorded.csv", rows))
        assert trace.datanodes == 4 and trace.recorded is not None
        assert list(trace.down) == [4]
        r = ev.Simulation(trace, ev.variant_of(Settings())).run()
        assert (r.crashes, r.mistakes, r.failovers) == (1, 0, 1)
        assert 10_000 < r.detection_ms[0] < 20_000

    @pytest.mark.parametrize(
        "rows, message",
        [
            (["1,2,3", "1,x,4"], ":2: expected datanode_id,region_id,timestamp_ms"),
            (["1,2,-3"], "non-negative"),
            (["datanode_id,region_id,timestamp_ms"], "no heartbeat rows"),
        ],
    )
    def test_bad_rows_are_named(self, tmp_path, rows, message):
        with pytest.raises(ev.TraceError, match=message):
            ev.load_csv(self.write(tmp_path / "bad.csv", rows))


class TestCommand:
    ARGS = ["evaluate", "--quick", "--datanodes", "6", "--regions", "4", "--processes", "1"]

    def test_writes_the_report_and_the_plot_and_passes_its_checks(self, tmp_path, capsys):
        assert cli.main([*self.ARGS, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        report = (tmp_path / "detection-quality.md").read_text()
        assert "| partition |" in report and "## Sweep" in report
        assert "FAIL" not in report and report.count("**PASS**") == 3
        assert "![detection time against mistake rate](detection-quality.png)" in report
        assert (tmp_path / "detection-quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "wrote" in out and "| phi threshold |" in out

    def test_a_failed_check_exits_1(self, tmp_path, monkeypatch, capsys):
        monkeypatch.setenv("SUPERVISOR_GUARDS_ENABLED", "false")
        one_hour_one_point = ["--datanodes", "6", "--regions", "4", "--processes", "1", "--seed", "7",
                              "--thresholds", "8", "--pauses", "10"]
        assert cli.main(["evaluate", *one_hour_one_point, "--out", str(tmp_path)]) == 1
        assert "**FAIL** no failover where no datanode is gone" in capsys.readouterr().out

    @pytest.mark.parametrize(
        "extra, message",
        [
            (["--thresholds", "8,x"], "--thresholds: expected comma-separated numbers"),
            (["--pauses", "-1"], "--pauses: expected positive numbers"),
            (["--datanodes", "2"], "--datanodes must be at least 3"),
            (["--trace", "/nonexistent/trace.csv"], "No such file"),
        ],
    )
    def test_usage_errors_are_one_line(self, tmp_path, capsys, extra, message):
        assert cli.main([*self.ARGS, "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
