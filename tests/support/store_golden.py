"""A fixed run of state changes and the transactions the store wrote for it, byte for byte.

Captured from the writer as it was before the codec took the encoding over;
`tests/unit/test_store_codec.py` replays `CALLS` through the codec and
`tests/runtime/test_store.py` through the writer, and both must produce
`TRANSACTIONS`: stored bytes never change unnoticed (a change of format is a
new golden, made on purpose, with a reader for the old one).

Each call of `CALLS` is one `submit()`, committed alone (prefix "/cluster-a/",
journal capacity 3); `RELOADED_CALLS` follow on a writer that loaded the
result (its mirror starts from what is stored).
"""

from __future__ import annotations

import numpy as np

from supervisor_service.core import (
    ClockMark,
    CountsDrop,
    CountsSet,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    JournalAppend,
    JournalEntry,
    MaintenanceSet,
    Peer,
    RegistryAdd,
    RegistryRemove,
    TermSet,
)

PREFIX = "/cluster-a/"
JOURNAL_CAPACITY = 3
BIG = (1 << 64) - 1
MARK = ClockMark("boot-1", 123, 4000)


def _u64(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.uint64)


def _entry(i: int, term: int = 1) -> JournalEntry:
    return JournalEntry(1000 + i, (i, BIG), Peer(1, "a:1"), Peer(2, "b:2"), 120_000, "FAILOVER", f"dry-run-{i}", term,
                        f"req-{i}" if i % 2 else "")


CALLS = [
    [TermSet(7)],
    [RegistryAdd(1, _u64(5, 3, BIG)), RegistryAdd(2, _u64(7)), RegistryAdd(30, _u64(1, 2))],
    [RegistryRemove(1, _u64(3)), RegistryRemove(30, _u64(1, 2)), CountsSet((((1, 5), 2), ((2, 7), 1), ((1, BIG), 3)))],
    [CountsDrop(((2, 7),)), CountsSet((((1, 5), 4),))],
    [
        InFlightSet("3-a", InFlightRecord("3-a", 1, Peer(1, "a:1"), Peer(2, "b:2"), (5, BIG), 240_000, "submitted",
                                          "p-1", 2, MARK)),
        InFlightSet("3-b", InFlightRecord("3-b", 1, Peer(1), Peer(2, "b:2"), (6,), 120_000, "intent")),
        InFlightDrop("3-b"),
        InFlightDrop("3-c"),
        InFlightSet("3-c", InFlightRecord("3-c", 2, Peer(2, "b:2"), Peer(3, ""), (), 1, "ambiguous", "", 1, None)),
    ],
    [MaintenanceSet(True, 5000, ((4, 0), (9, 7000)), MARK)],
    [MaintenanceSet(False)],
    [JournalAppend(_entry(0), 1), JournalAppend(_entry(1, 2), 2)],
    [JournalAppend(_entry(2, 3), 3)],
    [JournalAppend(_entry(3, 3), 3), JournalAppend(_entry(4, 4), 4), RegistryAdd(2, _u64(8, 7))],
    [CountsDrop(((1, 5), (1, BIG)))],
    [InFlightDrop("3-a"), RegistryRemove(2, _u64(7, 8)), TermSet(8)],
]

RELOADED_CALLS = [
    [RegistryAdd(1, _u64(4)), CountsSet((((3, 1), 1),)), JournalAppend(_entry(5, 5), 5)],
    [RegistryRemove(1, _u64(4, 5, BIG)), MaintenanceSet(True, 0, ((2, 9),), None)],
]

