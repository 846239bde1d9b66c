"""How the state is laid out in keys and values (pure: no threads, no I/O; docs/design.md §6).

Keys under the prefix (one per cluster; `prefix` below always ends with "/"):
  registry/<datanode>   sorted uint64 region ids (little endian)
  counts/<datanode>     uint64 pairs (region, failover count), by region
  inflight/<submission> JSON: one SubmitRegionMigration decision (request_id, datanode, peers,
                        regions, timeout, state, procedure id, clock mark); see InFlightRecord
  maintenance           JSON {enabled, until_ms, datanodes, mark} (first format: b"1" or b"0")
  journal/<seq>         JSON dry-run journal entry
  journal_term          highest leader term the dry-run journal accepted
  failovers/<id>        JSON: one failover record of the history (core/failovers.py), by request_id
  audit_next            number of the next audit entry
And beside the prefix, under `audit_prefix(prefix)` (`<prefix>@audit/`), the audit trail: `<seq>` JSON
entries, the oldest deleted as new ones pass the capacity. It is kept out of the prefix so that a new
leader's load never reads it (thousands of entries: megabytes, past etcd's 4 MiB answer).
  term                  leadership counter of a single replica (SQLite, memory)
  table_policies, drains/<id>  the planned operations (store/planned_codec.py)

A datanode's registry and counts keys are rewritten whole, and the journal is
trimmed to its capacity, so encoding needs to know what the store holds: the
`Mirror`. `encode` turns changes into puts and deletes against a mirror
without touching it; once the puts and deletes are committed, `Mirror.apply`
brings the mirror up to date. `decode_state` reads everything back.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from supervisor_service.core import (
    AuditAppend,
    AuditEntry,
    Change,
    ClockMark,
    CountsDrop,
    CountsSet,
    DrainDrop,
    DrainSet,
    FailoverDrop,
    FailoverSet,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    JournalAppend,
    JournalEntry,
    LegacyInFlight,
    MaintenanceSet,
    Peer,
    RegistryAdd,
    RegistryRemove,
    StoredState,
    TablePoliciesSet,
    TermSet,
)
from supervisor_service.store.failover_codec import failover_from_json, failover_to_json
from supervisor_service.store.planned_codec import (
    DRAINS,
    TABLE_POLICIES_KEY,
    decode_drain,
    decode_policies,
    encode_drain,
    encode_policies,
)

_U64 = np.dtype("<u8")

MAINTENANCE_KEY = "maintenance"
"""The maintenance key's name under the prefix (read on its own by followers)."""
AUDIT_NEXT_KEY = "audit_next"
DEFAULT_AUDIT_CAPACITY = 5000


def audit_prefix(prefix: str) -> str:
    """Where the audit trail of the state under `prefix` (ending with "/") is kept: beside it."""
    return prefix.rstrip("/") + "@audit/"


# ---------------------------------------------------------------- changes -> puts and deletes


@dataclass(slots=True)
class Mirror:
    """What the store holds of the keys that are rewritten whole (registry, counts) or trimmed (journal)."""

    registry: dict[int, np.ndarray] = field(default_factory=dict)
    counts: dict[int, dict[int, int]] = field(default_factory=dict)  # datanode -> {region: count}
    journal_keys: list[str] = field(default_factory=list)  # stored journal keys, oldest first
    journal_seq: int = 0  # number of the next journal key
    audit_seq: int = 0  # number of the next audit entry

    @classmethod
    def loaded(cls, raw: dict[str, bytes], prefix: str, state: StoredState) -> Mirror:
        """The mirror of the keys `raw` read under `prefix`, `state` being their `decode_state`."""
        counts: dict[int, dict[int, int]] = {}
        for (d, r), c in state.failover_counts.items():
            counts.setdefault(d, {})[r] = c
        journal_keys = sorted(k for k in raw if k.startswith(prefix + "journal/"))
        journal_seq = int(journal_keys[-1].rsplit("/", 1)[1]) + 1 if journal_keys else 0
        audit_seq = int(raw.get(prefix + AUDIT_NEXT_KEY, b"0"))
        return cls(dict(state.registry), counts, journal_keys, journal_seq, audit_seq)

    def apply(self, encoding: Encoding) -> None:
        """The encoding's keys were committed: the mirror now says so."""
        for d, ids in encoding.registry.items():
            if ids.size:
                self.registry[d] = ids
            else:
                self.registry.pop(d, None)
        for d, by_region in encoding.counts.items():
            if by_region:
                self.counts[d] = by_region
            else:
                self.counts.pop(d, None)
        self.journal_seq = encoding.journal_seq
        self.journal_keys = self.journal_keys[encoding.journal_trimmed:] + encoding.journal_new
        self.audit_seq = encoding.audit_seq


