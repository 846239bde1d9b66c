"""The detection-quality report: `Report` (what `evaluate` found), its markdown, the plot, `write_report`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from supervisor_service.evaluate.scoring import BURST_MS, RunResult, Summary, fmt_seconds, td_seconds
from supervisor_service.evaluate.simulation import CALL_LATENCY_MS, MIGRATION_MS, Point
from supervisor_service.evaluate.traces import Trace, TraceConfig


@dataclass(slots=True)
class Report:
    """Everything `evaluate` found; `markdown()` is the committed report."""

    cfg: TraceConfig | None
    traces: list[Trace]
    per_trace: dict[str, dict[bool, RunResult]]  # trace -> guards on? -> result (default settings)
    sweep: dict[Point, Summary]
    default: Point
    command: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def markdown(self, plot_name: str | None) -> str:
        out = ["# Detection quality", ""]
        out.append(f"Produced by `{self.command}`: every number below comes from that command, and the same "
                   "command with the same seed gives the same numbers.")
        out.append("")
        if self.cfg is not None:
            c = self.cfg
            out.append(f"Traces: {c.datanodes} datanodes x {c.regions} regions, heartbeat every "
                       f"{c.interval_ms / 1000:g} s, {c.hours:g} h each, seed {c.seed}; supervisor settings as "
                       f"the service's defaults unless a row says otherwise ({self.default.label}).")
            out.append("")
        out.append("| trace | what happens | guards | failovers | false failovers | regions moved needlessly "
                   "| mistake rate /h/datanode | crashes detected | T_D p50 / p99 s | P_A |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for trace in self.traces:
            for guards in (True, False):
                r = self.per_trace[trace.name][guards]
                detected = f"{len(r.detection_ms)} / {r.crashes}" if r.crashes else "-"
                out.append(
                    f"| {trace.name} | {trace.description} | {'on' if guards else 'off'} | {r.failovers} "
                    f"| {r.mistakes} | {r.wrong_regions} | {r.mistake_rate:.3f} | {detected} "
                    f"| {fmt_seconds(td_seconds(r.detection_ms, 50))} / "
                    f"{fmt_seconds(td_seconds(r.detection_ms, 99))} "
                    f"| {r.query_accuracy:.5f} |"
                )
        out += ["", "## Checks", ""]
        for name, ok, detail in self.checks:
            out.append(f"- **{'PASS' if ok else 'FAIL'}** {name}: {detail}")
        out += ["", "## Sweep", ""]
        out.append("Every trace above, run again for each setting. T_D and crashes detected are over the "
                   "crashes of every trace but flapping (whose failovers are damped on purpose: its row above "
                   "shows what that costs); false failovers and the mistake rate are over all traces; "
                   "flapping failovers counts the failovers of the flapping trace.")
        out.append("")
        out.append("| phi threshold | acceptable pause s | guards | T_D p50 / p99 s | crashes detected "
                   "| false failovers | mistake rate /h/datanode | flapping failovers | P_A |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for point, summary in sorted(self.sweep.items(), key=lambda kv: (kv[0].pause_ms, kv[0].threshold,
                                                                          not kv[0].guards)):
            mark = " (default)" if (point.threshold, point.pause_ms) == (self.default.threshold,
                                                                         self.default.pause_ms) else ""
            out.append(
                f"| {point.threshold:g}{mark} | {point.pause_ms / 1000:g} | {'on' if point.guards else 'off'} "
                f"| {fmt_seconds(summary.td(50))} / {fmt_seconds(summary.td(99))} | {len(summary.detection_ms)} / "
                f"{summary.crashes} | {summary.mistakes} | {summary.mistake_rate:.3f} "
                f"| {_fmt_int(summary.flapping_failovers)} | {summary.query_accuracy:.5f} |"
            )
        if plot_name:
            out += ["", f"![detection time against mistake rate]({plot_name})"]
        out += ["", "## How to read it", "", *_READING]
        return "\n".join(out) + "\n"


_READING = [
    "- **T_D** (detection time): from the moment a datanode crashes to the first failover submitted "
    "for its regions. Heartbeats are stamped at arrival, ticks run every tick interval, remote calls "
    f"take {CALL_LATENCY_MS} ms and a migration {MIGRATION_MS / 1000:g} s.",
    "- **false failover**: a failover of a datanode that was not down (submissions for one datanode "
    f"within {BURST_MS / 1000:g} s of each other are one failover). The **mistake rate** is false failovers "
    "per hour per datanode (Chen, Toueg and Aguilera's λ_M).",
    "- **P_A** (query accuracy): the fraction of (tick, live datanode) pairs on which no region of the "
    "datanode was at or above the threshold. The guards do not change what the detector suspects, only "
    "what the supervisor does about it; P_A reads slightly higher without them because a datanode failed "
    "over by mistake loses its regions and is no longer scored.",
    "- **crashes detected**: crashes of datanodes that held regions, and how many were failed over "
    "before the datanode came back. On the flapping trace a datanode that comes back before its "
    "backoff ends is not failed over at all: that is the damping, not a miss.",
    "- The long_pauses trace freezes datanodes for longer than `acceptable_heartbeat_pause`: the "
    "detector is meant to convict them, and the guards are not meant to stop that.",
]


def _fmt_int(value: int | None) -> str:
    return "-" if value is None else str(value)





def plot(report: Report, path: Path) -> bool:
    """T_D p99 against the mistake rate for each point of the sweep; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    default = report.default
    series = [
        ("threshold sweep", lambda p: p.pause_ms == default.pause_ms, lambda p: f"phi {p.threshold:g}", "o"),
        ("pause sweep", lambda p: p.threshold == default.threshold, lambda p: f"{p.pause_ms / 1000:g} s", "s"),
    ]
    for name, member, label, marker in series:
        for guards, color in ((True, "tab:blue"), (False, "tab:red")):
            points = sorted(
                (p for p in report.sweep if p.guards == guards and member(p)),
                key=lambda p: (p.pause_ms, p.threshold),
            )
            xs = [report.sweep[p].mistake_rate for p in points]
            ys = [report.sweep[p].td(99) or float("nan") for p in points]
            ax.plot(xs, ys, marker=marker, color=color, alpha=0.8, linestyle="-" if guards else "--",
                    label=f"{name}, guards {'on' if guards else 'off'}")
            for i, (p, x, y) in enumerate(zip(points, xs, ys)):
                ax.annotate(label(p), (x, y), textcoords="offset points", fontsize=7,
                            xytext=(5, 6 if i % 2 else -10))
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xticks([0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("false failovers per hour per datanode (symlog)")
    ax.set_ylabel("detection time T_D p99 (s)")
    ax.set_title("Detection time against mistake rate, every trace")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(report: Report, out_dir: Path, stem: str = "detection-quality") -> tuple[Path, Path | None]:
    """Writes `<stem>.md` (and `<stem>.png` when matplotlib is installed) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    drawn = plot(report, png)
    md = out_dir / f"{stem}.md"
    md.write_text(report.markdown(png.name if drawn else None))
    return md, png if drawn else None
