"""Durable state: key-value backends (memory, SQLite, etcd, PostgreSQL), the codec, the group-commit writer (docs/design.md §6).

Modules: `kv` (the backend contract, its errors, the memory backend), `sqlite`,
`etcd`, `postgres` (backends), `open` (the backend a setting names), `codec` (changes to
keys and back, pure), `txn` (fitting writes into a backend's transactions),
`pending` (the bounded queue of writes), `health` (failing, gone, reported),
`writer` (`StateStore`: the thread that commits).
"""

from supervisor_service.store.codec import (
    Encoding,
    Mirror,
    decode_maintenance,
    decode_state,
    encode,
)
from supervisor_service.store.etcd import (
    EtcdKV,
)
from supervisor_service.store.health import (
    StoreMetrics,
)
from supervisor_service.store.kv import (
    KV,
    FencedOut,
    MemoryKV,
    StoreError,
    StoreGone,
)
from supervisor_service.store.open import (
    is_postgres,
    open_kv,
    parse_endpoints,
)
from supervisor_service.store.postgres import (
    PostgresKV,
    redact,
)
from supervisor_service.store.sqlite import (
    SqliteKV,
)
from supervisor_service.store.writer import (
    MAX_PENDING_WRITES,
    StateStore,
)

__all__ = [
    "Encoding",
    "EtcdKV",
    "FencedOut",
    "KV",
    "MAX_PENDING_WRITES",
    "MemoryKV",
    "Mirror",
    "PostgresKV",
    "SqliteKV",
    "StateStore",
    "StoreError",
    "StoreGone",
    "StoreMetrics",
    "decode_maintenance",
    "decode_state",
    "encode",
    "is_postgres",
    "open_kv",
    "parse_endpoints",
    "redact",
]