@dataclass(frozen=True, slots=True)
class Encoding:
    """The keys a run of changes writes and deletes, and what the mirror becomes once they are committed."""

    puts: dict[str, bytes]
    deletes: set[str]
    registry: dict[int, np.ndarray]  # datanodes touched: their regions after (empty: the key is deleted)
    counts: dict[int, dict[int, int]]  # datanodes touched: their counts after (empty: the key is deleted)
    journal_seq: int
    journal_new: list[str]
    journal_trimmed: int  # oldest journal keys deleted to keep the capacity
    audit_seq: int = 0


def encode(changes: Iterable[Change], mirror: Mirror, prefix: str, journal_capacity: int,
           audit_capacity: int = DEFAULT_AUDIT_CAPACITY) -> Encoding:
    """Puts and deletes for `changes` applied in order to what `mirror` says is stored (left unchanged).

    A key written and deleted by the same changes ends as its last change left it.
    """
    p = prefix
    registry: dict[int, np.ndarray] = {}
    counts: dict[int, dict[int, int]] = {}
    puts: dict[str, bytes] = {}
    deletes: set[str] = set()
    journal_seq = mirror.journal_seq
    journal_new: list[str] = []
    audit_seq = mirror.audit_seq
    trail = audit_prefix(p)

    def regions(d: int) -> np.ndarray:
        if d not in registry:
            registry[d] = mirror.registry.get(d, np.empty(0, dtype=np.uint64))
        return registry[d]

    def counts_of(d: int) -> dict[int, int]:
        if d not in counts:
            counts[d] = dict(mirror.counts.get(d, {}))
        return counts[d]

    # A record key written whole (in flight, a drain, a failover record) or dropped: the last change wins.
    def put(key: str, value: bytes) -> None:
        deletes.discard(key)
        puts[key] = value

    def drop(key: str) -> None:
        puts.pop(key, None)
        deletes.add(key)

    for change in changes:
        match change:
            case RegistryAdd(d, ids):
                registry[d] = np.union1d(regions(d), ids)
            case RegistryRemove(d, ids):
                registry[d] = np.setdiff1d(regions(d), ids, assume_unique=True)
            case CountsSet(pairs):
                for (d, r), c in pairs:
                    counts_of(d)[r] = c
            case CountsDrop(keys):
                for d, r in keys:
                    counts_of(d).pop(r, None)
            case InFlightSet(submission_id, rec):
                put(f"{p}inflight/{submission_id}", _inflight_to_json(rec))
            case InFlightDrop(submission_id):
                drop(f"{p}inflight/{submission_id}")
            case MaintenanceSet():
                puts[p + MAINTENANCE_KEY] = encode_maintenance(change)
            case JournalAppend(entry, term):
                key = f"{p}journal/{_key_id(journal_seq)}"
                journal_seq += 1
                puts[key] = _entry_to_json(entry)
                puts[f"{p}journal_term"] = str(term).encode()
                journal_new.append(key)
            case TermSet(term):
                puts[f"{p}term"] = str(term).encode()
            case TablePoliciesSet(policies):
                puts[p + TABLE_POLICIES_KEY] = encode_policies(policies)
            case DrainSet(drain_id, rec):
                put(f"{p}{DRAINS}/{drain_id}", encode_drain(rec))
            case DrainDrop(drain_id):
                drop(f"{p}{DRAINS}/{drain_id}")
            case FailoverSet(rec):
                put(f"{p}failovers/{rec.failover_id}", failover_to_json(rec))
            case FailoverDrop(failover_id):
                drop(f"{p}failovers/{failover_id}")
            case AuditAppend(entry):
                puts[trail + _key_id(audit_seq)] = audit_to_json(entry)
                if audit_seq >= audit_capacity:  # the entry that many before leaves (a no-op if it is gone)
                    old = trail + _key_id(audit_seq - audit_capacity)
                    if puts.pop(old, None) is None:
                        deletes.add(old)
                audit_seq += 1
                puts[p + AUDIT_NEXT_KEY] = str(audit_seq).encode()
    for d, ids in registry.items():
        key = f"{p}registry/{_key_id(d)}"
        if ids.size:
            puts[key] = ids.astype(_U64).tobytes()
        else:
            deletes.add(key)
    for d, by_region in counts.items():
        key = f"{p}counts/{_key_id(d)}"
        if by_region:
            puts[key] = np.array(sorted(by_region.items()), dtype=_U64).reshape(-1).tobytes()
        else:
            deletes.add(key)
    trimmed = max(len(mirror.journal_keys) + len(journal_new) - journal_capacity, 0)
    deletes.update(mirror.journal_keys[:trimmed])
    return Encoding(puts, deletes, registry, counts, journal_seq, journal_new, trimmed, audit_seq)


