"""`supervisor-service history | explain | whatif`: the failover history, why, and what if (docs/design.md §18).

    supervisor-service history [--datanode ID ...] [--region ID ...] [--since MILLIS] [--limit N] [--json]
                               [--plot FILE.png]
    supervisor-service explain DATANODE [REGION] [--at MILLIS] [--json]
    supervisor-service whatif DATANODE... [--json]

`cli/main.py` registers them (`add_commands`) and hands their parsed arguments to `run`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

COMMANDS = ("history", "explain", "whatif")
_STATES = {0: "in flight", 1: "RUNNING", 2: "SUCCEEDED", 3: "FAILED", 4: "NOT_FOUND"}
_TRIGGERS = {0: "UNSPECIFIED", 1: "FAILOVER", 2: "MANUAL"}


def add_commands(client: Callable, int_in: Callable) -> None:
    """Add the three commands with `client(name, help)` (main.py's: --addr, --token, --timeout)."""
    u64 = int_in(0, 2**64 - 1, "an id")
    when = int_in(0, 2**63 - 1, "a time in milliseconds since the epoch")
    h = client("history", "the failover decisions with their evidence and checks, newest first")
    h.add_argument("--datanode", type=u64, action="append", default=[], metavar="ID", help="only this datanode "
                   "(repeatable)")
    h.add_argument("--region", type=u64, action="append", default=[], metavar="ID", help="only decisions moving this "
                   "region (repeatable)")
    h.add_argument("--since", type=when, default=0, metavar="MILLIS", help="only decisions made at or after this")
    h.add_argument("--limit", type=int_in(1, 1000, "a number of records"), default=20, help="newest N (default 20)")
    h.add_argument("--json", action="store_true", help="one JSON object per record")
    h.add_argument("--plot", metavar="FILE.png", help="draw the newest record: phi rising to the threshold, the "
                   "conviction, the submission and the end on one time axis (needs matplotlib: the `plot` extra)")
    e = client("explain", "a datanode's or region's state, what the supervisor would do now and why, its history")
    e.add_argument("datanode", type=u64, metavar="DATANODE")
    e.add_argument("region", type=u64, nargs="?", default=0, metavar="REGION")
    e.add_argument("--at", type=when, default=0, metavar="MILLIS", help="evaluate phi at this time (default: now)")
    e.add_argument("--json", action="store_true", help="the answer as one JSON object")
    w = client("whatif", "what would happen if these datanodes stopped heartbeating now (nothing is changed)")
    w.add_argument("datanodes", type=u64, nargs="+", metavar="DATANODE")
    w.add_argument("--json", action="store_true", help="the answer as one JSON object")


def run(client, args) -> int:  # type: ignore[no-untyped-def]
    match args.command:
        case "history":
            return _history(client, args)
        case "explain":
            ex = client.explain(args.datanode, args.region, args.at)
            _print_explain(ex, args.json)
            return 0
        case "whatif":
            _print_whatif(client.what_if(args.datanodes), args.json)
            return 0
    raise ValueError(args.command)


def clock(ms: int) -> str:
    if ms <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d} UTC"


def _phi(phi: float) -> str | float:
    return "inf" if math.isinf(phi) else round(phi, 3)


def record_dict(r) -> dict:  # type: ignore[no-untyped-def]
    """A FailoverRecord as plain JSON (ids as numbers, the enums by name)."""
    return {
        "failover_id": r.failover_id, "decided_at_millis": r.decided_at_millis, "leader_term": r.leader_term,
        "from_peer": {"id": r.from_peer.id, "addr": r.from_peer.addr},
        "to_peer": {"id": r.to_peer.id, "addr": r.to_peer.addr},
        "region_ids": list(r.region_ids), "timeout_millis": r.timeout_millis,
        "evidence": [{"region_id": e.region_id, "phi": _phi(e.phi), "last_heartbeat_millis": e.last_heartbeat_millis,
                      "mean_interval_millis": e.mean_interval_millis, "std_deviation_millis": e.std_deviation_millis,
                      "sample_count": e.sample_count, "failover_count": e.failover_count, "result": e.result}
                     for e in r.evidence],
        "threshold": r.threshold, "acceptable_heartbeat_pause_millis": r.acceptable_heartbeat_pause_millis,
        "checks": list(r.checks), "procedure_id": r.procedure_id, "result": r.result,
        "final_state": _STATES.get(r.final_state, str(r.final_state)) if r.finished_at_millis else "in flight",
        "finished_at_millis": r.finished_at_millis, "trigger_reason": _TRIGGERS.get(r.trigger_reason, "UNSPECIFIED"),
    }


