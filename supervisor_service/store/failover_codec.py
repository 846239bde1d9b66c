"""How a failover record is stored: one JSON value per record, `failovers/<request_id>` (docs/design.md §18)."""

from __future__ import annotations

import base64
import json

import numpy as np

from supervisor_service.core import FailoverRecord, MigrationState, Peer, RegionEvidence

_EVIDENCE_FIELDS = ("region_id", "phi", "last_heartbeat_millis", "mean_interval_millis", "std_deviation_millis",
                    "sample_count", "failover_count", "result")


def failover_to_json(rec: FailoverRecord) -> bytes:
    return json.dumps({
        "id": rec.failover_id,
        "decided_at": rec.decided_at_millis,
        "term": rec.leader_term,
        "datanode_id": rec.datanode_id,
        "from": [rec.from_peer.id, rec.from_peer.addr],
        "to": [rec.to_peer.id, rec.to_peer.addr],
        # 8 bytes per region, base64, as an in-flight record's (store/codec.py).
        "regions": base64.b64encode(np.asarray(rec.region_ids, dtype="<u8").tobytes()).decode(),
        "timeout_ms": rec.timeout_ms,
        # Columns, not objects: a record of a thousand regions stays small.
        "evidence": [[getattr(e, f) for e in rec.evidence] for f in _EVIDENCE_FIELDS],
        "threshold": rec.threshold,
        "pause_ms": rec.acceptable_heartbeat_pause_ms,
        "checks": list(rec.checks),
        "trigger": rec.trigger_reason,
        "procedure_id": rec.procedure_id,
        "result": rec.result,
        "final_state": rec.final_state.name,
        "finished_at": rec.finished_at_millis,
    }, separators=(",", ":")).encode()


def failover_from_json(raw: bytes) -> FailoverRecord:
    d = json.loads(raw)
    columns = d["evidence"]
    evidence = tuple(RegionEvidence(*row) for row in zip(*columns)) if columns and columns[0] else ()
    return FailoverRecord(
        failover_id=str(d["id"]),
        decided_at_millis=int(d["decided_at"]),
        leader_term=int(d["term"]),
        datanode_id=int(d["datanode_id"]),
        from_peer=Peer(int(d["from"][0]), str(d["from"][1])),
        to_peer=Peer(int(d["to"][0]), str(d["to"][1])),
        region_ids=tuple(np.frombuffer(base64.b64decode(d["regions"]), dtype="<u8").tolist()),
        timeout_ms=int(d["timeout_ms"]),
        evidence=evidence,
        threshold=float(d["threshold"]),
        acceptable_heartbeat_pause_ms=float(d["pause_ms"]),
        checks=tuple(str(c) for c in d["checks"]),
        trigger_reason=str(d.get("trigger", "failover")),
        procedure_id=str(d.get("procedure_id", "")),
        result=str(d.get("result", "")),
        final_state=MigrationState[d.get("final_state", "UNSPECIFIED")],
        finished_at_millis=int(d.get("finished_at", 0)),
    )