def encode_maintenance(change: MaintenanceSet) -> bytes:
    return json.dumps({
        "enabled": change.enabled,
        "until_ms": change.until_ms,
        "datanodes": [list(x) for x in change.datanodes],
        "mark": _mark_json(change.mark),
    }).encode()


def _key_id(n: int) -> str:
    return f"{n:020d}"


def _mark_json(mark: ClockMark | None) -> dict | None:
    return None if mark is None else {"boot_id": mark.boot_id, "monotonic_ms": mark.monotonic_ms, "wall_ms": mark.wall_ms}


def _entry_to_json(entry: JournalEntry) -> bytes:
    return json.dumps({
        "at_millis": entry.at_millis,
        "region_ids": list(entry.region_ids),
        "from": [entry.from_peer.id, entry.from_peer.addr],
        "to": [entry.to_peer.id, entry.to_peer.addr],
        "timeout_ms": entry.timeout_ms,
        "trigger_reason": entry.trigger_reason,
        "procedure_id": entry.procedure_id,
        "leader_term": entry.leader_term,
        "request_id": entry.request_id,
    }).encode()


def audit_to_json(entry: AuditEntry) -> bytes:
    return json.dumps({
        "at_millis": entry.at_millis,
        "identity": entry.identity,
        "peer": entry.peer,
        "rpc": entry.rpc,
        "summary": entry.summary,
        "code": entry.code,
        "reason": entry.reason,
        "leader_term": entry.leader_term,
    }).encode()


def decode_audit(raw: dict[str, bytes]) -> list[AuditEntry]:
    """The audit entries of the keys `raw` read under the audit prefix, oldest first (by key); an
    entry that does not decode is left out (a trail read never fails for one bad value)."""
    entries = []
    for key in sorted(raw):
        try:
            d = json.loads(raw[key])
            entries.append(AuditEntry(
                at_millis=int(d["at_millis"]), identity=str(d["identity"]), peer=str(d["peer"]),
                rpc=str(d["rpc"]), summary=str(d["summary"]), code=str(d["code"]), reason=str(d["reason"]),
                leader_term=int(d["leader_term"]),
            ))
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def _inflight_to_json(rec: InFlightRecord) -> bytes:
    # A drain's decision says MANUAL; a failover's leaves the key out (the format failovers always had).
    extra = {} if rec.trigger_reason == "FAILOVER" else {"trigger_reason": rec.trigger_reason}
    return json.dumps({
        "request_id": rec.request_id,
        "datanode_id": rec.datanode_id,
        "from": [rec.from_peer.id, rec.from_peer.addr],
        "to": [rec.to_peer.id, rec.to_peer.addr],
        # 8 bytes per region, base64 (10.7): a 100,000-region submission is about 1.07 MB (etcd's writes: see etcd.py).
        "regions": base64.b64encode(np.asarray(rec.region_ids, dtype=_U64).tobytes()).decode(),
        "timeout_ms": rec.timeout_ms,
        "state": rec.state,
        "procedure_id": rec.procedure_id,
        "attempts": rec.attempts,
        "mark": _mark_json(rec.mark),
        **extra,
    }).encode()


# ---------------------------------------------------------------- stored keys -> state


