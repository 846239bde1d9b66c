"""Fitting writes into a backend's transactions: its limits on operations and bytes (pure; docs/design.md §6).

The writer commits whole `submit()` calls: a run of calls is cut only between
calls, and one call is split across transactions only when it alone exceeds
the limits (`split`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from supervisor_service.core import Change
from supervisor_service.store.codec import Encoding

OP_OVERHEAD_BYTES = 16  # per operation of a transaction, beyond its key and value (etcd request framing)


def txn_bytes(puts: dict[str, bytes], deletes: set[str]) -> int:
    """What a transaction of these puts and deletes weighs against a backend's `max_bytes`."""
    return (sum(len(k) + len(v) for k, v in puts.items()) + sum(len(k) for k in deletes)
            + OP_OVERHEAD_BYTES * (len(puts) + len(deletes)))


def fits(puts: dict[str, bytes], deletes: set[str], max_ops: int | None, max_bytes: int | None) -> bool:
    if max_ops is not None and len(puts) + len(deletes) > max_ops:
        return False
    return max_bytes is None or txn_bytes(puts, deletes) <= max_bytes


def longest_head(
    calls: Sequence[Sequence[Change]],
    encode: Callable[[Sequence[Sequence[Change]]], Encoding],
    max_ops: int | None,
    max_bytes: int | None,
) -> tuple[int, Encoding]:
    """How many of the first `calls` fit one transaction together (at least one), and their encoding."""
    if max_ops is not None:
        # Every call with changes writes at least one key: no more of them fit.
        nonempty, limit = 0, len(calls)
        for i, changes in enumerate(calls):
            nonempty += bool(changes)
            if nonempty > max_ops:
                limit = i
                break
        calls = calls[:limit]
    encoding = encode(calls)
    if fits(encoding.puts, encoding.deletes, max_ops, max_bytes):
        return len(calls), encoding
    # Binary search for the longest head that fits (size grows with the calls taken).
    lo, hi = 1, len(calls) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        head = encode(calls[:mid])
        if fits(head.puts, head.deletes, max_ops, max_bytes):
            lo = mid
        else:
            hi = mid - 1
    return lo, encode(calls[:lo])


def split(
    puts: dict[str, bytes], deletes: set[str], max_ops: int | None, max_bytes: int | None
) -> list[tuple[dict[str, bytes], set[str]]]:
    """Puts and deletes cut into transactions within the limits (deletes first, in key order)."""
    chunks: list[tuple[dict[str, bytes], set[str]]] = [({}, set())]
    size = 0
    ops: list[tuple[str, bytes | None]] = [(k, None) for k in sorted(deletes)] + sorted(puts.items())
    for key, value in ops:
        op_size = len(key) + (len(value) if value is not None else 0) + OP_OVERHEAD_BYTES
        chunk_puts, chunk_deletes = chunks[-1]
        n = len(chunk_puts) + len(chunk_deletes)
        if n and ((max_ops is not None and n >= max_ops) or (max_bytes is not None and size + op_size > max_bytes)):
            chunks.append(({}, set()))
            chunk_puts, chunk_deletes = chunks[-1]
            size = 0
        if value is None:
            chunk_deletes.add(key)
        else:
            chunk_puts[key] = value
        size += op_size
    return chunks
