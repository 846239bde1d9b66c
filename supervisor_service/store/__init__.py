"""Durable state: key-value backends (memory, SQLite, etcd), the codec, the group-commit writer (docs/design.md §6)."""

from supervisor_service.store.codec import (
    decode_maintenance,
    decode_state,
)
from supervisor_service.store.etcd import (
    EtcdKV,
)
from supervisor_service.store.kv import (
    KV,
    FencedOut,
    MemoryKV,
    StoreError,
    StoreGone,
)
from supervisor_service.store.open import (
    open_kv,
    parse_endpoints,
)
from supervisor_service.store.sqlite import (
    SqliteKV,
)
from supervisor_service.store.writer import (
    StateStore,
)

__all__ = [
    "EtcdKV",
    "FencedOut",
    "KV",
    "MemoryKV",
    "SqliteKV",
    "StateStore",
    "StoreError",
    "StoreGone",
    "decode_maintenance",
    "decode_state",
    "open_kv",
    "parse_endpoints",
]
