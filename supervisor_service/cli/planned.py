"""The planned operations' commands (docs/design.md §17):

    supervisor-service drain start DATANODE... [--reason TEXT] [--wait]
    supervisor-service drain status [DRAIN_ID] [--json]
    supervisor-service drain cancel DRAIN_ID [--reason TEXT]
    supervisor-service policy set TABLE... [--failover on|off] [--priority N] [--reason TEXT]  (one at least)
    supervisor-service policy list [TABLE...] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
MAX_REASON_LEN = 1024


IntType = Callable[[int, int, str], Callable[[str], int]]
"""cli/main.py's argparse integer type factory `_int_in(low, high, what)`, handed in (main imports this module)."""


def _reason(text: str) -> str:
    if len(text) > MAX_REASON_LEN:
        raise argparse.ArgumentTypeError(f"--reason is {len(text)} characters; at most {MAX_REASON_LEN}")
    return text


def add_planned_commands(client: Callable[[str, str], argparse.ArgumentParser], int_in: IntType) -> None:
    """Register `drain` and `policy` with the client command factory of cli/main.py."""
    drain = client("drain", "move every region off datanodes on purpose (decommission), follow or cancel it")
    drain.add_argument("action", choices=["start", "status", "cancel"])
    drain.add_argument("ids", nargs="*", metavar="ID",
                       help="start: the datanode ids; status: a drain id (default: the newest); cancel: the drain id")
    drain.add_argument("--reason", type=_reason, default="", help="why (logged and audited), e.g. 'rack 3 swap'")
    drain.add_argument("--wait", action="store_true", help="start: follow the drain until it ends")
    drain.add_argument("--json", action="store_true", help="status: as one JSON object")
    policy = client("policy", "per-table failover policy: disable failover of a table, or give it a priority")
    policy.add_argument("action", choices=["set", "list"])
    policy.add_argument("tables", nargs="*", type=int_in(0, UINT32_MAX, "a table id"), metavar="TABLE")
    policy.add_argument("--failover", choices=["on", "off"],
                        help="set: fail the tables' regions over, or never (default: as it is)")
    policy.add_argument("--priority", type=int_in(INT32_MIN, INT32_MAX, "a priority"), default=None,
                        help="set: higher goes first under rate limits and in drains (default: as it is; 0 for a "
                        "table without a policy)")
    policy.add_argument("--reason", type=_reason, default="", help="why (logged and audited)")
    policy.add_argument("--json", action="store_true", help="list: one JSON object per table")


def _status_dict(s) -> dict:
    return {
        "drain_id": s.drain_id, "datanode_ids": list(s.datanode_ids), "state": s.state,
        "regions_total": s.regions_total, "regions_moved": s.regions_moved,
        "regions_in_flight": s.regions_in_flight, "regions_pending": s.regions_pending,
        "regions_failed": s.regions_failed, "regions_gone": s.regions_gone, "failures": list(s.failures),
        "started_at_millis": s.started_at_millis, "finished_at_millis": s.finished_at_millis, "reason": s.reason,
    }


def _print_status(s, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_status_dict(s)))
        return
    print(f"{s.drain_id}: {s.state}, datanodes {','.join(str(d) for d in s.datanode_ids)}: "
          f"{s.regions_moved}/{s.regions_total} moved, {s.regions_in_flight} in flight, {s.regions_pending} pending, "
          f"{s.regions_failed} failed, {s.regions_gone} gone")
    for line in s.failures:
        print(f"  failed {line}")


def run_planned(client, args, fail: Callable[[str, int], int], usage: int, int_in: IntType) -> int:
    """Run `drain` or `policy` (grpc errors are the caller's to report)."""
    if args.command == "policy":
        if args.action == "set":
            if not args.tables or (args.failover is None and args.priority is None):
                return fail("policy set: name the tables and give --failover on|off, --priority N or both", usage)
            enabled = None if args.failover is None else args.failover == "on"
            policies = client.set_table_policy(args.tables, enabled, args.priority, args.reason)
        else:
            policies = client.table_policies(args.tables)
        for p in policies:
            if args.json:
                print(json.dumps({"table_id": p.table_id, "failover_enabled": p.failover_enabled,
                                  "priority": p.priority}))
            else:
                print(f"table {p.table_id}: failover {'on' if p.failover_enabled else 'off'}, priority {p.priority}")
        if not policies and not args.json:
            print("no table has a policy (every table fails over, priority 0)")
        return 0
    if args.action == "start":
        try:
            ids = [int_in(0, UINT64_MAX, "a datanode id")(i) for i in args.ids]
        except argparse.ArgumentTypeError as exc:
            return fail(f"drain start: {exc}", usage)
        if not ids:
            return fail("drain start: name the datanodes to drain", usage)
        drain_id = client.drain(ids, args.reason)
        print(drain_id)
        while args.wait:
            status = client.get_drain(drain_id)
            if status.state != "running":
                _print_status(status, args.json)
                return 0 if status.state == "done" else 1
            time.sleep(1.0)
        return 0
    if len(args.ids) > 1:
        return fail(f"drain {args.action}: one drain id at most", usage)
    drain_id = args.ids[0] if args.ids else ""
    if args.action == "cancel":
        if not drain_id:
            return fail("drain cancel: name the drain (drain status shows the newest)", usage)
        _print_status(client.cancel_drain(drain_id, args.reason), args.json)
        return 0
    _print_status(client.get_drain(drain_id), args.json)
    return 0