def decode_state(raw: dict[str, bytes], prefix: str) -> StoredState:
    """The state the keys `raw` read under `prefix` hold (the journal in the order of `raw`)."""
    state = StoredState()
    for key, value in raw.items():
        name = key[len(prefix):].lstrip("/")
        kind, _, ident = name.partition("/")
        if kind == "registry":
            state.registry[int(ident)] = np.frombuffer(value, dtype=_U64).astype(np.uint64)
        elif kind == "counts":
            pairs = np.frombuffer(value, dtype=_U64).reshape(-1, 2)
            for region_id, count in pairs.tolist():
                state.failover_counts[(int(ident), region_id)] = count
        elif kind == "inflight":
            _decode_inflight(ident, value, state)
        elif kind == "journal":
            state.journal.append(_entry_from_json(value))
        elif kind == MAINTENANCE_KEY:
            on, until, datanodes, mark = _decode_maintenance_marked(value)
            state.maintenance, state.maintenance_until_ms, state.datanode_maintenance = on, until, datanodes
            state.maintenance_mark = mark
        elif kind == "failovers":
            # A record that does not read (written by hand, a bad disk) is history, not state: it is left
            # out and counted, rather than keeping every replica from leading.
            try:
                state.failovers.append(failover_from_json(value))
            except (ValueError, KeyError, TypeError, IndexError):
                state.failovers_unreadable.append(ident)
        elif kind == "journal_term":
            state.journal_term = int(value)
        elif kind == "term":
            state.term = int(value)
        elif kind == TABLE_POLICIES_KEY:
            state.table_policies = decode_policies(value)
        elif kind == DRAINS:
            state.drains[ident] = decode_drain(value)
    return state


def decode_maintenance(value: bytes | None) -> tuple[bool, int, dict[int, int]]:
    """(global on, global expiry, {datanode: expiry}) from the stored value, expiries on the writer's clock."""
    on, until, datanodes, _ = _decode_maintenance_marked(value)
    return on, until, datanodes


def _decode_maintenance_marked(value: bytes | None) -> tuple[bool, int, dict[int, int], ClockMark | None]:
    if not value:
        return False, 0, {}, None
    if value in (b"0", b"1"):  # the first format: the global switch alone
        return value == b"1", 0, {}, None
    d = json.loads(value)
    mark = d.get("mark")
    return (
        bool(d["enabled"]),
        int(d.get("until_ms", 0)),
        {int(k): int(v) for k, v in d.get("datanodes", [])},
        ClockMark(str(mark["boot_id"]), int(mark["monotonic_ms"]), int(mark["wall_ms"])) if mark else None,
    )


def _entry_from_json(raw: bytes) -> JournalEntry:
    d = json.loads(raw)
    return JournalEntry(
        at_millis=d["at_millis"],
        region_ids=tuple(d["region_ids"]),
        from_peer=Peer(*d["from"]),
        to_peer=Peer(*d["to"]),
        timeout_ms=d["timeout_ms"],
        trigger_reason=d["trigger_reason"],
        procedure_id=d["procedure_id"],
        leader_term=d["leader_term"],
        request_id=d.get("request_id", ""),
    )


def _decode_inflight(ident: str, value: bytes, state: StoredState) -> None:
    d = json.loads(value)
    if "request_id" not in d:  # the first format: one key per region
        state.legacy_inflight[ident] = LegacyInFlight(int(ident), int(d["datanode_id"]), str(d["procedure_id"]),
                                                      int(d["deadline_ms"]))
        return
    mark = d.get("mark")
    state.inflight[ident] = InFlightRecord(
        request_id=str(d["request_id"]),
        datanode_id=int(d["datanode_id"]),
        from_peer=Peer(int(d["from"][0]), str(d["from"][1])),
        to_peer=Peer(int(d["to"][0]), str(d["to"][1])),
        region_ids=tuple(np.frombuffer(base64.b64decode(d["regions"]), dtype=_U64).tolist()),
        timeout_ms=int(d["timeout_ms"]),
        state=str(d["state"]),
        procedure_id=str(d.get("procedure_id", "")),
        attempts=int(d.get("attempts", 0)),
        mark=ClockMark(str(mark["boot_id"]), int(mark["monotonic_ms"]), int(mark["wall_ms"])) if mark else None,
        trigger_reason=str(d.get("trigger_reason", "FAILOVER")),
    )
