"""The audit trail's pure parts: the summary of a state-changing request, the bounds of a caller's
`reason`, and the coalescing of refused calls (docs/design.md §14.4).

The trail itself is written by the edge (`edge/audit.py`) through the state store's write path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_REASON_CHARS = 1024
"""A caller's `reason` longer than this is INVALID_ARGUMENT (the operator's words, not a document)."""
MAX_SUMMARY_CHARS = 240
MAX_IDS_SHOWN = 8
MAX_COALESCED_KEYS = 1024  # (identity, rpc, code) windows kept at once; past it, one shared window per rpc and code
OVERFLOW_IDENTITY = "(many identities)"

STATE_CHANGING = ("RegisterDetectors", "DeregisterDetectors", "ResetDetectors", "SetMaintenanceMode",
                  "ReleaseFailoverHold", "DrainDatanodes", "CancelDrain", "SetTablePolicy")
"""RPCs whose accepted calls are recorded (DESIGN.md section 8)."""


def clip(text: str, limit: int = MAX_SUMMARY_CHARS) -> str:
    """`text` cut to `limit` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ids_text(ids: Iterable[int]) -> str:
    """Sorted unique ids, at most MAX_IDS_SHOWN of them and how many more: "1,2,3 (+5 more)"."""
    unique = sorted(set(ids))
    shown = ",".join(str(i) for i in unique[:MAX_IDS_SHOWN])
    more = len(unique) - MAX_IDS_SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown


def summarize(rpc: str, request: object) -> str:
    """What a state-changing request asked for, in a bounded line: counts, datanode ids, enabled, ttl."""
    parts = []
    regions = getattr(request, "regions", None)
    if regions is not None:
        parts.append(f"{len(regions)} regions")
        parts.append(f"datanodes {ids_text(r.datanode_id for r in regions) or 'none'}")
    if hasattr(request, "enabled"):
        parts.append(f"enabled={str(bool(request.enabled)).lower()}")
    datanode_ids = getattr(request, "datanode_ids", None)
    if datanode_ids is not None:
        parts.append(f"datanodes {ids_text(datanode_ids)}" if len(datanode_ids) else "global")
    ttl = getattr(request, "ttl_millis", 0)
    if ttl:
        parts.append(f"ttl_millis={ttl}")
    table_ids = getattr(request, "table_ids", None)
    if table_ids is not None:
        parts.append(f"tables {ids_text(table_ids)}")
        # TablePolicyRequest's parts are optional: say only those the call sets.
        parts += [f"{name}={str(getattr(request, name)).lower()}" for name in ("failover_enabled", "priority")
                  if _has(request, name)]
    drain_id = getattr(request, "drain_id", "")
    if drain_id:
        parts.append(f"drain {clip(str(drain_id), 64)}")
    return clip(f"{rpc}: " + ", ".join(parts) if parts else rpc)


def _has(request: object, field: str) -> bool:
    try:
        return bool(request.HasField(field))  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # not a message, or not a field with presence
        return False


@dataclass(slots=True)
class _Window:
    started_ms: int
    suppressed: int = 0


@dataclass(frozen=True, slots=True)
class Coalesced:
    """A refused call to record: its key, and how many like it were counted since `since_ms` and not recorded."""

    identity: str
    rpc: str
    code: str
    suppressed: int
    since_ms: int


class RefusalCoalescer:
    """One record per (identity, rpc, code) per `interval_ms`; the calls in between are counted and
    reported with the next record of that key (or by `sweep` once the window has passed).

    Keys are bounded: past MAX_COALESCED_KEYS windows, expired ones are dropped, and a new identity
    shares one window per rpc and code (identities of refused callers are not the attacker's to
    multiply without bound: a token's name or a certificate the CA signed, else `anonymous`)."""

    def __init__(self, interval_ms: int, max_keys: int = MAX_COALESCED_KEYS) -> None:
        self._interval = interval_ms
        self._max_keys = max_keys
        self._windows: dict[tuple[str, str, str], _Window] = {}

    def note(self, identity: str, rpc: str, code: str, now_ms: int) -> Coalesced | None:
        """A refused call at `now_ms`: what to record now, or None when it is counted in its window."""
        key = (identity, rpc, code)
        window = self._windows.get(key)
        if window is None and len(self._windows) >= self._max_keys:
            self._expire(now_ms)
            if len(self._windows) >= self._max_keys:
                key = (OVERFLOW_IDENTITY, rpc, code)
                window = self._windows.get(key)
        if window is not None and now_ms - window.started_ms < self._interval:
            window.suppressed += 1
            return None
        self._windows[key] = _Window(now_ms)
        if window is None:
            return Coalesced(identity, rpc, code, 0, now_ms)
        return Coalesced(identity, rpc, code, window.suppressed, window.started_ms)

    def sweep(self, now_ms: int) -> list[Coalesced]:
        """The counts of windows that have passed (each reported once), their windows dropped."""
        due = []
        for key, window in list(self._windows.items()):
            if now_ms - window.started_ms >= self._interval:
                del self._windows[key]
                if window.suppressed:
                    due.append(Coalesced(*key, window.suppressed, window.started_ms))
        return due

    def _expire(self, now_ms: int) -> None:
        for key, window in list(self._windows.items()):
            if now_ms - window.started_ms >= self._interval and not window.suppressed:
                del self._windows[key]

    def __len__(self) -> int:
        return len(self._windows)


def refusal_summary(message: str, suppressed: int, since_ms: int) -> str:
    """The summary of a recorded refusal: the refusal's words, and the like ones counted before it."""
    more = f" (+{suppressed} like it since {since_ms}, not recorded one by one)" if suppressed else ""
    return clip(message, MAX_SUMMARY_CHARS - len(more)) + more
