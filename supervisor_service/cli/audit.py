"""`supervisor-service audit [--since WHEN] [--identity NAME] [--limit N] [--json]` and the `--reason`
flag of the commands that change state (docs/design.md §14.4)."""

from __future__ import annotations

import argparse
import json
import re
import time

from supervisor_service.security.audit import MAX_REASON_CHARS

_AGO = re.compile(r"([0-9]{1,12})(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_LIMIT = 10_000
_INT64_MAX = 2**63 - 1


def since_millis(text: str, now_ms: int | None = None) -> int:
    """`--since`: milliseconds since the epoch, or how long ago (`90s`, `15m`, `2h`, `7d`)."""
    text = text.strip()
    match = _AGO.fullmatch(text)
    if match is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return max(now - int(match.group(1)) * _UNIT_MS[match.group(2)], 0)
    if text.isdigit() and len(text) <= 19 and int(text) <= _INT64_MAX:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"expected milliseconds since the epoch or a duration ago like 15m, 2h, 7d; got {text[:40]!r}")


def reason_text(text: str) -> str:
    if len(text) > MAX_REASON_CHARS or any(c in text for c in "\x00\r\n"):
        raise argparse.ArgumentTypeError(f"one line of at most {MAX_REASON_CHARS} characters")
    return text


def add_reason(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", type=reason_text, default="", metavar="TEXT",
                        help="why (kept in the audit trail with your identity, e.g. \"upgrade of rack 3\")")


def add_audit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=since_millis, default=0, metavar="WHEN",
                        help="entries from then on: milliseconds since the epoch, or a duration ago (15m, 2h, 7d)")
    parser.add_argument("--identity", default="", metavar="NAME", help="only this caller's entries")
    parser.add_argument("--limit", type=_limit, default=100, help=f"newest N entries (default 100, at most {MAX_LIMIT})")
    parser.add_argument("--json", action="store_true", help="one JSON object per entry")


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a number of entries in 1..{MAX_LIMIT}, got {text[:20]!r}")
    return int(text)


def run_audit(client, args) -> int:
    entries = client.audit(since_millis=args.since, identity=args.identity, limit=args.limit)
    for e in entries:
        record = {"at_millis": e.at_millis, "identity": e.identity, "peer": e.peer, "rpc": e.rpc,
                  "code": e.code, "summary": e.summary, "reason": e.reason, "leader_term": e.leader_term}
        if args.json:
            print(json.dumps(record))
        else:
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(e.at_millis / 1000)) + f".{e.at_millis % 1000:03d}Z"
            why = f"  reason: {e.reason}" if e.reason else ""
            print(f"{when}  {e.code:<17} {e.identity:<20} {e.rpc:<20} {e.summary}  ({e.peer}, term {e.leader_term}){why}")
    if not args.json and not entries:
        print("no audit entries match")
    return 0
