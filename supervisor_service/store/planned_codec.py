"""How the planned operations are stored (pure: no I/O; docs/design.md §17).

  table_policies   JSON [[table_id, failover_enabled, priority], ...]: the whole per-table policy
  drains/<id>      JSON: one drain (datanodes, their regions at the start, the regions moved, gone
                   and failed, attempts, state, times, reason); region lists as "z" + base64 of
                   zlib of the sorted ids' uint64 deltas
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable

import numpy as np

from supervisor_service.core import DrainRecord, TablePolicy

TABLE_POLICIES_KEY = "table_policies"
DRAINS = "drains"
_U64 = np.dtype("<u8")


def _ids(values: Iterable[int]) -> str:
    """Sorted region ids as base64 of zlib of their deltas: the ids of a datanode's regions are close
    together (one table's regions differ in the low bits), so a drain of 200,000 regions stays a value
    of a few hundred KB, well within one etcd request (store/etcd.py)."""
    ids = np.asarray(sorted(values), dtype=_U64)
    deltas = np.diff(ids, prepend=np.uint64(0)) if ids.size else ids
    return "z" + base64.b64encode(zlib.compress(deltas.astype(_U64).tobytes(), 6)).decode()


def _from_ids(text: str) -> tuple[int, ...]:
    if text.startswith("z"):
        deltas = np.frombuffer(zlib.decompress(base64.b64decode(text[1:])), dtype=_U64)
        return tuple(np.cumsum(deltas, dtype=np.uint64).tolist())
    return tuple(np.frombuffer(base64.b64decode(text), dtype=_U64).tolist())


def encode_policies(policies: Iterable[TablePolicy]) -> bytes:
    return json.dumps([[p.table_id, p.failover_enabled, p.priority] for p in policies]).encode()


def decode_policies(value: bytes) -> tuple[TablePolicy, ...]:
    return tuple(TablePolicy(int(t), bool(e), int(p)) for t, e, p in json.loads(value))


def encode_drain(rec: DrainRecord) -> bytes:
    return json.dumps({
        "drain_id": rec.drain_id,
        "datanode_ids": list(rec.datanode_ids),
        "regions": [[d, _ids(r)] for d, r in rec.regions],
        "state": rec.state,
        "started_at_ms": rec.started_at_ms,
        "finished_at_ms": rec.finished_at_ms,
        "reason": rec.reason,
        "moved": _ids(rec.moved),
        "gone": _ids(rec.gone),
        "failed": [[r, why] for r, why in rec.failed],
        "attempts": [[r, n] for r, n in rec.attempts],
    }).encode()


def decode_drain(value: bytes) -> DrainRecord:
    d = json.loads(value)
    return DrainRecord(
        drain_id=str(d["drain_id"]),
        datanode_ids=tuple(int(x) for x in d["datanode_ids"]),
        regions=tuple((int(n), _from_ids(r)) for n, r in d["regions"]),
        state=str(d["state"]),
        started_at_ms=int(d["started_at_ms"]),
        finished_at_ms=int(d.get("finished_at_ms", 0)),
        reason=str(d.get("reason", "")),
        moved=_from_ids(d.get("moved", "")),
        gone=_from_ids(d.get("gone", "")),
        failed=tuple((int(r), str(why)) for r, why in d.get("failed", [])),
        attempts=tuple((int(r), int(n)) for r, n in d.get("attempts", [])),
    )