# (puts, deletes) of each call of CALLS, then of RELOADED_CALLS.
TRANSACTIONS: list[tuple[dict[str, bytes], set[str]]] = [
    (
        {
            "/cluster-a/term": b'7',
        },
        set(),
    ),
    (
        {
            "/cluster-a/registry/00000000000000000001": bytes.fromhex("03000000000000000500000000000000ffffffffffffffff"),
            "/cluster-a/registry/00000000000000000002": bytes.fromhex("0700000000000000"),
            "/cluster-a/registry/00000000000000000030": bytes.fromhex("01000000000000000200000000000000"),
        },
        set(),
    ),
    (
        {
            "/cluster-a/counts/00000000000000000001": bytes.fromhex("05000000000000000200000000000000ffffffffffffffff0300000000000000"),
            "/cluster-a/counts/00000000000000000002": bytes.fromhex("07000000000000000100000000000000"),
            "/cluster-a/registry/00000000000000000001": bytes.fromhex("0500000000000000ffffffffffffffff"),
        },
        {"/cluster-a/registry/00000000000000000030"},
    ),
    (
        {
            "/cluster-a/counts/00000000000000000001": bytes.fromhex("05000000000000000400000000000000ffffffffffffffff0300000000000000"),
        },
        {"/cluster-a/counts/00000000000000000002"},
    ),
    (
        {
            "/cluster-a/inflight/3-a": b'{"request_id": "3-a", "datanode_id": 1, "from": [1, "a:1"], "to": [2, "b:2"], "regions": "BQAAAAAAAAD//////////w==", "timeout_ms": 240000, "state": "submitted", "procedure_id": "p-1", "attempts": 2, "mark": {"boot_id": "boot-1", "monotonic_ms": 123, "wall_ms": 4000}}',
            "/cluster-a/inflight/3-c": b'{"request_id": "3-c", "datanode_id": 2, "from": [2, "b:2"], "to": [3, ""], "regions": "", "timeout_ms": 1, "state": "ambiguous", "procedure_id": "", "attempts": 1, "mark": null}',
        },
        {"/cluster-a/inflight/3-b"},
    ),
    (
        {
            "/cluster-a/maintenance": b'{"enabled": true, "until_ms": 5000, "datanodes": [[4, 0], [9, 7000]], "mark": {"boot_id": "boot-1", "monotonic_ms": 123, "wall_ms": 4000}}',
        },
        set(),
    ),
    (
        {
            "/cluster-a/maintenance": b'{"enabled": false, "until_ms": 0, "datanodes": [], "mark": null}',
        },
        set(),
    ),
    (
        {
            "/cluster-a/journal/00000000000000000000": b'{"at_millis": 1000, "region_ids": [0, 18446744073709551615], "from": [1, "a:1"], "to": [2, "b:2"], "timeout_ms": 120000, "trigger_reason": "FAILOVER", "procedure_id": "dry-run-0", "leader_term": 1, "request_id": ""}',
            "/cluster-a/journal/00000000000000000001": b'{"at_millis": 1001, "region_ids": [1, 18446744073709551615], "from": [1, "a:1"], "to": [2, "b:2"], "timeout_ms": 120000, "trigger_reason": "FAILOVER", "procedure_id": "dry-run-1", "leader_term": 2, "request_id": "req-1"}',
            "/cluster-a/journal_term": b'2',
        },
        set(),
    ),
    (
        {
            "/cluster-a/journal/00000000000000000002": b'{"at_millis": 1002, "region_ids": [2, 18446744073709551615], "from": [1, "a:1"], "to": [2, "b:2"], "timeout_ms": 120000, "trigger_reason": "FAILOVER", "procedure_id": "dry-run-2", "leader_term": 3, "request_id": ""}',
            "/cluster-a/journal_term": b'3',
        },
        set(),
    ),
    (
        {
            "/cluster-a/journal/00000000000000000003": b'{"at_millis": 1003, "region_ids": [3, 18446744073709551615], "from": [1, "a:1"], "to": [2, "b:2"], "timeout_ms": 120000, "trigger_reason": "FAILOVER", "procedure_id": "dry-run-3", "leader_term": 3, "request_id": "req-3"}',
            "/cluster-a/journal/00000000000000000004": b'{"at_millis": 1004, "region_ids": [4, 18446744073709551615], "from": [1, "a:1"], "to": [2, "b:2"], "timeout_ms": 120000, "trigger_reason": "FAILOVER", "procedure_id": "dry-run-4", "leader_term": 4, "request_id": ""}',
            "/cluster-a/journal_term": b'4',
            "/cluster-a/registry/00000000000000000002": bytes.fromhex("07000000000000000800000000000000"),
        },
        {"/cluster-a/journal/00000000000000000000", "/cluster-a/journal/00000000000000000001"},
    ),
    (
        {},
        {"/cluster-a/counts/00000000000000000001"},
    ),
    (
        {
            "/cluster-a/term": b'8',
        },
        {"/cluster-a/inflight/3-a", "/cluster-a/registry/00000000000000000002"},
    ),
    (
        {
            "/cluster-a/counts/00000000000000000003": bytes.fromhex("01000000000000000100000000000000"),
            "/cluster-a/journal/00000000000000000005": b'{"at_millis": 1005, "region_ids": [5, 18446744073709551615], "from": [1, "a:1"], "to": [2, "b:2"], "timeout_ms": 120000, "trigger_reason": "FAILOVER", "procedure_id": "dry-run-5", "leader_term": 5, "request_id": "req-5"}',
            "/cluster-a/journal_term": b'5',
            "/cluster-a/registry/00000000000000000001": bytes.fromhex("04000000000000000500000000000000ffffffffffffffff"),
        },
        {"/cluster-a/journal/00000000000000000002"},
    ),
    (
        {
            "/cluster-a/maintenance": b'{"enabled": true, "until_ms": 0, "datanodes": [[2, 9]], "mark": null}',
        },
        {"/cluster-a/registry/00000000000000000001"},
    ),
]