def print_record(r, indent: str = "") -> None:  # type: ignore[no-untyped-def]
    from supervisor_service.core import region_label

    end = "in flight" if not r.finished_at_millis else (
        f"{_STATES.get(r.final_state, '?') if r.final_state else 'ended'} after "
        f"{(r.finished_at_millis - r.decided_at_millis) / 1000:.1f} s")
    noun = "region" if len(r.region_ids) == 1 else "regions"
    print(f"{indent}{clock(r.decided_at_millis)}  datanode {r.from_peer.id} -> {r.to_peer.id} "
          f"({r.to_peer.addr or 'no address'})  {len(r.region_ids)} {noun}  {end}")
    print(f"{indent}  id {r.failover_id}  term {r.leader_term}  procedure {r.procedure_id or '-'}  "
          f"timeout {r.timeout_millis // 1000} s  result {r.result or '(not answered yet)'}")
    print(f"{indent}  threshold {r.threshold:g}, acceptable pause {r.acceptable_heartbeat_pause_millis / 1000:g} s")
    for e in r.evidence[:10]:
        print(f"{indent}  region {region_label(e.region_id):>12}  phi {_phi(e.phi)}  last heartbeat "
              f"{clock(e.last_heartbeat_millis)}  mean {e.mean_interval_millis:.1f} ms  std "
              f"{e.std_deviation_millis:.1f} ms  samples {e.sample_count}  count {e.failover_count}  -> {e.result or '-'}")
    if len(r.evidence) > 10:
        print(f"{indent}  ... {len(r.evidence) - 10} more regions (--json shows them all)")
    for c in r.checks:
        print(f"{indent}  check  {c}")


def _history(client, args) -> int:  # type: ignore[no-untyped-def]
    records = client.failovers(args.datanode, args.region, args.since, args.limit)
    if args.plot:
        if not records:
            print("no failover recorded yet: nothing to plot")
            return 1
        from supervisor_service.cli.plot import plot_record

        plot_record(records[0], args.plot)
        print(f"wrote {args.plot} (the newest record, datanode {records[0].from_peer.id})")
        return 0
    for r in records:
        if args.json:
            print(json.dumps(record_dict(r)))
        else:
            print_record(r)
    if not records and not args.json:
        print("no failover recorded yet")
    return 0


def _print_explain(ex, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    rows = [{"datanode_id": d.datanode_id, "region_id": d.region_id, "phi": _phi(d.phi), "available": d.available,
             "last_heartbeat_millis": d.last_heartbeat_millis, "sample_count": d.sample_count,
             "mean_interval_millis": d.mean_interval_millis, "std_deviation_millis": d.std_deviation_millis,
             "failover_count": d.failover_count, "migrating": d.migrating,
             "predicted_failure_millis": d.predicted_failure_millis} for d in ex.detectors]
    if as_json:
        print(json.dumps({"verdict": ex.verdict, "holds": list(ex.holds),
                          "predicted_failure_millis": ex.predicted_failure_millis, "detectors": rows,
                          "failovers": [record_dict(r) for r in ex.failovers]}))
        return
    print(ex.verdict)
    for h in ex.holds:
        print(f"  hold: {h}")
    from supervisor_service.core import region_label

    for d in ex.detectors[:20]:
        print(f"  region {region_label(d.region_id):>12}  phi {_phi(d.phi)}  {'up' if d.available else 'FAILED'}"
              f"{'  migrating' if d.migrating else ''}  last {clock(d.last_heartbeat_millis)}  fails at "
              f"{clock(d.predicted_failure_millis)}")
    if len(ex.detectors) > 20:
        print(f"  ... {len(ex.detectors) - 20} more regions (--json shows them)")
    if ex.failovers:
        print("history:")
        for r in ex.failovers:
            print_record(r, "  ")


def _print_whatif(w, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    plans = [{"datanode_id": p.datanode_id, "regions": p.regions, "predicted_failure_millis": p.predicted_failure_millis,
              "earliest_submit_millis": p.earliest_submit_millis} for p in w.plans]
    if as_json:
        print(json.dumps({"summary": w.summary, "held_by": list(w.held_by), "plans": plans,
                          "all_submitted_by_millis": w.all_submitted_by_millis}))
        return
    print(w.summary)
    for h in w.held_by:
        print(f"  held: {h}")
    for p in w.plans:
        submit = clock(p.earliest_submit_millis) if p.earliest_submit_millis else "held (nothing submitted)"
        print(f"  datanode {p.datanode_id}: {p.regions} regions, convicted at {clock(p.predicted_failure_millis)}, "
              f"submitted at {submit}")
