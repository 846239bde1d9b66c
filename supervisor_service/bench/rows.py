"""The benchmark's configuration and its result table: one row per scenario, rendered as a table."""

from __future__ import annotations

from dataclasses import dataclass, field

COLUMNS = (
    ("scenario", "scenario"),
    ("detectors", "detectors"),
    ("msgs_s", "messages/s"),
    ("region_hb_s", "region-heartbeats/s"),
    ("tick_ms", "tick p50/p99 ms"),
    ("apply_ms", "apply latency p50/p99 ms"),
    ("rss_mib", "RSS MiB"),
    ("cpu", "CPU cores service+load"),
    ("cpu_msg", "server CPU us/message (no-op server, ratio)"),
    ("rejected", "rejected / stream errors"),
    ("result", "result"),
)


@dataclass
class Config:
    datanodes: int = 1000
    regions: int = 1000
    period_s: float = 3.0
    loadgens: int = 2
    channels: int = 4  # HTTP/2 connections per load generator
    window: int = 1  # requests outstanding per stream when flooding
    steady_s: float = 10.0
    flood_s: float = 10.0
    small_datanodes: int = 1000
    small_regions: int = 10
    small_s: float = 10.0
    ceiling_s: float = 6.0
    best_case: bool = True  # also the identical-bytes rows (service and no-op server), labelled best case
    churn_datanodes: int = 100  # churned histories: streams whose region indexes join one heartbeat apart
    churn_regions: int = 300
    churn_s: float = 10.0
    change_every: int = 10  # the changing-region-set floods: one region left out or put back every this many messages
    in_process: bool = True  # the in-process worst-case rows (the real table and tick, no gRPC)
    in_process_budget_s: float | None = None  # each stops adding datanodes past this (None: curve.budget_for)
    wide_regions: int = 100  # the wide variant: as many detectors, this many regions per datanode
    dump_page_size: int = 10_000
    baseline_datanodes: int = 100
    baseline_rounds: int = 5
    baseline_naive_memory_datanodes: int = 2
    failover: bool = True
    tls: bool = True  # the TLS on / off rows: the same floods against a fresh service, plaintext then mTLS
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(steady_s=4.0, flood_s=4.0, small_s=4.0, ceiling_s=3.0, churn_datanodes=50, churn_regions=200,
                   churn_s=4.0, baseline_datanodes=50,
                   baseline_rounds=3, baseline_naive_memory_datanodes=1, quick=True)


@dataclass
class Row:
    scenario: str
    detectors: int = 0
    msgs_s: float | None = None
    region_hb_s: float | None = None
    tick_p50: float | None = None
    tick_p99: float | None = None
    apply_p50: float | None = None
    apply_p99: float | None = None
    rss_mib: float | None = None
    cpu_service: float | None = None
    cpu_load: float | None = None
    cpu_us_msg: float | None = None  # server CPU per acknowledged message, us
    floor_us_msg: float | None = None  # the same of the no-op server, same message size and stamping
    rejected: int | None = None
    errors: int | None = None
    result: str = ""
    extra: dict = field(default_factory=dict)

    def cells(self) -> dict[str, str]:
        def num(v, fmt="{:,.0f}"):
            return "-" if v is None else fmt.format(v)

        def pair(a, b, fmt="{:.1f}"):
            return "-" if a is None else f"{fmt.format(a)} / {fmt.format(b)}"

        return {
            "scenario": self.scenario,
            "detectors": num(self.detectors),
            "msgs_s": num(self.msgs_s),
            "region_hb_s": num(self.region_hb_s),
            "tick_ms": pair(self.tick_p50, self.tick_p99),
            "apply_ms": pair(self.apply_p50, self.apply_p99),
            "rss_mib": num(self.rss_mib),
            "cpu": "-" if self.cpu_service is None else
                   f"{self.cpu_service:.2f}" + ("" if self.cpu_load is None else f" + {self.cpu_load:.2f}"),
            "cpu_msg": "-" if self.cpu_us_msg is None else f"{self.cpu_us_msg:,.0f}" + (
                "" if self.floor_us_msg is None else
                f" ({self.floor_us_msg:,.0f}, {self.cpu_us_msg / max(self.floor_us_msg, 1e-9):.2f}x)"),
            "rejected": "-" if self.rejected is None else f"{self.rejected} / {self.errors or 0}",
            "result": self.result or "-",
        }


def render(rows: list, columns: tuple[tuple[str, str], ...] = COLUMNS) -> str:
    """A Markdown table: one header, one line per row (anything with `cells()` keyed by the columns)."""
    cells = [r.cells() for r in rows]
    widths = {k: max(len(title), *(len(c[k]) for c in cells)) for k, title in columns}
    line = lambda values: "| " + " | ".join(v.ljust(widths[k]) for (k, _), v in zip(columns, values)) + " |"  # noqa: E731
    out = [line([title for _, title in columns]), "|" + "|".join("-" * (widths[k] + 2) for k, _ in columns) + "|"]
    out += [line([c[k] for k, _ in columns]) for c in cells]
    return "\n".join(out)


def baseline_rows(result: dict) -> list[Row]:
    """The two rows of the in-process comparison: the naive dict of detectors and the table."""
    target = result["target_detectors"]
    mib = 1024 * 1024
    return [
        Row(
            scenario="naive baseline: dict of PhiAccrualFailureDetector, in-process",
            detectors=target,
            region_hb_s=result["naive_apply_rate"],
            tick_p50=result["naive_sweep_ms"], tick_p99=result["naive_sweep_ms"],
            rss_mib=result["naive_bytes_per_detector"] * target / mib,
            result=f"{result['naive_bytes_per_detector'] / 1024:,.1f} KiB/detector (full window), projected",
        ),
        Row(
            scenario="detector table, in-process, same sequence",
            detectors=target,
            region_hb_s=result["table_apply_rate"],
            tick_p50=result["table_sweep_ms"], tick_p99=result["table_sweep_ms"],
            rss_mib=result["table_bytes_per_detector"] * target / mib,
            result=f"{result['table_bytes_per_detector']:,.0f} B/detector (full window), projected",
        ),
    ]
