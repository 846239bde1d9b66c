"""How the state is laid out in keys and values (pure: bytes in, StoredState out)."""

from __future__ import annotations

import base64
import json

import numpy as np

from supervisor_service.core import ClockMark, InFlightRecord, JournalEntry, LegacyInFlight, Peer, StoredState


def _key_id(n: int) -> str:
    return f"{n:020d}"


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


def decode_maintenance(value: bytes | None) -> tuple[bool, int, dict[int, int]]:
    """(global on, global expiry, {datanode: expiry}) from the stored value, expiries on the writer's clock."""
    on, until, datanodes, _ = decode_maintenance_marked(value)
    return on, until, datanodes


def decode_maintenance_marked(value: bytes | None) -> tuple[bool, int, dict[int, int], ClockMark | None]:
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


def _mark_json(mark: ClockMark | None) -> dict | None:
    return None if mark is None else {"boot_id": mark.boot_id, "monotonic_ms": mark.monotonic_ms, "wall_ms": mark.wall_ms}


def _inflight_to_json(rec: InFlightRecord) -> bytes:
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
    }).encode()


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
    )


def decode_state(raw: dict[str, bytes], prefix: str) -> StoredState:
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
        elif kind == "maintenance":
            on, until, datanodes, mark = decode_maintenance_marked(value)
            state.maintenance, state.maintenance_until_ms, state.datanode_maintenance = on, until, datanodes
            state.maintenance_mark = mark
        elif kind == "journal_term":
            state.journal_term = int(value)
        elif kind == "term":
            state.term = int(value)
    return state


_U64 = np.dtype("<u8")
